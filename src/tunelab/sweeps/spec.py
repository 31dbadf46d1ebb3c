"""What a sweep asks for: its section of the YAML, its seeds, its method entries, and each run's config.

Shared by every sweep (compare, scale, advise, the learning-rate search); running the runs is
``tunelab.sweeps.runner``'s part.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

SWEEP_SECTIONS = ("compare", "scale", "advise")
# Factor names -> the config key they set. "model" takes X from the runs' total_params.
FACTOR_KEYS = {
    "model": "model.name",
    "rank": "method.r",
    "prompt_length": "method.num_virtual_tokens",
    "method": "method",
}


def read_sweep_config(cfg_path, overrides=()) -> tuple[dict, dict]:
    """(run config as a raw dict with overrides applied, {"compare": {...}, "scale": {...}})."""
    from tunelab.config import apply_overrides, resolve_data_paths

    raw = {}
    if cfg_path is not None:
        path = Path(cfg_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: config file not found")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        # data paths are relative to the config file, as for tunelab train; absolute here, because each
        # run's own config.yaml lives elsewhere (OUT/runs/...)
        raw = resolve_data_paths(raw, path.parent.resolve())
    raw = apply_overrides(raw, list(overrides))
    sweep = {k: raw.pop(k) or {} for k in SWEEP_SECTIONS if k in raw}
    for k, v in sweep.items():
        if not isinstance(v, dict):
            raise ValueError(f"{cfg_path}: section '{k}' must be a mapping (got {type(v).__name__})")
    return raw, sweep


def sweep_out_dir(out_dir, section: dict, overrides, default: str) -> Path:
    """--out, else an ``output_dir=`` override, else the section's out_dir, else ``default``.

    A run config's own output_dir names one run; a sweep puts each run under OUT/runs/<name>, so an
    ``output_dir=`` override on the command line is taken as the sweep's directory (never ignored)."""
    given = [o.split("=", 1)[1].strip() for o in overrides or () if str(o).strip().startswith("output_dir=")]
    if given:
        if out_dir is not None and Path(out_dir) != Path(given[-1]):
            raise ValueError(
                f"output_dir={given[-1]} and --out {out_dir} disagree: pass the sweep's directory once, as --out "
                "(each run goes to OUT/runs/<name>)"
            )
        out_dir = given[-1]
    return Path(out_dir or section.get("out_dir") or default)


def parse_seeds(seeds, section: dict, raw: dict, default_n: int = 1) -> list[int]:
    """The sweep's seeds: the CLI's, else the section's ``seeds``, else ``default_n`` seeds counting
    up from the config's own ``train.seed``; repeats are refused."""
    seeds = seeds if seeds else section.get("seeds")
    if seeds is None:  # default_n seeds from the config's own: train.seed, +1, +2, ...
        base = int((raw.get("train") or {}).get("seed", 0))
        seeds = list(range(base, base + default_n))
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    return [int(s) for s in seeds]


def slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_") or "run"


def method_spec(entry, base_method) -> tuple[str, dict, dict]:
    """(label, method section, train settings) for one method entry: a name, ``name:key=value:...``,
    or a mapping with ``name``, its params, and optional ``label`` and ``train`` (settings merged into
    the train section for that method only, e.g. its lr)."""
    base = {"name": base_method} if isinstance(base_method, str) else dict(base_method or {})
    train: dict = {}
    if isinstance(entry, str):
        name, *pairs = entry.strip().split(":")
        params = {}
        for pair in pairs:
            key, eq, val = pair.partition("=")
            if not eq or not key:
                raise ValueError(f"method '{entry}': '{pair}' is not key=value (e.g. lora:r=16:alpha=32)")
            params[key.strip()] = yaml.safe_load(val)
        label = "-".join([name] + [f"{k}{v}" for k, v in params.items()])
    elif isinstance(entry, dict) and entry.get("name"):
        params = {k: v for k, v in entry.items() if k not in ("name", "label", "train")}
        name, train = entry["name"], dict(entry.get("train") or {})
        label = str(entry.get("label") or "-".join([name] + [f"{k}{v}" for k, v in params.items()]))
    else:
        raise ValueError(f"method entry {entry!r}: expected a name or a mapping with 'name'")
    # Same method as the config's own: keep its params (the user tuned them), the entry's win.
    section = {**base, **params} if base.get("name") == name else {"name": name, **params}
    return slug(label), {**section, "name": name}, train


def method_specs(entries, base_method) -> list[tuple[str, dict, dict]]:
    """``method_spec`` of every entry; two entries with one label are refused (their runs would share a directory)."""
    specs = [method_spec(e, base_method) for e in entries]
    labels = [s[0] for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels repeat: {labels}; give each variant a distinct 'label'")
    return specs


def set_key(raw: dict, dotted: str, value) -> None:
    """Set ``a.b.c`` in a raw config dict, making the sections on the way (a short ``method: lora``
    becomes ``{name: lora}``); the sections on the path are copied, never shared with another run."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if isinstance(child, str):  # the short form "method: lora"
            child = {"name": child}
        node[part] = child = dict(child or {})
        node = child
    node[last] = value


def variant(raw: dict, run_dir: Path, seed: int, sets: dict) -> dict:
    """A copy of ``raw`` for one run: ``sets`` applied (``train``: merged into the train section; any
    other key: a dotted key set with ``set_key``), ``train.seed`` and ``output_dir`` = ``run_dir``."""
    out = copy.deepcopy(raw)
    for key, value in sets.items():
        if key == "train" and isinstance(value, dict):
            out["train"] = {**(out.get("train") or {}), **value}
        else:
            set_key(out, key, value)
    set_key(out, "train.seed", int(seed))
    out["output_dir"] = str(run_dir)
    return out


# Run facts every run's metrics.json has that a comparison may also be ranked by (beside the task's metrics).
RANKABLE_RUN_FACTS = ("eval_loss", "final_loss", "mean_train_loss", "trainable_params", "total_params",
                      "trainable_percent", "wall_time_s", "train_time_s", "eval_time_s", "train_tokens_per_s",
                      "peak_memory_mb")


def check_metric(raw: dict, metric: str | None, key: str = "--metric") -> None:
    """Refuse, before any run trains, a ranking ``metric`` the config's task family never reports (its
    ``metrics`` declaration) and that is no run fact; a dotted name (a nested metric group) is not checked."""
    if metric is None or "." in str(metric):
        return
    from tunelab.errors import suggest
    from tunelab.tasks import TASKS
    from tunelab.tasks.base import declares_metric

    entry = raw.get("task") or "sentiment"
    name = entry.get("name", "sentiment") if isinstance(entry, dict) else str(entry)
    if name not in TASKS:
        return  # the config check names the unknown task
    task = TASKS.get(name)
    if declares_metric(task, metric) or metric in RANKABLE_RUN_FACTS:
        return
    own = list(task.metrics)
    raise ValueError(f"{key} {metric}: task '{name}' does not report it{suggest(metric, own + list(RANKABLE_RUN_FACTS))}; "
                     f"its metrics: {', '.join(own)}; run facts: {', '.join(RANKABLE_RUN_FACTS)}")
