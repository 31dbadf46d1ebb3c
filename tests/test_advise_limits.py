"""advise under a budget: --time and --memory (a fake sizing probe and fake training, no models)."""

from __future__ import annotations

import json

import pytest

from test_advise import LAWS, FakeTrain, write_cfg
from tunelab.report import advise as ra
from tunelab.sweeps import advise as adv

# full fine-tuning needs 30 GB and 1 s per step here, LoRA 2 GB and 0.5 s.
PROBES = {"lora": {"s_per_step": 0.5, "peak_memory_mb": 2000.0}, "full": {"s_per_step": 1.0, "peak_memory_mb": 30000.0}}


class FakeProbe:
    def __init__(self):
        self.calls = []

    def __call__(self, cfg, out_dir):
        self.calls.append((cfg.method.name, cfg.data.max_train))
        return dict(PROBES[cfg.method.name])


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(ra, "N_BOOT", 20)
    return FakeTrain()


def run(tmp_path, fake, **kw):
    probe = FakeProbe()
    out = adv.advise(write_cfg(tmp_path), out_dir=tmp_path / "adv", say=lambda m: None, executor=fake.executor,
                     limits_probe=probe, **kw)
    return out, probe


def test_a_method_that_does_not_fit_the_memory_limit_is_left_out_with_the_reason(tmp_path, fake):
    # Unlimited, full fine-tuning wins at 4,000 rows (test_advise's laws); with 24 GB it cannot run.
    assert LAWS["full"]["E"] < LAWS["lora"]["E"]
    out, probe = run(tmp_path, fake, memory_limit="24GB")
    assert sorted(probe.calls) == [("full", 4000), ("lora", 4000)]  # probed at the full size
    assert {c.method.name for c in fake.calls} == {"lora"}  # none of full's runs trained
    res = json.loads((out / "advise.json").read_text())
    assert "does not fit the memory limit" in res["errors"]["full"] and "30,000 MB" in res["errors"]["full"]
    assert res["pick"] == "lora" and "full" not in res["methods"]
    assert res["limits"]["bound"] == ["memory"]
    md = ra.markdown(res)
    assert "The limit that bound the answer: memory." in md and "full: left out" in md


def test_the_time_limit_sets_the_steps_every_run_trains(tmp_path, fake):
    # 4,000 rows x 1 epoch / batch 8 = 500 planned steps; 100 s fit 200 LoRA steps and 100 full steps.
    out, _ = run(tmp_path, fake, time_limit="100s")
    steps = {(c.method.name, c.train.max_steps) for c in fake.calls}
    assert steps == {("lora", 200), ("full", 100)}
    res = json.loads((out / "advise.json").read_text())
    assert res["limits"]["steps"] == {"lora": {"planned": 500, "fit": 200}, "full": {"planned": 500, "fit": 100}}
    assert res["limits"]["bound"] == ["time"]
    assert "predicted at 200 steps, what fits the time, not its planned 500" in ra.markdown(res)


def test_limits_that_fit_bind_nothing_and_change_no_run(tmp_path, fake):
    out, _ = run(tmp_path, fake, time_limit="2h", memory_limit="64GB")
    assert {c.train.max_steps for c in fake.calls} == {None}
    res = json.loads((out / "advise.json").read_text())
    assert res["limits"]["bound"] == [] and res["errors"] == {}
    assert "Neither limit bound the answer" in ra.markdown(res)


def test_nothing_fits(tmp_path, fake):
    with pytest.raises(ValueError, match="no method fits the limits"):
        run(tmp_path, fake, memory_limit="1GB")
    assert fake.calls == []


@pytest.mark.parametrize(("value", "seconds"), [("2h", 7200.0), ("45m", 2700.0), ("90s", 90.0), (30, 30.0), ("1.5h", 5400.0)])
def test_durations(value, seconds):
    assert adv.parse_duration(value) == seconds


@pytest.mark.parametrize(("value", "mb"), [("24GB", 24e9 / 2**20), ("16GiB", 16384.0), ("512MB", 512.0)])
def test_memory_sizes(value, mb):
    assert adv.parse_memory(value) == pytest.approx(mb)


@pytest.mark.parametrize("bad", ["2 hours", "-1h", "fast"])
def test_a_bad_limit_is_one_clear_line_before_training(tmp_path, fake, bad):
    with pytest.raises(ValueError, match=r"--time / advise.time: .* (is not a quantity like 2h|must be more than 0)"):
        run(tmp_path, fake, time_limit=bad)
    assert fake.calls == []
