"""Matching the training budget of the methods in a comparison: equal steps, wall time or FLOPs.

``steps`` (the default) gives every method the config's own step budget (``train.max_steps``, or
``train.epochs`` over the training rows). The other two modes turn a budget into a step count per
method, measured in a short probe before any run starts, and recorded in ``OUT/budget.json`` so a
resumed comparison keeps exactly the same step counts:

- ``time``: equal training wall time. The probe times ``PROBE_STEPS`` optimizer steps of the real loop
  per method (``tunelab.training.sizing.bench_train``, after a warm-up of the same batches) and gives each method
  ``floor(T / seconds_per_step)`` steps. T is ``compare.time_s`` when set, else what the reference
  method (``compare.budget_ref``, default the first method that trains) needs for the config's step
  budget. Converting to steps keeps each run's learning-rate schedule complete (a wall-clock stop in
  the middle of the loop would cut the schedule short) and runs stay reproducible; the price is that
  the seconds per step are measured once, on a possibly busy machine.
- ``flops``: equal training FLOPs. Per method, FLOPs per step are estimated on the first
  ``PROBE_STEPS`` batches the loop will draw, with ``tunelab.training.sizing.train_flops``: per token 2N for
  the forward pass through the body's matmul weights N, 2N more for the input-gradient pass whenever
  anything trains (gradients must flow back to the earliest trainable parameter), 2 N_t for the weight
  gradients of trained matmuls, 6 per adapter parameter, attention 2·(1+passes)·L·d·len, and the LM
  head only at loss positions. So full fine-tuning costs ~6N per token and a PEFT method ~4N + 6 N_adapter
  (the familiar 6N rule with the weight-gradient term dropped for frozen weights). Every method then
  gets ``floor(F / flops_per_step)`` steps, F = the reference method's steps x its FLOPs per step
  (or ``compare.flops`` when set). Quantized bases (QLoRA, LoftQ) are counted at the matmul FLOPs of
  the dequantized weights.

Runs with ``train.max_steps: 0`` (a zero-shot entry) are left alone in every mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MODES = ("steps", "time", "flops")
PROBE_STEPS = 4
BUDGET_FILE = "budget.json"


def check_mode(mode: str | None) -> str:
    mode = mode or "steps"
    if mode not in MODES:
        raise ValueError(f"unknown budget '{mode}'; choose one of: {', '.join(MODES)} (--budget or compare.budget)")
    return mode


def planned_steps(cfg, n_train: int) -> int:
    """The step budget a config asks for: max_steps, else ceil(epochs x batches per epoch)."""
    tc = cfg.train
    if tc.max_steps is not None:
        return int(tc.max_steps)
    per_epoch = math.ceil(n_train / (tc.batch_size * tc.grad_accum))
    return int(math.ceil(tc.epochs * per_epoch))


def match_steps(cost_per_step: dict[str, float], total: float) -> dict[str, int]:
    """Steps per label so that steps x cost ~= total (at least 1 step each)."""
    out = {}
    for label, cost in cost_per_step.items():
        if not (cost and cost > 0 and math.isfinite(cost)):
            raise ValueError(f"budget probe for '{label}' measured a cost per step of {cost!r}")
        out[label] = max(1, math.floor(total / cost + 1e-9))  # 30 / 0.4 is 74.999...
    return out


def probe_flops(cfg) -> float:
    """Estimated training FLOPs per optimizer step for one method's config."""
    import tunelab
    from tunelab.training import sizing
    from tunelab.training.loop import Run, seed_all

    seed_all(cfg.train.seed)
    r = Run(cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval": None})}))
    if not r.train_ex:
        raise ValueError("budget matching needs training data: set data.train")
    model = tunelab.attach(r.model, cfg.method.name, **cfg.method.params())
    counts = sizing.matmul_counts(model)
    drawn = sizing.loop_batches(r, cfg, 0)[: PROBE_STEPS * cfg.train.grad_accum]
    per_batch = [sizing.train_flops(counts, sizing.batch_shape(b, r.tok.pad_token_id)) for b in drawn]
    return sum(per_batch) / len(per_batch) * cfg.train.grad_accum


def probe_time(cfg) -> float:
    """Median seconds per optimizer step of the real loop for one method's config."""
    from tunelab.training.sizing import bench_train

    return float(bench_train(cfg, steps=PROBE_STEPS, warmup=2)["step_s"]["median"])


def train_rows(cfg) -> int:
    """How many training rows the config reads (for an epoch-based budget)."""
    from tunelab.config import task_config
    from tunelab.tasks import TASKS
    from tunelab.tasks.splits import read_run_data

    tcfg = task_config(cfg.task.name, cfg.task.params())
    return len(read_run_data(TASKS.get(cfg.task.name), tcfg, cfg.data.model_copy(update={"eval": None} if not cfg.data.eval_split else {}))[0])


def plan(mode: str, cfgs: dict, out_dir: Path, *, ref: str | None = None, total: float | None = None,
         probe=None, rows=None) -> dict:
    """Steps per label for ``mode`` (see the module docstring); ``cfgs``: label -> RunConfig of the
    method's first seed. Cached in ``out_dir/budget.json`` (reused when mode and labels match)."""
    mode = check_mode(mode)
    trains = {k: c for k, c in cfgs.items() if c.train.max_steps != 0}
    if mode == "steps" or not trains:
        return {"mode": "steps", "note": "equal optimizer steps: the config's train budget for every method"}
    cache = Path(out_dir) / BUDGET_FILE
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("mode") == mode and set(saved.get("per_label", {})) == set(trains):
            return saved
    ref = ref or next(iter(trains))
    if ref not in trains:
        raise ValueError(f"compare.budget_ref '{ref}' is not a method label that trains; labels: {', '.join(trains)}")
    probe = probe or (probe_time if mode == "time" else probe_flops)
    costs = {label: probe(cfg) for label, cfg in trains.items()}
    unit = "s" if mode == "time" else "FLOPs"
    r = trains[ref]
    ref_steps = planned_steps(r, 0 if r.train.max_steps is not None else (rows or train_rows)(r))
    total = float(total) if total else ref_steps * costs[ref]
    steps = match_steps(costs, total)
    key = "s_per_step" if mode == "time" else "flops_per_step"
    out = {
        "mode": mode,
        "total": total,
        "ref": ref,
        "note": f"equal training {'wall time' if mode == 'time' else 'FLOPs'}: {total:.4g} {unit} per run "
                f"({'set in the config' if total != ref_steps * costs[ref] else f'{ref_steps} steps of {ref}'}), "
                f"converted to steps per method with a {PROBE_STEPS}-step probe",
        "per_label": {k: {"steps": steps[k], key: costs[k]} for k in trains},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2))
    return out
