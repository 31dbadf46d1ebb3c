"""`tunelab merge --dtype` (default: the base checkpoint's dtype), the base named by hub id / the user's
name (never a cache path), model cards, and prompt tuning in PEFT's own format."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import tunelab
from test_train import cfg_for
from tunelab.cli import app
from tunelab.config import dump_config
from tunelab.models.loading import base_identity, native_dtype, recorded_base

from conftest import tiny_llama, tiny_tokenizer_obj

runner = CliRunner()


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A LoRA run over a base whose checkpoint is bf16 (trained in fp32, as tunelab loads it)."""
    root = tmp_path_factory.mktemp("merge")
    base = root / "base-bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(base)
    tiny_tokenizer_obj().save_pretrained(base)
    rows = [{"sentence": f"the cat {w} sat {'yes' if i % 2 else 'no'}", "label": i % 2}
            for i, w in enumerate("John Mary Tom Berlin Paris Google apples dog mat city hello bye".split())]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    cfg = cfg_for(base, (root / "train.jsonl", root / "dev.jsonl"), root / "run", "method.name=lora", "method.r=2",
                  "train.max_steps=2", "eval.before=true")
    (root / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(root / "run.yaml")])
    assert res.exit_code == 0, res.output
    return root / "run"


def _dtypes(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_merge_default_is_the_base_dtype_and_dtype_flag_works(bf16_run, tmp_path):
    assert native_dtype(str(bf16_run.parent / "base-bf16")) == "bf16"
    res = runner.invoke(app, ["merge", str(bf16_run), str(tmp_path / "m-default")])
    assert res.exit_code == 0 and "bf16" in res.output, res.output
    assert _dtypes(tmp_path / "m-default") == {torch.bfloat16}
    sizes = {}
    for flag, want in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / f"m-{flag}"
        res = runner.invoke(app, ["merge", str(bf16_run), str(out), "--dtype", flag])
        assert res.exit_code == 0, res.output
        assert _dtypes(out) == {want}
        sizes[flag] = (out / "model.safetensors").stat().st_size
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("dtype", cfg.get("torch_dtype")) == str(want).removeprefix("torch.")
    assert sizes["fp32"] > 1.9 * sizes["bf16"] and abs(sizes["fp16"] - sizes["bf16"]) < 1024
    # The merged fp32 model gives the trained run's outputs; bf16 is within its rounding.
    from transformers import AutoModelForCausalLM

    from tunelab.export.merge import load_trained

    model, _, _ = load_trained(bf16_run)
    x = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        for flag, tol in (("fp32", 1e-5), ("bf16", 5e-2)):
            got = AutoModelForCausalLM.from_pretrained(tmp_path / f"m-{flag}", dtype=torch.float32)(x).logits
            assert (got - ref).abs().max() < tol * max(1.0, float(ref.abs().max())), flag
    res = runner.invoke(app, ["merge", str(bf16_run), str(tmp_path / "bad"), "--dtype", "int8"])
    assert res.exit_code == 2 and "int8" in res.output and "bf16" in res.output
    assert not (tmp_path / "bad").exists()


def test_card_and_base_name_never_a_cache_path(bf16_run, tmp_path):
    runner.invoke(app, ["merge", str(bf16_run), str(tmp_path / "m")])
    card = (tmp_path / "m" / "README.md").read_text()
    base = str(bf16_run.parent / "base-bf16")
    assert f"base_model: {base}" in card and "lora" in card and "accuracy" in card
    assert f"tunelab merge {bf16_run} {tmp_path / 'm'}" in card
    metrics = json.loads((bf16_run / "metrics.json").read_text())
    acc = metrics.get("metrics", metrics)["accuracy"]
    assert f"| accuracy | {acc:.4g} |" in card  # after, then before (eval.before=true)
    res = runner.invoke(app, ["export", str(bf16_run), str(tmp_path / "p"), "--format", "peft"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert "library_name: peft" in (tmp_path / "p" / "README.md").read_text()


def test_embedded_alias_is_recorded_by_its_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    assert base_identity("smollm2-135m") == {"name": "smollm2-135m", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert recorded_base("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert native_dtype("smollm2-135m") == "bf16"  # the hub checkpoint's dtype, not the fp32 cache copy
    assert recorded_base("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert not (tmp_path / "cache").exists()  # naming the base converts nothing


def test_prompt_tuning_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from tunelab.export.peft_format import export_peft, import_peft

    ours = tunelab.attach(tiny_llama(), "prompt_tuning", num_virtual_tokens=5)
    with torch.no_grad():
        ours.prompt_tuning.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    x = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(x).logits
    export_peft(ours, tmp_path, base_model="owner/tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5 and cfg["token_dim"] == 64
    assert cfg["base_model_name_or_path"] == "owner/tiny" and cfg["task_type"] == "CAUSAL_LM"
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        got = pm(input_ids=x).logits[:, 5:]  # PEFT keeps the virtual positions in front
    assert (got - ref).abs().max() < 1e-5
    back = import_peft(tiny_llama(), tmp_path)
    assert back.tunelab_method["name"] == "prompt_tuning"
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max() < 1e-6


def test_prompt_tuning_import_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    from tunelab.export.peft_format import import_peft

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    save_file({"prompt_embeddings": torch.zeros(4, 32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: prompt_embeddings has shape \(4, 32\)"):
        import_peft(tiny_llama(), tmp_path)
    save_file({"other": torch.zeros(4, 64)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no 'prompt_embeddings'"):
        import_peft(tiny_llama(), tmp_path)
