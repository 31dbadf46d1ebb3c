import os
import signal
import subprocess
import sys
import time

import pytest

from tunelab.runtime.atomic_files import atomic_dir, recover


def test_failure_inside_leaves_previous(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("v2-partial")
        raise RuntimeError("crash during save")
    assert (target / "a").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left


WRITER = r"""
import sys
from pathlib import Path
from tunelab.runtime.atomic_files import atomic_dir
target, ready, i = sys.argv[1], Path(sys.argv[2]), 0
while True:
    i += 1
    with atomic_dir(target) as tmp:
        for name in "abcd":
            (tmp / name).write_bytes(str(i).encode() * 200_000)
    if i == 1:
        ready.write_text("saved once")  # from here on every kill lands on a run that has a checkpoint
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_kill_during_save_leaves_a_complete_checkpoint(tmp_path, delay):
    target, ready = tmp_path / "last", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ready)])
    deadline = time.monotonic() + 120
    while not ready.exists():  # the kill must come after the first save (else there is nothing to check)
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never finished its first save"
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    got = recover(target)
    assert got == target, "a kill after a completed save must leave a checkpoint"
    versions = {(target / n).read_bytes()[:8] for n in "abcd"}
    sizes = {(target / n).stat().st_size for n in "abcd"}
    assert len(versions) == 1 and len(sizes) == 1
