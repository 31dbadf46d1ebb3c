"""compare's rigor options with a fake training loop: --tune lr, --budget flops, output_dir=, seeds."""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.sweeps import budget
from tunelab.sweeps import compare as cmp
from tunelab.sweeps.runner import SerialExecutor

BEST_LR = {"lora": 3e-3, "full": 1e-5}  # the fake's optimum per method


class FakeTrain:
    def __init__(self):
        self.calls = []
        self.executor = SerialExecutor(self.run)  # trains the sweep's runs with the fake, in this process

    def run(self, cfg) -> dict:
        self.calls.append(cfg)
        out = cfg.run_dir()
        lr = cfg.train.lr
        acc = 0.9 - 0.05 * abs(__import__("math").log10(lr / BEST_LR[cfg.method.name])) + 0.01 * cfg.train.seed
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({
            "metrics": {"accuracy": acc, "n": 10},
            "run": {"method": cfg.method.name, "seed": cfg.train.seed, "steps": cfg.train.max_steps, "lr": lr,
                    "trainable_params": 10, "wall_time_s": 1.0}}))
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return {}


@pytest.fixture
def fake():
    return FakeTrain()


def write_cfg(tmp_path, **compare):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"t{i}", "label": "pos"}) + "\n" for i in range(50)))
    raw = {"model": "smollm2-135m", "task": {"name": "sentiment"},
           "data": {"train": str(train), "eval": str(tmp_path / "dev.jsonl"), "max_train": 40},
           "train": {"max_steps": 10, "batch_size": 4, "lr": 1e-3},
           "compare": {"methods": ["lora", {"name": "full", "train": {"lr": 3e-5}}], **compare}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_three_seeds_by_default_and_tune_lr_on_a_training_split(tmp_path, fake):
    out = cmp.compare(write_cfg(tmp_path), out_dir=tmp_path / "cmp", tune="lr", say=lambda m: None,
                      executor=fake.executor)
    final = [c for c in fake.calls if "tune" not in str(c.run_dir())]
    trials = [c for c in fake.calls if "tune" in str(c.run_dir())]
    assert sorted(c.train.seed for c in final) == [0, 0, 1, 1, 2, 2]
    assert sorted((c.method.name, c.train.lr) for c in trials) == [
        ("full", 1e-5), ("full", 3e-5), ("full", 9e-5), ("lora", 3.33e-4), ("lora", 1e-3), ("lora", 3e-3)]
    for c in trials:  # never the eval set: a split of the first max_train training rows
        assert c.data.eval.endswith("tune_valid.jsonl") and c.data.train.endswith("tune_train.jsonl")
    assert len((out / "tune" / "data" / "tune_valid.jsonl").read_text().splitlines()) == 8
    assert {c.method.name: c.train.lr for c in final} == BEST_LR
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuning"]["lora"]["best_lr"] == 3e-3 and "32 train / 8 validation" in manifest["tuning"]["lora"]["split"]
    md = (out / "results.md").read_text()
    assert "lr search lora: best 0.003" in md and "lr=0.003" in md  # the summary's hyperparameters column
    summary = (out / "summary.csv").read_text()
    assert "tuned_lr" in summary.splitlines()[0] and "hyperparameters" in summary.splitlines()[0]


def test_budget_flops_sets_steps_per_method(tmp_path, fake, monkeypatch):
    cost = {"lora": 4.0, "full": 6.0}
    monkeypatch.setattr(budget, "probe_flops", lambda c: cost[c.method.name])
    out = cmp.compare(write_cfg(tmp_path, budget="flops", budget_ref="full"), seeds=[0], out_dir=tmp_path / "c",
                      say=lambda m: None, executor=fake.executor)
    assert {c.method.name: c.train.max_steps for c in fake.calls} == {"full": 10, "lora": 15}
    b = json.loads((out / "manifest.json").read_text())["budget"]
    assert b["mode"] == "flops" and b["per_label"]["lora"] == {"steps": 15, "flops_per_step": 4.0}
    assert "equal training FLOPs" in (out / "results.md").read_text()


def test_output_dir_override_is_the_sweep_directory(tmp_path, fake):
    cfg = write_cfg(tmp_path)
    out = cmp.compare(cfg, [f"output_dir={tmp_path / 'mine'}"], seeds=[0], say=lambda m: None, executor=fake.executor)
    assert out == tmp_path / "mine" and (out / "report.html").exists()
    with pytest.raises(ValueError, match="as --out"):
        cmp.compare(cfg, [f"output_dir={tmp_path / 'a'}"], seeds=[0], out_dir=tmp_path / "b", say=lambda m: None,
                    executor=fake.executor)
    with pytest.raises(ValueError, match="--tune fast: only 'lr'"):
        cmp.compare(cfg, seeds=[0], tune="fast", say=lambda m: None, executor=fake.executor)
