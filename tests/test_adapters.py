"""Series and parallel bottleneck adapters: formula, zero start, counts, merge/refusal, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tunelab
from tunelab.methods import adapters as ad
from tunelab.methods.base import replace_module

from conftest import tiny_bert, tiny_llama

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


class RefAdapter(nn.Module):
    """The formula written out independently: f(x) + s*U(tanh(D z)), z = f(x) (series) or x (parallel)."""

    def __init__(self, host, down, up, series, s):
        super().__init__()
        self.host, self.down, self.up, self.series, self.s = host, down.clone(), up.clone(), series, s

    def forward(self, x):
        y = self.host(x)
        z = y if self.series else x
        return y + self.s * torch.tanh(z @ self.down.T) @ self.up.T


@pytest.mark.parametrize("method", ["series_adapter", "parallel_adapter"])
def test_zero_up_starts_at_the_base_model(method):
    model = tunelab.attach(tiny_llama(), method)
    hosts = {"series_adapter": ("gate_proj", "up_proj"), "parallel_adapter": ("up_proj", "down_proj")}[method]
    assert [n for n, _ in ad.adapted(model)] == [f"model.layers.{i}.mlp.{h}" for i in range(2) for h in hosts]
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, tiny_llama()(input_ids=IDS).logits)


@pytest.mark.parametrize("method", ["series_adapter", "parallel_adapter"])
def test_matches_an_independent_computation_of_the_formula(method):
    model = tunelab.attach(tiny_llama(), method, init="bert", bottleneck=8, scaling=0.5, seed=1,
                           target_modules=["mlp"])  # the block host this reference computes
    ref = tiny_llama()
    for name, mod in ad.adapted(model):
        a = mod.adapter
        assert a.down.weight.std().item() == pytest.approx(0.02, rel=0.3) and a.up.weight.abs().sum() > 0
        host = ref.get_submodule(name)
        replace_module(ref, name, RefAdapter(host, a.down.weight, a.up.weight, method == "series_adapter", 0.5))
    with torch.no_grad():
        got, want = model(input_ids=IDS).logits, ref(input_ids=IDS).logits
        base = tiny_llama()(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-4  # the adapter did something


@pytest.mark.parametrize(
    "method,targets,per_target",
    [
        # defaults (tunelab.models.arch, LLM-Adapters' recipe): series on gate_proj + up_proj,
        # parallel beside up_proj (64 -> 128) + down_proj (128 -> 64); per layer
        ("series_adapter", None, 2 * 16 * (64 + 64)),  # series go before gate/up_proj: d = 64
        ("parallel_adapter", None, 2 * 16 * (64 + 128)),
        ("parallel_adapter", ["down_proj"], 16 * (128 + 64)),  # d_in = intermediate (128)
        ("series_adapter", ["down_proj"], 16 * (64 + 64)),
        ("series_adapter", ["up_proj"], 16 * (64 + 64)),  # before up_proj (LLM-Adapters): its input width
    ],
)
def test_trainable_counts_match_the_formula(method, targets, per_target):
    model = tunelab.attach(tiny_llama(), method, bottleneck=16, target_modules=targets)
    counts = tunelab.trainable_parameters(model)
    assert counts["trainable"] == 2 * per_target  # two layers
    assert all(".adapter." in n for n, p in model.named_parameters() if p.requires_grad)


def test_training_moves_only_the_adapters():
    model = tunelab.attach(tiny_llama(), "parallel_adapter", bottleneck=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapter." in k for k in changed)
    assert any(k.endswith("adapter.up.weight") for k in changed)


@pytest.mark.parametrize("method", ["series_adapter", "parallel_adapter"])
def test_identity_adapters_on_linears_merge_exactly(method):
    # BERT's linears carry biases, which the series merge must transform as well
    model = tunelab.attach(tiny_bert(), method, activation="identity", init="bert", bottleneck=8, seed=2)
    assert [n.split("layer.")[1] for n, _ in ad.adapted(model)] == ["0.output.dense", "1.output.dense"]
    ids = IDS[:, :8]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = tunelab.merge(model)
        merged = merged_model(input_ids=ids).logits
    assert not ad.adapted(merged_model) and not any(".adapter." in k for k in merged_model.state_dict())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_merge_refuses_nonlinear_or_non_linear_targets():
    tanh = tunelab.attach(tiny_llama(), "series_adapter", bottleneck=4, target_modules=["down_proj"])
    with pytest.raises(ValueError, match="nonlinearity"):
        tunelab.merge(tanh)
    assert ad.adapted(tanh)  # nothing was touched
    block = tunelab.attach(tiny_llama(), "parallel_adapter", bottleneck=4, activation="identity", target_modules=["mlp"])
    with pytest.raises(ValueError, match="linear target"):
        tunelab.merge(block)


def test_save_load_roundtrip(tmp_path):
    model = tunelab.attach(
        tiny_llama(), "series_adapter", init="bert", bottleneck=8, target_modules=["gate_proj", "up_proj"]
    )
    tunelab.save(model, tmp_path / "a")
    loaded = tunelab.load(tiny_llama(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_bf16_host_keeps_its_dtype_and_bad_config_is_clear():
    model = tunelab.attach(tiny_llama().to(torch.bfloat16), "parallel_adapter", init="bert", bottleneck=4)
    assert model(input_ids=IDS).logits.dtype == torch.bfloat16
    assert next(p for p in model.parameters() if p.requires_grad).dtype == torch.float32
    with pytest.raises(ValueError, match="activation"):
        tunelab.attach(tiny_llama(), "series_adapter", activation="sigmoidish")
    with pytest.raises(ValueError, match="matched no module"):
        tunelab.attach(tiny_llama(), "series_adapter", target_modules=["ffn"])
    assert ad.SeriesAdapter.recommended_lr == ad.ParallelAdapter.recommended_lr == 3e-4


def test_series_before_the_host_merges_exactly_and_learned_scaling_counts():
    model = tunelab.attach(tiny_llama(), "series_adapter", activation="identity", init="bert", bottleneck=8,
                           target_modules=["gate_proj", "up_proj", "down_proj"], seed=3)
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        merged = tunelab.merge(model)(input_ids=IDS).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    learned = tunelab.attach(tiny_llama(), "parallel_adapter", bottleneck=16, scaling="learned")
    assert tunelab.trainable_parameters(learned)["trainable"] == 2 * 2 * (16 * (64 + 128) + 1)  # up + down_proj
    with pytest.raises(ValueError, match="scaling"):
        tunelab.attach(tiny_llama(), "parallel_adapter", scaling="trained")


def test_old_series_run_on_up_proj_says_how_to_load_it(tmp_path):
    """tunelab 0.1 placed series adapters after up_proj (d_out wide); today's default is before it."""
    old = tunelab.attach(tiny_llama(), "series_adapter", bottleneck=4, target_modules=["up_proj"],
                         series_placement="after")
    tunelab.save(old, tmp_path / "old")
    meta = (tmp_path / "old" / "method.json").read_text().replace(', "series_placement": "after"', "")
    meta = meta.replace('"series_placement": "after",', "")
    (tmp_path / "old" / "method.json").write_text(meta)
    assert "series_placement" not in meta
    with pytest.raises(ValueError, match=r"method.safetensors.*series_placement='after'"):
        tunelab.load(tiny_llama(), tmp_path / "old")
