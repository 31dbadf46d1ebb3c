"""PEFT parity where PEFT supports the pair: LoRA on GPT-2's Conv1D (fan_in_fan_out), LoRA on input
embeddings, LoRA on Phi-3's fused qkv_proj / gate_up_proj; and the PEFT adapter format both ways."""

from __future__ import annotations

import pytest
import torch

import tunelab
from tiny_models import batch, tiny
from tunelab.export.peft_format import export_peft, import_peft
from tunelab.methods.lora import LoRAEmbedding, lora_modules

peft = pytest.importorskip("peft")

CASES = {
    "gpt2_conv1d": ("gpt2", "all-linear"),
    "gpt2_embedding": ("gpt2", ["wte", "c_attn"]),
    "llama_embedding": ("llama", ["embed_tokens", "q_proj", "v_proj"]),
    "phi3_fused": ("phi3", ["qkv_proj", "gate_up_proj"]),
}


def _randomize(model, seed=1):
    """Non-zero A and B so the update shows (B starts at zero for linears, A for embeddings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model


def _peft_twin(family, targets, ours):
    """PEFT's LoRA on a fresh copy of the same base, holding our A and B."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2")
    twin = peft.get_peft_model(tiny(family), cfg)
    mods = dict(lora_modules(ours))
    with torch.no_grad():
        for name, m in twin.base_model.model.named_modules():
            if name not in mods:
                continue
            if isinstance(mods[name], LoRAEmbedding):
                m.lora_embedding_A["default"].copy_(mods[name].lora_A)
                m.lora_embedding_B["default"].copy_(mods[name].lora_B)
            else:
                m.lora_A["default"].weight.copy_(mods[name].lora_A)
                m.lora_B["default"].weight.copy_(mods[name].lora_B)
    return twin.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_peft(case, tmp_path):
    family, targets = CASES[case]
    ours = _randomize(tunelab.attach(tiny(family), "lora", r=4, alpha=8, target_modules=targets))
    b = batch(family)
    twin = _peft_twin(family, targets, ours)
    n_peft = sum(1 for _, m in twin.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert n_peft == len(lora_modules(ours))
    with torch.no_grad():
        want, got = twin(**b).logits, ours(**b).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # our export loads in PEFT over a fresh base and gives the same outputs
    loaded = peft.PeftModel.from_pretrained(tiny(family), str(export_peft(ours, tmp_path / "ad"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, want, atol=1e-5, rtol=1e-5)
    # PEFT's save imports back into tunelab
    twin.save_pretrained(str(tmp_path / "peft"))
    back = import_peft(tiny(family), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, want, atol=1e-5, rtol=1e-5)
    # merge: the plain model (same module types, so save_pretrained keeps the layout) gives the same
    merged = tunelab.merge(ours)
    assert type(merged.get_submodule(lora_names(twin)[0])).__name__ in ("Conv1D", "Linear", "Embedding")
    with torch.no_grad():
        torch.testing.assert_close(merged(**b).logits, want, atol=1e-4, rtol=1e-4)


def lora_names(twin):
    return [n.removeprefix("base_model.model.") for n, m in twin.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_in_place_merge_roundtrip_on_conv1d():
    model = _randomize(tunelab.attach(tiny("gpt2"), "lora", r=4))
    b = batch("gpt2")
    with torch.no_grad():
        want = model(**b).logits
        w0 = model.transformer.h[0].attn.c_attn.base_layer.weight.clone()
        tunelab.methods.lora.merge_in_place(model)
        torch.testing.assert_close(model(**b).logits, want, atol=1e-5, rtol=1e-5)
        tunelab.methods.lora.unmerge_model(model)
        torch.testing.assert_close(model.transformer.h[0].attn.c_attn.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_random_mask_merge_is_exact_on_conv1d():
    model = tunelab.attach(tiny("gpt2"), "random_mask", fraction=0.05)
    b = batch("gpt2")
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "random_mask"):
                m.random_mask.values.normal_()
        want = model(**b).logits
        merged = tunelab.merge(model)
        torch.testing.assert_close(merged(**b).logits, want, atol=1e-5, rtol=1e-5)


def test_dora_on_an_embedding_is_refused():
    with pytest.raises(ValueError, match="DoRA on an embedding"):
        tunelab.attach(tiny("llama"), "dora", target_modules=["embed_tokens"])


def test_qlora_on_conv1d_matches_lora_over_the_dequantized_base():
    """QLoRA on GPT-2 quantizes W0 = Conv1D.weight^T (d_out x d_in), not the stored layout."""
    q = tunelab.attach(tiny("gpt2"), "qlora", r=4)
    lin = q.transformer.h[0].attn.c_attn
    assert (lin.out_features, lin.in_features) == (192, 64)
    w = tiny("gpt2").transformer.h[0].attn.c_attn.weight.T
    assert (lin.base_weight() - w).abs().mean() < 0.1 * w.abs().mean()
