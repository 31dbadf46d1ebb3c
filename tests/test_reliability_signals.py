"""SIGTERM/SIGINT: checkpoint at the next step boundary, say how to resume, exit non-zero; resuming gives the
very same loss sequence and weights. A kill in the middle of a save leaves a stale temp dir that the next
start removes, and the resume is still exact."""

import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import tunelab.training.loop as train_mod
from test_train import cfg_for, data, losses  # noqa: F401  (fixtures)
from tunelab.config import dump_config
from tunelab.training.run_lock import Stopped

STEPS = ["train.max_steps=9", "train.save_every=4", "train.grad_accum=2", "train.schedule=cosine", "train.warmup=0.2"]


def same_weights(a_dir, b_dir):
    a = load_file(str(a_dir / "method" / "method.safetensors"))
    b = load_file(str(b_dir / "method" / "method.safetensors"))
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.fixture
def full(tiny_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "full"
    train_mod.run(cfg_for(tiny_dir, data, out, *STEPS))
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_resume_is_exact(signum, full, tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    real = train_mod.check_step

    def signal_at_step_6(step, *a):
        if step == 6:
            os.kill(os.getpid(), signum)  # arrives mid-step, like a scheduler's kill
        return real(step, *a)

    monkeypatch.setattr(train_mod, "check_step", signal_at_step_6)
    part = tmp_path / "part"
    with pytest.raises(Stopped) as e:
        train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    assert e.value.exit_code == 128 + signum
    assert "at step 6 of 9" in str(e.value) and str(part / "checkpoints" / "last") in str(e.value)
    assert "again" in str(e.value)  # how to resume
    assert not (part / "metrics.json").exists() and not (part / "method").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(train_mod, "check_step", real)
    train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    assert losses(part) == losses(full)
    assert same_weights(part, full)


KILL_IN_SAVE = """
import os, signal, sys
import tunelab.training.checkpoint as c
import tunelab.training.loop as t
from tunelab.config import load_config
real = c.save_file
def save_file(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if path.endswith("optimizer.safetensors") and "/.last.tmp-" in path and os.path.exists(os.path.dirname(os.path.dirname(path)) + "/last"):
        os.kill(os.getpid(), signal.SIGKILL)  # the second save, half written
c.save_file = save_file
t.run(load_config(sys.argv[1]))
"""


def test_kill_during_save_then_restart(full, tiny_dir, data, tmp_path):  # noqa: F811
    part = tmp_path / "part"
    spec = tmp_path / "part.yaml"
    spec.write_text(dump_config(cfg_for(tiny_dir, data, part, *STEPS)))
    res = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, str(spec)], capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    stale = list((part / "checkpoints").glob(".last.tmp-*"))
    assert stale, "the kill should have left a half-written temp dir"
    train_mod.run(cfg_for(tiny_dir, data, part, *STEPS))
    assert not list((part / "checkpoints").glob(".last.tmp-*"))  # removed on the next start
    assert losses(part) == losses(full)
    assert same_weights(part, full)


def test_cli_sigterm_exits_nonzero_with_resume_hint(tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    # In-process through the CLI (the loop's handling of a real delivered signal is the same as above;
    # the subprocess test of a real kill is test_kill_during_save_then_restart).
    from typer.testing import CliRunner

    from tunelab.cli import app

    real = train_mod.check_step

    def sigterm_at_step_3(step, *a):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *a)

    monkeypatch.setattr(train_mod, "check_step", sigterm_at_step_3)
    out = tmp_path / "long"
    spec = tmp_path / "long.yaml"
    spec.write_text(dump_config(cfg_for(tiny_dir, data, out, "train.max_steps=50", "eval.loss=false")))
    res = CliRunner().invoke(app, ["train", str(spec)])
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert "stopped by SIGTERM at step 3 of 50" in res.output and "Traceback" not in res.output
    state = (out / "checkpoints" / "last" / "state.json").read_text()
    assert '"step": 3' in state


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_final_evaluation_says_where_it_stopped(signum, tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    real = train_mod.Run.evaluate

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signum)  # the handler runs here, inside the evaluation
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.Run, "evaluate", interrupted)
    with pytest.raises(Stopped, match="during the final evaluation.*method is saved") as e:
        train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2"))
    assert e.value.exit_code == 128 + signum
    assert (out / "method" / "method.json").exists() and not (out / "metrics.json").exists()
    assert signal.getsignal(signum) is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(train_mod.Run, "evaluate", real)
    rec = train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2"))  # the same command evaluates it
    assert rec["run"]["steps"] == 2 and (out / "metrics.json").exists() and len(losses(out)) == 2
