"""Sweeps on several processes at once (``--jobs 2``) and on a local Ray cluster give the serial sweep's
results bit for bit; a sweep stopped by SIGTERM resumes without retraining its finished runs; ``tunelab
status`` reads the manifest. Real ``tunelab train`` subprocesses on a tiny model (CPU, fp32, 1 thread)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from test_train import WORDS
from tunelab.sweeps.compare import compare
from tunelab.sweeps.runner import SerialExecutor

# columns of results.csv that measure the machine, not the training
MACHINE = {"data_seconds", "eval_time_s", "wall_time_s", "train_tokens_per_s", "peak_memory_mb", "train_time_s",
           "run_dir", "data_cached", "held_weights_mb"}
LONG_STEPS = 1000
METHODS = [{"name": "full", "label": "short", "train": {"max_steps": 2}},
           {"name": "lora", "r": 2, "label": "long", "train": {"max_steps": LONG_STEPS, "lr": 1e-3}}]


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def cfg_path(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    rows = [{"sentence": " ".join(WORDS[i % 7 : i % 7 + 4]), "label": i % 2} for i in range(12)]
    data = d / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = d / "d_eval.jsonl"  # a copy: train == eval is refused, and what is tested is the executors' sameness
    held.write_text(data.read_text())
    cfg = {
        "model": str(tiny_dir), "method": {"name": "full"},
        "task": {"name": "sentiment", "chat": False, "labels": ["no", "yes"], "template": "{text} ?"},
        "data": {"train": str(data), "eval": str(held)},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "precision": "fp32", "threads": 1,
                  "log_every": 5},
        "eval": {"loss": False},
        "compare": {"methods": METHODS, "seeds": [0]},
    }
    path = d / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def serial(cfg_path):
    """The reference: the same sweep, one run after another."""
    return compare(cfg_path, out_dir=cfg_path.parent / "serial", say=quiet, executor=SerialExecutor())


def results(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return [{k: v for k, v in row.items() if k not in MACHINE} for row in csv.DictReader(f)]


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("grad_norm")) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def assert_same_as_serial(out: Path, serial: Path) -> None:
    assert results(out) == results(serial) and len(results(out)) == 2
    for run in ("short-s0", "long-s0"):
        assert losses(out / "runs" / run) == losses(serial / "runs" / run)
        assert json.loads((out / "runs" / run / "metrics.json").read_text())["metrics"] == \
            json.loads((serial / "runs" / run / "metrics.json").read_text())["metrics"]


def states(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["state"]


def test_two_jobs_at_once_give_the_serial_results(cfg_path, serial):
    out = compare(cfg_path, out_dir=cfg_path.parent / "jobs2", say=quiet, executor="local",
                  executor_options={"jobs": 2})
    assert_same_as_serial(out, serial)
    st = states(out)
    assert all(e["state"] == "done" and e["where"].endswith("cpu (1 thread)") for e in st.values())
    # both ran at once: each started before the other finished
    assert st["short-s0"]["started"] <= st["long-s0"]["started"] < st["short-s0"]["finished"]


def test_a_local_ray_cluster_gives_the_serial_results(cfg_path, serial):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tunelab[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as e:  # pragma: no cover - a machine where Ray cannot start
        pytest.skip(f"a local Ray cluster could not start here: {type(e).__name__}: {e}")
    try:
        out = compare(cfg_path, out_dir=cfg_path.parent / "ray", say=quiet, executor="ray")
    finally:
        ray.shutdown()
    assert_same_as_serial(out, serial)
    assert all(e["state"] == "done" and e["where"].startswith("ray node") for e in states(out).values())


def wait_for(what, check, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (status {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_stops_every_job_and_the_rerun_retrains_nothing_finished(cfg_path, serial, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tunelab", "compare", str(cfg_path), "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    short, long = out / "runs" / "short-s0", out / "runs" / "long-s0"

    def long_is_training():
        log = long / "log.jsonl"
        return log.exists() and log.read_text().strip() != ""

    def short_done():
        return (out / "manifest.json").exists() and states(out)["short-s0"]["state"] == "done"

    # The long run is held (SIGSTOP) once it trains, so that it is mid-run when the sweep is stopped
    # however fast or loaded the machine is.
    wait_for("the long run to log a step", long_is_training, proc)
    held = json.loads((long / ".tunelab.lock").read_text())["pid"]
    os.kill(held, signal.SIGSTOP)
    try:
        wait_for("the sweep to record the short run done", short_done, proc)
        proc.send_signal(signal.SIGTERM)  # what `kill <pid>` or a scheduler's preemption does
        time.sleep(1)  # the sweep passes it on to the (held) long run
    finally:
        os.kill(held, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    st = states(out)
    assert st["short-s0"]["state"] == "done" and st["long-s0"]["state"] == "stopped", st
    assert not (long / "metrics.json").exists() and (long / "checkpoints" / "last").is_dir()  # stopped, saved
    assert not list(out.rglob(".*.tmp-*")), "a half-written file was left"
    status = subprocess.run([sys.executable, "-m", "tunelab", "status", str(out)], capture_output=True, text=True)
    assert status.returncode == 0 and "1 done, 1 stopped" in status.stdout and "rerun" in status.stdout
    stamps = {p: p.stat().st_mtime_ns for p in (short / "metrics.json", short / "train.out")}
    steps_before = len(losses(long))

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "short-s0: finished before, reused" in rerun.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the finished run was not started again
    assert 0 < steps_before < LONG_STEPS // 5
    assert_same_as_serial(out, serial)
    assert all(e["state"] == "done" for e in states(out).values())


def test_status_of_a_sweep_killed_without_a_word(tmp_path):
    """A manifest saying "running" for a run no process holds is shown as stopped (rerun to continue)."""
    from tunelab.sweeps.status import format_status

    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "compare", "runs": [{"run": "a"}], "state": {
        "a": {"state": "running", "where": "vm cpu (1 thread)", "attempts": 1}}}))
    text = format_status(tmp_path)
    assert "stopped?" in text and "rerun the sweep's command" in text


def test_ray_executor_without_ray_says_how_to_install(monkeypatch, tmp_path):
    from tunelab.sweeps.executors import executor_from

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tunelab\[ray\]'"):
        executor_from({"executor": "ray"})
    with pytest.raises(ValueError, match="choose one of local, ray"):
        executor_from({}, "slurm")
    with pytest.raises(ValueError, match="for --executor ray"):
        executor_from({}, "local", storage=str(tmp_path))


def test_cpu_cores_are_split_between_jobs_and_gpus_given_one_per_run(cfg_path):
    from tunelab.config import load_config
    from tunelab.sweeps.executors import LocalExecutor
    from tunelab.sweeps.runner import Job

    cfg = load_config(None, ["model.name=x", "method.name=full"])
    job = Job("a", cfg, Path("a"), 1, 1)
    env, nproc, _, where = LocalExecutor(2, cores=8, gpus=[]).placement(job, [])
    assert env["OMP_NUM_THREADS"] == "4" and nproc == 1 and where.endswith("cpu (4 threads)")
    gpu = LocalExecutor(None, 2, cores=16, gpus=["0", "1", "2", "3"])
    assert gpu.jobs == 2
    env, nproc, taken, where = gpu.placement(job, ["2", "3"])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and nproc == 2 and taken == ["2", "3"] and "cuda:2,3" in where
    with pytest.raises(ValueError, match="at most 2 runs at once"):
        LocalExecutor(3, 2, gpus=["0", "1", "2", "3"])


def test_the_sweep_section_chooses_the_executor(monkeypatch):
    from tunelab.sweeps import executors

    monkeypatch.setattr(executors, "visible_gpus", lambda: [])
    assert isinstance(executors.executor_from({}), SerialExecutor)  # the CPU default: one run at a time
    local = executors.executor_from({"executor": "local", "jobs": 2})
    assert isinstance(local, executors.LocalExecutor) and local.jobs == 2
    assert executors.executor_from({"jobs": 2}, jobs=1).__class__ is SerialExecutor  # the command line wins
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0", "1", "2"])
    assert executors.executor_from({}).jobs == 3  # CUDA: one run per GPU


def test_the_storage_probe_names_a_node_that_cannot_see_the_runs(tmp_path):
    from tunelab.sweeps.ray_executor import probe_problems

    path = tmp_path / ".probe"
    (tmp_path / ".probe.good").write_text("t")
    answers = [{"host": "good", "token": "t"}, {"host": "blind", "error": "FileNotFoundError: no such file"},
               {"host": "other", "token": "x"}]
    problems = probe_problems(answers, "t", path)
    assert len(problems) == 2 and "node blind cannot read" in problems[0] and "node other sees another" in problems[1]



class FakeRay:
    """Enough of Ray's API for RayExecutor, running each task at once in this process: ``results``
    gives, per run directory name, the task results to return in turn (then the real task body is not
    run; a result with returncode 0 writes the run's metrics.json)."""

    class Ref:
        def __init__(self, value):
            self.value = value

    def __init__(self, results):
        self.results, self.submitted = results, []

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 2.0}

    def nodes(self):
        return [{"Alive": True, "NodeID": "n1"}]

    def remote(self, fn):
        fake = self

        class Remote:
            def options(self, **kw):
                return self

            def remote(self, *args):
                if fn.__name__ == "probe_task":
                    return FakeRay.Ref(fn(*args))
                run_dir = Path(args[1])
                fake.submitted.append(run_dir.name)
                res = fake.results[run_dir.name].pop(0)
                if isinstance(res, Exception):
                    return FakeRay.Ref(res)
                if res["returncode"] == 0:
                    (run_dir / "metrics.json").write_text(json.dumps({"metrics": {"accuracy": 1.0}, "run": {}}))
                return FakeRay.Ref({"host": "node-a", **res})

        return Remote()

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs)[:num_returns], list(refs)[num_returns:]

    def get(self, ref):
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        if isinstance(ref.value, Exception):
            raise ref.value
        return ref.value

    def cancel(self, ref, force=False):
        pass


def test_ray_retries_a_failed_run_then_reports_it_and_the_others_finish(tmp_path, monkeypatch):
    from test_compare import write_cfg
    from tunelab.sweeps import compare as cmp
    from tunelab.sweeps.ray_executor import RayExecutor

    fake = FakeRay({
        "lora-s0": [{"returncode": 1}, {"returncode": 0}],                      # fails once, then resumes
        "loreft-s0": [RuntimeError("node died"), {"returncode": 1}, {"returncode": 1}],  # fails every attempt
        "full-s0": [{"returncode": 0}],
    })
    monkeypatch.setitem(sys.modules, "ray", fake)
    strategies = types.ModuleType("ray.util.scheduling_strategies")
    strategies.NodeAffinitySchedulingStrategy = lambda node, soft: None
    monkeypatch.setitem(sys.modules, "ray.util.scheduling_strategies", strategies)
    msgs = []
    out = cmp.compare(write_cfg(tmp_path), (), ["lora", "loreft", "full"], [0], tmp_path / "cmp", say=msgs.append,
                      executor=RayExecutor(retries=2))
    assert sorted(fake.submitted) == ["full-s0", "lora-s0", "lora-s0", "loreft-s0", "loreft-s0", "loreft-s0"]
    st = states(out)
    assert st["lora-s0"]["state"] == "done" and st["lora-s0"]["attempts"] == 2 and st["lora-s0"]["where"] == "ray node node-a"
    assert st["loreft-s0"]["state"] == "failed" and st["loreft-s0"]["attempts"] == 3
    assert st["full-s0"]["state"] == "done"
    assert "loreft-s0" in json.loads((out / "manifest.json").read_text())["failed"]
    assert any("loreft-s0: training (retry 2 of 2)" in m for m in msgs)
