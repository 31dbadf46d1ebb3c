"""``--executor ray``: each run of a sweep is a Ray task on a cluster (or a local one), training in its
own ``tunelab train`` process on whichever node Ray picks.

- **Resources.** A task asks for ``num_cpus`` = the run's ``train.threads`` (default 1; the run's
  OMP_NUM_THREADS is set to it) and ``num_gpus`` = ``gpus_per_run`` when the cluster has GPUs
  (Ray sets CUDA_VISIBLE_DEVICES; k > 1 GPUs start the run under ``torchrun --nproc_per_node k``).
  No more tasks are in flight than the cluster's CPUs (and GPUs) hold, so "running" in the manifest
  means running.
- **Storage.** Run directories are written by the nodes, read by the driver (reports, resume): the
  sweep's output directory must be on storage every node mounts at the same path (``storage``,
  default the output directory itself). Before training, a probe task on every node reads a file the
  driver wrote there and writes one back; a node that cannot is named and the sweep refuses to start.
- **Failures.** A run that fails (its process exits non-zero, its worker or node dies) is started
  again up to ``retries`` times; ``tunelab train`` resumes it from its last checkpoint. Then it is
  reported as failed and the others go on.
- **Stopping.** On SIGTERM/SIGINT the driver writes a stop file into each running run's directory;
  the task passes SIGTERM to its run, which saves a checkpoint and exits; tasks still running after
  ``stop_timeout_s`` are cancelled (``ray.cancel(force=True)``). Rerunning the command continues.

Ray is optional: ``pip install 'tunelab[ray]'``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tunelab.sweeps.runner import Job, Outcome, train_command, train_result, write_request

STOP_FILE = ".tunelab.stop"
INSTALL = "the Ray executor needs Ray: pip install 'tunelab[ray]' (or pip install 'ray>=2.9')"


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ModuleNotFoundError(f"{INSTALL} ({e})") from None
    return ray


def train_task(spec: str, run_dir: str, env: dict[str, str], nproc: int, poll_s: float = 0.2) -> dict:
    """The body of one Ray task: ``tunelab train spec`` in a child process on this node; a stop file in
    ``run_dir`` (or an interrupt from ``ray.cancel``) passes SIGTERM to it and waits for its checkpoint."""
    run = Path(run_dir)
    stop = run / STOP_FILE
    with contextlib.suppress(FileNotFoundError):
        stop.unlink()
    t0 = time.time()
    with open(run / "train.out", "a") as out:  # a retry's output follows the failed attempt's
        child = subprocess.Popen(train_command(Path(spec), nproc), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, **env})
        stopped = False
        try:
            while child.poll() is None:
                if not stopped and stop.exists():
                    stopped = True
                    child.send_signal(signal.SIGTERM)
                time.sleep(poll_s)
        except BaseException:  # cancelled: the run checkpoints before the task ends
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            child.wait()
            raise
    return {"returncode": child.returncode, "stopped": stopped, "host": socket.gethostname(),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "wall_s": time.time() - t0}


def probe_task(path: str) -> dict:
    """Read the driver's probe file at ``path`` and write ``<path>.<host>`` beside it."""
    host = socket.gethostname()
    try:
        token = Path(path).read_text()
        Path(f"{path}.{host}").write_text(token)
        return {"host": host, "token": token}
    except OSError as e:
        return {"host": host, "error": f"{type(e).__name__}: {e}"}


def probe_problems(answers: list[dict], token: str, path: Path) -> list[str]:
    """What the probe answers say is wrong: a node that could not read the file, read another one, or
    whose write the driver cannot see."""
    problems = []
    for a in answers:
        host = a.get("host", "?")
        if a.get("error"):
            problems.append(f"node {host} cannot read {path} ({a['error']})")
        elif a.get("token") != token:
            problems.append(f"node {host} sees another {path} (not the file this machine wrote)")
        elif not Path(f"{path}.{host}").exists():
            problems.append(f"node {host} wrote {path}.{host}, but this machine does not see it")
    return problems


class RayExecutor:
    """Each job a Ray task (see the module's docstring). ``address``: None starts a local cluster
    (``ray.init()``; a cluster already initialised in this process is used as it is), "auto" joins the
    running one, "ray://host:10001" a remote one through Ray Client."""

    def __init__(self, address: str | None = None, storage: str | Path | None = None, retries: int = 1,
                 gpus_per_run: int | None = None, stop_timeout_s: float = 300.0, probe_timeout_s: float = 120.0):
        import_ray()  # fail now, with the install line, rather than after the plan is built
        self.address = None if address in (None, "", "none", "local") else address
        self.storage = Path(storage) if storage else None
        self.retries = int(retries)
        if self.retries < 0:
            raise ValueError(f"retries={retries}: need 0 or more")
        self.gpus_per_run = gpus_per_run
        self.stop_timeout_s, self.probe_timeout_s = stop_timeout_s, probe_timeout_s
        self.slots = 1

    def _init(self):
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        return ray

    def _check_storage(self, ray, jobs: Sequence[Job]) -> None:
        out_dir = jobs[0].run_dir.parent.parent.resolve()
        storage = (self.storage or out_dir).resolve()
        if not out_dir.is_relative_to(storage):
            raise ValueError(f"the sweep's output {out_dir} is not inside the shared storage {storage}: "
                             "put --out on the storage every Ray node mounts")
        storage.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        path = storage / f".tunelab-probe-{token}"
        path.write_text(token)
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            nodes = [n for n in ray.nodes() if n.get("Alive")]
            probe = ray.remote(probe_task)
            refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(path)) for n in nodes]
            ready, late = ray.wait(refs, num_returns=len(refs), timeout=self.probe_timeout_s)
            answers = ray.get(ready)
            problems = probe_problems(answers, token, path)
            if late:
                problems.append(f"{len(late)} node(s) did not answer the storage probe in {self.probe_timeout_s:.0f}s")
            if problems:
                raise ValueError(f"Ray workers cannot use {storage} for the runs: " + "; ".join(problems) +
                                 ". Put the sweep's output on storage every node mounts at the same path "
                                 "(compare.storage / --storage, and --out inside it)")
        finally:
            for p in storage.glob(f".tunelab-probe-{token}*"):
                with contextlib.suppress(OSError):
                    p.unlink()

    def _capacity(self, ray, cpus: float, gpus: float) -> int:
        total = ray.cluster_resources()
        n = int(total.get("CPU", 0) // cpus) if cpus else 1 << 30
        if gpus:
            n = min(n, int(total.get("GPU", 0) // gpus))
        return max(1, n)

    def execute(self, jobs: Sequence[Job], start: Callable[..., bool]) -> Iterator[Outcome]:
        if not jobs:
            return
        ray = self._init()
        self._check_storage(ray, jobs)
        task = ray.remote(train_task)
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        gpus = int(self.gpus_per_run or 1) if has_gpus else 0
        pending = list(jobs)
        attempts: dict[str, int] = {}
        running: dict = {}  # ObjectRef -> job
        got: list[int] = []
        stop_sent = [0.0]

        def on_signal(signum, frame):
            got.append(signum)

        main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}

        def stop_running():
            for job in running.values():
                with contextlib.suppress(OSError):
                    (job.run_dir / STOP_FILE).write_text("stop")
            stop_sent[0] = time.time()

        try:
            stopped: list[Job] = []
            while pending or running:
                while pending and not got:
                    job = pending[0]
                    cpus = job.config.train.threads or 1
                    self.slots = self._capacity(ray, cpus, gpus)
                    if len(running) >= self.slots:
                        break
                    pending.pop(0)
                    n = attempts.get(job.name, 0)
                    note = f"retry {n} of {self.retries}" if n else None
                    if not start(job, where="ray", note=note):
                        continue
                    attempts[job.name] = n + 1
                    spec = write_request(job.config)
                    env = {"OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus)}
                    ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=0).remote(
                        str(spec), str(job.run_dir), env, max(1, gpus))
                    running[ref] = job
                if got and not stop_sent[0]:
                    pending.clear()
                    stop_running()
                if got and stop_sent[0] and time.time() - stop_sent[0] > self.stop_timeout_s:
                    for ref in running:
                        ray.cancel(ref, force=True)
                if not running:
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        res = ray.get(ref)
                    except Exception as e:  # the worker or its node died, or the task was cancelled
                        res = {"returncode": -1, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
                    where = f"ray node {res['host']}" + (f" cuda:{res['gpus']}" if res.get("gpus") else "") \
                        if res.get("host") else None
                    if got and (job.run_dir / "metrics.json").exists():
                        res["returncode"] = 0  # it had finished (metrics.json is written last) when stopped
                    if got:
                        if res["returncode"] != 0:
                            stopped.append(job)
                            continue
                    elif res["returncode"] != 0 and attempts[job.name] <= self.retries:
                        pending.insert(0, job)  # again, first: it resumes from its checkpoint
                        continue
                    error, metrics = None, None
                    try:
                        if res.get("error"):
                            raise RuntimeError(f"Ray task failed: {res['error']}")
                        metrics = train_result(job.run_dir, res["returncode"])
                    except Exception as e:
                        error = e
                    yield Outcome(job, metrics, error, where)
            for job in stopped:
                try:
                    train_result(job.run_dir, 1, got[0])
                except Exception as e:
                    yield Outcome(job, error=e)
        finally:
            if running:  # closed early (the runner stopped on an error): stop the tasks in flight
                stop_running()
                with contextlib.suppress(Exception):
                    ray.wait(list(running), num_returns=len(running), timeout=self.stop_timeout_s)
                for ref in running:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
            for s, h in old.items():
                signal.signal(s, h)

