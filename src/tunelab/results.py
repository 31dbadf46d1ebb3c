"""What a finished run's ``metrics.json`` holds, and the one reader for it.

Task metrics and run facts live in separate namespaces, so a task metric can never be overwritten by
a run setting (a NER run's entity ``precision`` once read "float32", the training precision):

    {"metrics": {...},   # the task family's metrics after training (first key = primary), "n", "eval_loss"
     "before":  {...},   # the same metrics before training, when eval.before is set (optional)
     "run":     {...}}   # facts: method, task, model, seed, trainable_params, total_params, precision,
                         # device, world_size, steps, train_tokens, train_tokens_per_s, wall_time_s, ...

``read_metrics`` also reads the flat files of tunelab 0.1 (task metrics and run facts side by side),
so comparisons made before the split still report.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.json"

# Run facts of tunelab 0.1's flat metrics.json (every other scalar there is a task metric).
LEGACY_RUN_KEYS = frozenset({
    "method", "task", "model", "seed", "trainable_params", "total_params", "trainable_percent", "precision",
    "device", "world_size", "steps", "train_tokens", "train_time_s", "train_tokens_per_s", "final_loss", "lr",
    "wall_time_s", "peak_memory_mb",
})


def split_legacy(flat: dict) -> dict:
    """A 0.1 flat record as the namespaced form (``before`` kept as is)."""
    out: dict = {"metrics": {}, "run": {}}
    for key, value in flat.items():
        if key == "before" and isinstance(value, dict):
            out["before"] = value
        elif key in LEGACY_RUN_KEYS:
            out["run"][key] = value
        else:
            out["metrics"][key] = value
    return out


def normalize(data: dict) -> dict:
    """The namespaced form of a metrics record, old or new."""
    if isinstance(data.get("metrics"), dict) and isinstance(data.get("run"), dict):
        return data
    return split_legacy(data)


def read_metrics(run_dir: str | Path) -> dict | None:
    """The namespaced metrics of a finished run directory (or of a metrics.json path); None if unfinished.

    A file that is not valid JSON is an error naming the file."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return normalize(data)
