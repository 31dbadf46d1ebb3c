"""Evaluation forwards that give the plain forward's scores with less work.

- ``inference(model)``: eval mode and no autograd for the block, and every matmul-only weight held
  in the autocast dtype once (``tunelab.runtime.precision.cast_weights``) instead of re-cast in each forward;
  bit-identical to autocast's own casts. The copies (2 bytes per weight: ~2 GB for a 1B model kept
  in fp32) are made only while they fit in a quarter of the memory free at the start of the block
  (``copies_fit``); otherwise autocast casts per forward as without the lever, slower but within
  the memory the plain path needs, with the same results.
- ``shared_casts()`` (part of ``inference`` unless ``shared=False``): a linear's fp32 input is cast
  to the autocast dtype once however many linears read it. Autocast casts every linear's input anew:
  in a Llama block the fp32 RMSNorm outputs are cast for q, k and v and for gate and up, and with
  LoRA again for each adapter's A (10 casts per layer where 2 do); a BERT block's LayerNorm output is
  cast for q, k and v (4 casts per layer where 2 do).
  The shared cast is the tensor autocast would make (``x.to(dtype)``, round to nearest), so the
  results are bit-identical.
- ``packed_choices``: multi-token choice scoring with each prompt run once. A row holds a prompt
  followed by all its choices; a 4-D attention mask lets each choice token see the prompt and the
  earlier tokens of its own choice only, and position ids restart after the prompt for every choice,
  so each choice sees exactly what it sees in its own ``prompt + choice`` row. The LM head runs only
  at the positions whose next token is a choice token. Used where that is known to be exact: a
  decoder with SDPA attention, no hooks (no method acting on positions), no sliding window.
- ``first_token_ids`` / ``best_spans``: NER label placement and QA n-best span search in tensors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tunelab.models import prefix_cache
from tunelab.runtime.precision import cast_weights, fits_free, saved_bytes


def active_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast is on with for ``device`` right now (None when it is off)."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class _SharedCasts(TorchFunctionMode):
    """Hands ``F.linear`` its fp32 input already in the autocast dtype, cast once per tensor: the last
    input seen is kept with its cast, and reused while the same tensor (same in-place version) comes
    back. Anything else passes through untouched (autocast then does what it always does)."""

    def __init__(self):
        super().__init__()
        self.src, self.version, self.cast = None, None, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and args and type(args[0]) is torch.Tensor and args[0].dtype == torch.float32:
            x = args[0]
            dtype = active_autocast_dtype(x.device)
            if dtype is not None and dtype != torch.float32:
                if x is not self.src or x._version != self.version or self.cast.dtype != dtype:
                    self.src, self.version, self.cast = x, x._version, x.to(dtype)
                args = (self.cast, *args[1:])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def shared_casts():
    """Within the block each fp32 tensor that linears read under autocast is cast once (see above).

    Costs a Python call per torch call, so it is for forwards over many tokens (scoring, heads, eval
    loss), not for decoding steps, where the casts it saves are small."""
    mode = _SharedCasts()
    try:
        with mode:
            yield
    finally:
        mode.src = mode.cast = None  # the kept tensors go with the block


def copies_fit(model, dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether the copies ``cast_weights`` would hold fit in a quarter of the memory free now (the
    training loop's automatic rule for its held weights, without its fixed cap: these live for one
    evaluation only). An evaluation inside a training run finds the frozen weights held already."""
    if dtype is None or dtype == torch.float32:
        return False
    return fits_free(saved_bytes(model, dtype, frozen_only=False), device)


@contextlib.contextmanager
def inference(model, *, shared: bool = True):
    """Eval mode, ``torch.no_grad``, autocast-dtype weights where they fit (``copies_fit``) and
    (``shared``) each linear input cast once within the block; training mode restored."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    dtype = active_autocast_dtype(dev)
    try:
        with (torch.no_grad(), cast_weights(model, dtype if copies_fit(model, dtype, dev) else None, frozen_only=False),
              shared_casts() if shared else contextlib.nullcontext()):
            yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- choice scoring, prompt once
def packable(model) -> bool:
    cfg = getattr(model, "config", None)
    return (cfg is not None and not getattr(cfg, "is_encoder_decoder", False)
            and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and getattr(cfg, "sliding_window", None) is None
            and prefix_cache.hook_free(model) and prefix_cache.takes_logits_to_keep(model))


def _row(prompt: list[int], choices: list[list[int]]):
    """Tokens, position ids, segment ids (-1 prompt, j choice j) and the positions whose logits score
    each choice token: (position, token, choice)."""
    ids, pos, seg, reads = list(prompt), list(range(len(prompt))), [-1] * len(prompt), []
    for j, c in enumerate(choices):
        start = len(ids)
        for t, tok in enumerate(c):
            reads.append((len(prompt) - 1 if t == 0 else start + t - 1, tok, j))
        ids += c
        pos += range(len(prompt), len(prompt) + len(c))
        seg += [j] * len(c)
    return ids, pos, seg, reads


def _mask(seg: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, 1, Q, prefix + Q) bool: causal, a choice sees the prompt and itself; pads (-2) see only themselves."""
    b, q = seg.shape
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    same = (seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])
    real = (seg != -2)
    m = causal & same & real[:, None, :] & real[:, :, None]
    m |= torch.eye(q, dtype=torch.bool) & ~real[:, :, None]  # a fully masked row would give NaNs
    pre = real[:, :, None].expand(b, q, prefix)
    return torch.cat([pre, m], -1)[:, None]


def packed_choices(model, prompt_ids: list[list[int]], choice_ids: list[list[list[int]]], pad_id: int, device,
                   batch_size: int, bar=None) -> list[list[float]]:
    """Sum log-probabilities of every choice after its prompt, each prompt forwarded once."""
    cut = prefix_cache.shared_prefix(prompt_ids, keep_last=1)
    pre = None
    if cut >= prefix_cache.MIN_PREFIX:
        try:
            pre = prefix_cache.PrefixForward(model, prompt_ids[0][:cut], device)
        except (TypeError, ValueError, AttributeError):
            pre, cut = None, 0
    else:
        cut = 0
    rows = [_row(p[cut:], cs) for p, cs in zip(prompt_ids, choice_ids, strict=True)]
    scores = [[0.0] * len(cs) for cs in choice_ids]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        pos = torch.zeros_like(ids)
        seg = torch.full_like(ids, -2)
        reads = []  # (row, position, token, example, choice)
        for r, i in enumerate(batch):
            t, p, s, rd = rows[i]
            n = len(t)
            ids[r, :n], pos[r, :n], seg[r, :n] = torch.tensor(t), torch.tensor(p) + cut, torch.tensor(s)
            reads += [(r, q, tok, i, j) for q, tok, j in rd]
        if not reads:  # prompts without choices: nothing to score
            continue
        mask = _mask(seg, cut)
        keep = torch.tensor(sorted({q for _, q, _, _, _ in reads}))
        col = {int(q): k for k, q in enumerate(keep)}
        kw = {"logits_to_keep": keep.to(device)}
        if pre is not None:
            import copy

            cache = copy.deepcopy(pre.cache)
            cache.batch_repeat_interleave(len(batch))
            kw[pre.cache_key] = cache
            kw["use_cache"] = True
        else:
            kw["use_cache"] = False
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), **kw).logits
        rr = torch.tensor([x[0] for x in reads], device=device)
        cc = torch.tensor([col[x[1]] for x in reads], device=device)
        tt = torch.tensor([x[2] for x in reads], device=device)
        # log_softmax per read position, in fp32 like the plain path
        lp = F.log_softmax(logits[rr, cc].float(), -1).gather(-1, tt[:, None])[:, 0]
        sums: dict[tuple[int, int], float] = {}
        for (_, _, _, i, j), v in zip(reads, lp.tolist(), strict=True):
            sums[i, j] = sums.get((i, j), 0.0) + v
        for (i, j), v in sums.items():
            scores[i][j] = v
        if bar is not None:
            bar.update(sum(len(choice_ids[i]) for i in batch))
    return scores


# ---------------------------------------------------------------- heads: vectorized post-processing
def best_spans(start: torch.Tensor, end: torch.Tensor, ok: torch.Tensor, lengths: list[int], max_answer_tokens: int,
               n_best: int):
    """Per row of (B, T) start/end logits, its first ``lengths[r]`` tokens, ``ok`` (B, T) marking context
    tokens: (score, first, last) of the best span among the top ``n_best`` starts x ends (both on context
    tokens, last >= first, at most ``max_answer_tokens`` long), or None for a row without a valid span.
    The same candidates, scores and tie-breaking as ``tunelab.tasks.qa.best_span`` (its loop keeps the
    first maximum in start-major top-k order; so does ``argmax`` over the flattened grid)."""
    s_all = start.float().masked_fill(~ok, float("-inf"))
    e_all = end.float().masked_fill(~ok, float("-inf"))
    out = []
    for r, n in enumerate(lengths):
        n_ok = int(ok[r, :n].sum())
        if not n_ok:
            out.append(None)
            continue
        k = min(n_best, n_ok)
        sv, si = s_all[r, :n].topk(k)  # over the window's own tokens, as the loop does
        ev, ei = e_all[r, :n].topk(k)
        span = ei[None, :] - si[:, None]
        valid = (span >= 0) & (span + 1 <= max_answer_tokens)
        if not valid.any():
            out.append(None)
            continue
        total = (sv[:, None] + ev[None, :]).masked_fill(~valid, float("-inf"))
        a, b = divmod(int(total.flatten().argmax()), k)
        out.append((float(total[a, b]), int(si[a]), int(ei[b])))
    return out
