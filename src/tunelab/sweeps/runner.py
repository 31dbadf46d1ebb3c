"""The sweep runner: a plan of runs, each trained by an executor, recorded in the sweep's manifest.

Every sweep (``compare``, ``scale``, ``advise``, the learning-rate search of ``--tune lr``) builds a
plan, a list of ``PlannedRun`` (its manifest entry and its config as a raw dict, written to
``OUT/runs/<name>``), and hands it to ``run_plan``, which

- validates every run's config before any trains (a typo fails before hours of training);
- writes ``OUT/manifest.json`` (with ``failed``: run -> reason) at the start, on a stop and at the end;
- reuses a run whose ``metrics.json`` exists (finished before: an interrupted sweep continues where it
  stopped; an unfinished run is started again and the training loop resumes it from its checkpoints),
  and never starts a run whose directory another process holds locked;
- says ``[i/N] <run>: ...`` for each run, and records a failed run and goes on (``keep_going``).

How the runs train is the executor's part (``Executor``): it is given every job at once and yields
each one's ``Outcome`` as it finishes, so an executor may train several at a time. ``SerialExecutor()``
trains one run after another, each in its own ``tunelab train`` process (tests pass
``SerialExecutor(fake_train)``); ``tunelab.sweeps.executors`` has the parallel ones (``LocalExecutor``:
several runs at once on one machine, ``RayExecutor``: a Ray cluster) and ``executor_from`` (the
``--executor``/``--jobs`` options).

The jobs are ordered so that the first seed of every label (method) comes before any second seed: a
sweep stopped half-way (or a budget running out) has one complete comparison first. The manifest's
``state`` holds each run's state (``pending``, ``running``, ``done``, ``failed``, ``stopped``: stopped by
a signal after saving a checkpoint), where it ran, its wall time and attempts, and ``eta_s``, the time
left estimated from the finished runs' wall times; ``tunelab status DIR`` prints it, and while a sweep
runs with stderr on a terminal it draws that table live there (``tunelab.sweeps.status.LiveStatus``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import yaml

from tunelab.results import read_metrics
from tunelab.runtime.atomic_files import atomic_write_text
from tunelab.sweeps.status import LiveStatus, format_seconds, live_console
from tunelab.training.run_lock import Stopped, locked_by

if TYPE_CHECKING:
    from rich.console import Console

    from tunelab.config import RunConfig


def to_stderr(msg: str) -> None:
    """The sweeps' default ``say``: one progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class PlannedRun:
    """One run of a sweep before it is validated: ``info`` is its manifest entry (``run``: its name,
    ``label``, ``seed``, and what the sweep varies), ``raw`` its config as a raw dict with
    ``output_dir`` set. Budget matching and the lr search may still edit ``raw``."""

    info: dict
    raw: dict

    @property
    def name(self) -> str:
        return self.info["run"]

    @property
    def label(self) -> str:
        return self.info["label"]

    def config(self) -> RunConfig:
        """The validated config (a bad key or value raises, naming the run)."""
        from tunelab.config import build_config

        return build_config(self.raw, f"run {self.name}")


def first_configs(plan: Iterable[PlannedRun]) -> dict[str, RunConfig]:
    """label -> the validated config of its first run (budget probes and the lr search use it)."""
    out: dict[str, RunConfig] = {}
    for run in plan:
        if run.label not in out:
            out[run.label] = run.config()
    return out


@dataclass(frozen=True)
class Job:
    """One run to train: its name, validated config and directory (``OUT/runs/<name>``), and its
    place in the plan (``index`` of ``total``, from 1) for progress messages."""

    name: str
    config: RunConfig
    run_dir: Path
    index: int
    total: int


@dataclass(frozen=True)
class Outcome:
    """What training one job gave: its metrics (may be None; the run directory's metrics.json is the
    record), or the exception that ended it; ``where`` it ran when the executor knows it better than
    it did at the start (a Ray node)."""

    job: Job
    metrics: dict | None = None
    error: Exception | None = None
    where: str | None = None


class Executor(Protocol):
    """Trains a sweep's jobs.

    ``execute(jobs, start)`` gets every job of the sweep in plan order and yields one ``Outcome`` per
    job it trained, each as it finishes (in any order). Just before launching a job it calls
    ``start(job)``, in the thread iterating it; when that returns False the job is not trained and no
    outcome is yielded (it finished before, or another process holds it; the runner has said why).
    ``start`` also takes ``where=`` (the machine and devices, for the manifest) and ``note=`` (e.g.
    "retry 1 of 2"; a job may be started again after a failed attempt). An executor may have ``slots``
    (how many jobs it trains at once; 1 when absent), used for the ETA.
    An ``Exception`` raised while training a job (``Stopped`` by a signal included) is yielded as that
    job's ``Outcome.error``, never raised; the runner decides whether the sweep goes on. When the
    runner stops iterating early it closes the iterator (``close()``, as for a generator): an executor
    with jobs in flight stops them there.
    """

    def execute(self, jobs: Sequence[Job], start: Callable[[Job], bool]) -> Iterator[Outcome]: ...


TrainFn = Callable[["RunConfig"], "dict | None"]


def train_in_subprocess(cfg: RunConfig) -> dict | None:
    """Train one run in a fresh ``tunelab train`` process, output to ``<run_dir>/train.out``.

    Peak memory (RSS never shrinks), threads and any state a method leaves behind then belong to that
    run alone, as when a user runs it by itself. SIGTERM/SIGINT are passed on to the run, which saves a
    checkpoint and stops; this then raises ``Stopped`` so the sweep starts nothing more."""
    child = launch_train(cfg)
    with forward_signals(child) as got:
        returncode = child.wait()
    return train_result(cfg.run_dir(), returncode, got[0] if got else None)


def write_request(cfg: RunConfig) -> Path:
    """Write the run's config as ``<run_dir>/requested.yaml`` (what ``tunelab train`` is given)."""
    from tunelab.config import dump_config

    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "requested.yaml"
    atomic_write_text(spec, dump_config(cfg))
    return spec


def train_command(spec: Path, nproc: int = 1) -> list[str]:
    """``tunelab train SPEC`` with this Python, under ``torchrun`` (one process per GPU) when ``nproc`` > 1."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "-m", "tunelab", "train", str(spec)]
    return [sys.executable, "-m", "tunelab", "train", str(spec)]


def launch_train(cfg: RunConfig, env: dict[str, str] | None = None, nproc: int = 1) -> subprocess.Popen:
    """Start ``tunelab train`` for ``cfg`` (output to ``<run_dir>/train.out``), with ``env`` added to
    this process's environment; returns the child, in its own session (a terminal's Ctrl-C reaches
    only the sweep, which passes it on exactly once)."""
    spec = write_request(cfg)
    with open(cfg.run_dir() / "train.out", "w") as out:
        return subprocess.Popen(train_command(spec, nproc), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})


def train_result(run_dir: Path, returncode: int, signum: int | None = None) -> dict | None:
    """The metrics of a finished ``tunelab train`` child; ``Stopped`` when ``signum`` was passed on to
    it (it saved a checkpoint, or finished), RuntimeError with the end of its train.out when it failed."""
    if signum is not None:
        raise Stopped(f"stopped by {signal.Signals(signum).name}: the run in {run_dir} saved a checkpoint and "
                      "stopped; rerun the same command to continue the sweep where it stopped", signum)
    if returncode != 0:
        out = run_dir / "train.out"
        tail = out.read_text(errors="replace").strip().splitlines()[-5:] if out.exists() else []
        raise RuntimeError(f"training exited with status {returncode}; last lines of {out}:\n" + "\n".join(tail))
    return read_metrics(run_dir)


@contextlib.contextmanager
def forward_signals(child: subprocess.Popen) -> Iterator[list[int]]:
    """While ``child`` runs, SIGTERM/SIGINT are passed on to it (it checkpoints and stops); the signals
    received are yielded so the caller stops the sweep instead of starting the next run."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def forward(signum, frame):
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class SerialExecutor:
    """One job at a time, in plan order, each trained by ``train(config) -> metrics``; the default
    ``train`` is ``train_in_subprocess`` (each run its own ``tunelab train`` process)."""

    def __init__(self, train: TrainFn = train_in_subprocess):
        self.train = train

    def execute(self, jobs: Sequence[Job], start: Callable[[Job], bool]) -> Iterator[Outcome]:
        for job in jobs:
            if not start(job):
                continue
            error, metrics = None, None
            try:
                metrics = self.train(job.config)
            except Exception as e:  # the runner records it (or raises it); a BaseException ends the sweep
                error = e
            yield Outcome(job, metrics, error)


def run_plan(
    out_dir: Path,
    manifest: dict,
    plan: Sequence[PlannedRun],
    *,
    executor: Executor | None = None,
    keep_going: bool = True,
    say: Callable[[str], None] = to_stderr,
    console: Console | None | bool = None,
) -> dict:
    """Train every run of ``plan`` under ``out_dir/runs`` with ``executor`` (default ``SerialExecutor()``)
    and record them in ``out_dir/manifest.json`` (``manifest`` plus ``failed`` and ``state``); returns the
    manifest.

    Every config is validated before any run starts. The runs are trained first seeds first
    (``budget_order``). A run with a ``metrics.json`` is reused, a run another process holds locked is
    skipped and recorded as failed. A failed run is recorded and the rest go on, unless ``keep_going`` is
    False (then its exception is raised). ``Stopped`` (a signal) writes the manifest and is raised:
    rerunning the sweep continues it.

    ``console``: a rich Console on which the sweep draws ``tunelab status``'s table live, redrawn as runs
    start and finish (``tunelab.sweeps.status.LiveStatus``); None (default): stderr's when ``say`` is
    ``to_stderr`` and stderr is a terminal, else no table (the progress lines alone); False: never."""
    cfgs = [run.config() for run in plan]
    order = budget_order(plan)
    jobs = [Job(plan[i].name, cfgs[i], out_dir / "runs" / plan[i].name, n, len(plan)) for n, i in enumerate(order, 1)]
    executor = executor or SerialExecutor()
    failed: dict[str, str] = {}
    manifest["failed"] = failed
    before = previous_state(out_dir)
    state: dict[str, dict] = {job.name: {"state": "pending"} for job in jobs}
    manifest["state"] = state
    began: dict[str, float] = {}
    if console is None:
        console = live_console() if say is to_stderr else None
    live = None
    if console is not None and console is not False:
        live = LiveStatus(out_dir, manifest, console)

    def save() -> None:  # the manifest, and the live table when there is one
        write_manifest(out_dir, manifest)
        if live is not None:
            live.show()

    save()

    def start(job: Job, where: str | None = None, note: str | None = None) -> bool:
        at = f"[{job.index}/{job.total}] {job.name}"
        entry = state[job.name]
        if (job.run_dir / "metrics.json").exists():
            say(f"{at}: finished before, reused")
            if config_changed(job.run_dir, job.config):
                say(f"  warning: {job.run_dir / 'config.yaml'} differs from this config; delete the run to redo it")
            old = before.get(job.name) or {}
            entry.update({k: old[k] for k in ("where", "wall_s", "attempts") if k in old}, state="done", reused=True)
            save()
            return False
        holder = locked_by(job.run_dir)
        if holder:  # another process trains it right now: never start a second writer
            failed[job.name] = f"locked: {job.run_dir} is being written by {holder}"
            entry.update(state="failed", error=failed[job.name])
            say(f"{at}: SKIPPED, {job.run_dir} is locked by {holder}")
            save()
            return False
        say(f"{at}: training" + (f" ({note})" if note else "") + (f" on {where}" if where else ""))
        began[job.name] = time.time()
        entry.pop("error", None)
        entry.update(state="running", where=where or socket.gethostname(), started=_now(),
                     attempts=entry.get("attempts", 0) + 1)
        failed.pop(job.name, None)
        save()
        return True

    def finish(done: Outcome, new_state: str, error: str | None = None) -> None:
        entry = state[done.job.name]
        entry.update(state=new_state, finished=_now())
        if done.job.name in began:
            entry["wall_s"] = round(time.time() - began.pop(done.job.name), 2)
        if done.where:
            entry["where"] = done.where
        if error:
            entry["error"] = error
        manifest["eta_s"] = eta_s(state, max(1, int(getattr(executor, "slots", 1) or 1)))  # may grow (Ray)
        save()

    def stop_all() -> None:  # the sweep is stopping: the runs in flight saved a checkpoint
        for entry in state.values():
            if entry["state"] == "running":
                entry["state"] = "stopped"
        manifest["eta_s"] = None
        save()

    with live or contextlib.nullcontext():  # the live table stops on any way out
        outcomes = iter(executor.execute(jobs, start))
        try:
            for done in outcomes:
                job, error = done.job, done.error
                at = f"[{job.index}/{job.total}] {job.name}"
                if isinstance(error, Stopped):
                    finish(done, "done" if (job.run_dir / "metrics.json").exists() else "stopped")
                    stop_all()
                    raise error
                if error is not None:
                    finish(done, "failed", f"{type(error).__name__}: {error}")
                    if not keep_going:
                        raise error
                    # one bad method must not sink the whole comparison
                    failed[job.name] = f"{type(error).__name__}: {error}"
                    save()
                    say(f"{at}: FAILED {type(error).__name__}: {error}")
                    continue
                if done.metrics and not (job.run_dir / "metrics.json").exists():  # keep the "finished" marker true
                    atomic_write_text(job.run_dir / "metrics.json", json.dumps(done.metrics, indent=2, default=str))
                finish(done, "done")
                say(f"{at}: done in {state[job.name]['wall_s']:.1f}s" + progress_note(state, manifest.get("eta_s")))
        except BaseException:
            stop_all()
            raise
        finally:
            close = getattr(outcomes, "close", None)
            if close is not None:  # a generator: its jobs still in flight are stopped
                close()
        manifest["eta_s"] = None
        save()
        return manifest


def budget_order(plan: Sequence[PlannedRun]) -> list[int]:
    """Plan indices, first runs of every label first, then every label's second run, ... (plan order
    within a round): the first complete seed of every method arrives first."""
    seen: dict[str, int] = {}
    rank = []
    for run in plan:
        rank.append(seen.get(run.label, 0))
        seen[run.label] = rank[-1] + 1
    return sorted(range(len(plan)), key=lambda i: (rank[i], i))


def eta_s(state: dict[str, dict], slots: int = 1) -> float | None:
    """Seconds left: the mean wall time of this sweep's finished runs x the runs not finished / ``slots``."""
    walls = [e["wall_s"] for e in state.values() if e["state"] == "done" and not e.get("reused") and "wall_s" in e]
    left = sum(e["state"] in ("pending", "running", "stopped") for e in state.values())
    if not walls:
        return None
    return round(sum(walls) / len(walls) * left / max(1, slots), 1)


def progress_note(state: dict[str, dict], eta: float | None) -> str:
    n_done = sum(e["state"] == "done" for e in state.values())
    text = f" ({n_done}/{len(state)} done"
    if eta:
        text += f", about {format_seconds(eta)} left"
    return text + ")"


def previous_state(out_dir: Path) -> dict[str, dict]:
    """The ``state`` of the manifest an earlier (interrupted) run of this sweep left, or {}."""
    from tunelab.report import MANIFEST

    try:
        return json.loads((out_dir / MANIFEST).read_text()).get("state") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def write_manifest(out_dir: Path, manifest: dict) -> None:
    from tunelab.report import MANIFEST  # the report package draws plots: imported only when a sweep runs

    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))


def config_changed(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run's saved config.yaml differs from ``cfg`` (a reused run made under another config)."""
    from tunelab.config import dump_config

    saved = run_dir / "config.yaml"
    return saved.exists() and yaml.safe_load(saved.read_text()) != yaml.safe_load(dump_config(cfg))
