"""Executors that train several runs of a sweep at once: on this machine (``LocalExecutor``) or on a Ray
cluster (``RayExecutor``, ``tunelab.sweeps.ray_executor``); ``executor_from`` picks one from the
command line's ``--executor/--jobs/...`` and the sweep section's keys.

Every run still trains in its own ``tunelab train`` process with its own config, so the executor
never changes a run's results: the same config and seed give the same metrics serially, with
``--jobs 2`` or on Ray (what changes is only which device and how many CPU threads a run gets; give
runs a fixed ``train.threads`` when bit-identical CPU results matter, as the tests do).

Sweep section keys (``compare:``, ``scale:`` or ``advise:``; the command line wins):

    executor: local          # local (default) | ray
    jobs: 2                  # local: runs at once (default: one per GPU, else 1)
    gpus_per_run: 1          # GPUs each run gets (started under torchrun with one process per GPU when > 1)
    ray_address: auto        # ray: auto (a running cluster) | ray://head:10001 | none (a local one)
    storage: /shared/sweeps  # ray: a directory every node mounts; the output dir must lie inside it
    retries: 1               # ray: attempts after a run fails (it resumes from its checkpoint)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from tunelab.sweeps.runner import Executor, Job, Outcome, SerialExecutor, launch_train, train_result

EXECUTORS = ("local", "ray")
POLL_S = 0.1


def cpu_count() -> int:
    """The CPU cores this process may use."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process may hand out (ids as CUDA_VISIBLE_DEVICES names them), [] on CPU."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install: train on the CPU rather than fail the sweep here
        n = 0
    if n == 0:
        return []
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:n] if len(named) >= n else [str(i) for i in range(n)]


class LocalExecutor:
    """Up to ``jobs`` runs at once on this machine, each a ``tunelab train`` process.

    On CUDA every run gets ``gpus_per_run`` GPUs of its own through CUDA_VISIBLE_DEVICES (started under
    ``torchrun --nproc_per_node k`` when k > 1); ``jobs`` defaults to as many as the GPUs allow. On the
    CPU ``jobs`` defaults to 1 and the cores are split: a run without ``train.threads`` gets
    ``cores // jobs`` threads (OMP_NUM_THREADS), so parallel runs do not fight over cores.

    SIGTERM/SIGINT are passed on to every running run (each saves a checkpoint and stops), nothing more
    is started, and once all have exited each stopped one is yielded as ``Stopped``."""

    def __init__(self, jobs: int | None = None, gpus_per_run: int | None = None, *,
                 gpus: list[str] | None = None, cores: int | None = None):
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        self.cores = cores or cpu_count()
        self.gpus_per_run = int(gpus_per_run or 1)
        if self.gpus:
            if self.gpus_per_run > len(self.gpus):
                raise ValueError(f"gpus_per_run={self.gpus_per_run}, but this machine has {len(self.gpus)} GPU(s)")
            most = len(self.gpus) // self.gpus_per_run
            if jobs is not None and jobs > most:
                raise ValueError(f"--jobs {jobs}: {len(self.gpus)} GPU(s) with {self.gpus_per_run} per run allow "
                                 f"at most {most} runs at once")
            self.jobs = int(jobs or most)
        else:
            self.jobs = int(jobs or 1)
        if self.jobs < 1:
            raise ValueError(f"--jobs {jobs}: need at least 1")
        self.slots = self.jobs

    def placement(self, job: Job, free: list[str]) -> tuple[dict[str, str], int, list[str], str]:
        """(environment, processes, GPUs taken, where) for one run."""
        host = socket.gethostname()
        if self.gpus:
            taken = free[: self.gpus_per_run]
            env = {"CUDA_VISIBLE_DEVICES": ",".join(taken)}
            if job.config.train.threads is None:
                env["OMP_NUM_THREADS"] = str(max(1, self.cores // (self.jobs * self.gpus_per_run)))
            return env, self.gpus_per_run, taken, f"{host} cuda:{','.join(taken)}"
        threads = job.config.train.threads or max(1, self.cores // self.jobs)
        env = {} if self.jobs == 1 and job.config.train.threads is None else {
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        return env, 1, [], f"{host} cpu ({threads} thread{'s' if threads > 1 else ''})"

    def execute(self, jobs: Sequence[Job], start: Callable[..., bool]) -> Iterator[Outcome]:
        pending = list(jobs)
        free = list(self.gpus)
        running: dict = {}  # Popen -> (job, GPUs taken)
        got: list[int] = []

        def forward(signum, frame):
            got.append(signum)
            for child in list(running):
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

        main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            stopped: list[Job] = []
            while pending or running:
                while pending and not got and len(running) < self.jobs:
                    job = pending.pop(0)
                    env, nproc, taken, where = self.placement(job, free)
                    if not start(job, where=where):
                        continue
                    for g in taken:
                        free.remove(g)
                    child = launch_train(job.config, env, nproc)
                    running[child] = (job, taken)
                    if got:  # a signal came while it started: it stops too
                        with contextlib.suppress(ProcessLookupError):
                            child.send_signal(got[0])
                if got:
                    pending.clear()
                finished = [c for c in running if c.poll() is not None]
                if not finished:
                    time.sleep(POLL_S)
                    continue
                for child in finished:
                    job, taken = running.pop(child)
                    free.extend(taken)
                    rc = child.returncode
                    if got and rc != 0:
                        if not (job.run_dir / "metrics.json").exists():
                            stopped.append(job)  # stopped by the signal after saving its checkpoint
                            continue
                        rc = 0  # it had finished (metrics.json is written last) when the signal came
                    error, metrics = None, None
                    try:
                        metrics = train_result(job.run_dir, rc)
                    except Exception as e:
                        error = e
                    yield Outcome(job, metrics, error)
            for job in stopped:
                try:
                    train_result(job.run_dir, 1, got[0])
                except Exception as e:
                    yield Outcome(job, error=e)
        finally:
            # closed early (the runner stopped on an error): the runs in flight checkpoint and stop
            for child in running:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
            for child in running:
                child.wait()
            for s, h in old.items():
                signal.signal(s, h)


def executor_from(section: dict | None, executor: Executor | str | None = None, *, jobs: int | None = None,
                  gpus_per_run: int | None = None, ray_address: str | None = None, storage: str | None = None,
                  retries: int | None = None) -> Executor:
    """The executor a sweep asks for: ``executor`` when it is one already; else by name (the argument,
    else the section's ``executor``, else local) with the arguments, else the section's keys."""
    if executor is not None and not isinstance(executor, str):
        return executor
    section = section or {}

    def pick(value, key):
        return value if value is not None else section.get(key)

    kind = str(executor or section.get("executor") or "local").lower()
    if kind not in EXECUTORS:
        raise ValueError(f"executor '{kind}': choose one of {', '.join(EXECUTORS)}")
    jobs, gpus_per_run = pick(jobs, "jobs"), pick(gpus_per_run, "gpus_per_run")
    if kind == "ray":
        from tunelab.sweeps.ray_executor import RayExecutor

        retries = pick(retries, "retries")
        return RayExecutor(address=pick(ray_address, "ray_address"), storage=pick(storage, "storage"),
                           retries=1 if retries is None else int(retries), gpus_per_run=gpus_per_run)
    for name, value in (("ray_address", ray_address), ("storage", storage), ("retries", retries)):
        if value is not None:
            raise ValueError(f"--{name.replace('_', '-')} is for --executor ray")
    local = LocalExecutor(None if jobs is None else int(jobs), gpus_per_run)
    if local.jobs == 1 and not local.gpus:
        return SerialExecutor()  # one run at a time on the CPU: what sweeps always did
    return local
