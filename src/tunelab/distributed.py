"""Data parallelism through PyTorch's own engine (``torchrun``); a no-op in a single process.

``torchrun --nproc_per_node N -m tunelab train CONFIG`` sets WORLD_SIZE/RANK/LOCAL_RANK; ``init``
then joins the process group (NCCL on CUDA, gloo on CPU). Each optimizer step consumes one global
batch of ``batch_size x world`` rows, split across ranks; the loop weights each rank's loss by its
share of the global loss tokens times ``world`` so DDP's gradient average equals the single-process
gradient of the same global batch.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as td


def init() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
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


def wrap(model, full: bool = False):
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [local_rank()] if torch.cuda.is_available() else None
    return DDP(model, device_ids=ids)


def unwrap(model):
    return getattr(model, "module", model)


def no_sync(model):
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


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


def check_resume(pos: dict) -> None:
    saved = pos.get("world", 1)
    if saved != world():
        raise RuntimeError(
            f"the checkpoint was written by {saved} process(es) but this run has {world()}: the global batch "
            "and data order would change, so the run cannot resume exactly; relaunch with the same process count"
        )


def _comm_device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() and td.get_backend() == "nccl" else torch.device("cpu")
