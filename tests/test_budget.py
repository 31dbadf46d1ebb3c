"""Budget matching (equal steps / wall time / FLOPs) and the lr search's data split; the real probes once, on a tiny model."""

from __future__ import annotations

import json

import pytest

from tunelab.config import build_config
from tunelab.sweeps import budget, lr_search


def cfg(**train):
    return build_config({"model": "smollm2-135m", "data": {"train": "t.jsonl"}, "train": {"batch_size": 8, **train}})


def test_match_steps_gives_equal_totals():
    steps = budget.match_steps({"lora": 4.0e12, "full": 6.0e12, "pt": 1.0e12}, 6.0e12 * 100)
    assert steps == {"lora": 150, "full": 100, "pt": 600}
    with pytest.raises(ValueError, match="cost per step"):
        budget.match_steps({"x": 0.0}, 1.0)


def test_planned_steps_from_max_steps_or_epochs():
    assert budget.planned_steps(cfg(max_steps=40), 1000) == 40
    assert budget.planned_steps(cfg(epochs=2), 1001) == 2 * 126  # ceil(1001 / 8) per epoch


def test_plan_flops_and_time_with_a_fake_probe_and_its_cache(tmp_path):
    cfgs = {"full": cfg(max_steps=100), "lora": cfg(max_steps=100), "zero-shot": cfg(max_steps=0)}
    cost = {id(cfgs["full"]): 6.0, id(cfgs["lora"]): 4.0}
    res = budget.plan("flops", cfgs, tmp_path, probe=lambda c: cost[id(c)])
    assert res["ref"] == "full" and res["total"] == 600.0
    assert {k: v["steps"] for k, v in res["per_label"].items()} == {"full": 100, "lora": 150}  # zero-shot untouched
    assert json.loads((tmp_path / "budget.json").read_text()) == res
    # A resumed comparison reuses the measured budget instead of probing again.
    again = budget.plan("flops", cfgs, tmp_path, probe=lambda c: pytest.fail("probed twice"))
    assert again == res
    t = budget.plan("time", cfgs, tmp_path / "t", probe=lambda c: cost[id(c)] / 10, ref="lora", total=30.0)
    assert {k: v["steps"] for k, v in t["per_label"].items()} == {"full": 50, "lora": 75}
    assert budget.plan("steps", cfgs, tmp_path)["mode"] == "steps"
    with pytest.raises(ValueError, match="unknown budget 'money'"):
        budget.plan("money", cfgs, tmp_path)
    with pytest.raises(ValueError, match="budget_ref 'nope'"):
        budget.plan("time", cfgs, tmp_path / "u", probe=lambda c: 1.0, ref="nope")


def test_split_keeps_the_format_and_never_overlaps(tmp_path):
    src = tmp_path / "train.tsv"
    rows = [f'it \'s "good" {i} \t{i % 2}' for i in range(50)]
    src.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    tr, va, n_tr, n_va = lr_search.split_file(src, tmp_path / "s", limit=40)
    assert (n_tr, n_va) == (32, 8)
    assert tr.read_text().splitlines() == ["sentence\tlabel"] + rows[:32]  # bytes kept, quotes and all
    assert va.read_text().splitlines() == ["sentence\tlabel"] + rows[32:40]
    js = tmp_path / "d.jsonl"
    js.write_text("".join(json.dumps({"text": str(i), "label": "a"}) + "\n" for i in range(10)))
    tr, va, n_tr, n_va = lr_search.split_file(js, tmp_path / "j")
    assert (n_tr, n_va) == (8, 2) and json.loads(va.read_text().splitlines()[0])["text"] == "8"


def test_split_rejects_what_it_cannot_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="needed to split it for --tune lr"):
        lr_search.split_file(tmp_path / "missing.jsonl", tmp_path / "s")
    (tmp_path / "eng.train").write_text("EU NNP B-NP B-ORG\n")
    with pytest.raises(ValueError, match="can split .jsonl, .json, .csv and .tsv"):
        lr_search.split_file(tmp_path / "eng.train", tmp_path / "s")
    (tmp_path / "one.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="too few to split"):
        lr_search.split_file(tmp_path / "one.jsonl", tmp_path / "s")


def test_lr_grid_and_pick():
    assert lr_search.grid(3e-4) == [1e-4, 3e-4, 9e-4]
    assert lr_search.best_lr([(1e-4, 0.8), (3e-4, 0.9), (9e-4, 0.85)], True) == 3e-4
    assert lr_search.best_lr([(1e-4, 0.5), (3e-4, 0.4), (9e-4, None)], False) == 3e-4
    assert lr_search.best_lr([(1e-4, 0.9), (3e-4, 0.9), (9e-4, 0.9)], True) == 3e-4  # ties: the base rate
    with pytest.raises(ValueError, match="every learning-rate trial failed"):
        lr_search.best_lr([(1e-4, None)], True)


def test_the_real_probes_measure_a_tiny_model(tiny_dir, tmp_path):
    """probe_flops and probe_time themselves (every other test passes a stand-in), on a tiny Llama."""
    import math

    from test_train import cfg_for

    rows = [{"sentence": f"the film number {i} was " + ("good yes" if i % 2 else "bad no"), "label": i % 2} for i in range(16)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = cfg_for(tiny_dir, (train, None), tmp_path / "full", "train.max_steps=6", "data.eval=null")
    lora = cfg_for(tiny_dir, (train, None), tmp_path / "lora", "train.max_steps=6", "data.eval=null", "method.name=lora")
    f_full, f_lora = budget.probe_flops(full), budget.probe_flops(lora)
    assert math.isfinite(f_full) and math.isfinite(f_lora) and f_full > f_lora > 0
    assert budget.probe_flops(full) == f_full  # the same batches drawn: a deterministic count
    # full fine-tuning's backward adds the weight gradients of every matmul: between 1x and 2x LoRA's step
    assert 1.0 < f_full / f_lora < 2.0
    s = budget.probe_time(lora)
    assert math.isfinite(s) and 0 < s < 60
    res = budget.plan("flops", {"full": full, "lora": lora}, tmp_path / "plan", ref="full")
    steps = {k: v["steps"] for k, v in res["per_label"].items()}
    assert steps["full"] == 6 and steps["lora"] == math.floor(6 * f_full / f_lora + 1e-9)
