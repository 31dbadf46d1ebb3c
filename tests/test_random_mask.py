"""Random masking: only the chosen entries move, exact counts, exact merge, sparse forward, save/load."""

from __future__ import annotations

import pytest
import torch

import tunelab
from tunelab.methods import random_mask as rm

from conftest import tiny_llama


def _batch(seed=0, batch=2, length=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**_batch(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_only_the_chosen_entries_change_after_training():
    model = tunelab.attach(tiny_llama(), "random_mask", fraction=0.01, seed=0)
    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    _train(model)
    # the frozen model is untouched, bit for bit
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.items())
    deltas = {n.rsplit(".random_mask", 1)[0]: m for n, m in model.named_modules() if isinstance(m, rm.SparseDelta)}
    assert len(deltas) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in deltas)
    assert all((m.values != 0).float().mean() > 0.9 for m in deltas.values())  # they did train
    merged = tunelab.merge(model).state_dict()
    for name, delta in deltas.items():
        before, after = base[name + ".weight"].view(-1), merged[name + ".weight"].view(-1)
        kept = torch.zeros_like(before, dtype=torch.bool)
        kept[delta.indices] = True
        assert torch.equal(before[~kept], after[~kept])  # every other entry bit-identical
        assert (before[kept] != after[kept]).float().mean() > 0.9
    others = [k for k in base if k.rsplit(".weight", 1)[0] not in deltas]
    assert all(torch.equal(base[k], merged[k]) for k in others)


def test_parameter_count_is_exact_and_both_fractions_are_reported():
    fraction = 0.003
    model = tunelab.attach(tiny_llama(), "random_mask", fraction=fraction)
    shapes = [(64, 64), (32, 64)] * 2  # q_proj (64x64) and v_proj (2 kv heads x 16 = 32 rows) per layer
    expected = sum(max(1, round(fraction * o * i)) for o, i in shapes)
    counts = tunelab.trainable_parameters(model)
    assert counts["trainable"] == expected
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert counts["total"] == base_total + expected
    s = rm.stats(model)
    assert s["kept"] == expected and s["targeted"] == sum(o * i for o, i in shapes)
    assert s["fraction_of_targets"] == pytest.approx(fraction, rel=0.05)
    assert s["fraction_of_model"] == pytest.approx(expected / base_total)
    # one entry at least, even when the fraction rounds to zero
    tiny = tunelab.attach(tiny_llama(), "random_mask", fraction=1e-9)
    assert tunelab.trainable_parameters(tiny)["trainable"] == 4


def test_forward_matches_the_dense_formula_and_merge_is_exact():
    model = tunelab.attach(tiny_llama(), "random_mask", fraction=0.02, seed=3)
    _train(model, steps=2)
    batch = _batch(9)
    with torch.no_grad():
        unmerged = model(input_ids=batch["input_ids"]).logits
        # independent computation: W0 + scatter(I, v) written into a fresh copy of the base
        ref = tiny_llama()
        for name, mod in model.named_modules():
            if isinstance(getattr(mod, "random_mask", None), rm.SparseDelta):
                ref.get_submodule(name).weight += mod.random_mask.dense()
        expected = ref(input_ids=batch["input_ids"]).logits
        merged = tunelab.merge(model)(input_ids=batch["input_ids"]).logits
    assert not any(isinstance(m, rm.SparseDelta) for m in model.modules())
    assert not any(f is rm._add_sparse_delta for m in model.modules() for f in m._forward_hooks.values())
    torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_sparse_path_never_builds_a_dense_delta(monkeypatch):
    model = tunelab.attach(tiny_llama(), "random_mask", fraction=0.001)

    def boom(self, values):
        raise AssertionError("dense delta built in the sparse path")

    monkeypatch.setattr(rm.SparseDelta, "scatter", boom)
    model.train()
    model(**_batch()).loss.backward()
    assert all(m.values.grad is not None for m in model.modules() if isinstance(m, rm.SparseDelta))


def test_sparse_and_dense_paths_agree_and_gradients_are_right(monkeypatch):
    g = torch.Generator().manual_seed(0)
    idx = rm.sample_indices(40 * 30, 60, g)
    values = torch.randn(60, dtype=torch.double, requires_grad=True)
    x = torch.randn(3, 5, 30, dtype=torch.double, requires_grad=True)
    out = torch.randn(3, 5, 40, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, x, v: rm._SparseAdd.apply(o, x, v, idx // 30, idx % 30), (out, x, values))
    delta = rm.SparseDelta((40, 30), idx).double()
    with torch.no_grad():
        delta.values.copy_(values)
    sparse = delta.add_to(x, out)
    monkeypatch.setattr(rm, "DENSE_ABOVE", 10**9)  # force the dense path
    torch.testing.assert_close(delta.add_to(x, out), sparse)
    torch.testing.assert_close(sparse, out + x @ delta.dense().T)


def test_sample_indices_distinct_sorted_reproducible():
    for n, k in [(1000, 3), (1000, 900), (64 * 64, 41)]:
        a = rm.sample_indices(n, k, torch.Generator().manual_seed(5))
        b = rm.sample_indices(n, k, torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and a.numel() == k and a.unique().numel() == k
        assert torch.all(a[1:] > a[:-1]) and a.min() >= 0 and a.max() < n
    # not biased to small indices (a rejection-sampling bug would keep the k smallest draws)
    big = rm.sample_indices(10**6, 1000, torch.Generator().manual_seed(0))
    assert 4e5 < big.float().mean() < 6e5


def test_save_load_restores_indices_from_the_file(tmp_path):
    model = _train(tunelab.attach(tiny_llama(), "random_mask", fraction=0.01, seed=0))
    tunelab.save(model, tmp_path / "m")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / "method.safetensors"))
    assert all(k.endswith((".random_mask.indices", ".random_mask.values")) for k in saved)
    assert all(v.dim() == 1 for v in saved.values())  # no dense mask or delta stored
    # a model attached with another seed gets the saved indices, not its own
    other = tunelab.attach(tiny_llama(), "random_mask", fraction=0.01, seed=1)
    loaded = tunelab.load(other, tmp_path / "m")
    fresh = tunelab.load(tiny_llama(), tmp_path / "m")
    ids = _batch(4)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
        torch.testing.assert_close(fresh(input_ids=ids).logits, want)


def test_recommended_lr_and_bad_config():
    lr = rm.RandomMask.lr_for
    assert rm.RandomMask.recommended_lr == pytest.approx(lr(rm.RandomMaskConfig()))
    from tunelab.train import default_lr

    assert default_lr("random_mask") == rm.RandomMask.recommended_lr  # what the loop defaults to
    cfg = rm.RandomMaskConfig
    assert lr(cfg(fraction=1e-4)) == pytest.approx(1e-2)
    assert lr(cfg(fraction=1e-5)) > lr(cfg(fraction=1e-4)) > lr(cfg(fraction=1e-3)) > lr(cfg(fraction=1.0))
    assert lr(cfg(fraction=1e-9)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="fraction"):
        tunelab.attach(tiny_llama(), "random_mask", fraction=0.0)
    with pytest.raises(ValueError, match="matched no module"):
        tunelab.attach(tiny_llama(), "random_mask", target_modules=["nope"])
