"""Evaluation you can watch (issue 32): progress lines (with an ETA) in eval_log.jsonl and on a non-terminal console,
``eval.every_steps`` (logged, tracked, picks checkpoints/best), the memory note, and `tunelab eval RUN`
without the training file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config

runner = CliRunner()
ROWS = [{"text": f"the cat sat {i}", "label": "yes" if i % 2 else "no"} for i in range(8)]


def write_run(tmp_path, tiny_dir, *overrides):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    cfg = {"model": str(tiny_dir), "method": {"name": "lora", "r": 2}, "task": {"name": "classification", "chat": False},
           "data": {"train": "train.jsonl", "eval": "dev.jsonl", "max_length": 48},
           "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "progress": True, "precision": "fp32", "threads": 1},
           "eval": {"batch_size": 2}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "run.yaml"), *overrides])
    assert res.exit_code == 0, res.output
    return tmp_path / "run", res.output


def test_every_steps_evaluates_logs_tracks_and_keeps_the_best(tmp_path, tiny_dir):
    pytest.importorskip("tensorboard")
    run, output = write_run(tmp_path, tiny_dir, "eval.every_steps=2", "eval.before=true", "train.report_to=tensorboard")
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval" in x]
    assert [x["step"] for x in evals] == [2] and "accuracy" in evals[0]["eval"]  # step 4 is the final evaluation
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    assert best["metric"] == "accuracy"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2]
    assert all("loss" in x or "eval" in x for x in lines)  # log.jsonl: step and eval lines only
    # progress: a line per evaluation call at least (at its end), with the phase, the rows and an ETA
    progress = [json.loads(x) for x in (run / "eval_log.jsonl").read_text().splitlines()]
    assert {"before training", "at step 2", "after training"} <= {x["phase"] for x in progress}
    last = progress[-1]
    assert last["done"] == last["total"] == 4 and last["eta_s"] == 0 and last["step"] == 4 and last["desc"] == "scoring"
    assert [x["step"] for x in progress if x["phase"] == "at step 2"][0] == 2
    # the console is not a terminal here: the same progress in words
    assert "evaluation before training: scoring 4/4 rows" in output
    # older name, same setting; two values for it are refused
    with pytest.raises(ValueError, match="eval.every_steps=2 and train.eval_every=3"):
        load_config(None, ["eval.every_steps=2", "train.eval_every=3"])


def test_eval_of_a_run_does_not_read_the_training_file(tmp_path, tiny_dir):
    run, _ = write_run(tmp_path, tiny_dir)
    assert json.loads((run / "task.json").read_text()) == {"labels": ["no", "yes"]}
    (tmp_path / "train.jsonl").rename(tmp_path / "moved.jsonl")  # gone: eval must not need it
    res = runner.invoke(app, ["eval", str(run)])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{\n"):])
    saved = json.loads((run / "metrics.json").read_text())["metrics"]
    assert got["accuracy"] == saved["accuracy"] and got["n"] == 4
    # task.json is the only stand-in: without it (a run from before), the training file would be read for the labels
    (run / "task.json").unlink()
    res = runner.invoke(app, ["eval", str(run)])
    assert res.exit_code != 0 and "train.jsonl: file not found" in res.output


def fake_model(hidden=576, layers=30, heads=9, vocab=49152, params=135_000_000, dtype="bfloat16"):
    """SmolLM2-135M's shape (the issue's 8 x 512 run peaked at 7.65 GB)."""
    import torch

    cfg = SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=vocab,
                          _attn_implementation="sdpa")
    return SimpleNamespace(config=cfg, parameters=lambda: [torch.empty(params // 1000, dtype=getattr(torch, dtype))] * 1000)


def test_memory_note_names_gradient_checkpointing_and_packing():
    from tunelab.training.preflight import memory_note

    cfg = load_config(None, ["train.batch_size=8", "data.max_length=512", "train.precision=bf16"])
    gb = 1024**3
    note = memory_note(cfg, fake_model(), "cuda", free=6 * gb)  # a 135M model at 8 x 512 on a small card
    assert "train.gradient_checkpointing=true" in note and "data.pack=true" in note and "GB free" in note
    assert memory_note(cfg, fake_model(), "cuda", free=200 * gb) is not None  # 14x the weights: said anyway
    assert "7x the model's weights" in memory_note(cfg, fake_model(dtype="float32"), "cuda", free=78 * gb)  # the run
    small = load_config(None, ["train.batch_size=2", "data.max_length=128", "train.precision=bf16"])
    assert memory_note(small, fake_model(), "cuda", free=200 * gb) is None
    on = load_config(None, ["train.batch_size=8", "data.max_length=512", "train.gradient_checkpointing=true",
                            "data.pack=true", "train.precision=bf16"])
    note = memory_note(on, fake_model(), "cuda", free=1 * gb)
    assert "gradient_checkpointing=true would" not in note and "grad_accum" in note and "data.pack" not in note


def test_choices_fp32_scores_without_autocast(llama, tiny_tokenizer):
    import torch

    from tunelab.evaluation import scoring

    prompts, choices = ["the cat sat on the", "Tom has a"], [["mat", "dog"], ["cat", "dog", "apples"]]
    exact = scoring.score_choices(llama, tiny_tokenizer, prompts, choices, batch_size=2)  # no autocast: fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = scoring.score_choices(llama, tiny_tokenizer, prompts, choices, batch_size=2)
        with scoring.choices_fp32():
            full = scoring.score_choices(llama, tiny_tokenizer, prompts, choices, batch_size=2)
    assert full == exact and rounded != exact
    assert load_config(None, ["eval.choices_fp32=true"]).eval.choices_fp32


def test_a_familys_own_evaluation_loop_reports_progress(llama, tiny_tokenizer):
    from tunelab.evaluation.scoring import progress_to
    from tunelab.tasks.shared import nll

    feats = [{"input_ids": [5, 6, 7, 8, 9][: 3 + i % 3], "labels": [-100, 6, 7, 8, 9][: 3 + i % 3]} for i in range(5)]
    seen = []
    with progress_to(seen.append, every_s=0):  # text and chat perplexity: every batch reported
        nll(llama, tiny_tokenizer, feats, batch_size=2)
    assert [r["done"] for r in seen] == [2, 4, 5] and all(r["total"] == 5 for r in seen) and seen[-1]["eta_s"] == 0
