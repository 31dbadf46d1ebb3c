"""``tunelab status DIR``: a sweep's progress from its manifest (written by ``tunelab.sweeps.runner`` at
every start and finish), readable from another shell while the sweep runs.

A run the manifest calls ``running`` whose directory no process holds locked any more (the sweep was
killed without a chance to write) is shown as ``stopped?``: rerunning the sweep's command continues it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.sweeps.runner import format_seconds
from tunelab.training.run_lock import locked_by

STATES = ("done", "running", "pending", "stopped", "failed")


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
    running = counts["running"] > 0
    if running and manifest.get("eta_s"):
        summary += f"; about {format_seconds(manifest['eta_s'])} left"
    elif not running and counts["pending"] + counts["stopped"]:
        summary += "; not running: rerun the sweep's command to continue"
    failed = [f"  {name}: {e.get('error', '')}" for name, e in state.items() if e["state"] == "failed"]
    return "\n".join([summary, *lines, *(["failed:", *failed] if failed else [])])
