"""One writer per run directory, and a clean stop on SIGTERM/SIGINT.

``RunLock(dir)`` holds an exclusive ``fcntl.flock`` on ``dir/.tunelab.lock`` for the whole run. The
kernel drops the lock when the process dies (even on SIGKILL), so a stale lock file never blocks a
later run; a second writer fails at once with the holder's PID and host (written into the file).

``StopOnSignal`` turns the first SIGTERM/SIGINT into a request the training loop honours at the next
step boundary (save a checkpoint, say how to resume, exit non-zero); a second signal acts at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
from pathlib import Path

LOCK_FILE = ".tunelab.lock"


class RunLocked(ValueError):
    """Another process writes this run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}"


class RunLock:
    """Exclusive lock on a run directory (a context manager; ``release`` is idempotent)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{self.dir}: another run is writing this output_dir ({_holder(self.path)}; "
                            f"lock {self.path}); wait for it, stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def locked_by(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir``'s lock right now (``"PID n on host h"``), or None when it is free."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return None


class Stopped(RuntimeError):
    """The run was stopped by a signal after saving a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.exit_code = 128 + signum


class StopOnSignal:
    """While active, the first SIGTERM/SIGINT sets ``signum``; a second one gets the old behaviour."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()


@contextlib.contextmanager
def stop_says_where(where: str):
    """Outside the step loop (evaluations): SIGTERM/SIGINT stop at once with ``Stopped`` saying
    ``where`` it stopped and what is kept, instead of a bare KeyboardInterrupt traceback or a silent kill."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Stopped(f"stopped by {signal.Signals(signum).name} {where}", signum)

    old = {s: signal.signal(s, handle) for s in StopOnSignal.SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
