"""train.report_to: a tiny run logs config, steps, evals and final metrics to TensorBoard event files and
a local MLflow store, read back with the libraries' own readers; bad values and missing libraries fail
before training."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_train import cfg_for, data  # noqa: F401  (data is a fixture)
from tunelab.cli import app
from tunelab.config import dump_config, load_config
from tunelab.training import tracking

runner = CliRunner()


@pytest.fixture
def tracked_run(tiny_dir, data, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    cfg = cfg_for(tiny_dir, data, out, "method.name=lora", "method.r=2", "train.max_steps=4", "train.log_every=2",
                  "train.eval_every=2", "eval.before=true", "train.report_to=tensorboard,mlflow")
    assert cfg.train.report_to == ["tensorboard", "mlflow"]
    (tmp_path / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert res.exit_code == 0, res.output
    return out


def test_tensorboard_event_file_holds_steps_evals_and_final(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    logged = [json.loads(ln) for ln in (tracked_run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in steps]  # 1, 2, 4
    assert [round(e.value, 5) for e in acc.Scalars("train/loss")] == [round(r["loss"], 5) for r in steps]
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm", "eval/accuracy", "final/accuracy"} <= set(tags)
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2]  # before training, then eval_every
    final = json.loads((tracked_run / "metrics.json").read_text())
    final = final.get("metrics", final)
    assert acc.Scalars("final/accuracy")[-1].value == pytest.approx(final["accuracy"])
    assert "lora" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_mlflow_store_holds_params_and_metric_history(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("tunelab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "lora" and run.data.params["train.max_steps"] == "4"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    logged = [json.loads(ln) for ln in (tracked_run / "log.jsonl").read_text().splitlines()]
    assert [(m.step, round(m.value, 5)) for m in loss] == [(r["step"], round(r["loss"], 5)) for r in logged if "loss" in r]
    assert "final/accuracy" in run.data.metrics and "final/before.accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [0, 2]


def test_bad_backend_is_a_config_error():
    with pytest.raises(ValueError, match="train.report_to"):
        load_config(None, ["train.report_to=tensorbord"])
    assert load_config(None, ["train.report_to=none"]).train.report_to == []


def test_missing_library_fails_before_training_naming_the_package(tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    cfg = cfg_for(tiny_dir, data, tmp_path / "run", "method.name=lora", "train.max_steps=2", "train.report_to=[wandb]")
    (tmp_path / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert res.exit_code == 2 and "pip install wandb" in res.output and "train.report_to" in res.output
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_wandb_backend_runs_offline_and_logs_each_record(tmp_path, monkeypatch, capfd):
    """The real wandb package in offline mode: the run lives in RUN/wandb, carries the config, and its
    history and summary (which wandb prints when the run finishes) hold what the tracker logged."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # tunelab's default: offline
    monkeypatch.setenv("WANDB_SILENT", "false")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    t = tracking.Tracker.__new__(tracking.Tracker)
    t.step, t.backends = 0, [tracking.WandB(run_dir, {"method": {"name": "lora"}})]
    run = t.backends[0].run
    assert run.offline and run.settings.mode == "offline" and run.config["method"]["name"] == "lora"
    assert Path(run.dir).is_relative_to(run_dir / "wandb") and run.name == "r"
    t.log_step({"step": 3, "loss": 1.5, "lr": 1e-3})
    assert run.step == 3
    t.finish({"accuracy": 0.5, "method": "lora"})
    (record,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert record.stat().st_size > 0
    out = capfd.readouterr()
    shown = " ".join((out.out + out.err).split())
    for line in ("final/accuracy 0.5", "train/loss 1.5", "train/lr 0.001"):  # wandb's own run summary
        assert line in shown, shown[-2000:]
    assert "final/method" not in shown  # only numbers are logged