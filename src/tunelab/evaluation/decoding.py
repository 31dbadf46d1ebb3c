"""One decoding loop for evaluation (``tunelab.evaluation.scoring.generate``) and serving (``tunelab.serve``).

Greedy tokens are those of ``model.generate`` on the same prompts (left padding, positions from the
attention mask, the KV cache, the LM head on the last position only); what changes is the work:

- Rows leave the batch as they finish (EOS, their token budget, a stop string): their cache rows go.
- Prefill in sub-batches, decode together. A decoding step reads every weight once whatever the
  batch, so on CPU a step of 32 rows costs ~1.4x a step of 8 (SmolLM2-135M, bf16): the prompts are
  prefilled ``prefill_rows`` at a time (length-sorted: little padding, and the activation peak of
  the caller's batch size), their caches left-padded to one width and stacked, and up to
  ``MAX_ROWS`` rows (within ``KV_BUDGET`` bytes of cache) decode as one batch.
- The KV cache has room: each layer's keys and values live in a buffer preallocated for the
  whole decode, so a step writes one column instead of re-concatenating the cache (``_Room``).
- A prefix every prompt shares (a chat template's system prompt) runs once at batch 1 and its
  keys and values are repeated per row (``tunelab.models.lm_loss`` does the same for scoring).
- The caller holds matmul-only weights in the autocast dtype for the call (``shadow.cast_weights``).

Stacking sub-batches and the shared prefix need a model whose output at a position depends on the
tokens up to it and nothing else, with a plain ``DynamicCache``: ``prefix_cache.hook_free`` models (the
LoRA family, full, random masking). Methods with hooks (ReFT, prompt tuning, adapters) and models
with sliding-window or other cache layers decode each prefill batch on its own, which is
``model.generate``'s batching with rows leaving early. Encoder-decoders and beam search are not
handled here (``supported``): the caller keeps ``model.generate`` for them.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tunelab.methods.base import context
from tunelab.models import prefix_cache

MAX_ROWS = 64  # rows decoded together at most
KV_BUDGET = 1 << 30  # bytes of KV cache one decode batch may hold

Pick = Callable[[torch.Tensor, list[int]], list[int]]  # (logits (n, V), row indices) -> next tokens
Advance = Callable[[int, int], bool]  # (row index, token) -> whether the row is done


def supported(model) -> bool:
    """Whether ``decode`` can run ``model``: a causal LM taking position ids and ``logits_to_keep``."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params and "logits_to_keep" in params


@functools.cache
def _layer_types():
    """(transformers' DynamicLayer, our subclass of it with preallocated room)."""
    from transformers.cache_utils import DynamicLayer

    class RoomLayer(DynamicLayer):
        """Keys/values are views of buffers with free columns: a step writes its column in place
        (``DynamicLayer.update`` concatenates the whole cache every step)."""

        def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int):
            super().__init__()
            self.device, self.is_initialized = kbuf.device, True
            self.kbuf, self.vbuf, self.n = kbuf, vbuf, n
            self._view()

        def _view(self) -> None:
            self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]

        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.n, key_states.shape[-2]
            if n + m > self.kbuf.shape[-2]:  # out of room (not expected: the room is the token budget)
                self.kbuf, self.vbuf = (F.pad(b, (0, 0, 0, max(m, b.shape[-2]))) for b in (self.kbuf, self.vbuf))
            self.kbuf[:, :, n : n + m] = key_states
            self.vbuf[:, :, n : n + m] = value_states
            self.n = n + m
            self._view()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
            self._view()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.kbuf, self.vbuf = self.kbuf.repeat_interleave(repeats, 0), self.vbuf.repeat_interleave(repeats, 0)
            self._view()

    return DynamicLayer, RoomLayer


def _plain(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(lay) is _layer_types()[0] for lay in layers)


def _stack(parts: list[tuple], room: int):
    """One cache with ``room`` free columns, its mask and last positions, from prefilled sub-batches
    (cache, mask, positions) left-padded to the widest (the padding is masked; its keys are zeros).
    A single part keeps its own cache width (prompt tuning's holds virtual columns the mask lacks)."""
    room_layer = _layer_types()[1]
    cache = parts[0][0]
    widths = [c.layers[0].keys.shape[-2] for c, _, _ in parts]
    width = max(widths)
    rows = sum(m.shape[0] for _, m, _ in parts)
    for li, lay in enumerate(cache.layers):
        k, v = lay.keys, lay.values
        kbuf = k.new_zeros(rows, k.shape[1], width + room, k.shape[3])
        vbuf = v.new_zeros(rows, v.shape[1], width + room, v.shape[3])
        r = 0
        for (c, m, _), w in zip(parts, widths, strict=True):
            kbuf[r : r + m.shape[0], :, width - w : width] = c.layers[li].keys
            vbuf[r : r + m.shape[0], :, width - w : width] = c.layers[li].values
            r += m.shape[0]
        cache.layers[li] = room_layer(kbuf, vbuf, width)
    if len(parts) == 1:
        return cache, parts[0][1], parts[0][2]
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m, _ in parts])
    return cache, mask, torch.cat([p for _, _, p in parts])


def _kv_bytes(cache) -> int:
    return sum(lay.keys.numel() * lay.keys.element_size() + lay.values.numel() * lay.values.element_size()
               for lay in cache.layers)


class Decoder:
    """Decode lists of prompt ids with ``model`` (see the module docstring)."""

    def __init__(self, model, pad_id: int, *, prefix: bool = True):
        self.model, self.pad = model, pad_id
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.stackable = prefix_cache.hook_free(model)
        self.prefix = prefix and self.stackable
        self.stats = {"prefill_batches": 0, "decode_batches": 0, "steps": 0, "prefix": 0}

    def _forward(self, ids, mask, pos, cache=None):
        kw = {self.cache_key: cache} if cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1], getattr(out, self.cache_key, None) or out.past_key_values

    def _pad(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r, dtype=torch.long), 1
        return ids.to(self.device), mask.to(self.device)

    def _prefill(self, rows: list[list[int]], pre):
        """(last logits, cache, full mask, last positions) of left-padded ``rows`` after the shared
        prefix ``pre`` = (its cache, its length) when given."""
        self.stats["prefill_batches"] += 1
        if pre is None:
            ids, mask = self._pad(rows)
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            context(self.model)["prompt_mask"] = mask.bool()  # ReFT / prompt tuning see the prompt positions
            try:
                logits, cache = self._forward(ids, mask, pos)
            finally:
                context(self.model).pop("prompt_mask", None)
            return logits, cache, mask, pos[:, -1:]
        pcache, p = pre
        ids, mask = self._pad([r[p:] for r in rows])
        cache = copy.deepcopy(pcache)
        cache.batch_repeat_interleave(len(rows))
        pos = p + (mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([mask.new_ones(len(rows), p), mask], 1)
        logits, cache = self._forward(ids, mask, pos, cache)
        return logits, cache, mask, pos[:, -1:]

    def _shared(self, prompts: list[list[int]]):
        p = prefix_cache.shared_prefix(prompts, keep_last=1) if self.prefix else 0
        if p < prefix_cache.MIN_PREFIX:
            return None
        ids = torch.tensor([prompts[0][:p]], device=self.device)
        _, cache = self._forward(ids, torch.ones_like(ids), torch.arange(p, device=self.device)[None])
        if not _plain(cache):
            return None
        self.stats["prefix"] = p
        return cache, p

    @torch.no_grad()
    def run(self, prompts: list[list[int]], pick: Pick, advance: Advance, *, room: int, prefill_rows: int) -> None:
        """Decode every prompt (a row is its index in ``prompts``; prefilled in that order,
        ``prefill_rows`` at a time) until ``advance`` says it is done, at most ``room`` tokens."""
        if not prompts:
            return
        pre = self._shared(prompts)
        group: list[int] = []
        parts: list[tuple] = []
        bpt = 0.0  # cache bytes per row and column
        for s in range(0, len(prompts), prefill_rows):
            chunk = list(range(s, min(s + prefill_rows, len(prompts))))
            if parts and not self._fits(len(group) + len(chunk), parts, bpt, room):
                self._decode(group, parts, pick, advance, room)
                group, parts = [], []
            logits, cache, mask, pos = self._prefill([prompts[i] for i in chunk], pre)
            toks = pick(logits, chunk)
            keep = [j for j, (i, t) in enumerate(zip(chunk, toks, strict=True)) if not advance(i, t)]
            if not keep:
                continue
            sel = torch.tensor(keep, device=self.device)
            if len(keep) < len(chunk):
                cache.batch_select_indices(sel)
            toks = torch.tensor(toks, device=self.device)
            parts.append((cache, mask[sel], pos[sel], toks[sel]))
            group += [chunk[j] for j in keep]
            if self.stackable and _plain(cache):
                bpt = _kv_bytes(cache) / parts[-1][1].numel()
            else:  # not stackable: this batch decodes on its own
                self._decode(group, parts, pick, advance, room)
                group, parts = [], []
        if parts:
            self._decode(group, parts, pick, advance, room)

    @staticmethod
    def _fits(rows: int, parts: list[tuple], bpt: float, room: int) -> bool:
        width = max(p[1].shape[1] for p in parts)
        return rows <= MAX_ROWS and rows * (width + room) * bpt <= KV_BUDGET

    def _decode(self, active: list[int], parts: list[tuple], pick: Pick, advance: Advance, room: int) -> None:
        self.stats["decode_batches"] += 1
        if _plain(parts[0][0]):
            cache, mask, pos = _stack([p[:3] for p in parts], room)
            toks = torch.cat([p[3] for p in parts])
        else:
            (cache, mask, pos, toks), = parts
        for _ in range(room - 1):
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
            pos = pos + 1
            logits, cache = self._forward(toks[:, None], mask, pos, cache)
            self.stats["steps"] += 1
            nxt = pick(logits, active)
            keep = [j for j, (i, t) in enumerate(zip(active, nxt, strict=True)) if not advance(i, t)]
            if not keep:
                return
            toks = torch.tensor(nxt, device=self.device)
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, pos, toks = mask[sel], pos[sel], toks[sel]
                active = [active[j] for j in keep]


# ---------------------------------------------------------------- choosing tokens, finishing rows
def choose(logits: torch.Tensor, settings: list[tuple]) -> list[int]:
    """The next token of each row: argmax at temperature 0, else a draw at ``settings[row]`` =
    (temperature, top_p, top_k, generator): logits / temperature, then the top_k best (0: all),
    then the smallest set whose probability reaches top_p (always the best token)."""
    out = logits.argmax(-1).tolist()
    for i, (t, p, k, gen) in enumerate(settings):
        if t <= 0:
            continue
        x = logits[i].float() / t
        if 0 < k < x.shape[-1]:
            x = x.masked_fill(x < x.topk(k).values[-1], float("-inf"))
        probs = torch.softmax(x, -1)
        if p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(-1) - sp < p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out


def settled_cut(text: str, stops: list[str]) -> int | None:
    """Where ``text`` ends before its first stop string, once no later text can move that point
    (no stop string that starts earlier is still incomplete at the end); None until then."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return None
    cut = min(hits)
    for s in stops:
        for j in range(max(0, len(text) - len(s) + 1), cut):
            if s.startswith(text[j:]):
                return None
    return cut


# Generation-config settings that change which token ``model.generate`` picks (besides temperature,
# top_p and top_k): a model that sets any of them keeps ``model.generate``.
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "min_length": 0, "min_new_tokens": None, "sequence_bias": None, "encoder_repetition_penalty": 1.0,
               "exponential_decay_length_penalty": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
               "min_p": None, "guidance_scale": None, "watermarking_config": None, "stop_strings": None,
               "renormalize_logits": False, "remove_invalid_values": False}


def plain_generation(model) -> bool:
    """Whether ``model.generate``'s choice of tokens is ours: no logits processors from its config."""
    gc = getattr(model, "generation_config", None)
    return gc is None or all(getattr(gc, k, d) in (None, d) for k, d in _PROCESSORS.items())


@torch.no_grad()
def complete(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int, eos: set[int],
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, stop: list[str] | None = None,
             on_row: Callable[[], None] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (EOS excluded), in input order: greedy, or sampled at
    ``temperature``/``top_p``/``top_k`` from ``generator``. Rows are prefilled longest first,
    ``batch_size`` at a time. A row with ``stop`` strings ends once its decoded text has a settled
    cut (``settled_cut``) that one more token left unchanged, so cutting the text at the first stop
    string gives what the full ``max_new_tokens`` would. ``on_row`` is called as each row ends."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = [prompts[i] for i in order]
    toks: list[list[int]] = [[] for _ in rows]
    seen: dict[int, str] = {}  # the text at the previous token, of rows whose stop string showed up
    stops = [s for s in stop or [] if s]
    setting = (temperature if do_sample else 0.0, top_p, top_k, generator)

    def pick(logits, active):
        return choose(logits, [setting] * len(active))

    def done(i: int) -> bool:
        if on_row:
            on_row()
        return True

    def advance(i: int, t: int) -> bool:
        if t in eos:
            return done(i)
        toks[i].append(t)
        if len(toks[i]) >= max_new_tokens:
            return done(i)
        if stops:
            text = tokenizer.decode(toks[i], skip_special_tokens=True)
            cut = settled_cut(text, stops)
            if cut is not None and i in seen and seen[i] == text[:cut]:
                return done(i)
            if cut is not None:
                seen[i] = text[:cut]
        return False

    if max_new_tokens > 0:
        Decoder(model, tokenizer.pad_token_id).run(rows, pick, advance, room=max_new_tokens, prefill_rows=batch_size)
    out: list[list[int]] = [[] for _ in prompts]
    for k, i in enumerate(order):
        out[i] = toks[k]
    return out
