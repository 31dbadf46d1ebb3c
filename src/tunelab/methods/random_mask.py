"""Random Masking (Xu & Zhang, ICML 2024): train a fixed random sparse subset of each target weight.

For a target linear with frozen W0 (d_out x d_in, n = d_out d_in entries) and bias b, draw once (from
``seed``) a count k ~ Binomial(n, fraction) and a uniform set I of k distinct flat positions of W0,
and train v (k,), zero at start:

    y = W0 x + b + S x,     S = scatter(I, v)  (d_out x d_in, zero outside I)
    (S x)[r] = sum_{j: row(I_j) = r} v_j * x[col(I_j)]          row = I // d_in, col = I % d_in

The two-step draw is in distribution the reference's mask (every entry kept independently with
probability ``fraction``), so E[k] = fraction * n exactly at every scale; tunelab <= 0.1 kept
max(1, round(fraction * n)) per matrix, which at fraction 1e-6 kept ~4.5x the requested entries.
A matrix may keep k = 0 entries (then it has no delta and costs nothing); a model where every
targeted matrix draws 0 is refused with the expected count. Saved runs load with the indices in
the file, whatever count the re-attach draws (``upgrade_state``).
``fraction`` is of the *targeted matrices* (the reference code's 1 - masking_prob on q_proj/v_proj);
``stats(model)`` reports it and the fraction of the whole model. Trainable parameters = sum_targets k.
Below 1/256 of a matrix kept, the forward never builds S: it gathers x at col(I) and index-adds
v * x[col(I)] into rows row(I) (extra cost O(tokens * k)); the backward recomputes the gather from x,
which the frozen linear saves anyway, so no (tokens x k) activation is kept. Denser masks add a dense
S x instead (cheaper there). Stored: ``indices`` (an int64 persistent buffer of the ``SparseDelta``
module, tunelab_state = True) and ``values``; never a dense mask.
Merge is exact: W = W0 + S, the entries outside I stay bit-identical.

Default targets come from ``tunelab.models.arch`` (the family's q and v projections). On a fused projection
(Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) the mask is drawn only in the q and
v output rows (k of each row range separately), so the default trains the same matrices everywhere.
GPT-2's Conv1D stores W0 transposed; I indexes W0 (d_out x d_in) all the same.

Sparse masks need much larger learning rates than dense tuning (flatter loss landscape): the reference
trains 0.01% of q/v with lr 1e-2 where full tuning uses ~1e-5. ``RandomMask.lr_for(cfg)``
interpolates log-linearly between those two points, lr = 1e-2 * (1e-4 / fraction) ** 0.75, clipped to
[1e-5, 1e-1] (0.1% -> 1.8e-3, 0.01% -> 1e-2, 0.001% -> 5.6e-2); ``recommended_lr`` (a float, read by
the loop when no lr is set) is its value at the default fraction.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from tunelab.methods.base import (
    METHODS,
    MethodConfig,
    count_parameters,
    find_linears,
    freeze,
    is_transposed,
    linear_dims,
    linear_types,
)
from tunelab.models import arch

# Above 1/DENSE_ABOVE of a matrix kept (~0.4%), the forward adds a dense S instead of gathering.
DENSE_ABOVE = 256


class RandomMaskConfig(MethodConfig):
    fraction: float = Field(0.001, gt=0.0, le=1.0, description="kept share of each targeted matrix")
    target_modules: list[str] | str | None = None  # None: q_proj+v_proj (or query+value)
    seed: int = 0


def kept_count(n: int, fraction: float, gen: torch.Generator) -> int:
    """k ~ Binomial(n, fraction): the number of entries an independent per-entry mask keeps."""
    if fraction >= 1.0:
        return n
    draw = torch.binomial(torch.tensor([float(n)], dtype=torch.float64),
                          torch.tensor([fraction], dtype=torch.float64), generator=gen)
    return int(draw.item())


def sample_indices(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct integers from [0, n), uniformly, sorted (int64), without an O(n) draw when k << n."""
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if k * 4 > n:
        return torch.randperm(n, generator=gen)[:k].sort().values
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < k:  # draw with replacement, drop repeats; the set is exchangeable, so uniform
        more = torch.randint(n, (2 * (k - picked.numel()) + 16,), generator=gen)
        picked = torch.unique(torch.cat([picked, more]))
    # keep a uniformly random k-subset of the distinct draws (not the smallest k)
    return picked[torch.randperm(picked.numel(), generator=gen)[:k]].sort().values


class _SparseAdd(torch.autograd.Function):
    """out + S x for S = scatter((rows, cols), values), without materialising S or saving x[..., cols]."""

    @staticmethod
    def forward(ctx, out, x, values, rows, cols):
        ctx.save_for_backward(x, values, rows, cols)
        return out.index_add(-1, rows, x[..., cols].to(out.dtype) * values.to(out.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, values, rows, cols = ctx.saved_tensors
        g = grad[..., rows]  # (..., k)
        grad_x = grad_v = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.zeros_like(x).index_add_(-1, cols, (g * values.to(g.dtype)).to(x.dtype))
        if ctx.needs_input_grad[2]:
            grad_v = (g * x[..., cols].to(g.dtype)).reshape(-1, rows.numel()).sum(0).to(values.dtype)
        return grad, grad_x, grad_v, None, None


class SparseDelta(nn.Module):
    """The trainable sparse update of one frozen linear: kept flat ``indices`` + their ``values``."""

    tunelab_state = True  # the indices (a buffer) are saved with the method
    tunelab_active = True  # False: no delta is added (tunelab.disabled)

    def __init__(self, shape: tuple[int, int], indices: torch.Tensor, device=None):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.to(device=device, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=device))

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.indices.numel() == 0:  # this matrix drew no entry
            return out
        if self.indices.numel() * DENSE_ABOVE > self.shape[0] * self.shape[1]:
            # dense masks: one extra matmul beats a (tokens x k) gather (measured ~4x at 1% on CPU)
            return out + nn.functional.linear(x.to(out.dtype), self.scatter(self.values).to(out.dtype))
        rows, cols = self.indices // self.shape[1], self.indices % self.shape[1]
        return _SparseAdd.apply(out, x, self.values, rows, cols)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(self.shape[0] * self.shape[1], dtype=values.dtype, device=values.device)
        return flat.index_put((self.indices,), values).view(self.shape)

    def dense(self) -> torch.Tensor:
        """S as a dense matrix (for tests and inspection)."""
        return self.scatter(self.values.detach())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, kept={self.indices.numel()}"


def _add_sparse_delta(module: nn.Linear, args, output):
    # A forward hook (not a wrapper class) so the base weight keeps its name in the state dict.
    delta = module.random_mask
    return delta.add_to(args[0], output) if delta.tunelab_active else output


def remove_hook(module: nn.Module, fn) -> None:
    """Drop the forward hook ``fn`` from ``module`` (found by identity, so deep copies work too)."""
    for key in [k for k, f in module._forward_hooks.items() if f is fn]:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)


def _resolve_targets(model: nn.Module, targets):
    if targets is not None:
        return find_linears(model, targets)
    try:
        names = arch.default_targets(model, "qv", linear_types())
    except ValueError as e:
        raise ValueError(f"random_mask: {e}") from None
    return [(n, model.get_submodule(n)) for n in names]


def _draw(model: nn.Module, name: str, lin: nn.Module, fraction: float, gen: torch.Generator):
    """(flat indices into W0 (d_out x d_in), the number of entries they were drawn from)."""
    d_in, d_out = linear_dims(lin)
    rows = arch.qv_rows(model, name, d_out) or [(0, d_out)]
    picked = []
    for start, stop in rows:  # the q and v rows of a fused projection, else the whole matrix
        n = (stop - start) * d_in
        picked.append(sample_indices(n, kept_count(n, fraction, gen), gen) + start * d_in)
    return torch.cat(picked), sum((stop - start) * d_in for start, stop in rows)


def stats(model: nn.Module) -> dict:
    """Kept entries, their share of the targeted matrices and of the whole model."""
    deltas = [m for m in model.modules() if isinstance(m, SparseDelta)]
    kept = sum(d.indices.numel() for d in deltas)
    targeted = sum(getattr(d, "targeted", d.shape[0] * d.shape[1]) for d in deltas)
    total = count_parameters(model)["total"] - kept  # the base model's own size
    return {
        "kept": kept,
        "targeted": targeted,
        "fraction_of_targets": kept / max(targeted, 1),
        "fraction_of_model": kept / max(total, 1),
    }


class RandomMask:
    name = "random_mask"
    Config = RandomMaskConfig

    @staticmethod
    def lr_for(cfg: RandomMaskConfig) -> float:
        """Default AdamW learning rate at this mask density (see the module docstring)."""
        return float(min(1e-1, max(1e-5, 1e-2 * (1e-4 / cfg.fraction) ** 0.75)))

    # what the loop reads when the run sets no lr: the value at the default fraction (0.1% -> 1.8e-3)
    recommended_lr = lr_for(RandomMaskConfig())
    about_defaults = (
        "kept count per matrix ~ Binomial(n, fraction) (expected = fraction * n, the reference's per-entry mask); "
        "lr from the density: 1e-2 * (1e-4 / fraction) ** 0.75"
    )

    def attach(self, model: nn.Module, cfg: RandomMaskConfig) -> nn.Module:
        targets = _resolve_targets(model, cfg.target_modules)
        freeze(model)
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, lin in targets:  # model order, so the same seed gives the same masks
            d_in, d_out = linear_dims(lin)
            indices, targeted = _draw(model, name, lin, cfg.fraction, gen)
            lin.random_mask = SparseDelta((d_out, d_in), indices, lin.weight.device)
            lin.random_mask.targeted = targeted  # the q/v rows of a fused projection, else d_out * d_in
            lin.register_forward_hook(_add_sparse_delta)
        if not any(lin.random_mask.indices.numel() for _, lin in targets):
            expected = cfg.fraction * sum(lin.weight.numel() for _, lin in targets)
            raise ValueError(
                f"random_mask: fraction={cfg.fraction} kept no entry of the {len(targets)} targeted matrices "
                f"(expected {expected:.3g} entries in all); raise fraction or target more modules"
            )
        return model

    def upgrade_state(self, model: nn.Module, state: dict, where) -> dict:
        """Size each delta to the indices saved in the file (runs of tunelab <= 0.1 used another count)."""
        for name, mod in model.named_modules():
            saved = state.get(f"{name}.indices")
            if isinstance(mod, SparseDelta) and saved is not None and saved.shape != mod.indices.shape:
                if saved.dim() != 1 or (saved.numel() and int(saved.max()) >= mod.shape[0] * mod.shape[1]):
                    raise ValueError(f"{where}: {name}.indices does not fit a {mod.shape} matrix")
                device = mod.indices.device
                mod.indices = saved.to(device=device, dtype=torch.long)
                mod.values = nn.Parameter(torch.zeros(saved.numel(), device=device))
        return state

    def merge(self, model: nn.Module) -> nn.Module:
        """W0 += S on the kept entries only (exact: no other entry is touched); removes the hooks."""
        for lin in [m for m in model.modules() if isinstance(getattr(m, "random_mask", None), SparseDelta)]:
            delta = lin.random_mask
            idx = delta.indices
            if is_transposed(lin):  # Conv1D stores W0^T: entry (r, c) of W0 lives at c * d_out + r
                idx = (idx % delta.shape[1]) * delta.shape[0] + idx // delta.shape[1]
            with torch.no_grad():
                lin.weight.view(-1).index_add_(0, idx, delta.values.to(lin.weight.dtype))
            remove_hook(lin, _add_sparse_delta)
            del lin.random_mask
        return model


METHODS.register(RandomMask.name, RandomMask())
