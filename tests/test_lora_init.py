"""LoRA's newer starts and optimiser, golden against PEFT itself: PiSSA / OLoRA (same A, B and residual
base as PEFT's init_lora_weights="pissa"/"olora"), what disabled / merge / save-load / PEFT export do over
the residual base, and LoRA+'s parameter groups (PEFT's create_loraplus_optimizer)."""

from __future__ import annotations

import copy

import pytest
import torch

import tunelab
from test_train import cfg_for, data, losses  # noqa: F401  (fixtures)
from tunelab.export.peft_format import export_peft
from tunelab.methods.lora import lora_modules
from tunelab.training import optimizer

from conftest import tiny_llama

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

X = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
QV = ["q_proj", "v_proj"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def moved(model, seed=0):
    """Move every adapter off its start (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A.add_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_start_and_residual_equal_peft(init):
    ours = tunelab.attach(tiny_llama(), "lora", r=4, alpha=8, target_modules=QV, init=init)
    twin = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=init))
    theirs = dict(twin.base_model.model.named_modules())
    mods = lora_modules(ours)
    assert len(mods) == 4
    for name, m in mods:
        t = theirs[name]
        torch.testing.assert_close(m.lora_A, t.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.lora_B, t.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.base_layer.weight, t.base_layer.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(ours), logits(tiny_llama()), atol=1e-5, rtol=1e-5)  # starts at W0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_disabled_is_the_original_base_and_merge_save_load_export_hold(tmp_path, init):
    base = logits(tiny_llama())
    model = moved(tunelab.attach(tiny_llama(), "lora", r=4, alpha=8, target_modules=QV, init=init))
    tuned = logits(model)
    assert not torch.allclose(tuned, base, atol=1e-3)
    with tunelab.disabled(model):  # the residual base + s B0 A0: the original W0 x, not W_res x
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model), tuned)
    tunelab.save(model, tmp_path / "m")
    again = tunelab.load(tiny_llama(), tmp_path / "m")  # the start is recomputed from the fresh base
    torch.testing.assert_close(logits(again), tuned, atol=1e-6, rtol=1e-6)
    export_peft(model, tmp_path / "peft")  # PEFT's own conversion: rank 2r over the untouched base
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    assert pm.peft_config["default"].r == 8
    torch.testing.assert_close(logits(pm), tuned, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(tunelab.merge(model)), tuned, atol=1e-5, rtol=1e-5)


def test_pissa_niter_reattaches_to_the_same_start():
    a, b = tiny_llama(), tiny_llama()
    torch.manual_seed(5)  # the global RNG does not matter: the randomized SVD is seeded
    a = tunelab.attach(a, "lora", r=4, target_modules=QV, init="pissa_niter_2")
    torch.manual_seed(123)
    b = tunelab.attach(b, "lora", r=4, target_modules=QV, init="pissa_niter_2")
    for (_, m), (_, n) in zip(lora_modules(a), lora_modules(b), strict=True):
        assert torch.equal(m.lora_A, n.lora_A) and torch.equal(m.base_layer.weight, n.base_layer.weight)


def test_gaussian_start_is_peft_s():
    torch.manual_seed(0)
    m = dict(lora_modules(tunelab.attach(tiny_llama(), "lora", r=4, target_modules=QV, init="gaussian")))
    a = next(iter(m.values()))
    assert torch.count_nonzero(a.lora_B) == 0 and abs(a.lora_A.std().item() - 1 / 4) < 0.05
    torch.testing.assert_close(logits(tunelab.attach(tiny_llama(), "lora", init="gaussian")), logits(tiny_llama()))


def test_init_errors_are_clear():
    with pytest.raises(ValueError, match="init='pisa' is unknown.*did you mean 'pissa'"):
        tunelab.attach(tiny_llama(), "lora", init="pisa")
    with pytest.raises(ValueError, match="not supported with a quantized base or DoRA"):
        tunelab.attach(tiny_llama(), "dora", init="pissa")
    with pytest.raises(ValueError, match="embedding is not supported"):
        tunelab.attach(tiny_llama(), "lora", target_modules=["embed_tokens"], init="olora")


def _names(model, params, strip=""):
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = []
    for p in params:
        n = by_id[id(p)].removeprefix(strip)
        for a, b in ((".default.weight", ""), (".default", ""), ("lora_embedding_", "lora_"),
                     ("lora_magnitude_vector", "lora_magnitude")):
            n = n.replace(a, b)
        out.append(n)
    return sorted(out)


@pytest.mark.parametrize(("method", "targets"), [("lora", ["embed_tokens", "q_proj", "v_proj"]), ("dora", QV)])
def test_loraplus_groups_equal_peft(method, targets):
    lr, wd, ratio = 2e-4, 0.01, 16.0
    ours = tunelab.attach(tiny_llama(), method, r=4, target_modules=targets, loraplus_lr_ratio=ratio)
    opt = optimizer.build(method, ours.tunelab_method["params"], ours, lr, wd)
    twin = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                             use_dora=method == "dora"))
    ref = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                                    loraplus_weight_decay=wd)
    assert len(opt.param_groups) == len(ref.param_groups) == 4
    for g, h in zip(opt.param_groups, ref.param_groups, strict=True):
        assert (g["lr"], g["weight_decay"]) == (h["lr"], h["weight_decay"])
        assert _names(ours, g["params"]) == _names(twin, h["params"], "base_model.model.")
    assert any(g["params"] for g in opt.param_groups[1:])  # the groups are not all in A's


def test_plain_lora_keeps_one_group():
    model = tunelab.attach(tiny_llama(), "lora", r=4)
    opt = optimizer.build("lora", model.tunelab_method["params"], model, 1e-3, 0.0)
    assert len(opt.param_groups) == 1


def test_loraplus_trains_through_the_loop(tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    """B's groups run at lr x ratio in the real loop (the optimizer asks the method for its groups)."""
    import tunelab.training.loop as loop

    seen = {}
    real = loop.optimizer.build

    def spy(*a, **k):
        seen["opt"] = real(*a, **k)
        return seen["opt"]

    monkeypatch.setattr(loop.optimizer, "build", spy)
    steps = ["method.name=lora", "method.r=4", "method.loraplus_lr_ratio=8", "train.max_steps=3"]
    loop.run(cfg_for(tiny_dir, data, tmp_path / "run", *steps))
    lrs = sorted({g["initial_lr"] for g in seen["opt"].param_groups if g["params"]})
    assert len(lrs) == 2 and lrs[1] == pytest.approx(8 * lrs[0])
    assert len(losses(tmp_path / "run")) == 3


def test_copy_keeps_the_start():
    model = tunelab.attach(tiny_llama(), "lora", r=4, target_modules=QV, init="pissa")
    twin = copy.deepcopy(model)
    with tunelab.disabled(twin):
        torch.testing.assert_close(logits(twin), logits(tiny_llama()), atol=1e-5, rtol=1e-5)
