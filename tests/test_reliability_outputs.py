"""Nothing lost at the output edges: merge / export / predict never delete or overwrite what tunelab
did not write (tunelab issue 26, item 1)."""

import json

import pytest
from typer.testing import CliRunner

from test_train import WORDS, cfg_for
from tunelab.cli import app
from tunelab.config import dump_config

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("outputs")
    rng = random.Random(0)
    rows = [{"sentence": " ".join(rng.sample(WORDS, 5)) + (" yes" if i % 2 else " no"), "label": i % 2} for i in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    cfg = cfg_for(tiny_dir, (root / "train.jsonl", root / "dev.jsonl"), root / "run", "method.name=lora", "method.r=2",
                  "train.max_steps=1")
    (root / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(root / "run.yaml")])
    assert res.exit_code == 0, res.output
    return root / "run"


def _snapshot(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("cmd", [["merge"], ["export", "--format", "peft"], ["export", "--format", "gguf", "--outtype", "f32"]])
def test_a_users_file_in_the_target_is_never_deleted(run, tmp_path, cmd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = runner.invoke(app, [cmd[0], str(run), str(out), *cmd[1:]])
    assert res.exit_code == 2, res.output
    assert "notes.txt" in res.output and "--overwrite" in res.output and "Traceback" not in res.output
    assert _snapshot(out) == ["notes.txt"]
    # --overwrite: tunelab's files move in beside the user's file, which stays as it was
    if cmd[-1] == "f32":
        return  # the refusal comes before loading; the tiny WordPiece tokenizer cannot be written as GGUF
    res = runner.invoke(app, [cmd[0], str(run), str(out), *cmd[1:], "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    # and again with --overwrite: the same names are replaced, nothing else changes
    before = _snapshot(out)
    res = runner.invoke(app, [cmd[0], str(run), str(out), *cmd[1:], "--overwrite"])
    assert res.exit_code == 0 and _snapshot(out) == before


@pytest.mark.parametrize("where", ["", "method", "checkpoints/new"])
def test_the_run_directory_is_never_a_target(run, where):
    before = _snapshot(run)
    target = run / where if where else run
    for cmd in (["merge"], ["merge", "--overwrite"], ["export", "--format", "peft", "--overwrite"]):
        res = runner.invoke(app, [cmd[0], str(run), str(target), *cmd[1:]])
        assert res.exit_code == 2 and "run directory" in res.output and "Traceback" not in res.output, res.output
        assert _snapshot(run) == before


def test_a_file_as_target_and_an_empty_folder(run, tmp_path):
    (tmp_path / "f").write_text("x")
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "f")])
    assert res.exit_code == 2 and "is a file" in res.output and (tmp_path / "f").read_text() == "x"
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "empty")])
    assert res.exit_code == 0 and (tmp_path / "empty" / "config.json").exists(), res.output


def test_a_clash_found_late_replaces_nothing(tmp_path):
    from tunelab.runtime.atomic_files import files_into

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.txt").write_text("user")
    with pytest.raises(FileExistsError, match="b.txt"), files_into(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("ours")
        (tmp / "b.txt").write_text("ours")
    assert _snapshot(tmp_path / "out") == ["b.txt"] and (tmp_path / "out" / "b.txt").read_text() == "user"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_predict_never_overwrites_its_input_and_refuses_a_folder(run, tmp_path):
    rows = run.parent / "dev.jsonl"
    src = tmp_path / "rows.jsonl"
    src.write_text(rows.read_text())
    res = runner.invoke(app, ["predict", str(run), "-i", str(src), "-o", str(src)])
    assert res.exit_code == 2 and "also an input" in res.output, res.output
    assert src.read_text() == rows.read_text()
    res = runner.invoke(app, ["predict", str(run), "-i", str(src), "-o", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(app, ["predict", str(run), "-o", str(rows)])  # the run's own data.eval
    assert res.exit_code == 2 and "also an input" in res.output


def test_predict_rows_without_labels_predicts_and_mixed_rows_skip_metrics(run, tmp_path):
    """Item 2: `tunelab predict RUN -i rows.jsonl` on rows without labels predicts (help: metrics only
    when references exist); with labels it still scores."""
    src = tmp_path / "rows.jsonl"
    src.write_text('{"sentence": "the cat sat on the mat"}\n{"sentence": "John visited Paris", "label": null}\n')
    out = tmp_path / "p.jsonl"
    res = runner.invoke(app, ["predict", str(run), "-i", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 of 2 examples have no reference: no metrics" in res.output and "accuracy" not in res.output
    got = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [g["prediction"] in ("no", "yes") for g in got] == [True, True] and got[0]["reference"] is None
    res = runner.invoke(app, ["predict", str(run), "-i", str(run.parent / "dev.jsonl"), "-o", str(out)])
    assert res.exit_code == 0 and '"accuracy"' in res.output
    # outside predict, a label is still required
    res = runner.invoke(app, ["eval", str(run), f"data.eval={src}"])
    assert res.exit_code == 2 and "'label' is missing" in res.output


def test_predict_and_eval_refuse_a_run_without_its_method(run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    shutil.rmtree(bare / "method")
    for cmd in (["eval", str(bare)], ["predict", str(bare), "-o", str(tmp_path / "p.jsonl")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2 and "no trained method here" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "p.jsonl").exists()
