"""The CLI end to end on a tiny model: train, eval, predict, merge, export, bench, listings, errors."""

import json

import pytest
from typer.testing import CliRunner

from test_train import cfg_for, data  # noqa: F401  (data is a fixture)
from tunelab.cli import app
from tunelab.config import dump_config

runner = CliRunner()


@pytest.fixture
def config_file(tiny_dir, data, tmp_path):  # noqa: F811
    cfg = cfg_for(tiny_dir, data, tmp_path / "run", "method.name=lora", "method.r=2", "train.max_steps=2")
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    return path


def test_listings():
    for cmd in ("methods", "tasks", "models"):
        res = runner.invoke(app, [cmd])
        assert res.exit_code == 0, res.output
    assert "loreft" in runner.invoke(app, ["methods"]).output


def test_train_eval_predict_merge_export(config_file, tmp_path):
    res = runner.invoke(app, ["train", str(config_file)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["run"]["steps"] == 2
    res = runner.invoke(app, ["eval", str(run)])
    assert res.exit_code == 0 and '"accuracy"' in res.output
    res = runner.invoke(app, ["predict", str(run), "-o", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 0 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 8
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "merged" / "config.json").exists()
    res = runner.invoke(app, ["export", str(run), str(tmp_path / "peft"), "--format", "peft"])
    assert res.exit_code == 0 and (tmp_path / "peft" / "adapter_config.json").exists()


def test_bench_and_errors(config_file, tmp_path):
    res = runner.invoke(app, ["bench", str(config_file), "--steps", "2", "--eval-examples", "0", "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["train"]
    res = runner.invoke(app, ["train", str(config_file), "train.lr=-1"])
    assert res.exit_code == 2 and "train.lr" in res.output
    res = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "missing.yaml" in res.output
