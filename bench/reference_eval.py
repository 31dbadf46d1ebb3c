"""Plain Hugging Face evaluation loops, the reference side of bench/run.py's evaluation rows.

Each one is what a user writes without tunelab: the examples in file order, right padding, batches of
``eval.batch_size``, the plain model under the same autocast, the full output of every forward.

- ``choice_plain``: one row per (prompt, choice), full logits, summed log-probabilities of the choice.
- ``ner_plain``: a token-classification forward per batch of sentences; each word takes its first
  sub-token's argmax (the same alignment as tunelab's, ``NER.align``).
- ``qa_plain``: every window of ``question + context``, the n-best start x end loop per window.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from reference import prepare

from tunelab.config import RunConfig
from tunelab.data.encoding import tokenize_prompt
from tunelab.models.loading import resolve
from tunelab.runtime.precision import autocast, autocast_dtype, pick_device
from tunelab.tasks.qa import best_span, windows
from tunelab.training.sizing import peak_memory_mb


def _pad_right(rows: list[list[int]], pad: int):
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(rows):
        ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return ids, mask


def _result(impl, cfg, device, amp, n, dt, metrics) -> dict:
    return {"impl": impl, "kind": "eval", "task": cfg.task.name, "device": str(device),
            "precision": str(amp).replace("torch.", "") if amp else "float32", "batch_size": cfg.eval.batch_size,
            "examples": n, "seconds": dt, "examples_per_s": n / dt, "peak_memory_mb": peak_memory_mb(device),
            "metrics": metrics, "threads": torch.get_num_threads()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def choice_plain(cfg: RunConfig, max_examples: int | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg, "eval")
    examples = r.eval_ex[:max_examples] if max_examples else r.eval_ex
    model = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name), dtype=torch.float32).to(device).eval()
    sep = " " if r.tcfg.answer_prefix else ""
    pairs = [(i, j) for i, ex in enumerate(examples) for j in range(len(ex["choices"]))]
    scores = [[0.0] * len(ex["choices"]) for ex in examples]
    _sync(device)
    t = time.perf_counter()
    prompts = [tokenize_prompt(r.tok, r.task.prompt(ex, r.tok, r.tcfg) + r.tcfg.answer_prefix) for ex in examples]
    bs = cfg.eval.batch_size
    with torch.no_grad():
        for s in range(0, len(pairs), bs):
            chunk = pairs[s : s + bs]
            cids = [r.tok(sep + examples[i]["choices"][j], add_special_tokens=False)["input_ids"] for i, j in chunk]
            ids, mask = _pad_right([prompts[i] + c for (i, _), c in zip(chunk, cids, strict=True)], r.tok.pad_token_id)
            with autocast(device, amp):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = F.log_softmax(logits.float(), -1)
            for row, ((i, j), c) in enumerate(zip(chunk, cids, strict=True)):
                p = len(prompts[i])
                scores[i][j] = float(logp[row, p - 1 : p - 1 + len(c)].gather(-1, torch.tensor(c, device=device)[:, None]).sum())
    _sync(device)
    dt = time.perf_counter() - t
    correct = sum(ex["choices"][max(range(len(s)), key=s.__getitem__)] == ex["answer"] for ex, s in zip(examples, scores, strict=True))
    return _result("plain-forward", cfg, device, amp, len(examples), dt, {"accuracy": correct / len(examples)})


def _head_model(cls, cfg: RunConfig, device, **kw):
    torch.manual_seed(cfg.train.seed)
    return cls.from_pretrained(resolve(cfg.model.name), dtype=torch.float32, **kw).to(device).eval()


def ner_plain(cfg: RunConfig, max_examples: int | None = None) -> dict:
    from transformers import AutoModelForTokenClassification

    from tunelab.evaluation.metrics import entity_prf

    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg, "eval")
    examples = r.eval_ex[:max_examples] if max_examples else r.eval_ex
    labels = r.tcfg.labels
    model = _head_model(AutoModelForTokenClassification, cfg, device, num_labels=len(labels))
    _sync(device)
    t = time.perf_counter()
    feats = [r.task.align(r.tok, ex["tokens"], None, {}, r.tcfg.eval_max_length) for ex in examples]
    pred, bs = [], cfg.eval.batch_size
    with torch.no_grad():
        for s in range(0, len(feats), bs):
            chunk = feats[s : s + bs]
            ids, mask = _pad_right([f["input_ids"] for f in chunk], r.tok.pad_token_id)
            with autocast(device, amp):
                best = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
            for row, (f, ex) in enumerate(zip(chunk, examples[s : s + bs], strict=True)):
                tags = ["O"] * len(ex["tokens"])
                for pos, w in enumerate(f["words"]):
                    if w is not None:
                        tags[w] = labels[int(best[row, pos])]
                pred.append(tags)
    metrics = entity_prf([ex["tags"] for ex in examples], pred)
    _sync(device)
    dt = time.perf_counter() - t
    return _result("plain-forward", cfg, device, amp, len(examples), dt, {"f1": metrics["f1"]})


def qa_plain(cfg: RunConfig, max_examples: int | None = None) -> dict:
    from transformers import AutoModelForQuestionAnswering

    from tunelab.evaluation.metrics import squad_scores

    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg, "eval")
    examples = r.eval_ex[:max_examples] if max_examples else r.eval_ex
    c = r.tcfg
    model = _head_model(AutoModelForQuestionAnswering, cfg, device)
    _sync(device)
    t = time.perf_counter()
    feats = [(i, w) for i, ex in enumerate(examples) for w in windows(r.tok, ex["question"], ex["context"], c.window, c.stride)]
    best: list = [None] * len(examples)
    bs = cfg.eval.batch_size
    with torch.no_grad():
        for s in range(0, len(feats), bs):
            chunk = feats[s : s + bs]
            ids, mask = _pad_right([w["input_ids"] for _, w in chunk], r.tok.pad_token_id)
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if "token_type_ids" in chunk[0][1]:
                inputs["token_type_ids"] = _pad_right([w["token_type_ids"] for _, w in chunk], 0)[0].to(device)
            with autocast(device, amp):
                out = model(**inputs)
            for row, (i, w) in enumerate(chunk):
                n = len(w["input_ids"])
                span = best_span(out.start_logits[row, :n].cpu(), out.end_logits[row, :n].cpu(), w["offsets"],
                                 c.max_answer_tokens, c.n_best)
                if span is not None and (best[i] is None or span[0] > best[i][0]):
                    best[i] = (span[0], w["offsets"][span[1]][0], w["offsets"][span[2]][1])
    answers = [examples[i]["context"][b[1] : b[2]] if b else "" for i, b in enumerate(best)]
    scores = squad_scores(answers, [ex["answers"] for ex in examples])
    _sync(device)
    dt = time.perf_counter() - t
    return _result("plain-forward", cfg, device, amp, len(examples), dt, {"f1": scores["f1"]})
