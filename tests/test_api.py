"""The public API on a tiny model: attach, count, save/load round trip, merge refusals."""

import pytest
import torch

import tunelab
from tunelab.methods import METHODS

from conftest import tiny_llama


def test_attach_full_counts_and_round_trip(tmp_path):
    model = tunelab.attach(tiny_llama(), "full")
    counts = tunelab.trainable_parameters(model)
    assert counts["trainable"] == counts["total"] > 0 and counts["percent"] == 100.0
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    tunelab.save(model, tmp_path / "m")
    fresh = tunelab.load(tiny_llama(), tmp_path / "m")
    x = torch.randint(3, 100, (2, 7))
    assert torch.equal(model(x).logits, fresh(x).logits)


def test_errors_are_clear(tmp_path):
    model = tunelab.attach(tiny_llama(), "full")
    with pytest.raises(ValueError, match="already attached"):
        tunelab.attach(model, "full")
    with pytest.raises(ValueError, match="cannot merge 'full'"):
        tunelab.merge(model)
    with pytest.raises(ValueError, match="did you mean 'lora'"):
        tunelab.attach(tiny_llama(), "lorra")
    with pytest.raises(ValueError, match="bad parameters for method 'lora'"):
        tunelab.attach(tiny_llama(), "lora", rank=3)
    with pytest.raises(FileNotFoundError, match="method.json"):
        tunelab.load(tiny_llama(), tmp_path / "missing")
    with pytest.raises(ValueError, match="no tunelab method"):
        tunelab.save(tiny_llama(), tmp_path / "x")


def test_every_method_registered_and_documented():
    expected = {"full", "lora", "dora", "qlora", "loftq", "loreft", "direft", "random_mask",
                "series_adapter", "parallel_adapter", "prompt_tuning"}
    assert expected <= set(METHODS.names())
    import sys

    for name in expected:
        doc = sys.modules[type(METHODS.get(name)).__module__].__doc__
        assert doc and len(doc) > 100, name


@pytest.mark.parametrize("name,params", [("lora", {"r": 4}), ("loreft", {"rank": 2}), ("random_mask", {"fraction": 0.01}),
                                         ("parallel_adapter", {"bottleneck": 8}), ("prompt_tuning", {"num_virtual_tokens": 3, "init": "random"})])
def test_save_load_round_trip_every_family(tmp_path, name, params):
    torch.manual_seed(0)
    model = tunelab.attach(tiny_llama(), name, **params)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    tunelab.save(model, tmp_path / name)
    fresh = tunelab.load(tiny_llama(), tmp_path / name)
    x = torch.randint(3, 100, (2, 9))
    torch.testing.assert_close(model(x).logits, fresh(x).logits)
