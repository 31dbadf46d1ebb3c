"""Loading trusts nothing: a method directory or PEFT adapter may carry only the method's own tensors, with
the right shapes, finite; configs are checked before anything is allocated; every error names the file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tunelab
from tunelab.export.peft_format import export_peft, import_peft

from conftest import tiny_llama


@pytest.fixture
def method_dir(tmp_path):
    d = tmp_path / "method"
    tunelab.save(tunelab.attach(tiny_llama(), "lora", r=2), d)
    return d


def edit_weights(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_a_method_dir_carrying_a_foreign_tensor_is_refused(method_dir):
    w = method_dir / "method.safetensors"
    edit_weights(w, lambda t: t.update({"model.embed_tokens.weight": torch.zeros(128, 64)}))
    base = tiny_llama()
    before = base.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match=r"method.safetensors: holds 1 tensor\(s\) that method 'lora' does not own.*embed_tokens"):
        tunelab.load(base, method_dir)
    assert torch.equal(base.model.embed_tokens.weight, before)  # nothing was overwritten


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({k: v[:1] for k, v in list(t.items())[:1]}), "has shape"),
    (lambda t: t.update({k: v * float("nan") for k, v in list(t.items())[:1]}), "non-finite"),
    (lambda t: t.pop(next(iter(t))), "lacks 1 tensor"),
    (lambda t: t.update({k: v.to(torch.int64) for k, v in list(t.items())[:1]}), "has dtype torch.int64"),
])
def test_bad_method_tensors_name_the_file(method_dir, edit, message):
    edit_weights(method_dir / "method.safetensors", edit)
    with pytest.raises(ValueError, match=f"method.safetensors: .*{message}"):
        tunelab.load(tiny_llama(), method_dir)


def test_truncated_weights_and_bad_method_json(method_dir):
    w = method_dir / "method.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="method.safetensors: unreadable safetensors"):
        tunelab.load(tiny_llama(), method_dir)
    (method_dir / "method.json").write_text('{"name": "lora", "params": ')
    with pytest.raises(ValueError, match="method.json: not valid JSON"):
        tunelab.load(tiny_llama(), method_dir)
    for meta, message in [({"name": "lorax", "params": {}}, "unknown method 'lorax'"),
                          ({"name": "lora", "params": {"r": -1}}, "method.json: bad parameters"),
                          ({"name": "lora", "params": []}, "'params' must be a mapping")]:
        (method_dir / "method.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=message):
            tunelab.load(tiny_llama(), method_dir)


@pytest.fixture
def peft_dir(tmp_path):
    d = tmp_path / "peft"
    export_peft(tunelab.attach(tiny_llama(), "lora", r=2, target_modules=["q_proj"]), d)
    return d


def test_peft_adapter_carrying_a_foreign_tensor_is_refused(peft_dir):
    edit_weights(peft_dir / "adapter_model.safetensors",
                 lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.zeros(128, 64)}))
    with pytest.raises(ValueError, match="adapter_model.safetensors: holds 1 tensor.*embed_tokens"):
        import_peft(tiny_llama(), peft_dir)


@pytest.mark.parametrize("change, message", [
    ({"r": 0}, "r must be a whole number >= 1"),
    ({"r": "8"}, "r must be a whole number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_dropout": 1.5}, "lora_dropout must lie in"),
    ({"target_modules": []}, "target_modules must be a non-empty list"),
    ({"modules_to_save": ["model.embed_tokens"]}, "modules_to_save may only name task heads"),
])
def test_peft_config_is_checked_before_attaching(peft_dir, change, message):
    path = peft_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    model = tiny_llama()
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        import_peft(model, peft_dir)
    assert not getattr(model, "tunelab_method", None)  # nothing attached


def test_peft_nan_and_shape_errors_name_the_file(peft_dir):
    w = peft_dir / "adapter_model.safetensors"
    edit_weights(w, lambda t: t.update({k: v * float("inf") for k, v in t.items() if k.endswith("lora_B.weight")}))
    with pytest.raises(ValueError, match="adapter_model.safetensors: tensor .*lora_B.* non-finite"):
        import_peft(tiny_llama(), peft_dir)


@pytest.fixture
def model_folder(tmp_path):
    from conftest import tiny_tokenizer_obj

    d = tmp_path / "m"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    return d


def test_a_pickle_model_folder_is_refused_by_name_before_loading(model_folder, monkeypatch):
    from tunelab.models import loading

    (model_folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, model_folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the pickle was opened"))
    with pytest.raises(ValueError) as e:
        loading.load(str(model_folder))
    assert str(e.value).startswith(f"model '{model_folder}': {model_folder / 'pytorch_model.bin'} holds pickle weights")
    assert "tunelab loads safetensors only" in str(e.value)


def test_a_config_with_auto_map_says_it_loads_the_builtin_class(model_folder, caplog):
    from tunelab.models import loading

    cfg = json.loads((model_folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}
    (model_folder / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="tunelab.models.loading"):
        model, _ = loading.load(str(model_folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (f"model '{model_folder}': its config.json names custom code (auto_map: AutoModelForCausalLM); "
            "trust_remote_code is off, so tunelab loads the built-in class LlamaForCausalLM (model_type 'llama')") in caplog.text


def test_an_empty_or_weightless_model_folder_is_named(tmp_path, model_folder):
    from tunelab.models import loading

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        loading.load(str(empty))
    assert str(e.value).startswith(f"model '{empty}': the folder {empty} holds no config.json and no weights (*.safetensors)")
    (model_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no weights \(\*\.safetensors\); a model folder is what"):
        loading.load(str(model_folder))


def test_fp16_method_tensors_are_cast_with_a_warning(method_dir, caplog):
    w = method_dir / "method.safetensors"
    edit_weights(w, lambda t: t.update({k: v.half() for k, v in t.items()}))
    n = len(load_file(str(w)))
    with caplog.at_level("WARNING", logger="tunelab.methods.load_checks"):
        model = tunelab.load(tiny_llama(), method_dir)
    assert f"{w}: {n} tensor(s) stored as float16 (e.g. " in caplog.text
    assert "are cast to the model's float32 on load" in caplog.text
    assert all(p.dtype == torch.float32 for p in model.parameters())
