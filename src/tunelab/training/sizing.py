"""Size a run before launching it: train tokens/s, peak memory and model FLOP utilisation (MFU).

``bench(cfg)`` runs the real training loop (``tunelab.training.loop._train``) for ``warmup + steps``
optimizer steps on the config's model, method, data and batch shape, and times evaluation on
``eval_examples`` examples of its eval set. Used by ``tunelab bench CONFIG [overrides]`` and as the
tunelab half of ``bench/run.py`` (which runs the reference implementations beside it).

Figures:
- tokens/s: non-pad tokens of a step / its wall time (data collation included), median over the
  steps after the warm-up (by default one pass over the same batches, so that kernels built per
  new shape are not timed); the spread is the min..max of those steps.
- peak memory: RSS high-water mark on CPU (whole process, weights included), max allocated on CUDA.
- MFU: model FLOPs / time / the matmul peak measured on this machine in the compute dtype.
  Model FLOPs count the work the step needs, whoever does it: per token 2 N forward and 2 N backward
  through the body's matmul weights N, 2 N_t more for the weight gradients of those that train,
  6 per adapter parameter, attention 6 L d len per token (fwd + bwd, causal, L layers), and the LM
  head (2 V d per pass) only at the positions that carry loss. Padding and logits nobody reads do
  not count, so an implementation that computes them shows a lower MFU for the same work.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import tunelab
from tunelab.config import RunConfig
from tunelab.data.encoding import Collator, batches
from tunelab.runtime.precision import peak_memory_mb

IGNORE = -100


# ---------------------------------------------------------------- the machine
def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` over ~``seconds`` of repeats."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best


# ---------------------------------------------------------------- FLOPs
def _leaf_linears(model: nn.Module):
    """Modules that hold one matmul weight: have in/out features and no child that does."""
    for mod in model.modules():
        if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            if not any(hasattr(c, "in_features") for c in mod.children()):
                yield mod


def _trains(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and w.requires_grad


def matmul_counts(model: nn.Module) -> dict:
    """Matmul parameters of ``model``: body (frozen / trained), LM head, adapter parameters, and
    the attention width, layer count and whether gradients flow through the body."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    frozen = trained = head_n = 0
    head_trains = False
    in_linears: set[int] = set()
    for mod in _leaf_linears(model):
        n = mod.in_features * mod.out_features
        in_linears.update(id(p) for p in mod.parameters())
        if mod is head:
            head_n, head_trains = n, _trains(mod)
        elif _trains(mod):
            trained += n
        else:
            frozen += n
    embeds = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in in_linears | embeds)
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads, hd = getattr(cfg, "num_attention_heads", 0) or 0, getattr(cfg, "head_dim", None)
    width = heads * hd if heads and hd else getattr(cfg, "hidden_size", 0) or 0
    grad = any(p.requires_grad for p in model.parameters())
    return {"body_frozen": frozen, "body_trained": trained, "head": head_n, "head_trains": head_trains,
            "adapters": adapters, "layers": layers, "attn_width": width, "grad": grad}


def batch_shape(batch: dict, pad_id: int) -> dict:
    """Non-pad tokens, loss positions (shifted targets) and the sum of squared row lengths."""
    mask = batch["attention_mask"]
    rows = mask.sum(-1) if mask.dim() == 2 else (batch["input_ids"] != pad_id).sum(-1)
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or labels.dtype.is_floating_point:
        positions = int(rows.numel())  # a sequence head: one read per row
    else:
        positions = int((labels[:, 1:] != IGNORE).sum())
    return {"tokens": int(rows.sum()), "loss_positions": positions, "sq_len": int((rows.float() ** 2).sum())}


def train_flops(c: dict, shape: dict) -> float:
    body, t, p = c["body_frozen"] + c["body_trained"], shape["tokens"], shape["loss_positions"]
    passes = 2 if c["grad"] else 1  # forward, plus the input-gradient pass when anything trains
    f = 2 * body * t * passes + 2 * c["body_trained"] * t
    f += 2 * c["head"] * p * passes + (2 * c["head"] * p if c["head_trains"] else 0)
    f += 6 * c["adapters"] * t
    f += 2 * (1 + passes) * c["layers"] * c["attn_width"] * shape["sq_len"]  # QK^T and AV, causal
    return float(f)


def eval_flops(c: dict, tokens: int, reads: int, sq_len: int) -> float:
    body = c["body_frozen"] + c["body_trained"]
    return float(2 * body * tokens + 2 * c["head"] * reads + 2 * c["adapters"] * tokens
                 + 2 * c["layers"] * c["attn_width"] * sq_len)


# ---------------------------------------------------------------- the loop's batches
def loop_batches(r, cfg: RunConfig, epoch: int = 0) -> list[dict]:
    """The batches the training loop draws in ``epoch``, in its order (as ``train._train`` builds them:
    the same features, so a task whose documents give several pieces, such as ``text``, gets them all)."""
    from tunelab.data import feature_cache

    feats = feature_cache.features(r.task, r.train_ex, r.tok, r.tcfg, cfg.data.max_length, pack=cfg.data.pack,
                              desc="tokenizing train", num_proc=cfg.data.num_proc)
    order = batches(feats.lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch,
                    group_by_length=cfg.data.group_by_length)
    collate = Collator(r.tok.pad_token_id)
    return [collate([feats[i] for i in idx]) for idx in order]


def bench_config(cfg: RunConfig, steps: int, warmup: int, out_dir: str) -> RunConfig:
    """``cfg`` trimmed to a timing run: an epoch of ``steps`` batches, ``warmup + steps`` steps, no
    evaluation, no resume, a log line per step."""
    n = warmup + steps
    rows = cfg.train.batch_size * cfg.train.grad_accum * steps
    data = cfg.data.model_copy(update={"max_train": min(cfg.data.max_train or rows, rows), "eval": None, "eval_split": None})
    train = cfg.train.model_copy(update={"max_steps": n, "log_every": 1, "progress": False, "resume": False,
                                         "save_every": 0, "eval_every": 0})
    ev = cfg.eval.model_copy(update={"before": False, "every_steps": 0})
    return cfg.model_copy(update={"data": data, "train": train, "eval": ev, "output_dir": out_dir})


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ---------------------------------------------------------------- the benchmarks
def bench_train(cfg: RunConfig, *, steps: int = 8, warmup: int | None = None, peak_flops: float | None = None) -> dict:
    """Train ``warmup + steps`` steps with the real loop; tokens/s, peak memory and MFU.

    The data is one epoch of ``steps`` batches; the default warm-up is that whole epoch, so the
    timed steps (epoch 2, the same batch shapes) are free of first-use costs (oneDNN builds its
    kernels per new shape: ~0.2-1 s each on CPU), which a long run pays once per distinct length.
    The first epoch's speed is reported as ``first_pass_tokens_per_s``."""
    warmup = steps if warmup is None else warmup
    from tunelab.training.loop import Run, _train, seed_all

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        bc = bench_config(cfg, steps, warmup, tmp)
        seed_all(bc.train.seed)
        r = Run(bc)
        if not r.train_ex:
            raise ValueError("bench needs training data: set data.train")
        model = tunelab.attach(r.model, bc.method.name, **bc.method.params())
        if r.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(r.device)
        stats = _train(r, model, Path(tmp), True)
        peak = peak_memory_mb(r.device)
        log = [json.loads(ln) for ln in (Path(tmp) / "log.jsonl").read_text().splitlines() if ln.strip()]
        steps_log = [rec for rec in log if "tokens_per_s" in rec]
        counts = matmul_counts(model)
        planned = loop_batches(r, bc, 0)
        for e in range(1, -(-(warmup + steps) // max(1, len(planned)))):
            planned += loop_batches(r, bc, e)
    times, tok_s, flops, first = [], [], [], []
    prev = 0.0
    for i, rec in enumerate(steps_log):
        dt = rec["elapsed_s"] - prev
        prev = rec["elapsed_s"]
        if i < warmup:
            first.append(rec["tokens_per_s"])
            continue
        times.append(dt)
        tok_s.append(rec["tokens_per_s"])
        if bc.train.grad_accum == 1 and i < len(planned):
            flops.append(train_flops(counts, batch_shape(planned[i], r.tok.pad_token_id)) / dt)
    res = {
        "impl": "tunelab", "kind": "train", "method": bc.method.name, "model": bc.model.name,
        "device": str(r.device), "precision": str(r.amp).replace("torch.", "") if r.amp else "float32",
        "batch_size": bc.train.batch_size, "max_length": bc.data.max_length, "steps": len(times),
        "tokens_per_s": summarize(tok_s), "step_s": summarize(times), "peak_memory_mb": peak,
        "mean_loss": statistics.mean(rec["loss"] for rec in steps_log), "threads": torch.get_num_threads(),
        "first_pass_tokens_per_s": summarize(first) if first else None,
        "trainable_params": tunelab.trainable_parameters(model)["trainable"],
        "held_weights_mb": stats.get("held_weights_mb"),  # frozen weights kept in bf16 (tunelab.runtime.precision)
    }
    if flops:
        peak_flops = peak_flops or matmul_peak(r.device, r.amp or torch.float32)
        res["matmul_peak_tflops"] = peak_flops / 1e12
        res["mfu"] = summarize([f / peak_flops for f in flops])
    return res


def bench_eval(cfg: RunConfig, *, max_examples: int | None = None, peak_flops: float | None = None) -> dict:
    """Time the task's evaluation (scoring or generation) on the eval set, with the method attached."""
    from tunelab.training.loop import Run, seed_all

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = cfg.data.model_copy(update={"train": None, "max_eval": max_examples or cfg.data.max_eval})
    bc = cfg.model_copy(update={"data": data})
    if not bc.data.eval:
        raise ValueError("bench needs evaluation data for the eval timing: set data.eval")
    seed_all(bc.train.seed)
    r = Run(bc)
    tunelab.attach(r.model, bc.method.name, **bc.method.params())
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(r.device)
        torch.cuda.synchronize()
    t = time.perf_counter()
    metrics, _ = r.evaluate()
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n = len(r.eval_ex)
    return {"impl": "tunelab", "kind": "eval", "task": bc.task.name, "method": bc.method.name, "device": str(r.device),
            "precision": str(r.amp).replace("torch.", "") if r.amp else "float32", "batch_size": bc.eval.batch_size,
            "examples": n, "seconds": dt, "examples_per_s": n / dt, "peak_memory_mb": peak_memory_mb(r.device),
            "metrics": metrics, "threads": torch.get_num_threads(),
            "matmul_peak_tflops": (peak_flops or matmul_peak(r.device, r.amp or torch.float32)) / 1e12}


def bench(cfg: RunConfig, *, steps: int = 8, warmup: int | None = None, eval_examples: int | None = 256) -> dict:
    """What ``tunelab bench`` prints: training speed and memory of ``cfg`` (and its evaluation's
    speed when it has eval data and ``eval_examples`` is not 0)."""
    out = {"train": bench_train(cfg, steps=steps, warmup=warmup)} if cfg.data.train else {}
    if cfg.data.eval and eval_examples != 0:
        out["eval"] = bench_eval(cfg, max_examples=eval_examples)
    return out


def format_result(res: dict) -> str:
    lines = []
    if "train" in res:
        t = res["train"]
        tok, step = t["tokens_per_s"], t["step_s"]
        mfu = f", MFU {100 * t['mfu']['median']:.1f}% of {t['matmul_peak_tflops']:.2f} TFLOP/s" if "mfu" in t else ""
        lines.append(
            f"train {t['method']} on {t['model']} ({t['device']}, {t['precision']}, batch {t['batch_size']}, "
            f"{t['threads']} threads): {tok['median']:,.0f} tokens/s (min {tok['min']:,.0f}, max {tok['max']:,.0f}; "
            f"{step['median']:.2f} s/step over {tok['n']} steps), peak memory {t['peak_memory_mb']:,.0f} MB{mfu}"
        )
    if "eval" in res:
        e = res["eval"]
        lines.append(f"eval {e['task']}: {e['examples']} examples in {e['seconds']:.1f} s "
                     f"({e['examples_per_s']:.1f}/s, batch {e['batch_size']}), peak memory {e['peak_memory_mb']:,.0f} MB")
    return "\n".join(lines)
