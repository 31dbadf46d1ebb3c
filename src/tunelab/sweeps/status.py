"""``tunelab status DIR``: a sweep's progress from its manifest (written by ``tunelab.sweeps.runner`` at
every start and finish), readable from another shell while the sweep runs; the same table is drawn live
on the sweep's own terminal (``LiveStatus``).

A run the manifest calls ``running`` whose directory no process holds locked any more (the sweep was
killed without a chance to write) is shown as ``stopped?``: rerunning the sweep's command continues it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.training.run_lock import locked_by

if TYPE_CHECKING:
    from rich.console import Console

STATES = ("done", "running", "pending", "stopped", "failed")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def read_state(out_dir: Path) -> tuple[dict, dict[str, dict]]:
    """(the manifest, run -> its state entry, with ``running`` checked against the run's lock)."""
    from tunelab.report import MANIFEST

    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no sweep manifest here (is {out_dir} a compare/scale/advise output?)")
    manifest = json.loads(path.read_text())
    state = {name: dict(entry) for name, entry in (manifest.get("state") or {}).items()}
    if not state:  # a manifest from before the runner kept states: finished or not, from the files
        for run in manifest.get("runs", []):
            done = (Path(out_dir) / "runs" / run["run"] / "metrics.json").exists()
            state[run["run"]] = {"state": "done" if done else "pending"}
    for name, entry in state.items():
        if entry["state"] == "running" and not locked_by(Path(out_dir) / "runs" / name):
            if (Path(out_dir) / "runs" / name / "metrics.json").exists():
                entry["state"] = "done"
            else:
                entry["state"] = "stopped?"
    return manifest, state


def format_status(out_dir: Path) -> str:
    manifest, state = read_state(out_dir)
    return status_text(out_dir, manifest, state)


def status_text(out_dir: Path, manifest: dict, state: dict[str, dict], *, in_progress: bool = False) -> str:
    """The status table (a summary line with the totals and ETA, one row per run, the failures): what
    ``tunelab status`` prints and what a sweep draws live on a terminal (``LiveStatus``). ``in_progress``:
    drawn by the sweep itself while it runs (the ETA is shown between runs, no "rerun" hint)."""
    rows = [("run", "state", "where", "wall", "tries")]
    for name, e in state.items():
        wall = format_seconds(e["wall_s"]) if e.get("wall_s") is not None else ""
        if e["state"] == "done" and e.get("reused"):
            wall += " (earlier)"
        rows.append((name, e["state"], e.get("where", ""), wall, str(e.get("attempts", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    counts = {s: 0 for s in STATES}
    for e in state.values():
        counts[e["state"].rstrip("?")] = counts.get(e["state"].rstrip("?"), 0) + 1
    summary = f"{manifest.get('kind', 'sweep')} in {out_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    running = counts["running"] > 0 or (in_progress and counts["pending"] > 0)
    if running and manifest.get("eta_s"):
        summary += f"; about {format_seconds(manifest['eta_s'])} left"
    elif not running and counts["pending"] + counts["stopped"]:
        summary += "; not running: rerun the sweep's command to continue"
    failed = [f"  {name}: {e.get('error', '')}" for name, e in state.items() if e["state"] == "failed"]
    return "\n".join([summary, *lines, *(["failed:", *failed] if failed else [])])


def live_console() -> Console | None:
    """The console a sweep draws its live status table on (when its messages go to stderr): stderr's
    when it is a terminal, else None (CI, logs, pipes: the progress lines only)."""
    if not sys.stderr.isatty() or os.environ.get("TERM") in ("dumb", "unknown"):
        return None
    from rich.console import Console

    return Console(stderr=True)


class LiveStatus:
    """``status_text`` of a running sweep, drawn on ``console`` with ``rich.live.Live`` and redrawn at
    every ``show()`` (the runner calls it whenever it writes the manifest). The progress lines printed
    to stderr meanwhile appear above the table; the last table stays on screen. The display stops (the
    cursor shown again) on leaving the ``with`` block, an exception, Ctrl-C or a SIGTERM (which then ends
    the process as it would have without the display)."""

    def __init__(self, out_dir: Path, manifest: dict, console: Console):
        from rich.live import Live

        self.out_dir, self.manifest = out_dir, manifest
        self.live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False,
                         redirect_stderr=True)
        self.old_term = None

    def show(self, in_progress: bool = True) -> None:
        from rich.text import Text

        if self.live.is_started:
            text = status_text(self.out_dir, self.manifest, self.manifest.get("state") or {}, in_progress=in_progress)
            self.live.update(Text(text, no_wrap=True, overflow="ellipsis"), refresh=True)

    def __enter__(self) -> LiveStatus:
        self.live.start()
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self.old_term = signal.signal(signal.SIGTERM, self._terminated)
        self.show()
        return self

    def _terminated(self, signum, frame) -> None:  # SIGTERM's default (death) after the terminal is restored
        self.close()
        os.kill(os.getpid(), signum)

    def close(self) -> None:
        try:
            self.show(in_progress=False)
        finally:
            self.live.stop()
            if self.old_term is not None:
                signal.signal(signal.SIGTERM, self.old_term)
                self.old_term = None

    def __exit__(self, *exc) -> None:
        self.close()
