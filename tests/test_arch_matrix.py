"""Every method on every architecture family (tiny random models): forward + backward correct, or a
clear refusal. Checked per cell: identity at init where the method starts at the base model, a finite
loss whose gradient reaches every trainable tensor and no frozen one, and one SGD step that moves the
output. T5/BART cells feed the model labels (decoder inputs are the shifted labels) directly."""

from __future__ import annotations

import pytest
import torch

import tunelab
from tiny_models import FAMILIES, SEQ2SEQ, batch, tiny
from tunelab.models import arch

PARAMS = {
    "full": {},
    "lora": {"r": 4},
    "dora": {"r": 4},
    "qlora": {"r": 4},
    "loftq": {"r": 4, "iters": 1},
    "loreft": {"rank": 2, "positions": "f2+l2"},
    "direft": {"rank": 2, "positions": "f2+l2"},
    "random_mask": {"fraction": 0.05},
    "series_adapter": {"bottleneck": 8},
    "parallel_adapter": {"bottleneck": 8},
    "prompt_tuning": {"num_virtual_tokens": 3},
}
IDENTITY_AT_INIT = {"full", "lora", "dora", "random_mask", "series_adapter", "parallel_adapter"}
# Cells that refuse, with words the refusal must contain (why + what to use instead).
# (None today: prompt tuning on T5/BART puts P on the encoder input.)
REFUSALS: dict[tuple[str, str], str] = {}


def _logits(model, b):
    with torch.no_grad():
        return model(**b).logits.float()


@pytest.mark.parametrize("method", list(PARAMS))
@pytest.mark.parametrize("family", FAMILIES)
def test_cell(family, method):
    model = tiny(family, layers=1)
    b = batch(family)
    if (family, method) in REFUSALS:
        with pytest.raises(ValueError, match=REFUSALS[family, method]):
            tunelab.attach(model, method, **PARAMS[method])
        return
    base = _logits(model, b)
    model = tunelab.attach(model, method, **PARAMS[method])
    start = _logits(model, b)
    assert start.shape == base.shape
    if method in IDENTITY_AT_INIT:
        torch.testing.assert_close(start, base, atol=1e-5, rtol=1e-5)
    elif method in ("qlora", "loftq"):  # the quantized base stays near the original
        assert (start - base).abs().mean() < 0.5 * base.abs().mean()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    model.train()
    torch.manual_seed(0)
    loss = model(**b).loss
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        for p in trainable.values():
            p -= 1.0 * p.grad.sign() * 1e-2  # a sign step: moves even tiny gradients
    model.eval()
    assert not torch.allclose(_logits(model, b), start)


@pytest.mark.parametrize("family", FAMILIES)
def test_table_defaults(family):
    """The table names real modules for every family: blocks, q/v targets and both adapter hosts."""
    model = tiny(family)
    a = arch.of(model)
    assert a.family != "generic"
    for stack in a.stacks:
        assert len(arch.blocks(model, stack)) == 2
    qv = arch.default_targets(model, "qv")
    assert qv and all("q" in n.rsplit(".", 1)[-1] or "v" in n.rsplit(".", 1)[-1] or "attn" in n for n in qv)
    for role in ("series", "parallel"):
        hosts = arch.default_targets(model, role)
        assert hosts and not any("attn" in n or "attention" in n.lower() for n in hosts), hosts
    assert a.encoder_decoder == (family in SEQ2SEQ)


@pytest.mark.parametrize(("family", "name", "rows"), [
    ("phi3", "model.layers.0.self_attn.qkv_proj", [(0, 64), (96, 128)]),  # q 4x16, k = v 2x16
    ("gpt2", "transformer.h.0.attn.c_attn", [(0, 64), (128, 192)]),
    ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value",
     [(0, 16), (32, 48), (48, 64), (80, 96), (96, 112), (128, 144), (144, 160), (176, 192)]),
])
def test_fused_qv_rows(family, name, rows):
    """Random masking's default on a fused projection lives only in its q and v rows."""
    model = tiny(family)
    assert arch.qv_rows(model, name, 192 if family != "phi3" else 128) == rows
    model = tunelab.attach(model, "random_mask", fraction=0.2)
    delta = model.get_submodule(name).random_mask
    r = delta.indices // delta.shape[1]
    inside = torch.zeros_like(r, dtype=torch.bool)
    for start, stop in rows:
        inside |= (r >= start) & (r < stop)
    assert inside.all() and delta.indices.numel() > 0


def test_reft_stacks():
    """ReFT edits the decoder stack of a decoder-only model and the encoder stack of T5 by default."""
    t5 = tiny("t5")
    assert arch.blocks(t5) is t5.encoder.block and arch.blocks(t5, "decoder") is t5.decoder.block
    with pytest.raises(ValueError, match="no 'decoder' stack"):
        arch.blocks(tiny("bert"), "decoder")


def test_unknown_family_falls_back():
    """A model type the table lacks uses the common naming schemes (here: a Llama renamed)."""
    model = tiny("llama")
    model.config.model_type = "my_llama"
    assert arch.of(model) is arch.GENERIC
    assert arch.default_targets(model, "qv")[0].endswith("q_proj")
    assert len(arch.blocks(model)) == 2


# PEFT's tuners through tunelab's bridge, on one family per kind (decoder, GPT-2's Conv1D, encoder,
# seq2seq): the full 15-family grid would add minutes. PEFT itself refuses some cells; the refusal names why.
BRIDGED = {"vera": {"r": 8}, "ia3": {}, "adalora": {"init_r": 4, "target_r": 2}, "oft": {}, "boft": {}, "loha": {},
           "lokr": {}, "fourierft": {"n_frequency": 64}, "hra": {"r": 4}, "ln_tuning": {}}
BRIDGED_FAMILIES = ("llama", "gpt2", "bert", "t5")
BRIDGED_REFUSALS = {**{("gpt2", m): "Conv1D.*not supported" for m in ("oft", "boft", "loha", "lokr", "hra")},
                    ("bert", "ln_tuning"): "specify `target_modules`"}


@pytest.mark.parametrize("method", list(BRIDGED))
@pytest.mark.parametrize("family", BRIDGED_FAMILIES)
def test_bridged_cell(family, method):
    pytest.importorskip("peft")
    model = tiny(family, layers=1)
    b = batch(family)
    if (family, method) in BRIDGED_REFUSALS:
        with pytest.raises(ValueError, match=BRIDGED_REFUSALS[family, method]):
            tunelab.attach(model, method, **BRIDGED[method])
        return
    base = _logits(model, b)
    model = tunelab.attach(model, method, **BRIDGED[method])
    start = _logits(model, b)
    if method != "fourierft":  # PEFT starts FourierFT's spectrum at random (init_weights=False)
        torch.testing.assert_close(start, base, atol=1e-5, rtol=1e-5)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    loss = model(**b).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in trainable.values()) and any(p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        for p in trainable.values():
            p -= 1.0 * p.grad.sign() * 1e-2
    model.eval()
    assert not torch.allclose(_logits(model, b), start)
    with tunelab.disabled(model):
        torch.testing.assert_close(_logits(model, b), base, atol=0, rtol=0)
