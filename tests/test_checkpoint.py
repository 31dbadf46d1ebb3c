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
from tunelab.runtime.atomic_files import atomic_dir
target, i = sys.argv[1], 0
while True:
    i += 1
    with atomic_dir(target) as tmp:
        for name in "abcd":
            (tmp / name).write_bytes(str(i).encode() * 200_000)
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_kill_during_save_leaves_a_complete_checkpoint(tmp_path, delay):
    target = tmp_path / "last"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    got = recover(target)
    if got is None:  # killed before the first save finished: nothing, never something partial
        assert not target.exists()
        return
    versions = {(target / n).read_bytes()[:8] for n in "abcd"}
    sizes = {(target / n).stat().st_size for n in "abcd"}
    assert len(versions) == 1 and len(sizes) == 1
