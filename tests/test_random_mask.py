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
    expected = sum(d.indices.numel() for d in model.modules() if isinstance(d, rm.SparseDelta))
    assert expected == pytest.approx(fraction * sum(o * i for o, i in shapes), abs=4 * (fraction * 12288) ** 0.5)
    counts = tunelab.trainable_parameters(model)
    assert counts["trainable"] == expected
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert counts["total"] == base_total + expected
    s = rm.stats(model)
    assert s["kept"] == expected and s["targeted"] == sum(o * i for o, i in shapes)
    assert s["fraction_of_targets"] == pytest.approx(expected / s["targeted"])
    assert s["fraction_of_model"] == pytest.approx(expected / base_total)
    # a fraction that keeps nothing in any matrix is refused with the expected count
    with pytest.raises(ValueError, match=r"kept no entry.*expected 1.23e-05"):
        tunelab.attach(tiny_llama(), "random_mask", fraction=1e-9)


@pytest.mark.parametrize("n,fraction", [(576 * 576, 1e-6), (576 * 192, 1e-6), (4096, 1e-3), (10**6, 1e-4),
                                        (2048, 0.3)])
def test_expected_kept_count_is_fraction_times_n_at_every_scale(n, fraction):
    """Over many seeds the mean kept count is fraction * n (Binomial), including far below 1 per matrix,
    where tunelab 0.1's max(1, round(f n)) kept 1 (4.5x too many on SmolLM2's q/v at 1e-6)."""
    draws = torch.tensor([float(rm.kept_count(n, fraction, torch.Generator().manual_seed(s))) for s in range(3000)])
    mean, var = n * fraction, n * fraction * (1 - fraction)
    assert abs(draws.mean().item() - mean) < 4 * (var / 3000) ** 0.5 + 1e-12
    assert draws.var().item() == pytest.approx(var, rel=0.15)  # per-entry independent: binomial spread
    if mean < 0.5:
        assert (draws == 0).float().mean() == pytest.approx((1 - fraction) ** n, abs=0.03)


def test_kept_counts_through_attach_average_to_the_fraction():
    fraction, targeted = 1e-4, 2 * (64 * 64 + 32 * 64)  # expected 1.23 kept in all, 0.2-0.4 per matrix
    kept = []
    for s in range(40):
        try:
            kept.append(rm.stats(tunelab.attach(tiny_llama(), "random_mask", fraction=fraction, seed=s))["kept"])
        except ValueError as e:  # every matrix drew 0 (probability e^-1.23 = 0.29)
            assert "kept no entry" in str(e)
            kept.append(0)
    assert sum(kept) / len(kept) == pytest.approx(fraction * targeted, abs=4 * (fraction * targeted / 40) ** 0.5)
    assert sum(kept) / len(kept) < 0.7 * 4  # the old per-matrix minimum of 1 kept 4 every time


def test_a_matrix_that_keeps_nothing_is_a_no_op_and_saved_runs_load_their_own_indices(tmp_path):
    model = tunelab.attach(tiny_llama(), "random_mask", fraction=5e-4, seed=1)
    sizes = [d.indices.numel() for d in model.modules() if isinstance(d, rm.SparseDelta)]
    assert 0 in sizes and sum(sizes) > 0
    ids = torch.randint(3, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # empty deltas run forward and backward
    tunelab.save(model, tmp_path / "run")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "run" / "method.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.random_mask.indices"))
    state[key] = torch.tensor([3, 70, 900])  # e.g. a 0.1 run's count
    state[key.replace("indices", "values")] = torch.tensor([0.5, -1.0, 2.0])
    save_file(state, str(tmp_path / "run" / "method.safetensors"))
    loaded = tunelab.load(tiny_llama(), tmp_path / "run")
    delta = loaded.get_submodule(key.rsplit(".indices", 1)[0])
    assert delta.indices.tolist() == [3, 70, 900] and delta.dense().view(-1)[70] == -1.0


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
    from tunelab.training.optimizer import default_lr

    assert default_lr("random_mask") == rm.RandomMask.recommended_lr  # what the loop defaults to
    cfg = rm.RandomMaskConfig
    assert lr(cfg(fraction=1e-4)) == pytest.approx(1e-2)
    assert lr(cfg(fraction=1e-5)) > lr(cfg(fraction=1e-4)) > lr(cfg(fraction=1e-3)) > lr(cfg(fraction=1.0))
    assert lr(cfg(fraction=1e-9)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="fraction"):
        tunelab.attach(tiny_llama(), "random_mask", fraction=0.0)
    with pytest.raises(ValueError, match="matched no module"):
        tunelab.attach(tiny_llama(), "random_mask", target_modules=["nope"])
