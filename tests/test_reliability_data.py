"""Data never leaks between train and eval (tunelab issue 26, item 5): a folder data set never swallows the
eval file, train and eval are never the same file, and rows in both are reported before training."""

import json
import shutil

import pytest
from typer.testing import CliRunner

import tunelab.training.loop as train_mod
from test_train import cfg_for, data  # noqa: F401  (fixtures)
from tunelab.cli import app
from tunelab.config import dump_config

runner = CliRunner()


def test_a_folder_holding_the_eval_file_is_refused(tiny_dir, data, tmp_path):  # noqa: F811
    train, dev = data
    folder = tmp_path / "set"
    folder.mkdir()
    shutil.copy(train, folder / "train.jsonl")
    shutil.copy(dev, folder / "dev.jsonl")
    cfg = cfg_for(tiny_dir, (folder, folder / "dev.jsonl"), tmp_path / "run", "train.max_steps=1")
    (tmp_path / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert res.exit_code == 2 and "data.train" in res.output and "dev.jsonl" in res.output, res.output
    assert "leak" in res.output and not (tmp_path / "run" / "log.jsonl").exists()
    # the eval file moved out of the folder: it trains
    shutil.move(folder / "dev.jsonl", tmp_path / "dev.jsonl")
    rec = train_mod.run(cfg_for(tiny_dir, (folder, tmp_path / "dev.jsonl"), tmp_path / "run2", "train.max_steps=1"))
    assert rec["run"]["steps"] == 1


def test_train_and_eval_the_same_file_is_an_error(tiny_dir, data, tmp_path):  # noqa: F811
    train, _ = data
    with pytest.raises(ValueError, match="data.train and data.eval are the same file"):
        train_mod.run(cfg_for(tiny_dir, (train, train), tmp_path / "run", "train.max_steps=1"))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_rows_in_both_sets_are_counted_before_training(tiny_dir, data, tmp_path, capsys):  # noqa: F811
    train, dev = data
    rows = train.read_text().splitlines()
    mixed = tmp_path / "dev-mixed.jsonl"
    mixed.write_text("\n".join(rows[:3] + dev.read_text().splitlines()[3:]) + "\n")
    train_mod.run(cfg_for(tiny_dir, (train, mixed), tmp_path / "run", "train.max_steps=1"))
    err = capsys.readouterr()
    assert "3 of 8 eval examples also occur in the training data" in err.out + err.err
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["step"] == 1
    train_mod.run(cfg_for(tiny_dir, (train, dev), tmp_path / "clean", "train.max_steps=1"))
    assert "also occur in the training data" not in "".join(capsys.readouterr())
