"""PEFT's other tuners through the bridge: each trains in tunelab's loop, resumes exactly, loads from the
run directory, is switched off exactly (the base's logits), merges (PEFT's merge_and_unload) or says why
not, exports to PEFT's own format; bad config keys fail with one line naming the key; AdaLoRA's rank
allocation runs from the loop's generic on_step hook."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tunelab
import tunelab.training.loop as train_mod
from test_train import cfg_for, data, losses  # noqa: F401  (fixtures)
from tunelab.export.peft_format import export_peft
from tunelab.methods.peft_bridge import TUNERS

from conftest import tiny_llama

peft = pytest.importorskip("peft")

X = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
# small settings so that a few steps move the tiny model visibly (defaults otherwise)
PARAMS = {"vera": ["method.r=16"], "adalora": ["method.init_r=6", "method.target_r=2"],
          "fourierft": ["method.n_frequency=64"], "hra": ["method.r=4"]}
STEPS = ["train.max_steps=6", "train.save_every=3", "train.lr=1e-2", "eval.loss=false"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def _run(tiny_dir, data, out, name, *extra):  # noqa: F811
    return train_mod.run(cfg_for(tiny_dir, data, out, f"method.name={name}", *PARAMS.get(name, []), *STEPS, *extra))


@pytest.mark.parametrize("name", list(TUNERS))
def test_trains_resumes_loads_disables_merges_exports(name, tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    full = tmp_path / "full"
    _run(tiny_dir, data, full, name)
    real = train_mod.save_checkpoint

    class Crash(Exception):
        pass

    def crash_after_first_save(path, model, opt, sched, pos):
        real(path, model, opt, sched, pos)
        if pos["step"] == 3:
            raise Crash

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first_save)
    part = tmp_path / "part"
    with pytest.raises(Crash):
        _run(tiny_dir, data, part, name)
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    _run(tiny_dir, data, part, name)
    assert len(losses(full)) == 6 and losses(part) == losses(full)  # exact resume
    a = load_file(str(full / "method" / "method.safetensors"))
    b = load_file(str(part / "method" / "method.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    base = tiny_llama()  # the run's base (tiny_dir holds tiny_llama())
    before = logits(base)
    model = tunelab.load(tiny_llama(), full / "method")  # touches only the tuner's tensors
    assert set(a) == set(tunelab.methods.base.method_state_dict(model))
    trained = logits(model)
    assert not torch.allclose(trained, before, atol=1e-4), "training did not move the model"
    with tunelab.disabled(model):
        assert torch.equal(logits(model), before)
    assert torch.equal(logits(model), trained)

    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(export_peft(model, tmp_path / "peft"))).eval()
    torch.testing.assert_close(logits(pm), trained, atol=1e-5, rtol=1e-5)

    merged = tunelab.merge(model)  # every tuner here merges in PEFT (a refusal would raise ValueError)
    assert not hasattr(merged, "tunelab_peft") and merged.tunelab_method is None
    torch.testing.assert_close(logits(merged), trained, atol=1e-4, rtol=1e-4)


def test_adalora_allocates_ranks_from_the_loop_hook(tiny_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "ada"
    _run(tiny_dir, data, out, "adalora")
    state = load_file(str(out / "method" / "method.safetensors"))
    E = [v for k, v in state.items() if "lora_E" in k]
    kept = sum(int((e != 0).sum()) for e in E)
    assert E and kept < sum(e.numel() for e in E)  # the budget fell below init_r: some ranks masked
    assert any(k.startswith("tunelab_peft.ema_") for k in state)  # the importance averages are saved


def test_generic_peft_method_with_a_type_and_its_keys():
    model = tunelab.attach(tiny_llama(), "peft", peft_type="VERA", r=8, target_modules=["q_proj"])
    assert model.tunelab_method == {"name": "peft", "params": {"peft_type": "VERA", "r": 8, "target_modules": ["q_proj"]}}
    from tunelab.training.optimizer import default_lr

    assert default_lr("peft", {"peft_type": "IA3"}) == TUNERS["ia3"][1]


def test_bad_keys_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key 'rr' for PEFT's VeraConfig \(did you mean 'r'\?\)"):
        tunelab.attach(tiny_llama(), "vera", rr=4)
    with pytest.raises(ValueError, match=r"peft_type 'VERRA' .*did you mean 'VERA'"):
        tunelab.attach(tiny_llama(), "peft", peft_type="VERRA")
    with pytest.raises(ValueError, match="method 'ia3' is PEFT's IA3"):
        tunelab.attach(tiny_llama(), "ia3", peft_type="VERA")
    with pytest.raises(ValueError) as e:
        tunelab.attach(tiny_llama(), "loha", alpah=4)
    line = str(e.value).splitlines()[-1]
    assert "'alpah'" in line and "did you mean 'alpha'" in line


def test_a_merged_tuner_has_no_off_switch():
    model = tunelab.attach(tiny_llama(), "ia3")
    tunelab.methods.peft_bridge.switch(model).tuner.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        with tunelab.disabled(model):
            pass


def test_methods_lists_native_and_bridged_apart():
    from typer.testing import CliRunner

    from tunelab.cli import app

    out = CliRunner().invoke(app, ["methods"]).output
    native, bridged = out.split("== PEFT's tuners")
    assert "\nlora " in native and "vera" not in native
    for name in (*TUNERS, "peft"):
        assert f"\n{name} " in bridged, name
    assert "default lr: 0.005" in bridged  # ia3's


# the lr each PEFT method_comparison experiment named in TUNERS trains with (huggingface/peft,
# method_comparison/MetaMathQA: default_training_params.json's 1e-4 unless the experiment's own
# training_params.json sets one: vera/llama-3.2-3B-default 1e-3, ia3/...-lr0.005, lokr/...-lr0.003)
PEFT_EXPERIMENT_LR = {"vera": 1e-3, "ia3": 5e-3, "lokr": 3e-3, "adalora": 1e-4, "oft": 1e-4, "boft": 1e-4,
                      "loha": 1e-4, "fourierft": 1e-4, "hra": 1e-4, "ln_tuning": 1e-4}


@pytest.mark.parametrize("name", list(TUNERS))
def test_recommended_lr_is_the_lr_of_the_peft_experiment_it_cites(name):
    from tunelab.training.optimizer import default_lr

    peft_type, lr, source = TUNERS[name][:3]
    assert lr == PEFT_EXPERIMENT_LR[name] and f"{name}/llama-3.2-3B" in source
    assert default_lr(name) == lr and default_lr("peft", {"peft_type": peft_type}) == lr
