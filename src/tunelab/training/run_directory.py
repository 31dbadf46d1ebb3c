"""A finished run, loaded from its run directory alone: the base model exactly as training loaded it
(model name, dtype, revision, the quantization QLoRA / LoftQ apply while loading, the task head), the
run's method on it (``tunelab.load``), its tokenizer and its config.

It reads ``config.yaml`` and ``method/`` (or, with ``checkpoint="best"``, ``checkpoints/best/``: the
method at the evaluation that scored best during training, ``best.json`` naming its step and score)
and never the data: a run trained with ``data.eval=null``,
or whose data files were moved or deleted since, still merges, exports and serves. A classification
or token head is rebuilt from the labels ``method/method.json`` records (``head_labels``); only runs
trained before tunelab recorded them read their training data again for the labels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

BEST_JSON = "best.json"  # in checkpoints/best: {"step", "metric", "value", "higher_is_better"}
TASK_JSON = "task.json"  # the run's task config as training fitted it (labels from the data)
EVAL_LOG = "eval_log.jsonl"  # progress of the run's evaluations (rows done, ETA), every 30 s and at each pass's end
CHECKPOINTS = ("final", "best")


class Trained(NamedTuple):
    model: Any  # the base with the run's method attached and loaded
    tokenizer: Any
    config: Any  # the run's RunConfig (output_dir: this run directory)


def method_dir(run_dir: str | Path, checkpoint: str = "final") -> Path:
    """Where a run's trained method is: ``method/`` ("final"), or ``checkpoints/best/`` ("best")."""
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint {checkpoint!r} is unknown; allowed: {', '.join(CHECKPOINTS)}")
    if checkpoint == "final":
        return run_dir / "method"
    best = run_dir / "checkpoints" / "best"
    if not (best / "method.json").exists():
        raise FileNotFoundError(
            f"{run_dir}: no best checkpoint here (expected {best}); training keeps one when it evaluates during "
            "training (eval.every_steps, or train.eval_every, > 0 and an eval set)")
    return best


def best_checkpoint(run_dir: str | Path) -> dict | None:
    """``checkpoints/best/best.json`` of a run (step, metric, value, higher_is_better), or None."""
    import json

    path = Path(run_dir) / "checkpoints" / "best" / BEST_JSON
    return json.loads(path.read_text()) if path.exists() else None


def method_meta(run_dir: str | Path, checkpoint: str = "final") -> dict:
    """``method.json`` of a run directory's method (``method_dir``); a missing one is one error naming the run directory."""
    from tunelab.api import METHOD_JSON, read_method

    run_dir = Path(run_dir)
    path = method_dir(run_dir, checkpoint) / METHOD_JSON
    if not path.exists():
        last = run_dir / "checkpoints" / "last"
        hint = (f"training has not finished (its last checkpoint is {last}): run the same `tunelab train` "
                "command again to finish it" if last.exists() else "is this a finished tunelab run directory?")
        raise FileNotFoundError(f"{run_dir}: no trained method here (expected {path}); {hint}")
    return read_method(path.parent)


def run_config(run_dir: str | Path):
    """The run's config (``config.yaml``), with ``output_dir`` this directory wherever it is now."""
    from tunelab.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml here (expected {run_dir / 'config.yaml'}): not a tunelab run directory")
    return load_config(run_dir / "config.yaml", []).model_copy(update={"output_dir": str(run_dir)})


def head_spec(cfg, meta: dict, run_dir: str | Path):
    """The task head training built (``tunelab.training.loop.Run``), from the config and method.json."""
    from tunelab.config import task_config
    from tunelab.tasks import TASKS

    task = TASKS.get(cfg.task.name)
    tcfg = task_config(cfg.task.name, cfg.task.params())
    spec = task.head(tcfg, [])
    if spec is None or spec.kind not in ("sequence", "token"):  # no head, or one without labels (QA, seq2seq)
        return spec
    if meta.get("head_labels"):
        return dataclasses.replace(spec, labels=list(meta["head_labels"]))
    if getattr(tcfg, "labels", None):  # given in the config: the data was never asked
        return spec
    return _head_from_data(task, tcfg, cfg, Path(run_dir), spec.kind)


def _head_from_data(task, tcfg, cfg, run_dir: Path, kind: str):
    """Runs trained before method.json recorded ``head_labels``: the labels from the data, as training
    collected them (data.train, else data.eval)."""
    from tunelab.errors import DataError

    d = cfg.data
    source, limit = (d.train, d.max_train) if d.train else (d.eval, d.max_eval)
    try:
        if not source:
            raise DataError("data.train and data.eval are both empty")
        from tunelab.tasks.splits import read_examples

        examples = read_examples(task, source, tcfg, limit=limit, skip_bad=d.skip_bad_rows)
    except (OSError, DataError) as e:
        raise ValueError(
            f"{run_dir}: this run trained a {kind} head whose labels {run_dir / 'method' / 'method.json'} does not "
            f"record (it predates head_labels), and the data they came from cannot be read ({e}); set task.labels "
            f"in {run_dir / 'config.yaml'} to the labels in training order"
        ) from None
    if hasattr(task, "fit"):
        tcfg = task.fit(tcfg, examples)
    return task.head(tcfg, examples)


def load_trained(run_dir: str | Path, *, device: str | None = None, dtype: str | None = None,
                 checkpoint: str = "final") -> Trained:
    """``(model with the run's method, tokenizer, run config)`` of a finished run directory, on
    ``device`` (default: the run's ``train.device``) in ``dtype`` (default: the run's ``model.dtype``);
    ``checkpoint`` "final" (``method/``) or "best" (``checkpoints/best/``, see ``method_dir``)."""
    import tunelab
    from tunelab.methods import method_config
    from tunelab.methods.base import METHODS
    from tunelab.models.loading import load as load_model
    from tunelab.runtime.precision import pick_device

    run_dir = Path(run_dir)
    meta = method_meta(run_dir, checkpoint)
    cfg = run_config(run_dir)
    head = head_spec(cfg, meta, run_dir)
    m = cfg.model
    # QLoRA / LoftQ quantize their targets while the weights load, as in training (``Run``)
    on_load = getattr(METHODS.get(cfg.method.name), "quantize_on_load", None)
    plan = on_load(method_config(cfg.method.name, cfg.method.params())) if on_load else None
    dev = pick_device(device or cfg.train.device)
    model, tok = load_model(m.name, head=head, dtype=dtype or m.dtype, trust_remote_code=m.trust_remote_code,
                            revision=m.revision, quantize=plan, device=dev)
    model.to(dev)
    return Trained(tunelab.load(model, method_dir(run_dir, checkpoint)), tok, cfg)
