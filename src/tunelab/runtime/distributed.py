"""Data parallelism through PyTorch's own engine (``torchrun``); a no-op in a single process.

``torchrun --nproc_per_node N -m tunelab train CONFIG`` sets WORLD_SIZE/RANK/LOCAL_RANK; ``init``
then joins the process group (gloo for CPU tensors, plus NCCL for CUDA tensors when CUDA is there).
Each optimizer step consumes one global batch of ``batch_size x world`` rows (x ``grad_accum``),
split across ranks; the loop weights each rank's loss by its share of the global loss tokens times
``world`` so the averaged gradient equals the single-process gradient of the same global batch.

PEFT methods train under DDP (every rank holds the model, gradients are all-reduced). Full
fine-tuning trains under FSDP2 (``fully_shard`` per decoder layer, then the root): parameters,
gradients and AdamW states are sharded, so a model that does not fit one device still trains.
``TUNELAB_PARALLEL=ddp|fsdp`` overrides the choice. With FSDP every forward is a collective, so
evaluation runs the same batches on every rank in lockstep; with DDP the evaluation primitives
(``spread``), called with ``split=True``, give each rank a strided share of the examples and
gather the results, so every rank computes the same metrics. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os

import torch
import torch.distributed as td


# ---------------------------------------------------------------- the process group
def init() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            # gloo keeps small CPU collectives (counts, results) working next to NCCL for CUDA tensors
            backend = "cpu:gloo,cuda:nccl"
            if local_rank() < torch.cuda.device_count():
                torch.cuda.set_device(local_rank())
        td.init_process_group(backend)


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def world() -> int:
    return td.get_world_size() if active() else 1


def rank() -> int:
    return td.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_lead() -> bool:
    return rank() == 0


def log(msg: str) -> None:
    if is_lead():
        print(msg, flush=True)


def _comm_device() -> torch.device:
    if "gloo" in str(td.get_backend()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------- data
def shard(global_batches: list[list[int]], per_rank: int) -> list[list[int]]:
    """This rank's part of each global batch. A short last global batch is split as evenly as it
    goes; one with fewer rows than ranks is dropped (every rank must step together)."""
    n = world()
    if n == 1:
        return global_batches
    out = []
    for b in global_batches:
        if len(b) < n:
            continue
        if len(b) == per_rank * n:
            out.append(b[rank() * per_rank : (rank() + 1) * per_rank])
        else:
            size, extra = divmod(len(b), n)
            start = rank() * size + min(rank(), extra)
            out.append(b[start : start + size + (rank() < extra)])
    return out


# ---------------------------------------------------------------- the model
def strategy(full: bool) -> str:
    """'ddp' or 'fsdp': FSDP2 for full fine-tuning where ``fully_shard`` exists, DDP otherwise."""
    choice = os.environ.get("TUNELAB_PARALLEL", "auto")
    if choice not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"TUNELAB_PARALLEL={choice!r}: allowed are auto, ddp, fsdp")
    if choice == "ddp" or (choice == "auto" and not full):
        return "ddp"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        log(f"FSDP2 (fully_shard) is not in torch {torch.__version__}: training with DDP instead")
        return "ddp"
    return "fsdp"


def wrap(model, full: bool = False):
    """DDP around ``model``, or FSDP2 applied in place (its parameters become sharded DTensors:
    build the optimizer from the returned model's parameters)."""
    if not active():
        return model
    how = strategy(full)
    log(f"data parallel over {world()} processes ({td.get_backend()}): {how.upper()}")
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for m in model.modules():
            if type(m).__name__ in blocks:
                fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    on_cuda = next(model.parameters()).device.type == "cuda"
    return DDP(model, device_ids=[torch.cuda.current_device()] if on_cuda else None)


def unwrap(model):
    return getattr(model, "module", model)


def _fsdp_modules(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(_fsdp_modules(model))


@contextlib.contextmanager
def no_sync(model):
    """Accumulate gradients locally (no all-reduce / reduce-scatter) for this backward."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    mods = _fsdp_modules(model)
    for m in mods:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True, recurse=False)


@contextlib.contextmanager
def gathered(model):
    """Every rank must enter. Inside, on rank 0, an FSDP model's sharded parameters are replaced
    by whole CPU copies (gathered one tensor at a time, so device memory never holds the whole
    model), so ``method_state_dict`` and ``tunelab.save`` work unchanged; a no-op without FSDP."""
    swaps, whole = [], {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not hasattr(p, "full_tensor"):
                continue
            if id(p) not in whole:  # tied weights stay one tensor
                t = p.full_tensor().cpu()
                whole[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad) if is_lead() else None
            if whole[id(p)] is not None:
                swaps.append((mod, name, p))
                mod._parameters[name] = whole[id(p)]
    try:
        yield model
    finally:
        for mod, name, p in swaps:
            mod._parameters[name] = p


def full(t):
    """A whole tensor from a (possibly sharded) DTensor; every rank must call it for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(t: torch.Tensor, ref):
    """``t`` (a whole tensor read from disk) laid out like ``ref``: this rank's shard when ``ref``
    is a DTensor (every rank must call it then), else ``t`` itself."""
    if not hasattr(ref, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements)


# ---------------------------------------------------------------- collectives
def all_sum(x: int) -> int:
    if not active():
        return x
    t = torch.tensor([x], dtype=torch.long, device=_comm_device())
    td.all_reduce(t)
    return int(t.item())


def mean(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of per-rank values that were already scaled by ``world``, over ``world``."""
    if not active():
        return t
    t = t.detach().clone().to(_comm_device())
    td.all_reduce(t)
    return t / world()


def barrier_if(cond) -> None:
    if cond and active():
        td.barrier()


def gather_bytes(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's uint8 tensor (any lengths), in rank order, on every rank."""
    if not active():
        return [t]
    dev = _comm_device()
    size = torch.tensor([t.numel()], device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world())]
    td.all_gather(sizes, size)
    width = int(max(s.item() for s in sizes))
    buf = torch.zeros(width, dtype=torch.uint8, device=dev)
    buf[: t.numel()] = t.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(world())]
    td.all_gather(bufs, buf)
    return [b[: int(s.item())].cpu() for b, s in zip(bufs, sizes, strict=True)]


def gather_json(obj) -> list:
    """Every rank's JSON-able ``obj``, in rank order, on every rank (JSON, not pickle)."""
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    return [json.loads(bytes(b.tolist()).decode()) for b in gather_bytes(data)]


def broadcast_json(obj):
    """Rank 0's JSON-able ``obj`` on every rank."""
    return gather_json(obj if is_lead() else None)[0] if active() else obj


# ---------------------------------------------------------------- evaluation
def spread(*names: str):
    """Decorator for a batched evaluation primitive whose parallel list arguments ``names`` (the
    first one sets the length) may be scored a strided share per rank. The decorated function takes
    one more keyword argument, ``split``: with ``split=True`` under torchrun every rank calls it with
    all examples, scores only its share and gathers the rest, so the (cheap) metric code sees every
    result; the return value is a list (or a tensor stacked on dim 0) in input order, identical on
    every rank. Without it (the default, and always in one process) the function runs as written."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, split: bool = False, **kwargs):
            if not (split and active()):
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            n = len(bound.arguments[names[0]])
            mine = range(rank(), n, world())
            for name in names:
                if bound.arguments.get(name) is not None:
                    bound.arguments[name] = [bound.arguments[name][i] for i in mine]
            part = fn(*bound.args, **bound.kwargs) if len(mine) else None
            is_tensor = torch.is_tensor(part)
            parts = gather_json(None if part is None else {"tensor": is_tensor, "rows": part.tolist() if is_tensor else part})
            out: list = [None] * n
            for r, p in enumerate(parts):
                if p is not None:
                    for i, row in zip(range(r, n, world()), p["rows"], strict=True):
                        out[i] = row
            if any(p and p["tensor"] for p in parts):
                return torch.tensor(out, dtype=torch.float32)
            return out

        return wrapper

    return deco


# ---------------------------------------------------------------- resume
def check_resume(pos: dict, per_rank: int, n_rows: int) -> None:
    """Accept a checkpoint written by another process count when the run would take the very
    same global batches (same ``batch_size x world``, same short batches dropped); else explain.
    Updates ``pos`` to this run's layout."""
    saved, now = pos.get("world", 1), world()
    glob = per_rank * now
    if saved != now:
        saved_glob = pos.get("global_batch")
        where = f"the checkpoint at step {pos['step']} was written by {saved} process(es)"
        if saved_glob is None:
            raise RuntimeError(f"{where} and does not record its global batch; relaunch with {saved} process(es)")
        if saved_glob != glob:
            hint = f"train.batch_size={saved_glob // now}" if saved_glob % now == 0 else f"{saved} process(es)"
            raise RuntimeError(
                f"{where} with a global batch of {saved_glob} rows; this run has {now} x train.batch_size "
                f"{per_rank} = {glob}, so the data order and step size would change: resume with {hint}"
            )
        rest = n_rows % glob
        if (0 < rest < saved) != (0 < rest < now):
            raise RuntimeError(
                f"{where}; with {now} the short last batch of {rest} row(s) is "
                f"{'dropped' if rest < now else 'kept'}, so epochs would differ: relaunch with {saved} process(es)"
            )
    pos["world"], pos["global_batch"] = now, glob


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank died or hung."""
    if not active():
        return False
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"DistBackendError", "DistNetworkError", "DistError"}:
        return True
    text = str(err).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "gloo", "nccl"))
