"""compare/scale orchestration with a fake trainer in place of ``tunelab.training.loop.run`` (passed as the
sweep's executor): same budget per run, resume, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.config import dump_config
from tunelab.report.fit import predict
from tunelab.results import read_metrics
from tunelab.sweeps import compare as cmp
from tunelab.sweeps.runner import SerialExecutor

BASE = {
    "model": "smollm2-135m",
    "method": {"name": "lora", "r": 16, "alpha": 32},
    "task": {"name": "sentiment"},
    "data": {"train": "train.jsonl", "eval": "dev.jsonl"},
    "train": {"max_steps": 5, "batch_size": 2, "lr": 1e-3},
}
ACC = {"lora": 0.8, "loreft": 0.75, "full": 0.9, "prompt_tuning": 0.6}
TRUE = {"A": 30.0, "alpha": 0.1, "beta": 0.4, "E": 0.9}


class FakeTrain:
    """Stands in for tunelab.training.loop.run: records each config and writes a run directory like the real
    loop. ``executor`` trains a sweep's runs with it, one after another in this process."""

    def __init__(self, fail_on: set[str] = frozenset(), interrupt_after: int | None = None):
        self.calls, self.fail_on, self.interrupt_after = [], set(fail_on), interrupt_after
        self.executor = SerialExecutor(self.run)

    def run(self, cfg) -> dict:
        out = cfg.run_dir()
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            out.mkdir(parents=True, exist_ok=True)  # started, then killed: no metrics.json
            raise KeyboardInterrupt
        self.calls.append(cfg)
        if out.name in self.fail_on:
            raise RuntimeError("CUDA out of memory (fake)")
        m = cfg.method
        n = cfg.data.max_train or 1000
        x = m.params().get("r", 8)
        record = {  # the real loop's metrics.json (tunelab.results): task metrics and run facts apart
            "metrics": {
                "accuracy": ACC[m.name] + 0.01 * cfg.train.seed,
                "n": 872,
                "eval_loss": float(predict("multiplicative", TRUE, n, x)) * {"lora": 1.0, "full": 0.8}.get(m.name, 1.1),
            },
            "run": {
                "method": m.name,
                "task": cfg.task.name,
                "model": cfg.model.name,
                "seed": cfg.train.seed,
                "trainable_params": 1000 * x,
                "total_params": 135_000_000,
                "trainable_percent": 100 * 1000 * x / 135e6,
                "train_tokens_per_s": 500.0,
                "wall_time_s": 3.0,
                "peak_memory_mb": 800.0,
                "final_loss": 1.0 - ACC[m.name],
                "steps": cfg.train.max_steps,
            },
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        (out / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
        (out / "metrics.json").write_text(json.dumps(record))
        assert read_metrics(out) == record  # the one reader takes it as the real format, not a legacy flat file
        return record


@pytest.fixture
def fake():
    return FakeTrain


def write_cfg(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, **sections}))
    return path


def quiet(_msg: str) -> None:
    pass


def test_compare_runs_every_method_and_seed_on_the_same_budget(tmp_path, fake):
    f = fake()
    out = cmp.compare(
        write_cfg(tmp_path), ["train.batch_size=4"], ["lora", "loreft", "full"], [0, 1], tmp_path / "cmp", say=quiet,
        executor=f.executor,
    )
    assert sorted(c.run_dir().name for c in f.calls) == sorted(
        f"{m}-s{s}" for m in ("lora", "loreft", "full") for s in (0, 1)
    )
    for c in f.calls:
        # data paths are read relative to the config file (and made absolute for the runs' own configs)
        want = ("sentiment", str(tmp_path.resolve() / "train.jsonl"), 5, 4)
        assert (c.task.name, c.data.train, c.train.max_steps, c.train.batch_size) == want
        assert c.run_dir() == out / "runs" / f"{c.method.name}-s{c.train.seed}"
    by = {c.method.name: c.method.params() for c in f.calls}
    assert by["lora"] == {"r": 16, "alpha": 32}  # the config's own lora settings are kept
    assert by["loreft"] == {} and by["full"] == {}  # another method starts from its defaults
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "compare" and manifest["seeds"] == [0, 1] and manifest["failed"] == {}
    md = (out / "results.md").read_text()
    assert md.index("| full |") < md.index("| lora |") < md.index("| loreft |")
    # no predictions.jsonl: the 95% t-interval over 2 seeds (inside [0, 1] here), then the std, and no test
    assert "| 0.905 | [0.841, 0.969] | 0.0071 |" in md and "t over seeds" not in md
    assert "Student-t interval over seeds" in md and "no paired test" in md and "only 2 seeds" in md
    assert all((out / n).exists() for n in ("results.csv", "summary.csv", "report.html", "plots/loss_curves.png"))


def test_interrupted_compare_resumes_and_reuses_finished_runs(tmp_path, fake):
    cfg = write_cfg(tmp_path)
    args = (cfg, (), ["lora", "loreft"], [0, 1], tmp_path / "cmp")
    first = fake(interrupt_after=3)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(*args, say=quiet, executor=first.executor)
    assert len(first.calls) == 3
    second = fake()
    msgs = []
    out = cmp.compare(*args, say=msgs.append, executor=second.executor)
    assert [c.run_dir().name for c in second.calls] == ["loreft-s1"]  # only the unfinished run
    assert sum("reused" in m for m in msgs) == 3
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4
    assert not any("differs" in m for m in msgs)
    # Reusing a run made under another config is allowed, but said.
    msgs.clear()
    cmp.compare(cfg, ["train.max_steps=7"], ["lora", "loreft"], [0, 1], tmp_path / "cmp", say=msgs.append,
                executor=fake().executor)
    assert sum("differs from this config" in m for m in msgs) == 4


def test_methods_and_seeds_from_the_yaml(tmp_path, fake):
    f = fake()
    section = {
        "methods": [
            "lora:r=4",
            {"name": "prompt_tuning", "label": "pt10", "num_virtual_tokens": 10, "train": {"lr": 0.3}},
        ],
        "seeds": [3],
        "out_dir": str(tmp_path / "y"),
    }
    out = cmp.compare(write_cfg(tmp_path, compare=section), say=quiet, executor=f.executor)
    assert out == tmp_path / "y"
    got = {c.run_dir().name: c for c in f.calls}
    assert set(got) == {"lora-r4-s3", "pt10-s3"}
    assert got["lora-r4-s3"].method.params() == {"r": 4, "alpha": 32}
    assert got["pt10-s3"].method.params() == {"num_virtual_tokens": 10}
    assert got["pt10-s3"].train.lr == 0.3 and got["lora-r4-s3"].train.lr == 1e-3  # per-method lr only
    assert got["pt10-s3"].train.max_steps == got["lora-r4-s3"].train.max_steps == 5


def test_a_failed_run_is_recorded_and_the_rest_go_on(tmp_path, fake):
    f = fake(fail_on={"loreft-s0"})
    out = cmp.compare(write_cfg(tmp_path), (), ["lora", "loreft"], [0], tmp_path / "c", say=quiet, executor=f.executor)
    assert len(f.calls) == 2
    failed = json.loads((out / "manifest.json").read_text())["failed"]
    assert "out of memory" in failed["loreft-s0"]
    html = (out / "report.html").read_text()
    assert "Failed" in html and "loreft-s0" in html
    f = fake(fail_on={"loreft-s0"})
    with pytest.raises(RuntimeError, match="out of memory"):
        cmp.compare(write_cfg(tmp_path), (), ["lora", "loreft"], [0], tmp_path / "c", keep_going=False, say=quiet,
                    executor=f.executor)


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        (["lora:rank=4"], "rank"),  # a bad method parameter fails before any training
        (["lora", "lora"], "labels repeat"),
        (["lora:r"], "not key=value"),
        ([], "no methods to compare"),
    ],
)
def test_bad_method_lists_fail_before_training(tmp_path, fake, methods, match):
    f = fake()
    with pytest.raises(ValueError, match=match):
        cmp.compare(write_cfg(tmp_path), (), methods, [0], tmp_path / "c", say=quiet, executor=f.executor)
    assert f.calls == []


def test_a_metric_the_task_never_reports_is_refused_before_any_run(tmp_path, fake):
    """compare --metric bleu on sentiment (no BLEU) and scale.target with a typo stop before training, naming
    the task's own metrics; a declared metric, a run fact and a nested metric group pass."""
    f = fake()
    with pytest.raises(ValueError, match=r"--metric bleu: task 'sentiment' does not report it.*accuracy"):
        cmp.compare(write_cfg(tmp_path), (), ["lora"], [0], tmp_path / "c", metric="bleu", say=quiet, executor=f.executor)
    with pytest.raises(ValueError, match=r"scale.target acuracy: .*did you mean 'accuracy'"):
        cmp.scale(write_cfg(tmp_path), (), [250, 500], "rank", [4], tmp_path / "s", target="acuracy", say=quiet,
                  executor=f.executor)
    assert f.calls == [] and not (tmp_path / "c").exists()
    for metric in ("accuracy", "train_tokens_per_s"):
        cmp.compare(write_cfg(tmp_path), (), ["lora"], [0], tmp_path / metric, metric=metric, say=quiet, executor=f.executor)
    assert len(f.calls) == 2


def test_scale_sweeps_rank_and_data_size_and_fits_the_law(tmp_path, fake):
    f = fake()
    out = cmp.scale(
        write_cfg(tmp_path),
        (),
        [250, 500, 1000, 2000, 4000],
        "rank",
        [4, 16, 64],
        tmp_path / "s",
        target="eval_loss",
        say=quiet,
        executor=f.executor,
    )
    assert len(f.calls) == 15
    assert {(c.method.params()["r"], c.data.max_train) for c in f.calls} == {
        (r, n) for r in (4, 16, 64) for n in (250, 500, 1000, 2000, 4000)
    }
    assert all(c.method.params()["alpha"] == 32 for c in f.calls)
    res = json.loads((out / "scaling.json").read_text())
    mult = next(x for x in res["fits"] if x["form"] == "multiplicative")
    assert mult["params"]["alpha"] == pytest.approx(0.1, abs=1e-3)
    assert mult["params"]["beta"] == pytest.approx(0.4, abs=1e-3)
    assert {h["d"] for h in mult["heldout"]} == {4000.0} and mult["errors"]["max_rel_error"] < 1e-4
    assert "additive" in {x["form"] for x in res["fits"]}
    assert "Scaling law" in (out / "report.html").read_text()


def test_scale_over_methods_fits_each_in_data_size_alone(tmp_path, fake):
    out = cmp.scale(
        write_cfg(tmp_path, scale={"factor": "method", "values": ["lora", "full"], "sizes": [250, 500, 1000, 2000]}),
        out_dir=tmp_path / "m",
        target="eval_loss",
        say=quiet,
        executor=fake().executor,
    )
    res = json.loads((out / "scaling.json").read_text())
    assert "D alone" in res["note"]
    assert {(x["group"], x["form"]) for x in res["fits"]} == {("lora", "data"), ("full", "data")}
    assert all(x["params"]["beta"] == pytest.approx(0.4, abs=1e-3) for x in res["fits"])


def test_scale_over_models_takes_x_from_total_params(tmp_path, fake):
    sizes = {"small": 1e8, "mid": 3e8, "big": 1e9}
    f = fake()
    real_run = f.run

    def run(cfg):
        m = real_run(cfg)
        m["run"]["total_params"] = sizes[cfg.model.name]
        m["metrics"]["eval_loss"] = float(predict("multiplicative", TRUE, cfg.data.max_train, sizes[cfg.model.name]))
        (cfg.run_dir() / "metrics.json").write_text(json.dumps(m))
        return m

    out = cmp.scale(write_cfg(tmp_path), (), [250, 500, 1000, 2000], "model", list(sizes), tmp_path / "mod", say=quiet,
                    executor=SerialExecutor(run))
    assert {c.model.name for c in f.calls} == set(sizes)
    res = json.loads((out / "scaling.json").read_text())
    assert res["target"] == "eval_loss"
    mult = next(x for x in res["fits"] if x["form"] == "multiplicative")
    assert mult["params"]["alpha"] == pytest.approx(0.1, abs=1e-3)


def test_scale_needs_a_factor_and_enough_sizes(tmp_path, fake):
    f = fake()
    with pytest.raises(ValueError, match="needs a factor"):
        cmp.scale(write_cfg(tmp_path), out_dir=tmp_path / "x", say=quiet, executor=f.executor)
    with pytest.raises(ValueError, match="leaves no data size"):
        cmp.scale(write_cfg(tmp_path), (), [250], "rank", [4, 8], tmp_path / "x", say=quiet, executor=f.executor)
    assert f.calls == []


def test_the_runner_takes_outcomes_in_any_order_and_a_stop_ends_the_sweep(tmp_path):
    """The executor contract a parallel or Ray executor will rely on: outcomes in finishing order, a job's
    failure yielded rather than raised, and the runner closing the executor when it stops early."""
    from tunelab.sweeps.runner import Outcome, PlannedRun, run_plan
    from tunelab.training.run_lock import Stopped

    raw = yaml.safe_load(write_cfg(tmp_path).read_text())
    out = tmp_path / "o"
    plan = [PlannedRun({"run": n, "label": n}, {**raw, "output_dir": str(out / "runs" / n)}) for n in "abc"]

    class AllAtOnce:  # every job launched first, the last to start finishing first
        def __init__(self, fail: Exception):
            self.fail, self.closed = fail, False

        def execute(self, jobs, start):
            launched = [j for j in jobs if start(j)]
            try:
                for j in reversed(launched):
                    yield Outcome(j, error=self.fail) if j.name == "b" else Outcome(j, {"accuracy": 0.5})
            finally:
                self.closed = True

    msgs = []
    manifest = run_plan(out, {"kind": "compare"}, plan, executor=AllAtOnce(RuntimeError("boom")), say=msgs.append)
    assert manifest["failed"] == {"b": "RuntimeError: boom"}
    assert msgs[:3] == ["[1/3] a: training", "[2/3] b: training", "[3/3] c: training"]
    assert [m.split(" in ")[0] for m in msgs[3:]] == ["[3/3] c: done", "[2/3] b: FAILED RuntimeError: boom", "[1/3] a: done"]
    assert json.loads((out / "runs" / "a" / "metrics.json").read_text()) == {"accuracy": 0.5}
    state = json.loads((out / "manifest.json").read_text())["state"]
    assert {n: e["state"] for n, e in state.items()} == {"a": "done", "b": "failed", "c": "done"}
    assert state["b"]["error"] == "RuntimeError: boom" and state["a"]["attempts"] == 1 and "wall_s" in state["a"]
    # rerun: a and c are reused; b is stopped by a signal, which ends the sweep with the manifest written
    stopper = AllAtOnce(Stopped("stopped by SIGTERM", 15))
    with pytest.raises(Stopped):
        run_plan(out, {"kind": "compare", "again": True}, plan, executor=stopper, say=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert stopper.closed and manifest["again"]
    assert {n: e["state"] for n, e in manifest["state"].items()} == {"a": "done", "b": "stopped", "c": "done"}
    assert manifest["state"]["a"]["reused"]


def test_the_first_seed_of_every_method_comes_first(tmp_path, fake):
    f = fake()
    cmp.compare(write_cfg(tmp_path), (), ["lora", "loreft", "full"], [0, 1], tmp_path / "cmp", say=quiet,
                executor=f.executor)
    assert [c.run_dir().name for c in f.calls] == ["lora-s0", "loreft-s0", "full-s0", "lora-s1", "loreft-s1", "full-s1"]
    # the manifest keeps the plan's order (the report's), the progress lines say the order trained
    manifest = json.loads((tmp_path / "cmp" / "manifest.json").read_text())
    assert [r["run"] for r in manifest["runs"]][:2] == ["lora-s0", "lora-s1"]
    assert all(e["state"] == "done" for e in manifest["state"].values()) and manifest["eta_s"] is None


def test_the_status_table_shows_each_runs_state_and_the_time_left(tmp_path):
    """One table for ``tunelab status`` and the live display: states, where, wall, tries, totals, ETA."""
    from tunelab.sweeps.status import format_status, status_text

    state = {"a-s0": {"state": "done", "where": "vm cpu", "wall_s": 62.0, "attempts": 1},
             "b-s0": {"state": "running", "where": "vm cpu", "attempts": 2},
             "c-s0": {"state": "failed", "where": "vm cpu", "wall_s": 3.0, "attempts": 1, "error": "RuntimeError: x"},
             "d-s0": {"state": "pending"}}
    manifest = {"kind": "compare", "state": state, "eta_s": 100.0}
    text = status_text(tmp_path, manifest, state)
    lines = text.splitlines()
    assert lines[0] == f"compare in {tmp_path}: 1 done, 1 running, 1 pending, 1 failed; about 1m40s left"
    assert lines[1].split() == ["run", "state", "where", "wall", "tries"]
    assert lines[2].split() == ["a-s0", "done", "vm", "cpu", "1m02s", "1"]
    assert lines[3].split() == ["b-s0", "running", "vm", "cpu", "2"]
    assert lines[5].split() == ["d-s0", "pending"] and lines[-2:] == ["failed:", "  c-s0: RuntimeError: x"]
    # between two runs of a live sweep nothing runs, yet it is not stopped: the ETA, no "rerun" hint
    state["b-s0"].update(state="done", wall_s=5.0)
    assert "about 1m40s left" in status_text(tmp_path, manifest, state, in_progress=True)
    assert "rerun the sweep's command" in status_text(tmp_path, manifest, state)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert format_status(tmp_path) == status_text(tmp_path, manifest, state)


def test_a_sweep_on_a_terminal_draws_the_status_table_live(tmp_path, fake, monkeypatch):
    """stderr a terminal: the table is drawn (rich.live) and redrawn as runs start and finish, the progress
    lines above it, the last table with the final states kept; the manifest and results are the same."""
    import io
    import re

    from rich.console import Console

    from tunelab.sweeps import runner
    from tunelab.sweeps.runner import to_stderr

    screen = io.StringIO()
    monkeypatch.setattr(runner, "live_console", lambda: Console(force_terminal=True, file=screen, width=120))
    f = fake(fail_on={"loreft-s0"})
    out = cmp.compare(write_cfg(tmp_path), (), ["lora", "loreft"], [0], tmp_path / "live", say=to_stderr,
                      executor=f.executor)
    drawn = screen.getvalue()
    assert "\x1b[?25l" in drawn and drawn.rstrip().endswith("\x1b[?25h")  # cursor hidden, then shown again
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert re.search(r"lora-s0\s+running\s", plain) and re.search(r"loreft-s0\s+running\s", plain)  # redrawn at starts
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.split("\x1b[2K")[-1])  # the last table, plain
    assert final.startswith(f"compare in {out}: 1 done, 1 failed\n")
    assert re.search(r"lora-s0\s+done\s", final) and re.search(r"loreft-s0\s+failed\s", final)
    assert "[1/2] lora-s0: training" in drawn and "[2/2] loreft-s0: FAILED RuntimeError" in drawn
    quiet_out = cmp.compare(write_cfg(tmp_path), (), ["lora", "loreft"], [0], tmp_path / "plain", say=quiet,
                            executor=fake(fail_on={"loreft-s0"}).executor)
    machine = ("where", "started", "finished", "wall_s")
    runs = [{n: {k: v for k, v in e.items() if k not in machine}
             for n, e in json.loads((d / "manifest.json").read_text())["state"].items()} for d in (out, quiet_out)]
    csv = [(d / "results.csv").read_text().replace(str(d), "OUT") for d in (out, quiet_out)]
    assert runs[0] == runs[1] and csv[0] == csv[1]


def test_a_sweep_without_a_terminal_prints_only_the_progress_lines(tmp_path, fake, capsys):
    import re

    from tunelab.sweeps.runner import to_stderr
    from tunelab.sweeps.status import live_console

    assert live_console() is None  # pytest's stderr is no terminal
    cmp.compare(write_cfg(tmp_path), (), ["lora", "full"], [0], tmp_path / "cmp", say=to_stderr, executor=fake().executor)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "run  " not in err
    lines = [re.sub(r"[0-9.]+s\b", "Ts", re.sub(r", about \S+ left", "", line)) for line in err.splitlines()]
    assert lines == ["[1/2] lora-s0: training", "[1/2] lora-s0: done in Ts (1/2 done)",  # today's lines exactly
                     "[2/2] full-s0: training", "[2/2] full-s0: done in Ts (2/2 done)",
                     f"report: {tmp_path / 'cmp' / 'report.html'}"]
