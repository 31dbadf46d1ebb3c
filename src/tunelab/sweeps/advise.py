"""``tunelab advise``: run each method at a few small data sizes, fit its scaling law, predict the winner.

    advise:
      methods: [lora, {name: full, train: {lr: 1.0e-4}}]
      sizes: [125, 250, 500, 1000]    # small training sizes to run (data.max_train)
      full_size: 4000                 # the size to predict for (your full data set)
      seeds: [0, 1, 2]
      factor: rank                    # optional: also sweep a numeric factor (rank | prompt_length | dotted key)
      values: [4, 16]                 #   its values; the law becomes L = A·X^-alpha·D^-beta + E
      x: 16                           #   the value to predict at (default: the largest)
      budget: steps                   # steps | time | flops, as in compare (matched per data size)
      steps: per_size                 # per_size: each size trains its own epochs; full: every run trains
                                      #   the full-size run's step count (fixed compute, only the data varies)
      chance_loss: 0.6931             # optional: the loss of a model that learned nothing (ln 2 for a
                                      #   balanced binary head); sizes within 3% of it are left out of the
                                      #   fit, and a method with fewer than 3 sizes above it is refused
      target: eval_loss               # what the law is fitted to: eval_loss, or a metric (accuracy is
                                      #   fitted as its error 1 - accuracy and predicted directly)
      verify: false                   # also train at full_size and report prediction vs truth
                                      #   (true: with every seed; a list such as [0]: with those seeds)
      out_dir: runs/advise
      time: 2h                        # optional: the time the full-size run may train on this machine
                                      #   (s, m, h); each method's seconds per step come from the sizing
                                      #   probe and every run trains the steps that fit (at most the plan's)
      memory: 24GB                    # optional: peak memory a run may use (MB, GB, GiB); a method whose
                                      #   probed peak does not fit is left out, with the reason

Runs go to ``OUT/runs/<label>[-x<value>]-n<size>-s<seed>`` (finished runs are reused), then the
report (``tunelab.report.advise``) writes advise.json, results.md and report.html. Every run trains
with the config's own budget at its size (``train.epochs`` over the rows, or ``train.max_steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tunelab.report import build_report
from tunelab.sweeps.executors import executor_from
from tunelab.sweeps.runner import Executor, PlannedRun, first_configs, run_plan, to_stderr
from tunelab.sweeps.spec import (
    FACTOR_KEYS,
    method_specs,
    parse_seeds,
    read_sweep_config,
    set_key,
    slug,
    sweep_out_dir,
    variant,
)

DEFAULT_SIZES = (125, 250, 500, 1000)


def advise(
    cfg_path,
    overrides=(),
    methods: list | None = None,
    sizes: list[int] | None = None,
    full_size: int | None = None,
    out_dir=None,
    *,
    seeds: list[int] | None = None,
    budget: str | None = None,
    verify: bool | None = None,
    verify_seeds: list[int] | None = None,
    keep_going: bool = True,
    say: Callable[[str], None] = to_stderr,
    executor: Executor | str | None = None,
    executor_options: dict | None = None,
    time_limit: str | float | None = None,
    memory_limit: str | float | None = None,
    limits_probe: Callable | None = None,
) -> Path:
    """Run the small-size sweep (and, with ``verify``, the full size), then write the advice.
    ``executor`` trains the runs: an ``Executor``, or "local" / "ray" with ``executor_options``
    (jobs, gpus_per_run, ray_address, storage, retries; see tunelab.sweeps.executors); default: the
    section's ``executor`` keys, else local. ``time_limit`` ("2h") and ``memory_limit`` ("24GB"), or
    advise.time / advise.memory: see ``apply_limits``; ``limits_probe`` replaces the sizing probe (tests)."""
    raw, sweep = read_sweep_config(cfg_path, overrides)
    section = sweep.get("advise", {})
    executor = executor_from(section, executor, **(executor_options or {}))
    entries = methods or section.get("methods")
    if not entries:
        raise ValueError("no methods to advise on: pass --methods a,b or add advise.methods to the config")
    sizes = sorted({int(s) for s in (sizes or section.get("sizes") or DEFAULT_SIZES)})
    full_size = int(full_size or section.get("full_size") or 0)
    if not full_size:
        raise ValueError("advise needs the full data size to predict for: --full-size N or advise.full_size")
    if len(sizes) < 3:
        raise ValueError(f"advise needs at least 3 small data sizes to fit a law (got {sizes})")
    if full_size <= max(sizes):
        raise ValueError(f"full_size {full_size} must be larger than the largest small size {max(sizes)}")
    seeds = parse_seeds(seeds, section, raw, default_n=3)
    out_dir = sweep_out_dir(out_dir, section, overrides, f"runs/advise-{Path(cfg_path or 'config').stem}")
    verify = section.get("verify", False) if verify is None else verify
    if isinstance(verify, list) or verify_seeds:  # verify: [0] checks the full size with those seeds only
        verify_seeds = [int(v) for v in (verify_seeds or verify)]
        verify = True
    verify = bool(verify)
    verify_seeds = verify_seeds or seeds
    factor, values = section.get("factor"), section.get("values")
    if bool(factor) != bool(values):
        raise ValueError("advise.factor and advise.values go together (e.g. factor: rank, values: [4, 16])")
    key = FACTOR_KEYS.get(factor, factor) if factor else None
    if key == "method":
        raise ValueError("advise compares methods already; advise.factor must be numeric (rank, prompt_length, ...)")
    xs = [float(v) for v in values] if values else [None]
    x_full = float(section.get("x", max(xs))) if values else None
    specs = method_specs(entries, raw.get("method"))
    labels = [s[0] for s in specs]
    run_sizes = sizes + ([full_size] if verify else [])
    plan = []
    for label, method, train in specs:
        for x in xs:
            for size in run_sizes:
                if x is not None and size == full_size and x != x_full:
                    continue  # the truth is needed only where the prediction is made
                for seed in verify_seeds if size == full_size else seeds:
                    tag = f"-x{slug(_num(x))}" if x is not None else ""
                    name = f"{label}{tag}-n{size}-s{seed}"
                    sets = {"method": method, "train": train, "data.max_train": size}
                    run = variant(raw, out_dir / "runs" / name, seed, sets)
                    if key:
                        set_key(run, key, _num(x))
                    info = {"run": name, "label": label, "value": label, "size": size, "seed": seed, "x": x}
                    plan.append(PlannedRun(info, run))
    _check_sizes_fit(plan, sizes, full_size if verify else None)
    steps_mode = section.get("steps", "per_size")
    if steps_mode not in ("per_size", "full"):
        raise ValueError(f"advise.steps: '{steps_mode}' is not one of per_size (each size's own epochs) or full")
    if steps_mode == "full":
        _full_steps(plan, full_size)
    else:
        _warn_short(plan, full_size, say)
    target = section.get("target")
    if target is not None and not (isinstance(target, str) and target):
        raise ValueError(f"advise.target: {target!r} is not a metric name (eval_loss, the default, or e.g. accuracy)")
    chance = section.get("chance_loss")
    if chance is not None and (isinstance(chance, bool) or not isinstance(chance, int | float) or chance <= 0):
        raise ValueError(f"advise.chance_loss: {chance!r} is not a positive number (the eval loss of a model "
                         "that has learned nothing, e.g. 0.6931 = ln 2 for a balanced binary head)")
    budget_info = _match_per_size(plan, budget or section.get("budget"), out_dir, section, say, max(sizes))
    time_s = parse_duration(time_limit if time_limit is not None else section.get("time"))
    memory_mb = parse_memory(memory_limit if memory_limit is not None else section.get("memory"))
    limits = None
    if time_s is not None or memory_mb is not None:
        plan, limits = apply_limits(plan, full_size, time_s, memory_mb, out_dir, say, limits_probe or probe_run)
    manifest = {
        "kind": "advise", "config": str(cfg_path), "overrides": list(overrides), "methods": labels,
        "sizes": sizes, "full_size": full_size, "verify": verify, "factor": factor, "x_full": x_full,
        "seeds": seeds, "budget": budget_info, "metric": section.get("metric"), "steps": steps_mode,
        "chance_loss": None if chance is None else float(chance), "target": target, "limits": limits,
        "runs": [run.info for run in plan],
    }
    from tunelab.report.stats import environment

    manifest["environment"] = environment()
    run_plan(out_dir, manifest, plan, executor=executor, keep_going=keep_going, say=say)
    say(f"report: {build_report(out_dir)}")
    return out_dir


def _check_sizes_fit(plan: list[PlannedRun], sizes: list[int], verified: int | None) -> None:
    """A size above the training rows would train on all of them under its own name ("n1000" on 48
    rows): refused before any run, naming the sizes. Data that cannot be read is left to the runs to report."""
    from tunelab.sweeps import budget as bud

    cfg = plan[0].config()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_train": None})})
    try:
        rows = bud.train_rows(cfg)
    except (OSError, ValueError, KeyError):
        return
    over = [s for s in sizes if s > rows] + ([verified] if verified and verified > rows else [])
    if over:
        raise ValueError(f"advise: size(s) {', '.join(map(str, over))} exceed the {rows} training rows of "
                         f"{cfg.data.train or 'the task data'}: a size is a number of training rows "
                         f"(data.max_train); use sizes up to {rows}")


def _full_steps(plan: list[PlannedRun], full_size: int) -> None:
    """advise.steps: full: every run trains the steps of the full-size run (more epochs on less data),
    so the law is fitted at the user's own compute budget and only the data varies."""
    from tunelab.sweeps import budget as bud

    for run in plan:
        set_key(run.raw, "train.max_steps", bud.planned_steps(run.config(), full_size))


def _warn_short(plan: list[PlannedRun], full_size: int, say) -> None:
    """advise.steps: per_size gives the smallest size a fraction of the full run's steps; below a tenth
    its runs often never leave the chance plateau, and a power law cannot extrapolate from a plateau."""
    from tunelab.sweeps import budget as bud

    run = min(plan, key=lambda r: r.info["size"])
    cfg, size = run.config(), run.info["size"]
    small, full = bud.planned_steps(cfg, size), bud.planned_steps(cfg, full_size)
    if small * 10 < full:
        say(f"warning: the smallest size ({size} rows) trains {small} steps, the full size {full}; "
            "runs this short may stay at chance, where no law extrapolates: consider advise.steps: full "
            "(every size trains the full size's steps) and advise.chance_loss to have such sizes detected")


def _num(x):
    return int(x) if x is not None and float(x).is_integer() else x


def _match_per_size(plan: list[PlannedRun], mode, out_dir: Path, section: dict, say, top: int) -> dict:
    """Budget matching across methods, applied at every data size: the probe's cost ratios (measured
    once, at the largest small size) scale each method's steps against the reference's."""
    import math

    from tunelab.sweeps import budget as bud

    mode = bud.check_mode(mode)
    if mode == "steps":
        return bud.plan("steps", {}, out_dir)
    probe_cfgs = first_configs(r for r in plan if r.info["size"] == top)
    say(f"matching budgets by {mode}: probing each method")
    res = bud.plan(mode, probe_cfgs, out_dir, ref=section.get("budget_ref"))
    cost_key = "s_per_step" if mode == "time" else "flops_per_step"
    costs = {k: v[cost_key] for k, v in res["per_label"].items()}
    ref = res["ref"]
    for run in plan:
        if run.label not in costs:
            continue
        ref_steps = bud.planned_steps(run.config(), run.info["size"])
        set_key(run.raw, "train.max_steps", max(1, math.floor(ref_steps * costs[ref] / costs[run.label])))
    res["note"] += f"; applied at every data size as steps x cost({ref}) / cost(method)"
    return res


_TIME_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_MEMORY_UNITS = {"mb": 1.0, "mib": 1.0, "gb": 1000.0 ** 3 / 2**20, "gib": 1024.0, "tb": 1000.0 ** 4 / 2**20,
                 "tib": 1024.0**2}


def parse_duration(v) -> float | None:
    """Seconds from "90s", "45m", "2h", "1.5h" or a number of seconds; None stays None."""
    return _parse(v, _TIME_UNITS, "s", "--time / advise.time", "2h, 45m or 90s")


def parse_memory(v) -> float | None:
    """MiB from "24GB", "512MB", "16GiB" or a number of MB; None stays None."""
    return _parse(v, _MEMORY_UNITS, "mb", "--memory / advise.memory", "24GB, 16GiB or 512MB")


def _parse(v, units: dict, default: str, where: str, examples: str) -> float | None:
    import re

    if v is None:
        return None
    if isinstance(v, int | float) and not isinstance(v, bool):
        value, unit = float(v), default
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(v))
        if not m or (m.group(2) and m.group(2).lower() not in units):
            raise ValueError(f"{where}: {v!r} is not a quantity like {examples}")
        value, unit = float(m.group(1)), (m.group(2) or default).lower()
    if value <= 0:
        raise ValueError(f"{where}: {v!r} must be more than 0")
    return value * units[unit]


def probe_run(cfg, out_dir: Path) -> dict:
    """The sizing probe (``tunelab bench``, training.sizing) of one method's full-size config in its
    own process, so that each method's peak memory is its own: seconds per optimizer step and peak
    memory (RSS on CPU, allocated on CUDA)."""
    import json
    import subprocess
    import sys

    from tunelab.sweeps.runner import write_request

    spec = write_request(cfg)
    res = out_dir / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tunelab", "bench", str(spec), "--steps", "4",
                           "--eval-examples", "0", "--json", str(res)], capture_output=True, text=True)
    if proc.returncode or not res.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"the sizing probe failed: {tail[0]}"}
    train = json.loads(res.read_text())["train"]
    return {"s_per_step": float(train["step_s"]["median"]), "peak_memory_mb": float(train["peak_memory_mb"]),
            "device": train.get("device")}


def apply_limits(plan: list[PlannedRun], full_size: int, time_s: float | None, memory_mb: float | None,
                 out_dir: Path, say, probe) -> tuple[list[PlannedRun], dict]:
    """advise under a budget. Each method's full-size config is probed once (``probe``, cached in
    OUT/limits.json): a method whose peak memory exceeds ``memory_mb`` is left out with the reason
    (none of its runs train); with ``time_s``, a method trains at most the steps that fit the time
    at its probed seconds per step: when fewer than the full-size run's planned steps, every run of
    that method trains exactly those steps (the law is then fitted at the compute the user can
    spend, as advise.steps: full does), and a method not even one step fits is left out. Returns the
    plan that remains and the record the report shows (which limit bound the answer)."""
    import json

    from tunelab.sweeps import budget as bud

    cache = out_dir / "limits.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    probes = dict(cached.get("probe", {})) if cached.get("full_size") == full_size else {}
    firsts: dict[str, PlannedRun] = {}
    for run in plan:
        firsts.setdefault(run.label, run)
    for label, run in firsts.items():
        if label in probes:
            continue
        cfg = run.config()
        probe_dir = out_dir / "probe" / label
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_train": full_size}),
                                     "output_dir": str(probe_dir)})
        say(f"limits: probing {label} (speed and peak memory at {full_size} rows)")
        probes[label] = probe(cfg, probe_dir)
    left_out, steps, bound = {}, {}, set()
    for label, run in firsts.items():
        p = probes[label]
        if "error" in p:
            left_out[label] = p["error"]
            continue
        if memory_mb is not None and p["peak_memory_mb"] > memory_mb:
            left_out[label] = (f"left out: its probed peak memory {p['peak_memory_mb']:,.0f} MB does not fit the "
                               f"memory limit {memory_mb:,.0f} MB")
            bound.add("memory")
            continue
        if time_s is not None:
            planned = bud.planned_steps(run.config(), full_size)
            fit = int(time_s // p["s_per_step"])
            if fit < 1:
                left_out[label] = (f"left out: one step takes {p['s_per_step']:.3g} s, more than the time limit "
                                   f"{time_s:g} s")
                bound.add("time")
                continue
            if fit < planned:
                steps[label] = {"planned": planned, "fit": fit}
                bound.add("time")
    kept = []
    for run in plan:
        if run.label in left_out:
            continue
        if run.label in steps:
            set_key(run.raw, "train.max_steps", steps[run.label]["fit"])
        kept.append(run)
    if not kept:
        raise ValueError("advise: no method fits the limits: " + "; ".join(f"{k}: {v}" for k, v in left_out.items()))
    for label, why in left_out.items():
        say(f"limits: {label} {why}")
    for label, st in steps.items():
        say(f"limits: {label} trains {st['fit']} of its {st['planned']} planned steps (what fits the time)")
    record = {"time_s": time_s, "memory_mb": memory_mb, "full_size": full_size, "probe": probes,
              "left_out": left_out, "steps": steps, "bound": sorted(bound)}
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=2))
    return kept, record
