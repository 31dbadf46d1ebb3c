"""PEFT interop: PEFT loads our export with the same logits; we import PEFT's adapters exactly."""

from __future__ import annotations

import json

import pytest
import torch

import tunelab
from tunelab.export.peft_format import export_peft, import_peft, save_dequantized_base
from tunelab.methods.lora import lora_modules

from conftest import tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

X = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
            if m.lora_magnitude is not None:
                m.lora_magnitude.mul_(1 + 0.3 * torch.rand(m.lora_magnitude.shape, generator=g))


def bert_with_head():
    m = tiny_bert()
    m.tunelab_new_head = ["classifier"]
    return m


@pytest.mark.parametrize(
    "method,kw",
    [("lora", {"target_modules": ["q_proj", "v_proj"]}), ("lora", {"rslora": True}), ("dora", {"alpha": 5})],
    ids=["lora-qv", "rslora-all", "dora"],
)
def test_peft_loads_our_export_with_the_same_logits(tmp_path, method, kw):
    ours = tunelab.attach(tiny_llama(), method, r=4, **kw)
    randomize(ours)
    with torch.no_grad():
        ref = ours(X).logits
    export_peft(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        assert (pm(input_ids=X).logits - ref).abs().max() < 1e-5


def test_export_with_a_classification_head_all_linear_encoder(tmp_path):
    ours = tunelab.attach(bert_with_head(), "lora", r=4, alpha=8)
    randomize(ours)
    with torch.no_grad():
        ours.classifier.weight.add_(1.0)
        ref = ours(X[:, :8]).logits
    export_peft(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
    # BERT's 'dense' leaf also names layers we adapted everywhere, so a leaf list is exact here
    assert sorted(cfg["target_modules"]) == ["dense", "key", "query", "value"]
    pm = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    with torch.no_grad():
        assert (pm(input_ids=X[:, :8]).logits - ref).abs().max() < 1e-5


@pytest.mark.parametrize("method,kw", [("loftq", {"bits": 2, "iters": 2}), ("qlora", {})])
def test_quantized_adapter_loads_in_peft_over_the_dequantized_base(tmp_path, method, kw):
    from transformers import AutoModelForCausalLM

    ours = tunelab.attach(tiny_llama(), method, r=4, alpha=16, target_modules=["q_proj", "gate_proj"], **kw)
    randomize(ours)
    with torch.no_grad():
        ref = ours(X).logits
    export_peft(ours, tmp_path / "adapter")
    save_dequantized_base(ours, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (pm(input_ids=X).logits - ref).abs().max() < 1e-5


def test_export_writes_full_names_when_leaf_names_would_select_more(tmp_path):
    ours = tunelab.attach(tiny_llama(), "lora", r=2, target_modules=["layers.0.self_attn.q_proj"])
    export_peft(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_import_a_peft_adapter_gives_peft_logits(tmp_path, use_dora):
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], use_dora=use_dora)
    pm = peft.get_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.rand_like(p) * 0.2)
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=X).logits
    pm.save_pretrained(str(tmp_path))
    ours = import_peft(tiny_llama(), tmp_path)
    assert ours.tunelab_method["name"] == ("dora" if use_dora else "lora")
    assert ours.tunelab_method["params"]["target_modules"] == ["k_proj", "o_proj", "up_proj"]
    with torch.no_grad():
        assert (ours(X).logits - ref).abs().max() < 1e-5
    export_peft(ours, tmp_path / "again")  # and back: a round trip through both formats
    again = import_peft(tiny_llama(), tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(X).logits, ours(X).logits)


def test_import_a_peft_classifier_adapter_loads_and_trains_the_head(tmp_path):
    pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.7)
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=X[:, :8]).logits
    pm.save_pretrained(str(tmp_path))
    ours = import_peft(tiny_bert(), tmp_path)
    assert ours.classifier.weight.requires_grad
    with torch.no_grad():
        assert (ours(X[:, :8]).logits - ref).abs().max() < 1e-5


def test_import_takes_the_heads_peft_0_22_lists_for_every_classifier(tmp_path):
    """PEFT >= 0.22 saves modules_to_save = classifier, score, pre_classifier (DistilBERT's head layer) for any
    SEQ_CLS adapter, whichever of them the model has: such an adapter imports, with the same logits."""
    pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=X[:, :8]).logits
    pm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, modules_to_save=["classifier", "score", "pre_classifier"])))
    ours = import_peft(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert (ours(X[:, :8]).logits - ref).abs().max() < 1e-5


def test_import_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(tiny_llama(), tmp_path)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 4}))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="rank_pattern"):
        import_peft(tiny_llama(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(ValueError, match="IA3"):
        import_peft(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="LoRA-family"):
        export_peft(tunelab.attach(tiny_llama(), "full"), tmp_path / "x")


@pytest.mark.parametrize("use_dora, drop", [(False, "lora_B.weight"), (True, "lora_magnitude_vector")])
def test_import_an_adapter_missing_a_tensor_names_the_file_and_tensor(tmp_path, use_dora, drop):
    from safetensors.torch import load_file, save_file

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=use_dora))
    pm.save_pretrained(str(tmp_path))
    w = tmp_path / "adapter_model.safetensors"
    state = load_file(str(w))
    gone = sorted(k for k in state if k.endswith(drop))[0]
    save_file({k: v for k, v in state.items() if k != gone}, str(w))
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: the tensor '{gone}' is missing"):
        import_peft(tiny_llama(), tmp_path)
