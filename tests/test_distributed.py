"""Data-parallel training under torchrun, on CPU with gloo and a tiny model.

Two processes with ``batch_size=2`` must train like one with ``batch_size=4`` (the same global
batches; both accumulate 2 micro-batches a step): same loss sequence, same final weights, same
evaluation, for full fine-tuning (FSDP2) and LoRA (DDP). Only rank 0 writes; a killed rank ends
the run with a clear error and leaves a checkpoint that resumes (here with one process, which
takes the same global batches).

Run as a script, this file is the torchrun worker: ``python -m torch.distributed.run ... THIS JOB.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tunelab.results import read_metrics

WORDS = "the cat sat on mat dog was in John Mary Tom Paris Berlin visited city".split()
STEPS = ["train.max_steps=8", "train.save_every=4", "train.eval_every=4", "train.grad_accum=2", "train.lr=1e-3", "train.schedule=cosine", "train.warmup=0.2"]
LORA = ["method.name=lora", "method.r=4", "method.alpha=8", "train.lr=1e-2"]


def overrides(model_dir, data_dir, out, batch_size, *extra):
    return [
        f"model.name={model_dir}", "method.name=full", "task.name=sentiment", "task.chat=false",
        'task.labels=["no", "yes"]', "task.template={text} ?", f"data.train={data_dir}/train.jsonl",
        f"data.eval={data_dir}/dev.jsonl", f"train.batch_size={batch_size}", "train.log_every=1",
        "train.progress=false", "train.precision=fp32", "train.threads=1", f"output_dir={out}", *STEPS, *extra,
    ]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "method" / "method.safetensors"))


def launch(job: dict, tmp: Path, name: str, procs: int = 2, *flags: str) -> subprocess.CompletedProcess:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *flags, __file__, str(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scratch():
    # our own directory: pytest's numbered tmp dirs are rotated away by concurrent pytest sessions
    with tempfile.TemporaryDirectory(prefix="tunelab-dist-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def setup(scratch):
    """A tiny Llama dir, 16 train + 8 dev rows, single-process references (batch 4) and one
    2-process launch (batch 2 each) of full FT and LoRA, with rank 1's file writes audited."""
    import tunelab.training.loop as train_mod
    from tunelab.config import load_config

    from conftest import tiny_llama, tiny_tokenizer_obj

    tmp = scratch / "setup"
    model_dir, data_dir = tmp / "model", tmp / "data"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer_obj().save_pretrained(model_dir)
    import random

    rng = random.Random(0)
    rows = [{"sentence": " ".join(rng.sample(WORDS, 5)) + (" yes" if i % 2 else " no"), "label": i % 2} for i in range(24)]
    data_dir.mkdir(parents=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (data_dir / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))

    runs = {"full": [], "lora": LORA}
    for name, extra in runs.items():
        train_mod.run(load_config(None, overrides(model_dir, data_dir, tmp / "one" / name, 4, *extra)))
    job = {"runs": [overrides(model_dir, data_dir, tmp / "two" / n, 2, *e) for n, e in runs.items()],
           "audit": str(tmp / "two"), "audit_out": str(tmp / "audit")}
    res = launch(job, tmp, "two")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"tmp": tmp, "model": model_dir, "data": data_dir, "out": res.stdout + res.stderr}


# ---------------------------------------------------------------- multi-process tests
@pytest.mark.parametrize("name", ["full", "lora"])
def test_two_processes_match_one(setup, name):
    one, two = setup["tmp"] / "one" / name, setup["tmp"] / "two" / name
    assert len(losses(two)) == 8
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-6)
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = (read_metrics(d) for d in (one, two))
    assert m2["run"]["world_size"] == 2 and m2["metrics"]["n"] == m1["metrics"]["n"] == 8
    assert m2["metrics"]["accuracy"] == m1["metrics"]["accuracy"]
    assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()


def test_strategy_per_method(setup):
    assert "FSDP" in setup["out"] and "DDP" in setup["out"], setup["out"][-2000:]


def test_only_rank_zero_writes(setup):
    audit = {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in (setup["tmp"] / "audit").glob("rank*.json")}
    assert sorted(audit) == [0, 1]
    assert any("checkpoints" in w for w in audit[0]) and any("method" in w for w in audit[0])  # the audit sees writes
    assert audit[1] == []
    for name in ("full", "lora"):
        assert (setup["tmp"] / "two" / name / "checkpoints" / "best" / "method.safetensors").exists()


def test_spread_shares_and_gathers(setup):
    got = json.loads((setup["tmp"] / "audit" / "spread.json").read_text())
    assert got["tensor"] == [[0.0, 0.5], [10.0, 10.5], [20.0, 20.5]]  # 3 rows over 2 ranks, input order
    assert got["list"] == ["a!"]  # one row: rank 1 has nothing to score
    assert got["ranks"] == [[0, 2], [1]]


def test_killed_rank_gives_clear_error_and_resumable_checkpoint(setup, scratch):
    import tunelab.training.loop as train_mod
    from tunelab.config import load_config

    out = scratch / "killed"
    job = {"runs": [overrides(setup["model"], setup["data"], out, 2)], "kill": {"rank": 1, "step": 6}}
    res = launch(job, scratch, "kill")
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Signal 9 (SIGKILL)" in text or "exitcode  : -9" in text, text[-3000:]
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["position"]["step"] == 4 and state["position"]["world"] == 2
    assert len(losses(out)) in (4, 5, 6)  # written up to the step in flight

    # one process with the same global batch (4 rows x 2 micro-batches) resumes it and ends
    # where the 1-process run ends
    mismatch = load_config(None, overrides(setup["model"], setup["data"], out, 2))
    with pytest.raises(RuntimeError, match="train.batch_size=4"):
        train_mod.run(mismatch)
    train_mod.run(load_config(None, overrides(setup["model"], setup["data"], out, 4)))
    one = setup["tmp"] / "one" / "full"
    torch.testing.assert_close(losses(out), losses(one), rtol=1e-5, atol=1e-6)
    a, b = weights(one), weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.data
def test_smollm2_lora_two_processes_end_to_end(scratch):
    from conftest import shared_data

    sst2 = shared_data("sst2")
    out, cfg = scratch / "smol", scratch / "smol.yaml"
    cfg.write_text(f"""model: smollm2-135m
method: {{name: lora, r: 8, alpha: 16}}
task: {{name: sentiment}}
data: {{train: {sst2}/train.tsv, eval: {sst2}/dev.tsv, max_train: 64, max_eval: 8, max_length: 64}}
train: {{max_steps: 2, batch_size: 4, threads: 1, progress: false}}
output_dir: {out}
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tunelab", "train", str(cfg)]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(out)
    assert m["run"]["world_size"] == 2 and m["run"]["steps"] == 2 and m["metrics"]["n"] == 8 and (out / "method" / "method.safetensors").exists()


# ---------------------------------------------------------------- single-process unit tests
def test_shard_splits_each_global_batch_without_duplicates(monkeypatch):
    from tunelab.runtime import distributed as dist

    glob = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10], [11]]
    monkeypatch.setattr(dist, "world", lambda: 2)
    seen = []
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        mine = dist.shard(glob, 2)
        assert len(mine) == 3  # the 1-row batch cannot feed 2 ranks
        seen += [i for b in mine for i in b]
    assert sorted(seen) == list(range(11))


def test_check_resume_rules(monkeypatch):
    from tunelab.runtime import distributed as dist

    monkeypatch.setattr(dist, "world", lambda: 1)
    pos = {"step": 4, "world": 2, "global_batch": 8}
    dist.check_resume(pos, 8, 16)  # same global batch: fine, and pos now describes this run
    assert pos["world"] == 1
    with pytest.raises(RuntimeError, match="train.batch_size=8"):
        dist.check_resume({"step": 4, "world": 2, "global_batch": 8}, 4, 16)
    with pytest.raises(RuntimeError, match="short last batch"):  # 17 % 8 = 1 row: dropped by 2 ranks, kept by 1
        dist.check_resume({"step": 4, "world": 2, "global_batch": 8}, 8, 17)
    with pytest.raises(RuntimeError, match="relaunch with 2"):
        dist.check_resume({"step": 4, "world": 2}, 8, 16)


def test_single_process_is_a_no_op():
    from tunelab.runtime import distributed as dist

    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model, full=True) is model and dist.world() == 1 and dist.is_lead()
    assert dist.gather_json({"a": [1.5, float("inf")]}) == [{"a": [1.5, float("inf")]}]
    assert dist.spread("xs")(lambda xs: [x * 2 for x in xs])([1, 2], split=True) == [2, 4]


def test_parallel_choice_env(monkeypatch):
    from tunelab.runtime import distributed as dist

    assert dist.strategy(full=False) == "ddp" and dist.strategy(full=True) == "fsdp"
    monkeypatch.setenv("TUNELAB_PARALLEL", "ddp")
    assert dist.strategy(full=True) == "ddp"
    monkeypatch.setenv("TUNELAB_PARALLEL", "zero3")
    with pytest.raises(ValueError, match="auto, ddp, fsdp"):
        dist.strategy(full=True)


# ---------------------------------------------------------------- the torchrun worker
def _audit_writes(root: str, seen: list[str]) -> None:
    """Record every file or directory this process creates, changes or removes under ``root``."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open" and isinstance(args[0], str | Path):
            mode, flags = args[1], args[2] or 0
            writes = any(c in (mode or "") for c in "wax+") or (mode is None and flags & write_flags)
            paths = [args[0]] if writes else []
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, str | Path)]
        else:
            return
        seen.extend(str(p) for p in paths if str(os.path.abspath(p)).startswith(root))

    sys.addaudithook(hook)


def _worker(spec: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(Path(spec).read_text())
    from tunelab.runtime import distributed as dist

    rank = int(os.environ["RANK"])
    seen: list[str] = []
    if job.get("audit"):
        _audit_writes(job["audit"], seen)
    kill = job.get("kill")
    first_try = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"  # torchrun --max-restarts relaunches
    if kill and rank == kill["rank"] and first_try:
        real, calls = dist.mean, [0]

        def mean_then_die(t):  # called once per optimizer step
            calls[0] += 1
            if calls[0] == kill["step"]:
                os.kill(os.getpid(), 9)
            return real(t)

        dist.mean = mean_then_die

    import tunelab.training.loop as train_mod
    from tunelab.config import load_config

    for ov in job["runs"]:
        train_mod.run(load_config(None, ov))
    if job.get("audit_out"):
        Path(job["audit_out"]).mkdir(exist_ok=True)
        Path(job["audit_out"], f"rank{rank}.json").write_text(json.dumps(seen))
        _check_spread(Path(job["audit_out"], "spread.json"))


def _check_spread(path: Path) -> None:
    from tunelab.runtime import distributed as dist

    scored = []

    @dist.spread("texts", "pairs")
    def logits(texts, pairs=None):
        scored.extend(texts)
        return torch.tensor([[10.0 * t, 10.0 * t + 0.5] for t in texts])

    @dist.spread("prompts")
    def shout(prompts):
        return [p + "!" for p in prompts]

    got = {"tensor": logits([0, 1, 2], ["x", "y", "z"], split=True).tolist(), "list": shout(["a"], split=True)}
    got["ranks"] = dist.gather_json(scored)
    if dist.is_lead():
        path.write_text(json.dumps(got))


if __name__ == "__main__":
    _worker(sys.argv[1])
