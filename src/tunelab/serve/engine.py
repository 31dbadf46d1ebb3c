"""One generation engine for ``tunelab chat`` and ``tunelab serve``: batched, streaming, per-row stopping.

Requests wait in a bounded queue. A worker thread takes the first one, waits up to ``batch_wait_ms``
for more (up to ``max_batch``), and decodes them as one batch through ``tunelab.evaluation.decoding`` (the loop
``tunelab.evaluation.scoring.generate`` uses: left padding, positions from the attention mask, ``prompt_mask``
for the prefill so ReFT and prompt tuning see the prompt positions, a shared prompt prefix once for
hook-free models, a KV cache with room), then one token per step. Each row samples with its own temperature /
top-p (greedy at temperature 0) and stops on its own (EOS, its token budget, a stop string, or its
client going away); finished rows leave the batch (their cache rows are dropped).

Text is streamed as deltas of the decoded continuation. A delta ends before the last whitespace
(decoders may still join or clean up the last word) and holds back any tail that could begin a stop
string, so the streamed pieces always add up to the final text.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from tunelab.data.encoding import tokenize_prompt
from tunelab.evaluation.decoding import Decoder, choose


class QueueFull(RuntimeError):
    """The request queue is at its bound; the caller should retry later."""


@dataclass
class Params:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


class Request:
    """One prompt in flight. Events: ("delta", text), then ("done", finish_reason) or ("error", message)."""

    def __init__(self, prompt_ids: list[int], params: Params, loop: asyncio.AbstractEventLoop | None = None):
        self.prompt_ids, self.params = prompt_ids, params
        self.tokens: list[int] = []
        self.text, self.sent = "", 0  # decoded continuation, and how much of it was streamed
        self.finish_reason: str | None = None
        self.cancelled = False
        self._loop = loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def _emit(self, *event) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._q.put_nowait, event)
        else:
            self._q.put(event)

    def cancel(self) -> None:
        self.cancelled = True

    def events(self):
        """Blocking iterator over the events (for threads)."""
        while True:
            ev = self._q.get()
            yield ev
            if ev[0] != "delta":
                return

    async def aevents(self):
        """The same, for asyncio (the request must have been made with ``loop``)."""
        while True:
            ev = await self._q.get()
            yield ev
            if ev[0] != "delta":
                return

    def result(self) -> str:
        """Wait for the end and return the whole text (raises on an engine error)."""
        for ev in self.events():
            if ev[0] == "error":
                raise RuntimeError(ev[1])
        return self.text


def _sample(logits: torch.Tensor, reqs: list[Request], gens: list[torch.Generator | None]) -> list[int]:
    """The next token of each row: argmax at temperature 0, else top-p sampling at its temperature."""
    return choose(logits, [(r.params.temperature, r.params.top_p, 0, g) for r, g in zip(reqs, gens, strict=True)])


def _stream_cut(text: str, stops: list[str], final: bool) -> int:
    """How much of ``text`` can be streamed now."""
    if final:
        return len(text)
    cut = len(text)
    while cut and text[cut - 1] == "\ufffd":  # an incomplete UTF-8 sequence
        cut -= 1
    for s in stops:  # a tail that may still become a stop string
        for k in range(min(len(s) - 1, cut), 0, -1):
            if text[:cut].endswith(s[:k]):
                cut -= k
                break
    # Up to the last whitespace: the word after it may still change (a cut followed by whitespace is settled).
    return max(0, *(text.rfind(c, 0, cut + 1) for c in " \n\t"))


def check_can_generate(model) -> None:
    """ValueError unless ``model`` is a causal LM that can write text (an encoder such as BERT, a
    classification head or a seq2seq model cannot be chatted with or served)."""
    from tunelab.models import arch

    name = type(model).__name__
    can = getattr(model, "can_generate", None)
    kind = arch.of(model).kind
    if (callable(can) and not can()) or kind != "decoder" or getattr(model, "tunelab_new_head", None):
        why = {"encoder": "an encoder", "seq2seq": "an encoder-decoder model"}.get(kind, "not a causal language model")
        raise ValueError(f"{name} is {why}: it cannot generate text, so it cannot be chatted with or served; "
                         "use a causal LM (or `tunelab predict` for a run with a task head)")


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, batch_wait_ms: float = 5.0, max_queue: int = 64):
        check_can_generate(model)
        self.model, self.tok = model.eval(), tokenizer
        self.max_batch, self.wait_s, self.max_queue = max_batch, batch_wait_ms / 1000, max_queue
        self.device = next(model.parameters()).device
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {i for i in [tokenizer.eos_token_id, *eos] if i is not None}
        self.decoder = Decoder(model, tokenizer.pad_token_id)
        self.context_len = getattr(model.config, "max_position_embeddings", None)
        self._pending: queue.Queue[Request] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0, "tokens": 0, "queued": 0}

    def encode(self, prompt: str) -> list[int]:
        return tokenize_prompt(self.tok, prompt)

    def submit(self, prompt_ids: list[int], params: Params, loop=None) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty (it encodes to no tokens)")
        if params.seed is not None:
            try:  # a seed torch cannot take (2**70) fails here, alone, not in the batch it would join
                torch.Generator().manual_seed(params.seed)
            except (RuntimeError, OverflowError, TypeError, ValueError) as e:
                raise ValueError(f"seed={params.seed} cannot seed a generator ({e})") from None
        if self.context_len and len(prompt_ids) + params.max_tokens > self.context_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} it exceeds "
                             f"the model's context of {self.context_len} tokens")
        req = Request(prompt_ids, params, loop)
        with self._lock:
            if self.stats["queued"] >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.stats["queued"] += 1
        self._pending.put(req)
        self.start()
        return req

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="tunelab-engine", daemon=True)
                self._thread.start()

    def _take(self) -> list[Request]:
        batch = [self._pending.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._pending.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        with self._lock:
            self.stats["queued"] -= len(batch)
        return [r for r in batch if not r.cancelled]

    def _worker(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                continue
            self._run_isolating(batch)

    def _run_isolating(self, batch: list[Request]) -> None:
        """Decode ``batch``; when it fails, the rows that had not produced a token yet are decoded again one
        by one, so one bad request fails alone and the others get their answers (the worker goes on)."""
        try:
            self.run_batch(batch)
        except Exception as e:  # noqa: BLE001
            fresh = [r for r in batch if r.finish_reason is None and not r.tokens and not r.sent]
            for r in batch:
                if r.finish_reason is None and r not in fresh:
                    r.finish_reason = "error"
                    r._emit("error", f"generation failed: {type(e).__name__}: {e}")
            if len(batch) == 1:
                for r in fresh:
                    r.finish_reason = "error"
                    r._emit("error", f"generation failed: {type(e).__name__}: {e}")
                return
            for r in fresh:
                self._run_isolating([r])

    def _advance(self, r: Request, token: int) -> None:
        """Add ``token`` to ``r``; stream what is settled; set ``finish_reason`` when the row is done."""
        if token in self.eos:
            r.finish_reason = "stop"
        else:
            r.tokens.append(token)
            r.text = self.tok.decode(r.tokens, skip_special_tokens=True)
            hits = [i for i in (r.text.find(s) for s in r.params.stop if s) if i >= 0]
            if hits:
                r.text, r.finish_reason = r.text[: min(hits)], "stop"
            elif len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
        if r.cancelled and r.finish_reason is None:
            r.finish_reason = "cancelled"
        cut = _stream_cut(r.text, r.params.stop, r.finish_reason is not None)
        if cut > r.sent:
            r._emit("delta", r.text[r.sent : cut])
            r.sent = cut
        if r.finish_reason is not None:
            r._emit("done", r.finish_reason)

    @torch.no_grad()
    def run_batch(self, reqs: list[Request]) -> None:
        self.stats["requests"] += len(reqs)
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(reqs))
        gens = []
        for r in reqs:
            g = None
            if r.params.seed is not None and r.params.temperature > 0:
                g = torch.Generator(device=self.device).manual_seed(r.params.seed)
            gens.append(g)

        def pick(logits, rows):
            return _sample(logits, [reqs[i] for i in rows], [gens[i] for i in rows])

        def advance(i: int, token: int) -> bool:
            self._advance(reqs[i], token)
            self.stats["tokens"] += 1
            return reqs[i].finish_reason is not None

        room = max(r.params.max_tokens for r in reqs)
        self.decoder.run([r.prompt_ids for r in reqs], pick, advance, room=room, prefill_rows=len(reqs))
