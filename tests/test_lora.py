"""LoRA / DoRA: exact start, parity with PEFT, merge/unmerge, heads, save/load, config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tunelab
from tunelab.methods.lora import LoRALinear, lora_modules, merge_in_place

from conftest import tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

X = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter non-trivial weights (B = 0 at init would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
            if m.lora_magnitude is not None:
                m.lora_magnitude.mul_(1 + 0.3 * torch.rand(m.lora_magnitude.shape, generator=g))


def peft_twin(ours: nn.Module, **lora_kwargs) -> nn.Module:
    """A PEFT LoRA model on an identical base, holding our adapter tensors."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**lora_kwargs)).eval()
    mods = dict(lora_modules(ours))
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            if name in mods and hasattr(mod, "lora_A"):
                mod.lora_A["default"].weight.copy_(mods[name].lora_A)
                mod.lora_B["default"].weight.copy_(mods[name].lora_B)
                if mods[name].lora_magnitude is not None:
                    mod.lora_magnitude_vector["default"].weight.copy_(mods[name].lora_magnitude)
    return pm


def test_starts_exactly_at_the_base_and_trains_only_the_adapter():
    base = tiny_llama()
    ref = base(X).logits
    model = tunelab.attach(tiny_llama(), "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert torch.equal(model(X).logits, ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora_modules(model)) == 4  # 2 layers x (q, v)
    mod = model.model.layers[0].self_attn.q_proj
    assert mod.scaling == 2.0 and mod.lora_A.shape == (4, 64) and mod.lora_B.shape == (64, 4)


def test_all_linear_skips_the_output_head():
    model = tunelab.attach(tiny_llama(), "lora", r=2)
    names = [n for n, _ in lora_modules(model)]
    assert len(names) == 14 and not any("lm_head" in n for n in names)


@pytest.mark.parametrize(
    "method,kw,peft_kw",
    [
        ("lora", {}, {}),
        ("lora", {"rslora": True}, {"use_rslora": True}),
        ("dora", {}, {"use_dora": True}),
    ],
    ids=["lora", "rslora", "dora"],
)
def test_outputs_equal_peft(method, kw, peft_kw):
    ours = tunelab.attach(tiny_llama(), method, r=4, alpha=16, target_modules="all-linear", **kw)
    randomize(ours)
    pm = peft_twin(ours, r=4, lora_alpha=16, target_modules="all-linear", **peft_kw)
    with torch.no_grad():
        a, b = ours(X).logits, pm(input_ids=X).logits
    assert (a - b).abs().max() < 1e-5
    assert (a - tiny_llama()(X).logits).abs().max() > 1e-2  # the adapter really changed the output


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_equals_unmerged_forward(method):
    model = tunelab.attach(tiny_llama(), method, r=4, alpha=16, target_modules="all-linear")
    randomize(model)
    with torch.no_grad():
        before = model(X).logits
        merged = tunelab.merge(model)
        after = merged(X).logits
    assert not lora_modules(merged)
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear
    assert (before - after).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_in_place_then_unmerge_restores_w0(method):
    w0 = tiny_llama().model.layers[1].self_attn.o_proj.weight.clone()
    model = tunelab.attach(tiny_llama(), method, r=4, alpha=16)
    randomize(model)
    with torch.no_grad():
        before = model(X).logits
        merge_in_place(model)
        mod = model.model.layers[1].self_attn.o_proj
        assert mod.merged and not torch.allclose(mod.base_layer.weight, w0)
        assert (model(X).logits - before).abs().max() < 1e-5
        tunelab.unmerge(model)
        assert not mod.merged and (mod.base_layer.weight - w0).abs().max() < 1e-6
        assert (model(X).logits - before).abs().max() < 1e-5


def test_gradients_reach_only_the_adapter():
    model = tunelab.attach(tiny_llama(), "dora", r=4, target_modules=["q_proj", "down_proj"])
    randomize(model)
    model(X, labels=X).loss.backward()
    mod = model.model.layers[0].self_attn.q_proj
    assert mod.lora_A.grad is not None and mod.lora_B.grad is not None and mod.lora_magnitude.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_dropout_zero_is_deterministic_and_dropout_is_active_in_training():
    model = tunelab.attach(tiny_llama(), "lora", r=4).train()
    randomize(model)
    assert torch.equal(model(X).logits, model(X).logits)
    drop = tunelab.attach(tiny_llama(), "lora", r=4, dropout=0.5).train()
    randomize(drop)
    assert not torch.equal(drop(X).logits, drop(X).logits)
    drop.eval()
    assert torch.equal(drop(X).logits, drop(X).logits)


def test_encoder_with_a_new_classification_head_saves_and_restores_it(tmp_path):
    def fresh():
        m = tiny_bert()
        m.tunelab_new_head = ["classifier"]
        return m

    model = tunelab.attach(fresh(), "lora", r=4, target_modules=["query", "value"])
    assert model.classifier.weight.requires_grad and not model.bert.embeddings.word_embeddings.weight.requires_grad
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
        ref = model(X[:, :8]).logits
    tunelab.save(model, tmp_path / "run")
    loaded = tunelab.load(fresh(), tmp_path / "run")
    assert torch.equal(loaded(X[:, :8]).logits, ref)


def test_bf16_base_keeps_fp32_adapters():
    model = tunelab.attach(tiny_llama().to(torch.bfloat16), "lora", r=4)
    mod = model.model.layers[0].self_attn.q_proj
    assert mod.lora_A.dtype == torch.float32 and mod.base_layer.weight.dtype == torch.bfloat16
    randomize(model)
    out = model(X, labels=X)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert mod.lora_B.grad.dtype == torch.float32


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="r"):
        tunelab.attach(tiny_llama(), "lora", r=0)
    with pytest.raises(ValueError, match="q_proj"):  # the error lists the names the model has
        tunelab.attach(tiny_llama(), "lora", target_modules=["qproj"])
    with pytest.raises(ValueError, match="rank"):
        tunelab.attach(tiny_llama(), "lora", rank=4)
    model = tunelab.attach(tiny_llama(), "lora", target_modules="q_proj,v_proj")
    assert model.tunelab_method["params"]["target_modules"] == ["q_proj", "v_proj"]
    assert isinstance(model.model.layers[0].self_attn.v_proj, LoRALinear)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_in_place_adapter_sum_is_the_out_of_place_addmm_bit_for_bit(amp, grad):
    # the forward adds s (x A^T) B^T into the base output in place; the out-of-place addmm it replaced
    # must give the same bits, forward and backward, in fp32 and under bf16 autocast
    torch.manual_seed(0)
    mod = LoRALinear(nn.Linear(24, 40), r=4, scale=2.0)
    with torch.no_grad():
        mod.lora_A.normal_(std=0.2)
        mod.lora_B.normal_(std=0.2)

    def old(x):
        y = mod.base_layer(x)
        h = torch.nn.functional.linear(x, mod.lora_A)
        return torch.addmm(y.view(-1, 40), h.view(-1, 4), mod.lora_B.t(), alpha=mod.scaling).view(y.shape)

    outs = []
    for fn in (mod, old):
        x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2), requires_grad=grad)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = fn(x)
        got = [y.detach()]
        if grad:
            mod.zero_grad(set_to_none=True)
            (y.float() ** 2).sum().backward()
            got += [x.grad, mod.lora_A.grad, mod.lora_B.grad]
        outs.append(got)
    assert outs[0][0].dtype == (torch.bfloat16 if amp else torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
