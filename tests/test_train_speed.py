"""Issue-19 training-speed levers leave the numbers alone: the fast dequantize is torchao's / the
packed loop's bit for bit, QLoRA/LoftQ losses and gradients equal the previous path's, held copies
(tunelab.runtime.precision) change nothing but the work, and the loop's budget key behaves as documented."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from conftest import tiny_llama
from tests.test_train import cfg_for, data, losses  # noqa: F401  (data: the fixture)

import tunelab
import tunelab.training.loop as train_mod
from tunelab.config import load_config
from tunelab.models import quantization
from tunelab.runtime import precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_nf4_dequantize_is_torchaos_bit_for_bit(dtype):
    torch.manual_seed(0)
    for shape in [(96, 64), (192, 128), (64, 320)]:
        w = (torch.randn(*shape) * 0.05).to(dtype)
        q = quantization.quantize(w)
        assert isinstance(q, quantization.NF4Tensor)
        ref = q.get_original_weight()
        assert torch.equal(quantization.dequantize(q), ref)
        assert torch.equal(quantization.dequantize(q, torch.bfloat16), ref.to(torch.bfloat16))
        assert torch.equal(quantization.dequantize(q, torch.float16), ref.to(torch.float16))


@pytest.mark.parametrize("bits,kind", [(2, "nf"), (2, "uniform"), (2, "uniform_absmax"), (4, "nf"), (8, "uniform")])
def test_fast_packed_dequantize_is_the_loop_bit_for_bit(bits, kind):
    torch.manual_seed(1)
    for shape in [(33, 70), (64, 64)]:  # 2310 values: a padded last block and a padded last byte
        p = quantization.Packed.from_tensor(torch.randn(*shape) * 0.1, bits, kind)
        for dt in (None, torch.bfloat16):
            assert torch.equal(p.dequantize(dt), p.dequantize_reference(dt))


def _old_forward(self, x):
    """QuantLinear.forward before weights were held dequantized: dequantize in x's dtype (torchao's get_original_weight or
    the packed loop), cast by autocast; dequantize again in backward."""
    def deq(dtype):
        if self.is_nf4:
            return self.weight.get_original_weight().to(dtype)
        return self.as_packed().dequantize_reference(dtype)

    class Old(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return F.linear(x, deq(x.dtype), self.bias)

        @staticmethod
        def backward(ctx, grad):
            return grad @ deq(grad.dtype)

    return Old.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.linear(x, deq(x.dtype), self.bias)


def _loss_and_grads(model, ids, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _model(method, **kw):
    model = tunelab.attach(tiny_llama(hidden=64), method, r=4, **kw)
    torch.manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # a non-zero B, so gradients reach A and the input side too
            torch.nn.init.normal_(p, std=0.05)
    return model


CASES = [("qlora", {}, False), ("qlora", {}, True), ("loftq", {"bits": 4, "iters": 1}, True),
         ("loftq", {"bits": 2, "iters": 1}, True)]


@pytest.mark.parametrize("method,kw,amp", CASES)
def test_quantized_loss_and_grads_equal_the_previous_path_and_with_held_copies(monkeypatch, method, kw, amp):
    model = _model(method, **kw)
    ids = torch.randint(3, 128, (2, 11))
    new_loss, new_grads = _loss_and_grads(model, ids, amp)
    with precision.held_weights(model, torch.bfloat16 if amp else None, None, torch.device("cpu")) as facts:
        assert facts["held_quantized"] == (14 if amp else 0)  # 2 layers x 7 linears
        held_loss, held_grads = _loss_and_grads(model, ids, amp)
    assert all(m.held is None for m in model.modules() if isinstance(m, quantization.QuantLinear))
    with monkeypatch.context() as mp:
        mp.setattr(quantization.QuantLinear, "forward", _old_forward)
        old_loss, old_grads = _loss_and_grads(model, ids, amp)
    for loss, grads in ((new_loss, new_grads), (held_loss, held_grads)):
        assert torch.equal(loss, old_loss)
        assert grads.keys() == old_grads.keys() and all(torch.equal(grads[k], old_grads[k]) for k in grads)


def test_plan_budget_rules(monkeypatch):
    model = _model("qlora")
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    quantized = [m for m in model.modules() if isinstance(m, quantization.QuantLinear)]
    each = [m.out_features * m.in_features * 2 for m in quantized]
    auto = precision.plan(model, bf16, None, cpu)
    assert auto["quantized"] == quantized and auto["plain"]  # the tied head is a plain frozen linear
    assert precision.plan(model, bf16, 0, cpu)["quantized"] == []
    assert precision.plan(model, None, None, cpu)["bytes"] == 0  # fp32: nothing to hold
    part = precision.plan(model, bf16, (each[0] + each[1]) / 2**20, cpu)
    assert part["quantized"] == quantized[:2] and not part["plain"] and part["bytes"] == each[0] + each[1]
    monkeypatch.setattr(precision, "AUTO_MB", 0)  # a model too large for the automatic rule
    assert precision.plan(model, bf16, None, cpu)["quantized"] == []
    assert precision.plan(model, bf16, 10_000, cpu)["quantized"] == quantized  # an explicit budget still holds


def test_held_copies_are_released_and_state_is_unchanged():
    model = _model("qlora")
    before = {k: v.clone() for k, v in tunelab.methods.base.method_state_dict(model).items()}
    params = {n: p for n, p in model.named_parameters()}
    with precision.held_weights(model, torch.bfloat16, None, torch.device("cpu")):
        inside = tunelab.methods.base.method_state_dict(model)
        assert inside.keys() == before.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(m.held is None for m in model.modules() if isinstance(m, quantization.QuantLinear))


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_loop_with_held_weights_trains_and_saves_the_same(tiny_dir, data, tmp_path, method):  # noqa: F811
    runs = {}
    for mb in ("0", "null"):
        out = tmp_path / f"run-{mb}"
        m = train_mod.run(cfg_for(tiny_dir, data, out, f"method.name={method}", "method.r=4", "train.max_steps=4",
                                  "train.precision=bf16", f"train.shadow_mb={mb}", "eval.loss=false"))
        runs[mb] = (losses(out), load_file(str(out / "method" / "method.safetensors")), m["run"]["held_weights_mb"])
    (l0, s0, h0), (l1, s1, h1) = runs["0"], runs["null"]
    assert h0 == 0 and h1 > 0
    assert l0 == l1
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


def test_bad_shadow_mb_names_the_field(tiny_dir, data, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="shadow_mb"):
        cfg_for(tiny_dir, data, tmp_path, "train.shadow_mb=-5")
    with pytest.raises(ValueError, match="shadow_mb"):
        load_config(None, ["train.shadow_mb=lots"])
    assert json.dumps(cfg_for(tiny_dir, data, tmp_path).train.shadow_mb) == "null"
