"""Run several methods (``compare``) or a data-size sweep (``scale``) from one config, then report.

Every run shares the config's task, data, step budget and evaluation; only the method (or the swept
factor), the seed, ``data.max_train`` (scale) and ``output_dir`` change. Runs go to
``OUT/runs/<label>-s<seed>`` (compare) or ``OUT/runs/<value>-n<size>-s<seed>`` (scale). A run whose
``metrics.json`` exists is finished and reused, so an interrupted comparison continues where it stopped
(an unfinished run is started again; the training loop resumes it from its own checkpoints). The runs
are trained by ``tunelab.sweeps.runner`` with the ``executor`` given (default: the section's
``executor``/``jobs`` keys, else one after another on the CPU or one run per GPU at once, each in its own
``tunelab train`` process; see ``tunelab.sweeps.executors``).

The sweep may be given in the YAML beside the run config; CLI arguments win over it:

    compare:
      methods: [lora, "lora:r=64", {name: prompt_tuning, label: pt20, length: 20, train: {lr: 0.3}}]
      seeds: [0, 1, 2]
      out_dir: runs/cmp
    scale:
      factor: rank              # model | rank | prompt_length | method | any dotted key (method.r)
      values: [4, 8, 16, 32]
      sizes: [250, 500, 1000, 2000, 4000]
      holdout: 1                # the largest size(s) are held out and predicted

A method entry is a name, ``name:key=value:...``, or a mapping with ``name``, its params, and optional
``label`` and ``train`` (settings merged into the train section for that method only, e.g. its lr).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tunelab.report import build_report
from tunelab.sweeps import lr_search
from tunelab.sweeps.executors import executor_from
from tunelab.sweeps.runner import Executor, PlannedRun, first_configs, run_plan, to_stderr
from tunelab.sweeps.spec import (
    FACTOR_KEYS,
    check_metric,
    method_spec,
    method_specs,
    parse_seeds,
    read_sweep_config,
    set_key,
    slug,
    sweep_out_dir,
    variant,
)

DEFAULT_SIZES = (250, 500, 1000, 2000, 4000)


def method_plan(raw: dict, entries, seeds, out_dir: Path, suffix: str = "") -> tuple[list[str], list[PlannedRun]]:
    specs = method_specs(entries, raw.get("method"))
    labels = [s[0] for s in specs]
    plan = []
    for label, method, train in specs:
        for seed in seeds:
            name = f"{label}{suffix}-s{seed}"
            info = {"run": name, "label": label, "method": method["name"], "seed": seed}
            plan.append(PlannedRun(info, variant(raw, out_dir / "runs" / name, seed, {"method": method, "train": train})))
    return labels, plan


def match_budget(plan: list[PlannedRun], mode: str, out_dir: Path, section: dict, say=to_stderr) -> dict:
    """Set train.max_steps per method so that budgets match by ``mode`` (see tunelab.sweeps.budget)."""
    from tunelab.sweeps import budget as bud

    mode = bud.check_mode(mode)
    if mode == "steps":
        return bud.plan("steps", {}, out_dir)
    say(f"matching budgets by {mode}: probing each method")
    total = section.get("time_s") if mode == "time" else section.get("flops")
    result = bud.plan(mode, first_configs(plan), out_dir, ref=section.get("budget_ref"), total=total)
    for run in plan:
        steps = result["per_label"].get(run.label, {}).get("steps")
        if steps is not None:
            set_key(run.raw, "train.max_steps", int(steps))
    say(f"  {result['note']}: " + ", ".join(f"{k} {v['steps']} steps" for k, v in result["per_label"].items()))
    return result


def compare(
    cfg_path,
    overrides=(),
    methods: list | None = None,
    seeds: list[int] | None = None,
    out_dir=None,
    *,
    metric: str | None = None,
    budget: str | None = None,
    tune: str | None = None,
    keep_going: bool = True,
    say: Callable[[str], None] = to_stderr,
    executor: Executor | str | None = None,
    executor_options: dict | None = None,
) -> Path:
    """Run each method x seed on the config's task, then write the report; returns ``out_dir``.

    ``budget`` (or compare.budget): "steps" (default), "time" or "flops" (see tunelab.sweeps.budget).
    ``tune`` (or compare.tune): "lr" runs a small learning-rate search per method first (tunelab.sweeps.lr_search).
    Seeds default to three: train.seed, +1, +2. ``executor`` trains the runs: an ``Executor``, or "local" / "ray" with ``executor_options``
    (jobs, gpus_per_run, ray_address, storage, retries; see tunelab.sweeps.executors); default: the
    section's ``executor`` keys, else local."""
    from tunelab.report.stats import environment

    raw, sweep = read_sweep_config(cfg_path, overrides)
    section = sweep.get("compare", {})
    check_metric(raw, metric)  # before any run trains
    executor = executor_from(section, executor, **(executor_options or {}))
    entries = methods or section.get("methods")
    if not entries:
        raise ValueError("no methods to compare: pass --methods a,b or add compare.methods to the config")
    seeds = parse_seeds(seeds, section, raw, default_n=3)
    out_dir = sweep_out_dir(out_dir, section, overrides, f"runs/compare-{Path(cfg_path or 'config').stem}")
    tune = tune or section.get("tune")
    if tune not in (None, "lr"):
        raise ValueError(f"--tune {tune}: only 'lr' (a learning-rate search per method) is supported")
    labels, plan = method_plan(raw, entries, seeds, out_dir)
    budget_info = match_budget(plan, budget or section.get("budget"), out_dir, section, say)
    tuning = (lr_search.search(plan, out_dir, raw, metric, keep_going=keep_going, executor=executor, say=say)
              if tune == "lr" else {})
    manifest = {
        "kind": "compare",
        "config": str(cfg_path),
        "overrides": list(overrides),
        "metric": metric,
        "methods": labels,
        "seeds": seeds,
        "budget": budget_info,
        "tuning": tuning,
        "environment": environment(),
        "runs": [run.info for run in plan],
    }
    run_plan(out_dir, manifest, plan, executor=executor, keep_going=keep_going, say=say)
    say(f"report: {build_report(out_dir, metric)}")
    return out_dir


def scale(
    cfg_path,
    overrides=(),
    sizes: list[int] | None = None,
    factor: str | None = None,
    values: list | None = None,
    out_dir=None,
    *,
    seeds: list[int] | None = None,
    target: str | None = None,
    holdout: int | None = None,
    keep_going: bool = True,
    say: Callable[[str], None] = to_stderr,
    executor: Executor | str | None = None,
    executor_options: dict | None = None,
) -> Path:
    """Sweep data.max_train over ``sizes`` against ``factor`` in ``values``, fit the laws, report.
    ``executor`` trains the runs: an ``Executor``, or "local" / "ray" with ``executor_options``
    (jobs, gpus_per_run, ray_address, storage, retries; see tunelab.sweeps.executors); default: the
    section's ``executor`` keys, else local."""
    raw, sweep = read_sweep_config(cfg_path, overrides)
    section = sweep.get("scale", {})
    check_metric(raw, target or section.get("target"), "scale.target")
    executor = executor_from(section, executor, **(executor_options or {}))
    sizes = [int(s) for s in (sizes or section.get("sizes") or DEFAULT_SIZES)]
    factor = factor or section.get("factor")
    values = values or section.get("values")
    if not factor or not values:
        raise ValueError(
            "scale needs a factor and its values (--factor rank --values 4,8,16, or scale.factor/"
            f"scale.values in the config); factors: {', '.join(FACTOR_KEYS)} or a dotted config key"
        )
    holdout = int(holdout or section.get("holdout", 1))
    if holdout >= len(set(sizes)):
        raise ValueError(f"holdout={holdout} leaves no data size to fit among {sorted(set(sizes))}")
    seeds = parse_seeds(seeds, section, raw)
    out_dir = sweep_out_dir(out_dir, section, overrides, f"runs/scale-{Path(cfg_path or 'config').stem}")
    key = FACTOR_KEYS.get(factor, factor)
    categorical = key == "method"
    plan = []
    for value in values:
        if categorical:
            label, method, train = method_spec(value, raw.get("method"))
            sets, shown = {"method": method, "train": train}, label
        else:
            sets, shown = {key: value}, slug(value)
        for size in sizes:
            for seed in seeds:
                name = f"{shown}-n{size}-s{seed}"
                info = {"run": name, "label": f"{shown}-n{size}", "value": shown, "size": size, "seed": seed}
                plan.append(PlannedRun(info, variant(raw, out_dir / "runs" / name, seed, {**sets, "data.max_train": size})))
    manifest = {
        "kind": "scale",
        "config": str(cfg_path),
        "overrides": list(overrides),
        "factor": factor,
        "factor_key": key,
        "categorical": categorical,
        "x_from": "total_params" if factor == "model" else "value",
        "values": [str(v) if isinstance(v, dict) else v for v in values],
        "sizes": sizes,
        "seeds": seeds,
        "target": target,
        "holdout": holdout,
        "runs": [run.info for run in plan],
    }
    run_plan(out_dir, manifest, plan, executor=executor, keep_going=keep_going, say=say)
    say(f"report: {build_report(out_dir, target=target, holdout=holdout)}")
    return out_dir
