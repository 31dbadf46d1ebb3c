"""Atomic writes: a crash never leaves a half-written file or directory where a good one was."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700: give what a run writes the usual 0644/0755 (less the umask)."""
    os.chmod(path, (0o755 if directory else 0o644) & ~_umask())


@contextlib.contextmanager
def atomic_dir(target: str | Path, keep: str | Path | None = None):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` whole.

    The old ``target`` is renamed aside and only removed after the new one is in place, so at
    every instant either the old or the new complete directory exists under a known name. With
    ``keep``, the old ``target`` is moved there instead of being removed (the previous checkpoint).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    readable(tmp, directory=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            readable(f, directory=f.is_dir())  # safetensors writes 0600
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = Path(keep) if keep is not None else target.with_name(f".{target.name}.old")
        if old.exists() and target.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if keep is None and old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(directory: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` directories/files a kill mid-save left in ``directory`` (call it while
    holding the run lock: then no other writer can own them)."""
    directory = Path(directory)
    gone = []
    if directory.is_dir():
        for p in directory.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def recover(target: str | Path) -> Path | None:
    """After a crash between the two renames only ``.NAME.old`` exists: bring it back."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.replace(old, target)
    return target if target.exists() else None


