"""Experiment tracking: ``train.report_to: [tensorboard, mlflow, wandb]``, through the libraries themselves.

Each backend gets the resolved config at the start, every logged step (loss, lr, tokens/s, grad norm,
under ``train/``), each evaluation (``eval/``) and the final metrics (``final/``, plus a summary):

    tensorboard  event files in RUN/tensorboard (torch.utils.tensorboard; needs ``pip install tensorboard``)
    mlflow       a local store in RUN/mlruns, experiment "tunelab", run named after the run directory
                 (``pip install mlflow`` or ``mlflow-skinny``); MLFLOW_TRACKING_URI, when set, is used
                 instead (a team server). MLflow 3 calls the file store "maintenance mode" and refuses it
                 unless MLFLOW_ALLOW_FILE_STORE is set: we set it for the store we chose, nothing else.
    wandb        W&B offline mode in RUN/wandb (``pip install wandb``; ``wandb sync RUN/wandb/offline-run-*``
                 uploads later); WANDB_MODE=online, when the user sets it, logs live instead.

Only the lead process logs. A missing library is an error naming the pip package before training starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check(report_to: list[str]) -> None:
    """Raise a clear error (before any training) for an unknown backend or a missing library."""
    for name in report_to:
        if name not in PACKAGES:
            raise ValueError(f"train.report_to: unknown backend '{name}'; available: {', '.join(PACKAGES)}")
        module, pip = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"train.report_to: '{name}' needs the {pip} package: pip install {pip} "
                                      "(or pip install 'tunelab[tracking]')")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _scalars(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in _flat(d).items() if isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.w.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, group: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(f"{group}/{k}", v, step)
        self.w.flush()

    def finish(self, final: dict[str, float], step: int) -> None:
        self.log("final", final, step)
        self.w.close()


class MLflow:
    def __init__(self, run_dir: Path, config: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name("tunelab")
        exp_id = exp.experiment_id if exp else self.client.create_experiment("tunelab")
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.resolve().name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, json.dumps(config, indent=2, default=str), "config.json")

    def log(self, group: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{group}/{k}", v, now, step) for k, v in values.items()])

    def finish(self, final: dict[str, float], step: int) -> None:
        self.log("final", final, step)
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunelab"), name=run_dir.resolve().name,
                              dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="finish_previous")

    def log(self, group: str, values: dict[str, float], step: int) -> None:
        self.run.log({f"{group}/{k}": v for k, v in values.items()}, step=step)

    def finish(self, final: dict[str, float], step: int) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Tracker:
    """Fans each record out to the chosen backends; a no-op when ``report_to`` is empty."""

    def __init__(self, report_to: list[str], run_dir: Path, config: dict):
        check(report_to)
        self.step = 0
        self.backends = [BACKENDS[name](Path(run_dir), config) for name in report_to]

    def log_step(self, record: dict) -> None:
        self.step = int(record.get("step", self.step))
        values = _scalars({k: v for k, v in record.items() if k not in ("step",)})
        for b in self.backends:
            b.log("train", values, self.step)

    def log_eval(self, step: int, metrics: dict) -> None:
        for b in self.backends:
            b.log("eval", _scalars(metrics), step)

    def finish(self, metrics: dict) -> None:
        if isinstance(metrics.get("metrics"), dict) and isinstance(metrics.get("run"), dict):  # metrics.json's form
            metrics = {**metrics["metrics"], **({"before": metrics["before"]} if "before" in metrics else {}),
                       **metrics["run"]}
        final = _scalars(metrics)
        for b in self.backends:
            b.finish(final, self.step)
        self.backends = []


def start(cfg, lead: bool) -> Tracker | None:
    """A Tracker for ``cfg.train.report_to`` on the lead process (None elsewhere or when not asked)."""
    report_to = list(getattr(cfg.train, "report_to", None) or [])
    if not report_to:
        return None
    check(report_to)
    if not lead:
        return None
    return Tracker(report_to, cfg.run_dir(), cfg.model_dump(mode="json"))
