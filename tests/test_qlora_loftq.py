"""Quantizers, QLoRA and LoftQ: exact codes, bytes, training path, LoftQ's error bound for any alpha,
save/load round trips that re-quantize, and (slow) LoftQ on the real SmolLM2 weights."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import tunelab
from tunelab.methods.loftq import layer_index, loftq_init, top_r
from tunelab.methods.lora import LoRALinear, lora_modules
from tunelab.models import quantization

from conftest import tiny_llama

X = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def test_levels_match_nf4_and_are_2bit_sized():
    torchao_nf4 = quantization.quantize(torch.randn(64, 64)).nf4
    assert (quantization.nf_levels(4) - torchao_nf4).abs().max() < 1e-4  # torchao rounds to 4 decimals
    nf2 = quantization.nf_levels(2)
    assert nf2.numel() == 4 and nf2[0] == -1 and nf2[1] == 0 and nf2[-1] == 1
    assert torch.allclose(quantization.uniform_levels(2), torch.tensor([-1, -1 / 3, 1 / 3, 1]))


@pytest.mark.parametrize(
    "bits,kind", [(2, "nf"), (2, "uniform"), (4, "uniform"), (4, "nf"), (2, "uniform_absmax"), (4, "uniform_absmax")]
)
def test_packed_codes_round_trip_to_the_nearest_level(bits, kind):
    w = torch.randn(24, 40)  # 960 values: not a multiple of the block, so padding is exercised
    p = quantization.Packed.from_tensor(w, bits, kind)
    assert p.codes.numel() == -(-960 // (8 // bits)) and p.codes.dtype == torch.uint8
    d = p.dequantize()
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, 64 - 960 % 64)).view(-1, 64)
    if kind == "uniform":  # LoftQ's block scale
        scale = (blocks.mean(1) + 2.5 * blocks.std(1)).half().float().unsqueeze(1)
    else:
        scale = blocks.abs().amax(1).half().float().unsqueeze(1)
    book = quantization.levels(bits, kind)
    nearest = book[(blocks / scale).unsqueeze(-1).sub(book).abs().argmin(-1)] * scale
    assert torch.allclose(d.reshape(-1), nearest.reshape(-1)[:960], atol=1e-6)


def test_quantize_picks_torchao_nf4_and_falls_back_for_odd_shapes():
    w = torch.randn(96, 128)
    fast, ref = quantization.quantize(w), quantization.NF4Tensor.from_tensor(w, 64, 64)  # our faster builder = torchao's
    assert isinstance(fast, quantization.NF4Tensor) and torch.equal(fast.quantized_data, ref.quantized_data)
    assert torch.equal(quantization.dequantize(fast), ref.get_original_weight())
    odd = quantization.quantize(torch.randn(10, 10))
    assert isinstance(odd, quantization.Packed) and odd.dequantize().shape == (10, 10)
    zero_block = torch.randn(64, 64)
    zero_block[0] = 0
    assert isinstance(quantization.quantize(zero_block), quantization.Packed)  # torchao would divide by 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,kind", [(4, "nf"), (2, "nf"), (2, "uniform"), (8, "nf"), (8, "uniform")])
def test_nearest_codes_equal_bucketize_on_and_next_to_every_midpoint(bits, kind, dtype):
    book = quantization.levels(bits, kind).to(dtype)
    mids = (book[1:] + book[:-1]) / 2
    up, down = torch.tensor(2.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)
    uniform = torch.rand(50_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down), book, uniform.to(dtype),
                   torch.tensor([-1.0, -0.0, 0.0, 1.0], dtype=dtype)])
    assert torch.equal(quantization.nearest_codes(x, mids), torch.bucketize(x, mids).to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_codes_equal_the_plain_search_across_chunks(dtype):
    """The chunked builder = the plain one (bucketize over the whole matrix, torchao's double quantization),
    on a matrix of 1.25 chunks whose blocks hold values exactly on the level midpoints."""
    w = (torch.randn(640, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    q = quantization.quantize(w)
    mids = (q.nf4[1:] + q.nf4[:-1]) / 2
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    blocks[:, 1:16] = mids * absmax  # absmax (position 0 or elsewhere) is kept: the block scales stay
    assert w.numel() > quantization.CHUNK and w.numel() % quantization.CHUNK
    q = quantization.quantize(w)
    codes = torch.bucketize((blocks / blocks.abs().amax(1, keepdim=True)).reshape(-1), mids).to(torch.uint8)
    assert torch.equal(q.quantized_data, codes[::2] << 4 | codes[1::2])
    scalers, factor, mean = quantization.NF4Tensor.double_quantize_scalers(w.flatten(), 64, 256)
    assert torch.equal(q.quantized_scalers, scalers) and torch.equal(q.quantization_factor, factor)
    assert torch.equal(q.scaler_mean, mean) and q.dtype == dtype


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_over_a_quantized_base_does_not_dequantize_it_unless_dora(bits, dtype, monkeypatch):
    base = quantization.QuantLinear(quantization.quantize(torch.randn(32, 64).to(dtype), bits), None)
    dense = base.dequantized()
    assert base.dense_meta() == (dense.dtype, dense.device)
    calls = []
    monkeypatch.setattr(quantization.QuantLinear, "dequantized", lambda self, dtype=None: calls.append(1) or dense)
    lora = LoRALinear(base, 4, 2.0)
    assert not calls and lora.lora_A.dtype == torch.float32 and lora.lora_B.dtype == torch.float32
    LoRALinear(base, 4, 2.0, dora=True)  # DoRA's magnitude starts at W0's row norms: it needs W0
    assert calls


def test_qlora_quantizes_targets_reports_bytes_and_trains_only_lora():
    base = tiny_llama()
    ref = base(X).logits
    model = tunelab.attach(tiny_llama(), "qlora", r=4, alpha=8)
    info = model.tunelab_info
    assert info["quantized_linears"] == 14
    assert info["linear_bytes_after"] < info["linear_bytes_before"] / 7  # fp32 -> ~4.25 bits
    assert info["base_bytes_after"] < info["base_bytes_before"]
    q = model.model.layers[0].mlp.up_proj.base_layer
    assert isinstance(q.weight, quantization.NF4Tensor) and not q.weight.requires_grad
    assert (model(X).logits - ref).abs().max() < 0.2  # only the quantization error at the start
    model(X, labels=X).loss.backward()
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.grad is not None)
    counts = tunelab.trainable_parameters(model)
    assert counts["total"] == sum(p.numel() for p in base.parameters()) + counts["trainable"]


@pytest.mark.parametrize("bits", [4, 2])
def test_quant_linear_forward_and_backward_equal_the_dense_dequantized_linear(bits):
    w, b = torch.randn(32, 64), torch.randn(32)
    ql = quantization.QuantLinear(quantization.quantize(w, bits), b)
    x = torch.randn(3, 5, 64, requires_grad=True)
    ql(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x2, ql.dequantized(), b)
    ref.pow(2).sum().backward()
    assert torch.allclose(ql(x), ref, atol=1e-6) and torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_qlora_rejects_other_bit_widths():
    with pytest.raises(ValueError, match="4-bit NF4 only"):
        tunelab.attach(tiny_llama(), "qlora", bits=2)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    "method,kw", [("qlora", {}), ("loftq", {"bits": 4, "iters": 2}), ("loftq", {"bits": 2, "iters": 3})]
)
def test_save_load_recomputes_the_quantized_base_exactly(tmp_path, method, kw):
    model = tunelab.attach(tiny_llama(), method, r=4, alpha=16, target_modules=["q_proj", "down_proj"], **kw)
    randomize(model)  # as if trained
    with torch.no_grad():
        ref = model(X).logits
    tunelab.save(model, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checksum of the re-quantized base must match
        loaded = tunelab.load(tiny_llama(), tmp_path / "m")
    assert torch.equal(loaded(X).logits, ref)
    other = tiny_llama(seed=1)  # a different base: the saved checksum says so
    with pytest.warns(UserWarning, match="re-quantized base differs"):
        tunelab.load(other, tmp_path / "m")


@pytest.mark.parametrize("method,kw", [("qlora", {}), ("loftq", {"bits": 2, "iters": 1})])
def test_quantized_merge_returns_plain_dequantized_linears(method, kw):
    model = tunelab.attach(tiny_llama(), method, r=4, alpha=16, **kw)
    randomize(model)
    with torch.no_grad():
        before = model(X).logits
        merged = tunelab.merge(model)
        after = merged(X).logits
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear and not lora_modules(merged)
    assert (before - after).abs().max() < 1e-5


def test_top_r_matches_svd():
    for shape in [(40, 24), (24, 40)]:
        R = torch.randn(shape, dtype=torch.float64)
        U, S, V = top_r(R, 5)
        u, s, vh = torch.linalg.svd(R, full_matrices=False)
        assert torch.allclose(S, s[:5]) and torch.allclose((U * S) @ V.T, (u[:, :5] * s[:5]) @ vh[:5])


@pytest.mark.parametrize("bits,kind", [(4, "nf"), (2, "nf"), (2, "uniform")])
def test_loftq_beats_plain_quantization_for_any_alpha_and_falls_with_T(bits, kind):
    w = torch.randn(64, 128) * 0.05
    products = []
    for alpha in (4, 32):  # r = 8: s = 0.5 and 4; PEFT's split would only be right for s = 1
        s = alpha / 8
        q, A, B, errors = loftq_init(w, 8, s, bits, kind, iters=5)
        approx = quantization.dequantize(q) + s * B @ A
        exact = (w - approx).norm().item()
        assert abs(exact - min(errors[1:])) < 1e-4 * exact  # the best iterate is the one returned
        assert exact < (w - quantization.dequantize(q)).norm()  # ||W - (Q + s B A)|| < ||W - Q||
        assert exact < errors[0]  # ... and < ||W - q(W)||, QLoRA's error
        assert exact < errors[1]  # falls from T = 1 to T = 5
        products.append(approx)
    assert torch.allclose(products[0], products[1], atol=1e-5)  # the same Q + s B A whatever alpha
    q, A, B, errors = loftq_init(w, 8, 1.0, bits, kind, iters=5, keep_best=False)  # the paper's last iterate
    assert abs((w - quantization.dequantize(q) - B @ A).norm().item() - errors[-1]) < 1e-4 * errors[-1]


def test_loftq_module_holds_q_and_starts_near_w():
    w = tiny_llama().model.layers[1].mlp.down_proj.weight.detach()
    qlora = tunelab.attach(tiny_llama(), "qlora", r=8, alpha=16)
    loftq = tunelab.attach(tiny_llama(), "loftq", r=8, alpha=16, bits=4, iters=3)

    def err(model):
        m = model.model.layers[1].mlp.down_proj
        return (w - m.base_weight() - m.scaling * m.lora_B.detach() @ m.lora_A.detach()).norm()

    assert err(loftq) < err(qlora)
    ref = tiny_llama()(X).logits
    with torch.no_grad():
        assert (loftq(X).logits - ref).abs().mean() < (qlora(X).logits - ref).abs().mean()
    per = loftq.tunelab_info["loftq"]["per_matrix"]
    assert len(per) == 14 and 0 < loftq.tunelab_info["loftq"]["mean_ratio"] < 1


def test_loftq_mixed_precision_and_config_errors():
    model = tunelab.attach(tiny_llama(), "loftq", r=4, bits=2, iters=1, mixed_4bit_layers=1)
    assert model.model.layers[0].self_attn.q_proj.base_layer.bits == 4
    assert model.model.layers[1].self_attn.q_proj.base_layer.bits == 2
    counts = tunelab.trainable_parameters(model)  # packed 2-bit bases still count as parameters
    assert counts["total"] == sum(p.numel() for p in tiny_llama().parameters()) + counts["trainable"]
    assert layer_index("model.layers.12.mlp.up_proj") == 12 and layer_index("lm_head") is None
    with pytest.raises(ValueError, match="bits=4"):
        tunelab.attach(tiny_llama(), "loftq", bits=3)
    with pytest.raises(ValueError, match="uniform"):
        tunelab.attach(tiny_llama(), "loftq", bits=2, quant="int")


def _smollm2():
    try:
        from tunelab.models.loading import load

        return load("smollm2-135m")[0]
    except Exception:
        if not os.path.isdir("/tmp/smol_st"):
            pytest.skip("SmolLM2 weights are not available (tunelab.models.loading.load or /tmp/smol_st)")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained("/tmp/smol_st")


@pytest.mark.slow
def test_loftq_on_smollm2_weights_beats_qlora_error_and_falls_with_T():
    """Every target matrix of SmolLM2-135M (30 layers x 7): ||W - (Q_T + s B A)|| < ||W - q(W)|| at 4 and 2 bits,
    and the error falls from T = 1 to T = 5. Prints the mean ratios (a few minutes on one core)."""
    torch.set_num_threads(1)
    for bits in (4, 2):
        base = _smollm2()
        weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        model = tunelab.attach(base, "loftq", r=16, alpha=32, bits=bits, iters=5)
        per = model.tunelab_info["loftq"]["per_matrix"]
        assert len(per) == 210
        errs = torch.tensor([p["errors"] for p in per.values()])  # (matrices, 1 + T)
        kept = torch.tensor([p["kept"] for p in per.values()])
        assert (kept < errs[:, 0]).all() and (kept < errs[:, 1]).all()  # below QLoRA's error; T=5 below T=1
        for name, mod in lora_modules(model)[::50]:  # the recorded errors are the module's real ones
            w, q = weights[name], mod.base_weight()
            exact = (w - q - mod.scaling * mod.lora_B.detach() @ mod.lora_A.detach()).norm()
            assert abs(exact.item() - per[name]["kept"]) < 1e-3 * exact.item() and exact < (w - q).norm()
        curve = (errs[:, 1:] / errs[:, :1]).mean(0).tolist()
        print(
            f"\n{bits}-bit mean ||W-(Q_t+sBA)||/||W-q(W)|| for t=1..5: {curve}; kept: {(kept / errs[:, 0]).mean():.4f}"
        )
