"""Golden test: tunelab's LoReFT against pyreft's ``LoreftIntervention`` itself (pyreft 0.1.0, the PyPI
release of github.com/stanfordnlp/pyreft; installed for the tests with ``--no-deps`` beside pyvene 0.1.8,
as its pin of transformers 4.45 does not fit; see the Makefile's setup). Its R is
``torch.nn.utils.parametrizations.orthogonal`` on a (d x r) weight, its edit ``h + (W h + b - R h) R``
with R^T the weight, and dropout on the whole output. Both sides start from the identical R (pyreft's
trivialization base set to ours), W and b.
"""

from __future__ import annotations

import pyreft
import pytest
import torch
from torch import nn

import tunelab
from tunelab.methods.reft import LoReFT, prompt_sites

from conftest import tiny_llama

D, V = 64, 128


def RefLoreft(d, r, dropout=0.0):  # noqa: N802  (pyreft's class, under the name the tests use)
    return pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=r, dropout=dropout, dtype=torch.float32)


def same_start(ref, ours: LoReFT):
    """The reference at its identity point with our base: identical R, W, b."""
    with torch.no_grad():
        ref.rotate_layer.parametrizations.weight[0].base = ours.rotate.parametrizations.weight[0].base().clone()
        ref.learned_source.load_state_dict(ours.learned_source.state_dict())
    assert torch.allclose(ref.rotate_layer.weight, ours.rotate.weight.T, atol=1e-6)
    return ref


def R_of(mod):
    return mod.rotate.weight.detach().clone() if isinstance(mod, LoReFT) else mod.rotate_layer.weight.detach().T.clone()


def one_step(mod, h, target, lr, wd):
    opt = torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    before = R_of(mod)
    ((mod(h) - target) ** 2).mean().backward()
    opt.step()
    return R_of(mod) - before, R_of(mod)


def pair(seed=0, r=4):
    torch.manual_seed(seed)
    ours = LoReFT(D, r)
    return ours, same_start(RefLoreft(D, r), ours)


def test_forward_equals_the_reference():
    ours, ref = pair()
    h = torch.randn(9, D)
    assert torch.allclose(ours(h), ref(h), atol=1e-5)


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_one_adamw_step_on_R_equals_the_reference(lr):
    ours, ref = pair(1)
    g = torch.Generator().manual_seed(2)
    h, target = torch.randn(16, D, generator=g), torch.randn(16, D, generator=g)
    d_ours, _ = one_step(ours, h, target, lr, 0.0)
    d_ref, _ = one_step(ref, h, target, lr, 0.0)
    assert d_ref.norm() > 0
    assert (d_ours - d_ref).norm() / d_ref.norm() < 0.05  # the brief's bound; in fact ~1e-6
    assert d_ours.norm() / d_ref.norm() == pytest.approx(1.0, rel=0.01)  # not half the rate (tunelab 0.1)


def test_weight_decay_keeps_R_orthonormal_where_the_reference_collapses():
    ours, ref = pair(3)
    g = torch.Generator().manual_seed(4)
    h, target = torch.randn(16, D, generator=g), torch.randn(16, D, generator=g)
    _, R_ours = one_step(ours, h, target, 1e-2, 0.01)
    _, R_ref = one_step(ref, h, target, 1e-2, 0.01)
    assert torch.allclose(R_ours @ R_ours.T, torch.eye(4), atol=1e-5)
    # the reference's diagonal (no gradient) decays to 0.9999 and int() makes its columns zero
    assert R_ref.norm(dim=1).max() < 1e-6


def test_dropout_on_output_is_the_references_placement():
    torch.manual_seed(5)
    ours = LoReFT(D, 4, dropout=0.5, dropout_on="output")
    ref = same_start(RefLoreft(D, 4, dropout=0.5), ours)
    ours.train(), ref.train()
    h = torch.randn(7, D)
    torch.manual_seed(6)
    a = ours(h)
    torch.manual_seed(6)
    assert torch.allclose(a, ref(h), atol=1e-5) and (a == 0).any()  # zeros: h itself is dropped too


def _reference_model(ours_model, p, s):
    """A fresh tiny llama with forward hooks applying RefLoreft (from our start) at the same rows."""
    base = tiny_llama(layers=1)
    refs = nn.ModuleList()
    for blk, mine in zip(base.model.layers, ours_model.model.layers, strict=True):
        ref = same_start(RefLoreft(D, 4), mine.reft.both)
        refs.append(ref)

        def hook(mod, args, out, ref=ref):
            h = out if isinstance(out, torch.Tensor) else out[0]
            sites = base.sites[..., None]
            h = torch.where(sites, ref(h), h)
            return h if isinstance(out, torch.Tensor) else (h, *out[1:])

        blk.register_forward_hook(hook)
    return base, refs


def test_20_step_loss_curve_on_a_tiny_llama_equals_the_reference():
    p, s = 2, 2
    ours = tunelab.attach(tiny_llama(layers=1), "loreft", rank=4, positions=f"f{p}+l{s}")
    ref_model, refs = _reference_model(ours, p, s)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (2, 10), generator=g)
    pm = torch.arange(10).expand(2, 10) < 7  # 7 prompt tokens, 3 target tokens
    pre, suf = prompt_sites(pm, p, s)
    ref_model.sites = pre | suf
    curves = {}
    for name, model, params in (
        ("ours", ours, [q for q in ours.parameters() if q.requires_grad]),
        ("ref", ref_model, list(refs.parameters())),
    ):
        opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
        kw = {"prompt_mask": pm} if name == "ours" else {}
        losses = []
        for _ in range(20):
            loss = model(input_ids=ids, labels=ids, **kw).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[name] = losses
    assert curves["ours"][-1] < curves["ours"][0] - 0.05  # it learns
    for a, b in zip(curves["ours"], curves["ref"], strict=True):
        assert a == pytest.approx(b, rel=1e-3)


def test_one_step_equals_pyreft_itself():
    torch.manual_seed(8)
    ours = LoReFT(D, 4)
    ref = same_start(RefLoreft(D, 4), ours)
    assert type(ref).__module__ == "pyreft.interventions"
    h = torch.randn(16, D)
    target = torch.randn(16, D)
    assert torch.allclose(ours(h), ref(h), atol=1e-5)
    d_ours, _ = one_step(ours, h, target, 1e-2, 0.0)
    d_ref, _ = one_step(ref, h, target, 1e-2, 0.0)
    assert (d_ours - d_ref).norm() / d_ref.norm() < 0.05

