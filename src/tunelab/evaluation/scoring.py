"""Batched scoring and generation for evaluation.

- ``score_choices``: log-likelihood of each choice continuation after its prompt. Left padding puts
  every continuation at the end of the row, so the LM head runs only on the last few positions
  (``logits_to_keep``); when every choice is a single token, one forward per prompt scores all of them.
  A prefix every row shares (a prompt template) runs once, through the KV cache (``tunelab.models.lm_loss``).
- ``generate``: causal LMs through ``tunelab.evaluation.decoding`` (``model.generate``'s greedy tokens, faster);
  beam search and encoder-decoders through ``model.generate`` in left-padded batches.
- ``classify``: logits of a classification head.
- Encoder-decoder models (``config.is_encoder_decoder``: T5, BART): the prompt is the encoder's
  source (its own special tokens, right-padded: BART's learned positions would move under left
  padding); ``generate`` returns the decoder's tokens only, and ``score_choices`` sums the decoder's
  log-probabilities of each choice given the source (teacher forcing, labels = the choice).

Rows are sorted by length before batching (less padding) and results returned in input order.
Each call shows a progress bar (rows/s, ETA) on the lead process when stderr is a terminal, unless
``show_progress(False)`` (``train.progress: false``) turned it off. Within ``progress_to(sink)`` (the training
loop's evaluations) every call also hands ``sink`` a record ``{"desc", "done", "total", "elapsed_s", "eta_s"}``
every ``every_s`` seconds and at its end, whatever stderr is: the loop writes them to the run's eval_log.jsonl.
Every call records ``prompt_mask`` in the model context, so methods that act on prompt positions
(ReFT) see them during scoring and generation too.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tunelab.data.encoding import IGNORE, tokenize_prompt, tokenize_source
from tunelab.evaluation import inference
from tunelab.methods.base import context
from tunelab.models import prefix_cache
from tunelab.runtime import distributed as dist

_PROGRESS = {"on": True}


_FP32_CHOICES: contextvars.ContextVar = contextvars.ContextVar("fp32_choices", default=False)
_SINK: contextvars.ContextVar = contextvars.ContextVar("progress_sink", default=(None, 0.0))


@contextlib.contextmanager
def choices_fp32(on: bool = True):
    """Within this block ``score_choices`` runs with autocast off (``eval.choices_fp32``): in the weights' own
    dtype, fp32 for a float32 model, so low-precision rounding cannot tie two choices. Generation is unaffected."""
    token = _FP32_CHOICES.set(bool(on))
    try:
        yield
    finally:
        _FP32_CHOICES.reset(token)


def show_progress(on: bool) -> None:
    """Turn the evaluation progress bars on (where stderr is a terminal) or off."""
    _PROGRESS["on"] = bool(on)


@contextlib.contextmanager
def progress_to(sink, every_s: float = 30.0):
    """Within this block, evaluation calls report their progress to ``sink(record)`` (lead process only):
    every ``every_s`` seconds and when a call finishes."""
    token = _SINK.set((sink, every_s))
    try:
        yield
    finally:
        _SINK.reset(token)


class _Progress:
    """A tqdm bar (in a terminal) plus periodic records to the ``progress_to`` sink, with an ETA."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        on = _PROGRESS["on"] and dist.is_lead() and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="row", disable=not on, leave=False, dynamic_ncols=True)
        self.total, self.desc, self.done = total, desc, 0
        sink, self.every = _SINK.get()
        self.sink = sink if dist.is_lead() else None
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        now = time.perf_counter()
        if self.sink is not None and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            self.sink(self.record(now))

    def record(self, now: float) -> dict:
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return {"desc": self.desc, "done": self.done, "total": self.total, "elapsed_s": round(elapsed, 1),
                "eta_s": round(eta, 1) if eta is not None else None}

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str) -> _Progress:
    """A progress reporter for an evaluation pass of ``total`` rows (``update(n)``, ``close()``): the terminal
    bar and the ``progress_to`` records, as the primitives here use; for a family's own batched loop."""
    return _Progress(total, desc)


_bar = progress


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def _score_seq2seq(model, tokenizer, prompts, choice_ids, batch_size) -> list[list[float]]:
    """sum_t log p(choice_t | source, choice_<t) from the decoder, one (source, choice) pair a row."""
    dev, pad = _device(model), tokenizer.pad_token_id
    src = [tokenize_source(tokenizer, p) for p in prompts]
    pairs = [(i, j) for i, cs in enumerate(choice_ids) for j in range(len(cs))]
    scores: list[list[float]] = [[0.0] * len(cs) for cs in choice_ids]
    for batch in _by_length([len(src[i]) for i, _ in pairs], batch_size):
        ids, mask = _pad_right([src[pairs[k][0]] for k in batch], pad, dev)
        targets = [choice_ids[pairs[k][0]][pairs[k][1]] for k in batch]
        labels = torch.full((len(batch), max(map(len, targets))), IGNORE, dtype=torch.long)
        for row, t in enumerate(targets):
            labels[row, : len(t)] = torch.tensor(t)
        labels = labels.to(dev)
        context(model)["prompt_mask"] = mask.bool()
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, labels=labels).logits.float(), -1)
        got = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels == IGNORE, 0).sum(-1)
        for row, k in enumerate(batch):
            scores[pairs[k][0]][pairs[k][1]] = got[row].item()
    return scores


def _choice_ids(tokenizer, choice: str) -> list[int]:
    ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"choice {choice!r} tokenizes to nothing")
    return ids


@dist.spread("prompts", "choices")  # under torchrun each rank scores its share
@torch.no_grad()
def score_choices(model, tokenizer, prompts: list[str], choices: list[list[str]], *, batch_size: int = 16) -> list[list[float]]:
    """Sum log-probability of each ``choices[i][j]`` following ``prompts[i]``."""
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    full = torch.autocast(_device(model).type, enabled=False) if _FP32_CHOICES.get() else contextlib.nullcontext()
    with full, inference.inference(model):  # weights cast once for the whole evaluation, not in every forward
        return _score_choices(model, tokenizer, prompts, choices, batch_size)


def _score_choices(model, tokenizer, prompts, choices, batch_size) -> list[list[float]]:
    dev, pad = _device(model), tokenizer.pad_token_id
    keep = prefix_cache.takes_logits_to_keep(model)
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    choice_ids = [[_choice_ids(tokenizer, c) for c in cs] for cs in choices]
    if _encoder_decoder(model):
        scores = _score_seq2seq(model, tokenizer, prompts, choice_ids, batch_size)
        context(model).pop("prompt_mask", None)
        return scores
    scores: list[list[float]] = [[0.0] * len(cs) for cs in choices]
    single = all(len(c) == 1 for cs in choice_ids for c in cs)
    if single:
        # One forward per prompt: the next-token distribution at the prompt's end scores all choices.
        pre, cut = prefix_cache.prefix_forward(model, prompt_ids, dev)  # a shared template prefix runs once
        bar = _bar(len(prompt_ids), "scoring")
        for batch in _by_length([len(p) for p in prompt_ids], batch_size):
            if pre:
                logits = pre([prompt_ids[i][cut:] for i in batch], pad, 1)
            else:
                ids, mask = _pad_left([prompt_ids[i] for i in batch], pad, dev)
                context(model)["prompt_mask"] = mask.bool()
                logits = model(input_ids=ids, attention_mask=mask, **({"logits_to_keep": 1} if keep else {})).logits
            logp = F.log_softmax(logits[:, -1].float(), dim=-1)
            rows = [row for row, i in enumerate(batch) for _ in choice_ids[i]]  # one gather, one copy out
            toks = [c[0] for i in batch for c in choice_ids[i]]
            got = iter(logp[torch.tensor(rows), torch.tensor(toks)].tolist())
            for i in batch:
                scores[i] = [next(got) for _ in choice_ids[i]]
            bar.update(len(batch))
    elif inference.packable(model):  # each prompt once, all its choices in the same row
        bar = _bar(sum(map(len, choice_ids)), "scoring choices")
        scores = inference.packed_choices(model, prompt_ids, choice_ids, pad, dev, batch_size, bar)
    else:
        pairs = [(i, j) for i, cs in enumerate(choice_ids) for j in range(len(cs))]
        rows = [prompt_ids[i] + choice_ids[i][j] for i, j in pairs]
        pre, cut = prefix_cache.prefix_forward(model, rows, dev, keep_last=1 + max(len(c) for cs in choice_ids for c in cs))
        bar = _bar(len(rows), "scoring choices")
        for batch in _by_length([len(r) for r in rows], batch_size):
            n = max(len(choice_ids[pairs[k][0]][pairs[k][1]]) for k in batch)
            if pre:
                logits = pre([rows[k][cut:] for k in batch], pad, n + 1)
            else:
                ids, mask = _pad_left([rows[k] for k in batch], pad, dev)
                pm = mask.bool().clone()
                for row, k in enumerate(batch):
                    pm[row, ids.shape[1] - len(choice_ids[pairs[k][0]][pairs[k][1]]):] = False
                context(model)["prompt_mask"] = pm
                logits = model(input_ids=ids, attention_mask=mask, **({"logits_to_keep": n + 1} if keep else {})).logits
            logp = F.log_softmax(logits[:, -(n + 1) : -1].float(), dim=-1)  # predicts the last n tokens
            for row, k in enumerate(batch):
                i, j = pairs[k]
                c = torch.tensor(choice_ids[i][j], device=dev)
                lp = logp[row, n - len(c) :].gather(-1, c[:, None]).sum()
                scores[i][j] = lp.item()
            bar.update(len(batch))
    bar.close()
    context(model).pop("prompt_mask", None)
    return scores


@dist.spread("prompts")
@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> list[str]:
    """Continuations of ``prompts`` (special tokens removed, cut at the first ``stop`` string).

    Causal LMs decode through ``tunelab.evaluation.decoding`` (the tokens ``model.generate`` gives, with less
    work; sampling draws from a generator seeded with ``seed``, else torch's global one); beam
    search, encoder-decoders and models whose generation config adds logits processors keep
    ``model.generate``. Weights are held in the autocast dtype for the call (``inference.inference``)."""
    from tunelab.evaluation import decoding

    dev, pad = _device(model), tokenizer.pad_token_id
    enc_dec = _encoder_decoder(model)  # the source goes to the encoder; the output is the decoder's alone
    prompt_ids = [(tokenize_source if enc_dec else tokenize_prompt)(tokenizer, p) for p in prompts]
    outputs = [""] * len(prompts)
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    bar = _bar(len(prompt_ids), "generating")
    ours = num_beams == 1 and decoding.supported(model) and decoding.plain_generation(model)
    with inference.inference(model, shared=False):  # decoding steps: too few tokens for shared casts to pay
        if ours:
            eos = tokenizer.eos_token_id
            eos = eos if eos is not None else getattr(model.generation_config, "eos_token_id", None)
            gen = torch.Generator(device=dev).manual_seed(seed) if do_sample and seed is not None else None
            top_k = getattr(model.generation_config, "top_k", None)
            tokens = decoding.complete(
                model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                eos=set(eos if isinstance(eos, list) else [eos]) - {None}, do_sample=do_sample,
                temperature=temperature, top_p=top_p, top_k=50 if top_k is None else top_k, generator=gen,
                stop=stop, on_row=lambda: bar.update(1),
            )
        for batch in [] if ours else _by_length([len(p) for p in prompt_ids], batch_size):
            ids, mask = (_pad_right if enc_dec else _pad_left)([prompt_ids[i] for i in batch], pad, dev)
            context(model)["prompt_mask"] = mask.bool()
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                num_beams=num_beams, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            for row, i in enumerate(batch):
                outputs[i] = out[row, 0 if enc_dec else ids.shape[1]:]
            bar.update(len(batch))
    for i, toks in enumerate(tokens if ours else outputs):
        text = tokenizer.decode(toks, skip_special_tokens=True)
        for s in stop or []:
            text = text.split(s, 1)[0]
        outputs[i] = text.strip()
    bar.close()
    context(model).pop("prompt_mask", None)
    return outputs


@dist.spread("texts", "pairs")
@torch.no_grad()
def classify(model, tokenizer, texts: list[str], pairs: list[str] | None = None, *, batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Head logits (n, num_labels) for ``texts`` (and optional second segments ``pairs``)."""
    with inference.inference(model):
        return _classify(model, tokenizer, texts, pairs, batch_size, max_length)


def _classify(model, tokenizer, texts, pairs, batch_size, max_length) -> torch.Tensor:
    dev = _device(model)
    lengths = [len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)]
    result: list[torch.Tensor | None] = [None] * len(texts)
    bar = _bar(len(texts), "classifying")
    for batch in _by_length(lengths, batch_size):
        a = [texts[i] for i in batch]
        b = [pairs[i] for i in batch] if pairs else None
        enc = tokenizer(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(dev)
        context(model)["prompt_mask"] = enc["attention_mask"].bool()
        logits = model(**enc).logits.float().cpu()
        for row, i in enumerate(batch):
            result[i] = logits[row]
        bar.update(len(batch))
    bar.close()
    context(model).pop("prompt_mask", None)
    return torch.stack(result)
