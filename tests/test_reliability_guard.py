"""Divergence guard: a NaN loss stops the run naming the step, before the update; the last good checkpoint
stays; no NaN result is written; a checkpoint holding NaN is never resumed. Settings that cannot be meant
are refused up front."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tunelab.training.loop as train_mod
from test_train import cfg_for, data  # noqa: F401  (fixtures)
from tunelab.config import load_config
from tunelab.models import lm_loss
from tunelab.training.divergence import Diverged
from tunelab.training.preflight import warn_rank


def nan_from_step(monkeypatch, step):
    real, calls = lm_loss.loss, {"n": 0}

    def loss(model, batch, *a, **k):
        out = real(model, batch, *a, **k)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= step:
                return out * float("nan")
        return out

    monkeypatch.setattr(lm_loss, "loss", loss)


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    nan_from_step(monkeypatch, 5)
    with pytest.raises(Diverged, match="diverged at step 5: loss is nan") as e:
        train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=9", "train.save_every=2"))
    assert str(out / "checkpoints" / "last") in str(e.value)
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["position"]["step"] == 4
    weights = load_file(str(out / "checkpoints" / "last" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "method").exists() and not (out / "metrics.json").exists()  # no NaN result


def test_nan_grad_norm_is_caught_too():
    with pytest.raises(Diverged, match="step 3: gradient norm is inf"):
        train_mod.check_step(3, 1.0, torch.tensor(float("inf")), None)
    train_mod.check_step(3, 1.0, torch.tensor(2.0), None)


def test_checkpoint_with_nan_tensors_is_refused(tiny_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2"))
    f = out / "checkpoints" / "last" / "trainable.safetensors"
    tensors = load_file(str(f))
    key = next(iter(tensors))
    tensors[key][0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=rf"trainable.safetensors: tensor '{key}' holds \d+ non-finite"):
        train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=3"))


@pytest.mark.parametrize("override, message", [
    ("train.max_grad_norm=-1", "train.max_grad_norm: Input should be greater than or equal to 0"),
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
])
def test_settings_that_cannot_be_meant(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_warns_on_lora_rank_above_layer_width():
    import tunelab

    from conftest import tiny_llama

    model = tunelab.attach(tiny_llama(), "lora", r=80)  # hidden 64
    warnings = warn_rank(model, {"r": 80})
    assert warnings and "r=80" in warnings[0] and "64" in warnings[0]
    assert warn_rank(tunelab.attach(tiny_llama(), "lora", r=8), {"r": 8}) == []
