"""compare trains each run in its own process (clean peak memory per run), on a tiny model."""

import json

import yaml

from test_train import WORDS
from tunelab.sweeps.compare import compare


def test_isolated_runs_write_their_own_metrics(tiny_dir, tmp_path):  # noqa: F811
    rows = [{"sentence": " ".join(WORDS[i % 7 : i % 7 + 4]), "label": i % 2} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": str(tiny_dir), "method": {"name": "full"},
        "task": {"name": "sentiment", "chat": False, "labels": ["no", "yes"], "template": "{text} ?"},
        "data": {"train": str(data), "eval": str(_copy(data))},  # train == eval is refused (a leak)
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "precision": "fp32", "threads": 1},
        "eval": {"loss": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = compare(path, methods=["full", "lora:r=2"], out_dir=tmp_path / "cmp", say=lambda m: None)
    for run in ("full-s0", "lora-r2-s0"):
        metrics = json.loads((out / "runs" / run / "metrics.json").read_text())
        assert metrics["run"]["steps"] == 2 and metrics["metrics"]["n"] == 12
        assert (out / "runs" / run / "train.out").exists()
    assert (out / "report.html").exists()


def _copy(path):
    """The same rows under another name: an eval file that is not the training file itself."""
    dev = path.with_name("dev-" + path.name)
    dev.write_text(path.read_text())
    return dev
