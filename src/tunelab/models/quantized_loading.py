"""Load a model with its target linears quantized as their weights arrive (QLoRA, LoftQ).

The model is built on the meta device (``accelerate.init_empty_weights``: parameters take no memory,
buffers such as rotary tables are real), then the safetensors shards are read one tensor at a time:
a target linear's weight goes to the device, is turned into the method's frozen quantized module
(``plan.build``) and dropped; every other tensor is cast to the run's dtype and assigned in place.
So the full-precision target weights never sit in memory together: peak ~ quantized model + the
non-quantized tensors (embeddings, norms, head) + one linear. Tensors the checkpoint lacks (a new
task head) are initialised by the model's own ``_init_weights``, as ``from_pretrained`` does.

A method opts in by exposing ``quantize_on_load(cfg) -> LoadPlan`` (tunelab.models.loading calls it; the loop
never names a method). Checkpoints without safetensors files fall back to load-then-quantize.
"""

from __future__ import annotations

import ctypes
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LoadPlan:
    """``select(meta_model) -> names`` of the linears to quantize; ``build(name, w, bias) -> module``
    with ``w`` the dense (d_out x d_in) weight on the device, in the run's dtype."""

    select: Callable[[nn.Module], list[str]]
    build: Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module]


def shard_files(path: str | Path) -> list[Path]:
    """The safetensors files of a local model directory (sharded or not); [] when there are none."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e.__class__.__name__}: {e})") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    return [single] if single.exists() else []


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_safetensors(file: Path):
    """Yield ``(key, tensor)`` from a safetensors file, each read into its own buffer.

    ``safe_open`` maps the whole file, and the pages it touches count in the process's resident memory
    until the mapping closes, so streaming through it still peaks at the file size; plain reads do not.
    """
    with open(file, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file ({e.__class__.__name__})") from None
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, stop = info["data_offsets"]
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{file}: tensor {key} has dtype {info['dtype']}, which tunelab cannot read")
            f.seek(8 + n + start)
            buf = bytearray(stop - start)
            f.readinto(buf)
            t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[info["dtype"]])
            yield key, t.reshape(info["shape"])


def _target_key(key: str, own: set[str], prefix: str) -> str | None:
    """The model's name for checkpoint key ``key`` (checkpoints of the bare model lack the prefix)."""
    if key in own:
        return key
    if prefix and f"{prefix}.{key}" in own:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in own:
        return key[len(prefix) + 1 :]
    return None


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
    else:
        mod._buffers[leaf] = t


def _materialize_missing(model: nn.Module, device) -> list[str]:
    """Initialise (``_init_weights``) every module still holding meta tensors; returns their names."""
    missing = []
    for name, mod in model.named_modules():
        own = list(mod._parameters.items()) + list(mod._buffers.items())
        if any(t is not None and t.is_meta for _, t in own):
            missing += [f"{name}.{n}" if name else n for n, t in own if t is not None and t.is_meta]
            mod.to_empty(device=device, recurse=False)
            if hasattr(model, "_init_weights"):
                with torch.no_grad():
                    model._init_weights(mod)
    return missing


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


def return_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more by its own mmap, so it goes back
    to the OS when freed. By default glibc raises that threshold to the largest block freed so far (up
    to 32 MB); from then on the quantizer's and the NF4 dequantize's temporaries (1-32 MB each, a fresh
    set for every linear, in load and in every forward and backward) come from the heap, which keeps
    them resident: on a 1.1B Llama the resident size grew ~80 MB per layer while loading and ~0.8 GB over
    the first forward. Process-wide and idempotent; False (a no-op) where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps the quantizer's temporaries otherwise, and
    the resident size creeps up layer after layer); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_quantized(path: str | Path, build_model: Callable[[], nn.Module], plan: LoadPlan, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Build the model on meta with ``build_model()``, stream ``path``'s shards into it quantizing the
    plan's targets; returns ``(model, {"missing_keys": [...], "unexpected_keys": [...]})``."""
    from accelerate import init_empty_weights

    from tunelab.models.arch import is_transposed, replace_module

    return_large_blocks()
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index); cannot quantize while loading")
    with init_empty_weights(include_buffers=False):
        model = build_model()
    targets = {n: model.get_submodule(n) for n in plan.select(model)}
    own = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    own |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for file in files:
        for key, t in read_safetensors(file):
            name = _target_key(key, own, prefix)
            if name is None:
                unexpected.append(key)
                continue
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            mod_name, _, leaf = name.rpartition(".")
            if mod_name not in targets:
                _assign(model, name, t)
                continue
            got = pending.setdefault(mod_name, {})
            got[leaf] = t
            lin = targets[mod_name]
            if "weight" in got and ("bias" in got or getattr(lin, "bias", None) is None):
                w = got.pop("weight")
                w = w.T if is_transposed(lin) else w  # Conv1D stores d_in x d_out
                replace_module(model, mod_name, plan.build(mod_name, w, got.pop("bias", None)))
                del pending[mod_name], w, t
                _trim()
    incomplete = [n for n, lin in targets.items() if model.get_submodule(n) is lin]  # never replaced
    if incomplete:
        raise ValueError(f"{path}: the checkpoint lacks the weights of {incomplete[:3]} (cannot quantize them)")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = _materialize_missing(model, device)
    return model, {"missing_keys": missing, "unexpected_keys": unexpected}
