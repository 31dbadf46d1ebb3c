"""bench/run.py counts the FLOPs an evaluation row executes, CPU attention included."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F


def _run_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_executed_flops_counts_matmuls_and_cpu_attention():
    run = _run_module()
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    assert run.executed_flops(lambda: F.linear(x, w)) == 2 * 4 * 8 * 16
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    # QK^T and AV: 2 * (2 * heads * L * L * d), the CPU flash kernel that torch's own table leaves out
    assert run.executed_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == 2 * (2 * 2 * 5 * 5 * 4)
