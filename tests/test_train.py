"""The training loop on a tiny model: it learns, resumes exactly, and writes a complete run dir."""

import json

import pytest
from safetensors.torch import load_file

import tunelab.training.loop as train_mod
from tunelab.config import dump_config, load_config

WORDS = "the cat sat on mat dog was in John Mary Tom Paris Berlin visited city".split()


@pytest.fixture
def data(tmp_path):
    import random

    rng = random.Random(0)
    rows = []
    for i in range(24):
        label = i % 2
        words = rng.sample(WORDS, 5)
        rows.append({"sentence": " ".join(words) + (" yes" if label else " no"), "label": label})
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    return train, dev


def cfg_for(tiny_dir, data, out, *extra):
    train, dev = data
    return load_config(None, [
        f"model.name={tiny_dir}", "method.name=full", "task.name=sentiment", "task.chat=false",
        'task.labels=["no", "yes"]', "task.template={text} ?", f"data.train={train}", f"data.eval={dev}",
        "train.batch_size=4", "train.lr=1e-3", "train.log_every=1", "train.progress=false",
        "train.precision=fp32", "train.threads=1", f"output_dir={out}", *extra,
    ])


def losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "log.jsonl").read_text().splitlines() if "loss" in json.loads(ln)]


def test_run_writes_everything_and_learns(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    m = train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=12", "eval.before=true"))
    for name in ("config.yaml", "metrics.json", "log.jsonl", "predictions.jsonl", "method/method.json",
                 "method/method.safetensors", "checkpoints/last/state.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    facts = saved["run"]
    assert saved["metrics"]["n"] == 8 and facts["steps"] == 12 and facts["trainable_params"] == facts["total_params"]
    assert {"train_tokens_per_s", "peak_memory_mb", "final_loss"} <= set(facts) and "accuracy" in saved["before"]
    ls = losses(out)
    assert len(ls) == 12 and ls[-1] < ls[0]
    assert m == saved


def test_resume_is_exact(tiny_dir, data, tmp_path, monkeypatch):
    steps = ["train.max_steps=9", "train.save_every=4", "train.grad_accum=2", "train.schedule=cosine", "train.warmup=0.2"]
    full = tmp_path / "full"
    train_mod.run(cfg_for(tiny_dir, data, full, *steps))

    class Crash(Exception):
        pass

    real = train_mod.save_checkpoint

    def crash_after_first_save(path, model, opt, sched, pos):
        real(path, model, opt, sched, pos)
        if pos["step"] == 4:
            raise Crash

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first_save)
    part = tmp_path / "part"
    with pytest.raises(Crash):
        train_mod.run(cfg_for(tiny_dir, data, part, *steps))
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    train_mod.run(cfg_for(tiny_dir, data, part, *steps))  # resumes at step 4 (crosses an epoch boundary)

    assert losses(part) == losses(full)  # bit-identical loss sequence
    a = load_file(str(full / "method" / "method.safetensors"))
    b = load_file(str(part / "method" / "method.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_can_be_disabled(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2"))
    m = train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2", "train.resume=false"))
    assert m["run"]["steps"] == 2


def test_loss_token_weighting():
    import torch

    b = {"labels": torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]]), "input_ids": torch.zeros(2, 4)}
    assert train_mod.loss_tokens(b, causal=True) == 4
    assert train_mod.loss_tokens({"labels": torch.tensor([0, 1, 1])}, causal=False) == 3


def test_qlora_trains_in_a_fresh_process(tiny_dir, data, tmp_path):
    """The loop itself imports what a 4-bit load needs (once only other tests happened to import the API
    first: `tunelab train method.name=qlora` failed with "module 'tunelab' has no attribute 'api'")."""
    import subprocess
    import sys

    spec = tmp_path / "q.yaml"
    spec.write_text(dump_config(cfg_for(tiny_dir, data, tmp_path / "q", "method.name=qlora", "train.max_steps=1",
                                        "eval.before=false")))
    code = f"from tunelab.config import load_config\nfrom tunelab.training.loop import run\nrun(load_config({str(spec)!r}))\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "q" / "method" / "method.json").exists()
