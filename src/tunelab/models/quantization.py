"""Block-wise weight quantizers for QLoRA and LoftQ: NF4, NF2 and uniform k-bit.

A weight W (d_out x d_in) is cut into blocks of 64 consecutive values (row-major); each block keeps
a scale a and each value the index of the nearest level of a codebook c in [-1, 1]:
    code = argmin_k |w / a - c_k|,    dequantized w~ = a * c[code].
The scale a of a block x (64 values) is, by ``kind``:
    "nf"              a = max |x|                         (QLoRA's and LoftQ's NormalFloat)
    "uniform"         a = mean(x) + 2.5 std(x)            (LoftQ's uniform quantizer; std unbiased,
                      values beyond +-a go to the end levels; a may be negative: w~ = a c is still right)
    "uniform_absmax"  a = max |x|                         (tunelab <= 0.1's uniform; a named option)
The "uniform" formula is ``NFQuantizer.quantize_block`` in utils.py of github.com/yxli2123/LoftQ
(commit 194c8073785bfbf40ce4c1244dc6cdf64085ed85), with its asymmetric map linspace(-1, 1, 2^k).
- NF4 (QLoRA): torchao's ``NF4Tensor`` (16 NormalFloat levels, block 64, absmax scales themselves
  8-bit quantized per 256 blocks). It runs on CPU and CUDA and dequantizes on the fly.
- NFk / uniform k-bit (LoftQ's 2-bit): the pure-torch ``Packed`` below (codes packed 8/k per byte,
  fp16 scales). NormalFloat levels are normal quantiles, 2^(k-1) positive, 2^(k-1)-1 negative and 0,
  scaled to [-1, 1]; uniform levels are 2^k evenly spaced values from -1 to 1. It is also the NF4
  fallback for shapes torchao cannot take (numel not a multiple of 64, all-zero blocks).

``QuantLinear`` is a frozen linear over such a weight; its forward dequantizes into a temporary and
its backward does it again, so no dense copy of W lives between steps (unless the training loop asks
it to ``hold`` one: tunelab.runtime.precision, under a memory budget).

Dequantizing fast (``_decode``): a byte holds 8/k codes, so a 256-entry table maps each byte to its
8/k levels at once; the table's rows are viewed as one machine word (2 fp32 levels = int64) and
gathered with ``index_select`` on int32 byte indices, then each block is multiplied by its scale in
place. It computes the very products torchao's ``get_original_weight`` / ``Packed``'s loop compute
(level x scale in the tensor's dtype), so the result is bit-identical, ~10x faster on CPU. Under
autocast the weight is produced in the autocast dtype (the cast autocast would apply anyway).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

_TORCHAO: bool | None = None  # imported on first use: torchao pulls in torch._dynamo (seconds), which
# `tunelab methods` and every run without QLoRA/LoftQ never need. NF4Tensor / SubclassTensorArgs become
# module globals then (``quant.NF4Tensor`` from outside imports it too, via __getattr__).


def _torchao() -> bool:
    global _TORCHAO, NF4Tensor, SubclassTensorArgs
    if _TORCHAO is None:
        try:  # torchao prints loader noise for kernels this machine lacks; the NF4 tensor is pure torch
            from torchao.quantization import NF4Tensor
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

            _TORCHAO = True
        except Exception:  # pragma: no cover - torchao is a dependency; keep the pure-torch path usable
            NF4Tensor = SubclassTensorArgs = None
            _TORCHAO = False
    return _TORCHAO


def __getattr__(name: str):
    if name in ("NF4Tensor", "SubclassTensorArgs"):
        _torchao()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

BLOCK = 64
NF_OFFSET = 0.9677083  # the outermost quantile of NF4 (Dettmers et al.): keeps +-1 finite


def nf_levels(bits: int) -> torch.Tensor:
    """The 2^bits NormalFloat levels in [-1, 1] (asymmetric: one more positive level, and an exact 0)."""
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, 2 ** (bits - 1) + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, 2 ** (bits - 1), dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.max()).float()


def uniform_levels(bits: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, 2**bits)


KINDS = ("nf", "uniform", "uniform_absmax")


def levels(bits: int, kind: str) -> torch.Tensor:
    if kind not in KINDS:
        raise ValueError(f"quantizer kind {kind!r} is unknown; allowed: {', '.join(map(repr, KINDS))}")
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits} is not supported; allowed: 2, 4, 8")
    return nf_levels(bits) if kind == "nf" else uniform_levels(bits)


def block_scales(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """One scale per block (row of ``blocks``), by ``kind`` (see the module docstring)."""
    if kind == "uniform":  # LoftQ's utils.py: weight_block.mean(-1) + 2.5 * weight_block.std(-1)
        return blocks.mean(1) + 2.5 * blocks.std(1)
    return blocks.abs().amax(1)


class Packed:
    """Pure-torch block-quantized weight: k-bit codes packed into uint8 + one fp16 scale per block."""

    def __init__(self, codes, scales, codebook, shape, bits):
        self.codes, self.scales, self.codebook = codes, scales, codebook
        self.shape, self.bits = torch.Size(shape), bits

    @classmethod
    @torch.no_grad()
    def from_tensor(cls, w: torch.Tensor, bits: int, kind: str = "nf") -> Packed:
        book = levels(bits, kind).to(w.device)
        flat = w.detach().float().reshape(-1)
        pad = (-flat.numel()) % BLOCK
        blocks = F.pad(flat, (0, pad)).view(-1, BLOCK)
        scale = block_scales(blocks, kind)
        scales = scale.half() if scale.abs().max() < 6e4 else scale  # fp16 unless it would overflow
        denom = scales.float()
        denom = torch.where(denom.abs() < 1e-12, 1e-12, denom).unsqueeze(1)  # an all-zero block
        mids = (book[1:] + book[:-1]) / 2  # nearest level = number of midpoints below the value
        codes = nearest_codes((blocks / denom).clamp(-1, 1), mids)
        per_byte = 8 // bits
        codes = F.pad(codes, (0, (-codes.numel()) % per_byte)).view(-1, per_byte)
        shifts = torch.arange(per_byte, device=w.device, dtype=torch.uint8) * bits
        packed = (codes << shifts).sum(1, dtype=torch.uint8)  # disjoint bit fields: sum == or
        return cls(packed, scales, book.to(w.dtype), w.shape, bits)

    def dequantize(self, dtype=None) -> torch.Tensor:
        n = self.shape.numel()
        vals = _decode(self.codes, self.codebook.float(), self.bits, high_first=False)
        vals = vals[: self.scales.numel() * BLOCK].view(-1, BLOCK)
        w = vals.mul_(self.scales.float().unsqueeze(1)).view(-1)[:n].view(self.shape)
        return w.to(dtype or self.codebook.dtype)

    def dequantize_reference(self, dtype=None) -> torch.Tensor:
        """The plain unpack-gather-scale loop ``dequantize`` must equal (kept for the tests)."""
        per_byte = 8 // self.bits
        shifts = torch.arange(per_byte, device=self.codes.device, dtype=torch.uint8) * self.bits
        codes = ((self.codes.unsqueeze(1) >> shifts) & (2**self.bits - 1)).view(-1).long()
        n = self.shape.numel()
        vals = self.codebook.float()[codes[: self.scales.numel() * BLOCK]].view(-1, BLOCK)
        w = (vals * self.scales.float().unsqueeze(1)).view(-1)[:n].view(self.shape)
        return w.to(dtype or self.codebook.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales, "codebook": self.codebook}


CHUNK = 1 << 18  # values per step of the code search: its temporaries stay in cache (~1 MB each)


@functools.cache
def _code_table(mids: tuple[float, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of ``nearest_codes`` for these (sorted) midpoints: [-1, 1] cut into k equal cells, each
    widened by half a cell on both sides; ``below[c]`` counts the midpoints left of cell c's widened
    span, ``edge[c]`` is the one midpoint inside it (+inf if none). k doubles from 1024 until no span
    holds two midpoints."""
    m = torch.tensor(mids, dtype=torch.float64)
    k = 1024
    while True:
        left = torch.linspace(-1, 1, k + 1, dtype=torch.float64)[:-1]
        lo, hi = (left - 1 / k).unsqueeze(1), (left + 3 / k).unsqueeze(1)  # cell width 2/k, +-1/k
        inside = (m >= lo) & (m <= hi)
        if inside.sum(1).max() <= 1:
            break
        k *= 2
    edge = torch.full((k,), float("inf"), dtype=torch.float64)
    cell, which = inside.nonzero(as_tuple=True)
    edge[cell] = m[which]
    below = (m < lo).sum(1).to(torch.uint8)
    return below.to(device), edge.to(device=device, dtype=dtype)


def nearest_codes(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """``torch.bucketize(x, mids)`` as flat uint8 codes, for x in [-1, 1] (finite): the index of the
    nearest level when ``mids`` are the midpoints of sorted levels (a value on a midpoint goes down).

    Same codes, ~6x faster on CPU than bucketize's binary search: x's cell c = floor((x + 1) k / 2) in
    fp32 is within a rounding error of exact, so x lies in c's widened span, and the number of
    midpoints below x is ``below[c]`` plus one if x > ``edge[c]`` (compared in x's own dtype, as
    bucketize compares). Done CHUNK values at a time."""
    below, edge = _code_table(tuple(mids.tolist()), mids.dtype, x.device)
    k = below.numel()
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    for i in range(0, flat.numel(), CHUNK):
        part = flat[i : i + CHUNK]
        cell = part.float().mul(k / 2).add_(k / 2).to(torch.int32).clamp_(0, k - 1)
        codes = below.index_select(0, cell)
        codes += part > edge.index_select(0, cell)
        out[i : i + CHUNK] = codes
    return out


def _block_absmax(w: torch.Tensor) -> torch.Tensor:
    """max |x| of every 64-value block, in w's dtype: max(max x, -min x), the same value without an |w| copy."""
    lo, hi = torch.aminmax(w.reshape(-1, BLOCK), dim=1)
    return torch.maximum(hi, lo.neg_())


def _nf4_scales(absmax: torch.Tensor, scaler_block: int):
    """torchao's double quantization of the block scales (``NF4Tensor.double_quantize_scalers``) from
    the absmax already at hand: the scales minus their mean, 8-bit with one factor per scaler_block."""
    mean = absmax.mean()
    centred = (absmax - mean).view(-1, scaler_block)
    factor = 256 / (2 * centred.abs().amax(1))
    codes = (centred * factor.unsqueeze(1)).round().clamp(-128, 127)
    return codes.reshape(-1).to(torch.int8), factor.contiguous(), mean


@functools.cache
def _nf4_lut(dtype, device) -> torch.Tensor:  # torchao's own 16 levels, read once
    return NF4Tensor.from_tensor(torch.ones(2 * BLOCK, 1, dtype=dtype, device=device), BLOCK, 2).nf4


def _to_nf4(w: torch.Tensor, scaler_block: int, absmax: torch.Tensor):
    """torchao's ``NF4Tensor.from_tensor``, ~13x faster: its nearest-level search builds a (numel x 16)
    distance table, here ``nearest_codes`` on the midpoints of the same levels picks the nearest level
    too, CHUNK values at a time, packed two per byte as they come; the block absmax is computed once
    (torchao: three times). The scales are torchao's bits; the codes are too except for values within
    rounding of a midpoint, where torchao's rounded distances pick either side and this picks the
    lower level (none on random matrices of 11.5M values; bench/quant_speed.py --torchao checks).
    Falls back to ``from_tensor`` if torchao's constructor ever changes."""
    try:
        lut = _nf4_lut(w.dtype, w.device).clone()  # each tensor owns its table, as from_tensor's do
        n_blocks = w.numel() // BLOCK
        scalers, factor, mean = _nf4_scales(absmax, scaler_block)
        mids = (lut[1:] + lut[:-1]) / 2
        blocks = w.reshape(n_blocks, BLOCK)
        data = torch.empty(w.numel() // 2, dtype=torch.uint8, device=w.device)
        rows = CHUNK // BLOCK
        for i in range(0, n_blocks, rows):
            codes = nearest_codes(blocks[i : i + rows] / absmax[i : i + rows].unsqueeze(1), mids)
            data[i * BLOCK // 2 : (i + rows) * BLOCK // 2] = codes[::2] << 4 | codes[1::2]
        meta = SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, False)
        return NF4Tensor(meta, BLOCK, n_blocks, scaler_block, scalers, factor, mean, data, lut)
    except TypeError:  # pragma: no cover
        return NF4Tensor.from_tensor(w, BLOCK, scaler_block)


@torch.no_grad()
def quantize(w: torch.Tensor, bits: int = 4, kind: str = "nf"):
    """Quantize ``w``: an ``NF4Tensor`` for NF4 where torchao can, else a ``Packed`` (shapes torchao
    cannot take: numel not a multiple of 64, fewer than 2 blocks per scale group, an all-zero block)."""
    if bits == 4 and kind == "nf" and _torchao() and w.dim() == 2 and w.numel() % BLOCK == 0:
        group = math.gcd(w.numel() // BLOCK, 256)  # double quantization groups up to 256 block scales
        w = w.detach().contiguous()
        absmax = _block_absmax(w) if group >= 2 else None
        if absmax is not None and bool(absmax.min() > 0):
            return _to_nf4(w, group, absmax)
    return Packed.from_tensor(w, bits, kind)


_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}  # one table row as one word


@functools.cache
def _byte_codes(bits: int, high_first: bool, device) -> torch.Tensor:
    """(256, 8/bits): the codes byte b holds, in memory order (torchao: high nibble first)."""
    per = 8 // bits
    b = torch.arange(256)
    shifts = [(per - 1 - i) * bits if high_first else i * bits for i in range(per)]
    return torch.stack([(b >> s) & (2**bits - 1) for s in shifts], 1).to(device)


def _decode(data: torch.Tensor, book: torch.Tensor, bits: int, high_first: bool) -> torch.Tensor:
    """book[code] for every code packed in the uint8 ``data``, flat, in ``book``'s dtype."""
    table = book[_byte_codes(bits, high_first, book.device)].contiguous()  # (256, 8/bits) levels
    word = _WORD.get(table.shape[1] * table.element_size())
    idx = data.reshape(-1).to(torch.int32)
    if word is None:  # pragma: no cover - no dtype/bits pair in use lands here
        return table.index_select(0, idx).view(-1)
    return table.view(word).view(256).index_select(0, idx).view(book.dtype)


def _nf4_dense(q) -> torch.Tensor:
    """``q.get_original_weight()`` (torchao), bit for bit: nf4[code] * block scale in q's dtype."""
    scales = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor, q.scaler_block_size)
    vals = _decode(q.quantized_data, q.nf4, 4, high_first=True).view(-1, q.block_size)
    scales = scales.unsqueeze(1)
    vals = vals.mul_(scales) if scales.dtype == vals.dtype else vals * scales
    return vals.view(q.shape)


def dequantize(q, dtype=None) -> torch.Tensor:
    if isinstance(q, Packed):
        return q.dequantize(dtype)
    try:  # NF4Tensor
        w = _nf4_dense(q)
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - torchao changed its layout
        w = q.get_original_weight()
    return w if dtype is None else w.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, W)`` computes in: autocast's where it casts, else ``x``'s."""
    kind = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def tensor_bytes(t) -> int:
    """Bytes a tensor (or a quantized weight) really occupies, counting its scales and codebook."""
    if isinstance(t, Packed):
        return sum(x.numel() * x.element_size() for x in t.tensors().values())
    if _TORCHAO and isinstance(t, NF4Tensor):
        inner, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in inner)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized weights at their packed size), shared ones once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def checksum(w: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """[sum, sum of squares] of ``w`` in float64, a few rows at a time (no float64 copy of ``w``)."""
    total = torch.zeros(2, dtype=torch.float64, device=w.device)
    for part in w.split(rows):
        d = part.double()
        total += torch.stack([d.sum(), (d * d).sum()])
    return total


class _DequantLinear(torch.autograd.Function):
    """y = x W~^T + b with W~ dequantized in forward and again in backward (nothing dense saved)."""

    @staticmethod
    def forward(ctx, x, mod):
        ctx.mod = mod
        return F.linear(x, mod.dense_for(compute_dtype(x)), mod.bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.mod.dense_for(grad.dtype), None


class QuantLinear(nn.Module):
    """A frozen linear whose weight is stored quantized (NF4Tensor parameter or Packed buffers).

    It keeps a persistent ``checksum`` (sum and sum of squares of W~ in float64) that tunelab saves:
    a base re-quantized on load that differs from the one the adapter was trained on is reported.
    """

    tunelab_state = True

    def __init__(self, q, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.is_nf4 = not isinstance(q, Packed)
        self.bits = 4 if self.is_nf4 else q.bits
        if self.is_nf4:
            self.weight = nn.Parameter(q, requires_grad=False)
        else:
            for name, t in q.tensors().items():
                self.register_buffer(name, t, persistent=False)
            self.tunelab_frozen_numel = q.shape.numel()  # counted as parameters by count_parameters
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("checksum", checksum(self.dequantized(torch.float32)))
        self.register_load_state_dict_pre_hook(QuantLinear._check)

    held: torch.Tensor | None = None  # a dense copy kept by ``hold`` (not state: never saved)

    def dequantized(self, dtype=None) -> torch.Tensor:
        if self.is_nf4:
            return dequantize(self.weight, dtype)
        return self.as_packed().dequantize(dtype)

    def dense_meta(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of ``dequantized()``, without dequantizing."""
        if self.is_nf4:
            return self.weight.dtype, self.weight.device
        return self.codebook.dtype, self.codes.device

    def dense_for(self, dtype: torch.dtype) -> torch.Tensor:
        """W~ in ``dtype`` for a matmul: the held copy when it is in that dtype, else dequantized now."""
        held = self.held
        return held if held is not None and held.dtype == dtype else self.dequantized(dtype)

    def hold(self, dtype: torch.dtype | None) -> int:
        """Keep W~ dequantized in ``dtype`` (None: release it); returns the bytes now held. The copy
        is exactly what every forward and backward would compute, so results do not change."""
        self.held = None if dtype is None else self.dequantized(dtype).detach()
        return 0 if self.held is None else self.held.numel() * self.held.element_size()

    def as_packed(self) -> Packed:  # rebuilt from the buffers, which follow .to(device)
        return Packed(self.codes, self.scales, self.codebook, (self.out_features, self.in_features), self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self)
        return F.linear(x, self.dense_for(compute_dtype(x)), self.bias)

    def nbytes(self) -> int:
        w = self.weight if self.is_nf4 else self.as_packed()
        return tensor_bytes(w) + (0 if self.bias is None else tensor_bytes(self.bias))

    def _check(self, state_dict, prefix, *args):
        saved = state_dict.get(prefix + "checksum")
        if saved is not None and not torch.allclose(saved.to(self.checksum), self.checksum, rtol=1e-9, atol=0):
            warnings.warn(
                f"{prefix}: the re-quantized base differs from the one this adapter was saved with "
                f"(checksum {saved.tolist()} vs {self.checksum.tolist()}); outputs will not match exactly",
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        kind = "NF4 (torchao)" if self.is_nf4 else f"{self.bits}-bit packed"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


# ---- bitsandbytes NF4 (QLoRA's own kernel), the default 4-bit backend on CUDA when installed ----
def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install means the same: not available)
        return False
    return True


class BnbLinear4(nn.Module):
    """A frozen linear over a bitsandbytes NF4 weight (block 64, double-quantized scales: QLoRA's
    settings); forward and backward through ``bitsandbytes.matmul_4bit``. Same interface as
    ``QuantLinear`` (``dequantized``, ``nbytes``, a persistent ``checksum``)."""

    tunelab_state = True
    bits, is_nf4 = 4, True

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        import bitsandbytes.functional as bnbf

        self.out_features, self.in_features = w.shape
        packed, self.quant_state = bnbf.quantize_4bit(
            w.detach().contiguous(), blocksize=BLOCK, compress_statistics=True, quant_type="nf4"
        )
        self.register_buffer("packed", packed, persistent=False)
        self.tunelab_frozen_numel = w.numel()
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("checksum", checksum(self.dequantized(torch.float32)))
        self.register_load_state_dict_pre_hook(QuantLinear._check)

    def _apply(self, fn, recurse=True):  # keep the quant state on the packed weight's device
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)
        return self

    def dequantized(self, dtype=None) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(self.packed, self.quant_state)
        return w if dtype is None else w.to(dtype)

    def dense_meta(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of ``dequantized()``, without dequantizing."""
        return self.quant_state.dtype, self.packed.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.packed.t(), bias=bias, quant_state=self.quant_state)

    def nbytes(self) -> int:
        st = self.quant_state
        extra = sum(tensor_bytes(t) for t in (st.absmax, st.code) if isinstance(t, torch.Tensor))
        if st.state2 is not None:
            extra += sum(tensor_bytes(t) for t in (st.state2.absmax, st.state2.code))
        return tensor_bytes(self.packed) + extra + (0 if self.bias is None else tensor_bytes(self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, NF4 (bitsandbytes)"


BACKENDS = ("auto", "torchao", "bitsandbytes")


def nf4_linear(w: torch.Tensor, bias: torch.Tensor | None, backend: str = "auto") -> nn.Module:
    """A frozen NF4 linear over ``w`` (d_out x d_in): bitsandbytes when ``backend`` says so, or for
    "auto" when ``w`` is on CUDA and bitsandbytes is installed; torchao's NF4Tensor otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"quantization backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    use_bnb = backend == "bitsandbytes" or (backend == "auto" and w.is_cuda and bnb_available())
    if use_bnb:
        if not bnb_available():
            raise ValueError("backend='bitsandbytes' needs the bitsandbytes package: pip install bitsandbytes")
        return BnbLinear4(w, bias)
    return QuantLinear(quantize(w, 4, "nf"), bias)
