"""Checks that need a CUDA device (skipped without one; bench/gpu_check.sh runs them)."""

from __future__ import annotations

import pytest
import torch

import tunelab
from tiny_models import batch, tiny
from tunelab.methods.base import METHODS
from tunelab.models import quantization
from tunelab.models.loading import load as load_model

from conftest import tiny_tokenizer_obj

pytestmark = pytest.mark.cuda


def _on(b, device):
    return {k: v.to(device) for k, v in b.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_lora_on_cuda_matches_cpu(family):
    cpu = tunelab.attach(tiny(family), "lora", r=4)
    gpu = tunelab.attach(tiny(family), "lora", r=4).cuda()
    b = batch(family)
    with torch.no_grad():
        torch.testing.assert_close(gpu(**_on(b, "cuda")).logits.cpu(), cpu(**b).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "torchao"])
def test_qlora_loads_in_4bit_on_cuda(backend, tmp_path):
    tiny("llama").save_pretrained(str(tmp_path))
    tiny_tokenizer_obj().save_pretrained(str(tmp_path))
    cfg = tunelab.api.method_config("qlora", {"r": 4, "backend": backend})
    model, _ = load_model(str(tmp_path), quantize=METHODS.get("qlora").quantize_on_load(cfg), device="cuda")
    want = quantization.BnbLinear4 if backend == "auto" and quantization.bnb_available() else quantization.QuantLinear
    assert any(isinstance(m, want) for m in model.modules())
    assert all(p.is_cuda for p in model.parameters())
    model = tunelab.attach(model, "qlora", r=4, backend=backend).train()
    loss = model(**_on(batch("llama"), "cuda")).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
