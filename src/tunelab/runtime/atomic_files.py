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



def _staging_dir(target: Path) -> Path:
    """A new group-readable temporary folder beside ``target`` (same filesystem: its moves are renames)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    readable(tmp, directory=True)
    return tmp


@contextlib.contextmanager
def atomic_dir(target: str | Path, keep: str | Path | None = None):
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` whole.

    The old ``target`` is renamed aside and only removed after the new one is in place, so at
    every instant either the old or the new complete directory exists under a known name. With
    ``keep``, the old ``target`` is moved there instead of being removed (the previous checkpoint).
    """
    target = Path(target)
    tmp = _staging_dir(target)
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




def check_output_dir(target: str | Path, *, overwrite: bool = False, protect: tuple = (), what: str = "this") -> None:
    """Refuse an output folder where writing would lose files tunelab did not write, before any work.

    ``protect`` are folders that must never receive the output (a run directory: the target may be
    neither it nor a folder inside it). Without ``overwrite`` the target must be absent or empty;
    with it, only the files of the same names are replaced later (``files_into``)."""
    target = Path(target)
    resolved = target.resolve()
    for p in protect:
        p = Path(p).resolve()
        if resolved == p or p in resolved.parents:
            raise ValueError(f"{target}: this is {'the run directory' if resolved == p else 'inside the run directory'} "
                             f"{p}; {what} would write beside the run's own files (config.yaml, method/, ...): "
                             "choose a folder outside the run directory")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder: choose a new or empty folder for the output")
    if target.is_dir() and not overwrite:
        entries = sorted(e.name for e in target.iterdir())
        if entries:
            more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
            raise ValueError(f"{target} is not empty ({entries[0]}{more} would be at risk): choose a new or empty "
                             "folder, or pass --overwrite to replace only the files of the same names")


def _move_in(src: Path, dest: Path, overwrite: bool) -> None:
    for entry in sorted(src.iterdir()):
        to = dest / entry.name
        if entry.is_dir() and to.is_dir():
            _move_in(entry, to, overwrite)
            continue
        if to.exists() or to.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{to} already exists and was not written by this command: nothing was "
                                      "replaced; choose a new folder, or pass --overwrite to replace it")
            if to.is_dir() != entry.is_dir():
                raise FileExistsError(f"{to} is a {'folder' if to.is_dir() else 'file'} where tunelab writes a "
                                      f"{'folder' if entry.is_dir() else 'file'}: move it away first")
        os.replace(entry, to)


@contextlib.contextmanager
def files_into(target: str | Path, *, overwrite: bool = False):
    """Yield a temporary folder beside ``target``; on success move its files into ``target``.

    Unlike ``atomic_dir`` nothing else in ``target`` is touched: a new target appears whole (one
    rename); into an existing one only the written files move, and with ``overwrite`` they replace
    the files of the same names (without it, a name clash is an error and nothing is replaced)."""
    target = Path(target)
    tmp = _staging_dir(target)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            readable(f, directory=f.is_dir())
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if not target.exists():
            os.replace(tmp, target)
        else:
            if not overwrite:  # check every name before moving any, so a clash replaces nothing
                clash = [p for p in tmp.rglob("*") if p.is_file() and (target / p.relative_to(tmp)).exists()]
                if clash:
                    raise FileExistsError(f"{target / clash[0].relative_to(tmp)} already exists and was not written "
                                          "by this command: nothing was replaced; choose a new folder, or pass "
                                          "--overwrite to replace the files of the same names")
            _move_in(tmp, target, overwrite)
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
