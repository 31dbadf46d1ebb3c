"""Golden test: tunelab's 2-bit quantizers and LoftQ's Algorithm 1 against the LoftQ repository.

The reference below is re-typed (not imported) from ``utils.py`` of github.com/yxli2123/LoftQ at commit
194c8073785bfbf40ce4c1244dc6cdf64085ed85 (``NFQuantizer.create_normal_map``, ``create_uniform_map``,
``quantize_block`` / ``dequantize_block`` and ``loftq_init``): the repository is not a package, so
its formulas are restated here in plain torch (argmin over |w / a - level|, fp32 scales, full SVD).
"""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from tunelab.methods.loftq import loftq_init
from tunelab.models import quantization

COMMIT = "194c8073785bfbf40ce4c1244dc6cdf64085ed85"


def ref_normal_map(num_bits: int, offset: float = 0.9677083) -> torch.Tensor:
    ppf = NormalDist().inv_cdf
    variations = 2**num_bits
    v1 = [ppf(x) for x in torch.linspace(offset, 0.5, variations // 2 + 1)[:-1].tolist()]
    v3 = [-ppf(x) for x in torch.linspace(offset, 0.5, variations // 2)[:-1].tolist()]
    values = torch.tensor(v1 + [0.0] + v3).sort().values
    return values / values.max()


def ref_uniform_map(num_bits: int) -> torch.Tensor:
    return torch.linspace(-1, 1, 2**num_bits)  # create_uniform_map(symmetric=False)


def ref_quant_dequant(weight: torch.Tensor, num_bits: int, method: str, block_size: int = 64) -> torch.Tensor:
    table = ref_normal_map(num_bits) if method == "normal" else ref_uniform_map(num_bits)
    block = weight.flatten().reshape(-1, block_size)
    if method == "normal":
        weight_max = block.abs().max(dim=-1)[0]
    else:
        weight_max = block.mean(dim=-1) + 2.5 * block.std(dim=-1)
    weight_max = weight_max.unsqueeze(-1)
    q = torch.argmin(torch.abs((block / weight_max).unsqueeze(-1) - table.reshape(1, -1)), dim=-1)
    return (table[q] * weight_max).reshape(weight.shape)


def ref_loftq_init(weight, num_bits, reduced_rank, num_iter, method):
    """Algorithm 1 as the repository runs it: returns the error ||W - (Q_T + L R)|| per iteration."""
    res, errors = weight.clone(), []
    for _ in range(num_iter):
        deq = ref_quant_dequant(res, num_bits, method)
        res = weight - deq
        U, S, Vh = torch.linalg.svd(res, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :reduced_rank])
        R = torch.sqrt(torch.diag(S)[:reduced_rank, :]) @ Vh
        res = weight - L @ R
        errors.append((weight - deq - L @ R).norm().item())
    return errors


def matrices():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(64, 256, generator=g) * 0.02
    heavy = torch.distributions.StudentT(2.0).sample((64, 256)) * 0.02  # heavy tails: absmax >> std
    return {"gaussian": gauss, "heavy_tailed": heavy}


def rel(w, approx):
    return ((w - approx).norm() / w.norm()).item()


@pytest.mark.parametrize("name", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("kind,method", [("uniform", "uniform"), ("nf", "normal")])
def test_2bit_quantizer_matches_the_loftq_repository(name, kind, method):
    torch.manual_seed(1)
    w = matrices()[name]
    ours = quantization.dequantize(quantization.quantize(w, 2, kind), torch.float32)
    ref = ref_quant_dequant(w, 2, method)
    # the same codes and scales up to our fp16 scale storage (a code flips only at a level midpoint)
    assert (ours - ref).abs().le(1e-3 * w.abs().max()).float().mean() > 0.995
    assert rel(w, ours) == pytest.approx(rel(w, ref), rel=5e-3)


def test_reference_levels_equal_ours():
    assert torch.allclose(quantization.nf_levels(2), ref_normal_map(2), atol=1e-6)
    assert torch.allclose(quantization.nf_levels(4), ref_normal_map(4), atol=1e-6)
    assert torch.allclose(quantization.uniform_levels(2), ref_uniform_map(2))


def test_absmax_uniform_is_the_named_option_and_worse_on_heavy_tails():
    w = matrices()["heavy_tailed"]
    absmax = rel(w, quantization.dequantize(quantization.quantize(w, 2, "uniform_absmax"), torch.float32))
    loftq = rel(w, quantization.dequantize(quantization.quantize(w, 2, "uniform"), torch.float32))
    assert loftq < 0.8 * absmax  # the reason the repository scales by mean + 2.5 std


@pytest.mark.parametrize("kind,method", [("uniform", "uniform"), ("nf", "normal")])
def test_algorithm_1_matches_the_repository_at_2_bits(kind, method):
    for w in matrices().values():
        ref = ref_loftq_init(w, 2, 8, 5, method)
        _, A, B, errors = loftq_init(w, 8, 1.0, 2, kind, iters=5, keep_best=False)
        assert errors[1:] == pytest.approx(ref, rel=1e-2)  # ||W - (Q_t + B_t A_t)||, t = 1..5
        assert errors[0] == pytest.approx(ref_quant_dequant(w, 2, method).sub(w).norm().item(), rel=5e-3)

