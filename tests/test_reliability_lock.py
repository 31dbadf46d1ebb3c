"""One writer per run directory: a second launch fails at once naming the holder; compare skips locked runs
and forwards SIGTERM/SIGINT to its child run."""

import os
import signal
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import tunelab.training.loop as train_mod
import tunelab.training.run_lock
from test_train import cfg_for, data  # noqa: F401  (fixtures)
from tunelab.cli import app
from tunelab.config import dump_config
from tunelab.sweeps import compare as compare_mod
from tunelab.sweeps.runner import SerialExecutor, forward_signals
from tunelab.training.run_lock import RunLock, RunLocked, locked_by

# runlock.py imports nothing of tunelab: load it alone so the holder starts fast (no torch import)
HOLD = ("import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('runlock', {tunelab.training.run_lock.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "m.RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    proc.kill()
    proc.wait(timeout=30)


def test_second_writer_fails_naming_pid_and_host(holder, tiny_dir, data):  # noqa: F811
    run_dir, proc = holder
    with pytest.raises(RunLocked, match=f"PID {proc.pid} on host {socket.gethostname()}"):
        train_mod.run(cfg_for(tiny_dir, data, run_dir, "train.max_steps=2"))
    assert not (run_dir / "config.yaml").exists()  # it wrote nothing
    assert locked_by(run_dir) == f"PID {proc.pid} on host {socket.gethostname()}"


def test_lock_is_released_on_exit_and_on_kill(holder):
    run_dir, proc = holder
    proc.kill()
    proc.wait(timeout=30)
    assert locked_by(run_dir) is None  # the kernel dropped it with the process: no stale lock
    with RunLock(run_dir):
        assert locked_by(run_dir) is not None
    assert locked_by(run_dir) is None


def test_cli_double_launch_is_one_clear_line(tiny_dir, data, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    cfg = cfg_for(tiny_dir, data, run_dir, "train.max_steps=2")
    spec = tmp_path / "run.yaml"
    spec.write_text(dump_config(cfg))
    with RunLock(run_dir):  # flock conflicts between two opens even within one process
        res = CliRunner().invoke(app, ["train", str(spec)])
    assert res.exit_code == 2, res.output
    assert f"PID {os.getpid()}" in res.output and "another run is writing" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
    assert not (run_dir / "log.jsonl").exists()


def test_compare_never_starts_a_locked_run(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(compare_mod, "build_report", lambda *a, **k: "report.html")
    (tmp_path / "c.yaml").write_text("task: sentiment\n")
    with RunLock(tmp_path / "cmp" / "runs" / "lora-s0"):
        compare_mod.compare(tmp_path / "c.yaml", methods=["lora"], seeds=[0], out_dir=tmp_path / "cmp", say=lambda m: None,
                            executor=SerialExecutor(lambda cfg: started.append(cfg) or {}))
    manifest = (tmp_path / "cmp" / "manifest.json").read_text()
    assert not started and "locked" in manifest and str(os.getpid()) in manifest


def test_compare_forwards_sigterm_to_its_child():
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\nprint('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout.readline().strip() == "ready"
    with forward_signals(child) as got:
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill <compare pid>` does
        assert child.wait(timeout=60) == 143
    assert got == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler is gone again
