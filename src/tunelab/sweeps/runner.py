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
each one's ``Outcome`` as it finishes, so an executor may train several at a time. Today's, and the
default, is ``SerialExecutor()``: one run after another in plan order, each in its own
``tunelab train`` process. Tests pass ``SerialExecutor(fake_train)``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import yaml

from tunelab.results import read_metrics
from tunelab.runtime.atomic_files import atomic_write_text
from tunelab.training.run_lock import Stopped, locked_by

if TYPE_CHECKING:
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
    record), or the exception that ended it."""

    job: Job
    metrics: dict | None = None
    error: Exception | None = None


class Executor(Protocol):
    """Trains a sweep's jobs.

    ``execute(jobs, start)`` gets every job of the sweep in plan order and yields one ``Outcome`` per
    job it trained, each as it finishes (in any order). Just before launching a job it calls
    ``start(job)``, in the thread iterating it; when that returns False the job is not trained and no
    outcome is yielded (it finished before, or another process holds it; the runner has said why).
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
    from tunelab.config import dump_config

    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "requested.yaml"
    atomic_write_text(spec, dump_config(cfg))
    with open(run_dir / "train.out", "w") as out:
        # Its own session: a terminal's Ctrl-C reaches only us, and we pass it on exactly once.
        child = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(spec)], stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        with forward_signals(child) as got:
            returncode = child.wait()
    if got:
        raise Stopped(f"stopped by {signal.Signals(got[0]).name}: the run in {run_dir} saved a checkpoint and "
                      "stopped; rerun the same command to continue the comparison where it stopped", got[0])
    if returncode != 0:
        tail = (run_dir / "train.out").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"training exited with status {returncode}; last lines of {run_dir / 'train.out'}:\n" + "\n".join(tail))
    return read_metrics(run_dir)


def train_in_process(cfg: RunConfig) -> dict | None:
    """Train one run in this process (``tunelab.training.loop.run``): no process start, but the run's
    memory and threads stay with the sweep."""
    from tunelab.training.loop import run

    return run(cfg)


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
) -> dict:
    """Train every run of ``plan`` under ``out_dir/runs`` with ``executor`` (default ``SerialExecutor()``)
    and record them in ``out_dir/manifest.json`` (``manifest`` plus ``failed``); returns the manifest.

    Every config is validated before any run starts. A run with a ``metrics.json`` is reused, a run
    another process holds locked is skipped and recorded as failed. A failed run is recorded and the
    rest go on, unless ``keep_going`` is False (then its exception is raised). ``Stopped`` (a signal)
    writes the manifest and is raised: rerunning the sweep continues it."""
    cfgs = [run.config() for run in plan]
    jobs = [Job(run.name, cfg, out_dir / "runs" / run.name, i, len(plan))
            for i, (run, cfg) in enumerate(zip(plan, cfgs, strict=True), 1)]
    executor = executor or SerialExecutor()
    failed: dict[str, str] = {}
    manifest["failed"] = failed
    write_manifest(out_dir, manifest)

    def start(job: Job) -> bool:
        where = f"[{job.index}/{job.total}] {job.name}"
        if (job.run_dir / "metrics.json").exists():
            say(f"{where}: finished before, reused")
            if config_changed(job.run_dir, job.config):
                say(f"  warning: {job.run_dir / 'config.yaml'} differs from this config; delete the run to redo it")
            return False
        holder = locked_by(job.run_dir)
        if holder:  # another process trains it right now: never start a second writer
            failed[job.name] = f"locked: {job.run_dir} is being written by {holder}"
            say(f"{where}: SKIPPED, {job.run_dir} is locked by {holder}")
            return False
        say(f"{where}: training")
        return True

    outcomes = iter(executor.execute(jobs, start))
    try:
        for done in outcomes:
            job, error = done.job, done.error
            if isinstance(error, Stopped):
                write_manifest(out_dir, manifest)
                raise error
            if error is not None:
                if not keep_going:
                    raise error
                # one bad method must not sink the whole comparison
                failed[job.name] = f"{type(error).__name__}: {error}"
                say(f"[{job.index}/{job.total}] {job.name}: FAILED {type(error).__name__}: {error}")
                continue
            if done.metrics and not (job.run_dir / "metrics.json").exists():  # keep the "finished" marker true
                atomic_write_text(job.run_dir / "metrics.json", json.dumps(done.metrics, indent=2, default=str))
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:  # a generator: its jobs still in flight are stopped
            close()
    write_manifest(out_dir, manifest)
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> None:
    from tunelab.report import MANIFEST  # the report package draws plots: imported only when a sweep runs

    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))


def config_changed(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run's saved config.yaml differs from ``cfg`` (a reused run made under another config)."""
    from tunelab.config import dump_config

    saved = run_dir / "config.yaml"
    return saved.exists() and yaml.safe_load(saved.read_text()) != yaml.safe_load(dump_config(cfg))
