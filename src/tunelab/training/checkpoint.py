"""Training checkpoints: written atomically by every rank together, verified before they are trusted.

A checkpoint folder holds the trainable tensors, the optimizer state and every rank's RNG state as
safetensors, and ``state.json`` (the step/epoch/batch position, optimizer scalars, scheduler, Python
and NumPy RNG). ``save_checkpoint`` writes it through ``atomic_dir`` (the previous one is kept as
``prev`` until the new one is verified), so a crash mid-save leaves the last good one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.methods.base import method_state_dict
from tunelab.methods.load_checks import check_tensors
from tunelab.runtime import distributed as dist
from tunelab.runtime.atomic_files import atomic_dir

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


def _read_state(path: Path) -> dict:
    state_p = path / "state.json"
    try:
        state = json.loads(state_p.read_text())
        step = state["position"]["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state_p}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"{state_p}: position.step is {step!r}, not a step number")
    return state


def verify_checkpoint(path: str | Path, total: int | None = None, deep: bool = True) -> dict:
    """The checkpoint's state, or ValueError naming the bad file: state.json must parse, every
    safetensors file must open (a truncated one does not), the step must lie within ``total``; with
    ``deep`` every tensor is read and must be finite (a NaN checkpoint is never resumed)."""
    from safetensors import safe_open


    path = Path(path)
    state = _read_state(path)
    step = state["position"]["step"]
    if total is not None and step > total:
        raise ValueError(f"{path / 'state.json'}: step {step} is past the end of this run ({total} steps)")
    for name in CHECKPOINT_FILES:
        f = path / name
        try:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys() if deep else ():
                    t = h.get_tensor(key)
                    if name != "rng.safetensors":
                        check_tensors({key: t}, str(f))
        except ValueError as e:
            if "non-finite" in str(e):
                raise
            raise ValueError(f"{f}: unreadable safetensors ({e})") from None
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"{f}: unreadable safetensors ({type(e).__name__}: {e})") from None
    return state


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_fits(path: str | Path, state: dict, model, optimizer, *, epoch_batches: int | None = None,
               grad_accum: int = 1, global_batch: int | None = None, reuse: int = 1) -> None:
    """ValueError naming the file and the field unless the checkpoint fits this run exactly: every
    trainable tensor is one the model's method owns, of its shape and a floating dtype (none missing);
    every optimizer tensor belongs to a parameter and has its shape; every position field has its type
    and range, and the step, epoch and batch agree with each other (``epoch_batches`` batches an epoch,
    ``grad_accum`` of them a step, each used for ``reuse`` steps), so the run would resume where it stopped,
    not elsewhere."""
    from safetensors import safe_open

    path = Path(path)
    state_p = path / "state.json"
    pos = state.get("position")
    if not isinstance(pos, dict):
        raise ValueError(f"{state_p}: position is {pos!r}, not an object")
    for key, ok, what in (("step", _whole, "a whole number"), ("epoch", _whole, "a whole number"),
                          ("batch", _whole, "a whole number"), ("tokens", _whole, "a whole number")):
        if key in pos and not (ok(pos[key]) and pos[key] >= 0):
            raise ValueError(f"{state_p}: position.{key} is {pos[key]!r}, not {what} >= 0")
    for key in ("epoch", "batch"):
        if key not in pos:
            raise ValueError(f"{state_p}: position.{key} is missing")
    for key in ("train_time_s", "loss", "loss_sum", "best"):
        v = pos.get(key)
        if v is not None and not (isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)):
            raise ValueError(f"{state_p}: position.{key} is {v!r}, not a finite number")
    if epoch_batches:
        if pos["batch"] > epoch_batches:
            raise ValueError(f"{state_p}: position.batch {pos['batch']} is past the end of an epoch "
                             f"({epoch_batches} batches)")
        same_batches = global_batch is None or pos.get("global_batch", global_batch) == global_batch
        done = pos["epoch"] * epoch_batches + pos["batch"]
        if same_batches and done != -(-pos["step"] // reuse) * grad_accum:
            raise ValueError(
                f"{state_p}: position epoch {pos['epoch']}, batch {pos['batch']} is not where step {pos['step']} "
                f"ends ({pos['step']} x {grad_accum} micro-batches of {epoch_batches} per epoch): the checkpoint "
                "does not match this run's data, train.batch_size or train.grad_accum")
    own = method_state_dict(model)
    f = path / "trainable.safetensors"
    with safe_open(str(f), framework="pt") as h:
        keys = set(h.keys())
        for key in sorted(keys):
            if key not in own:
                raise ValueError(f"{f}: tensor '{key}' is not one this run's method trains (the model or "
                                 "method changed since the checkpoint?)")
            shape = tuple(h.get_slice(key).get_shape())
            if shape != tuple(own[key].shape):
                raise ValueError(f"{f}: tensor '{key}' has shape {list(shape)}; the model's is {list(own[key].shape)}")
    missing = sorted(set(own) - keys)
    if missing:
        raise ValueError(f"{f}: tensor '{missing[0]}' is missing ({len(missing)} of the method's {len(own)} tensors)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    f = path / "optimizer.safetensors"
    with safe_open(str(f), framework="pt") as h:
        for key in sorted(h.keys()):
            idx, _, name = key.partition(".")
            if not idx.isdigit() or int(idx) >= len(params):
                raise ValueError(f"{f}: tensor '{key}' belongs to no parameter of this run's optimizer "
                                 f"({len(params)} parameters)")
            shape = tuple(h.get_slice(key).get_shape())
            if shape and shape != tuple(params[int(idx)].shape):
                raise ValueError(f"{f}: tensor '{key}' has shape {list(shape)}; its parameter's is "
                                 f"{list(params[int(idx)].shape)}")
    groups = state.get("optimizer", {}).get("param_groups") if isinstance(state.get("optimizer"), dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{state_p}: optimizer.param_groups does not match this run's optimizer "
                         f"({len(optimizer.param_groups)} group(s))")
    if not isinstance(state.get("scheduler"), dict) or not isinstance(state.get("python_random"), list) \
            or not isinstance(state.get("numpy_random"), list):
        raise ValueError(f"{state_p}: scheduler / python_random / numpy_random missing or malformed")


def save_checkpoint(path: Path, model, optimizer, scheduler, position: dict) -> None:
    """Every rank calls it (sharded tensors are gathered, each rank's RNG state is kept); only
    rank 0 writes."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = dist.full(val).detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    with dist.gathered(model):
        own = {k: v.cpu().contiguous() for k, v in method_state_dict(model).items()} if dist.is_lead() else {}
    ranks = dist.gather_bytes(torch.get_rng_state())
    rng = {"torch": ranks[0]} | {f"torch.rank{i}": s for i, s in enumerate(ranks) if i}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if not dist.is_lead():
        return
    with atomic_dir(path, keep=path.with_name("prev")) as tmp:  # the previous one stays until this one is verified
        save_file(own, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {
            "position": position,
            "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
            "scheduler": scheduler.state_dict() | {"lr_lambdas": None},
            "python_random": _jsonable(random.getstate()),
            "numpy_random": _jsonable(np.random.get_state()),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        verify_checkpoint(tmp, deep=False)


def _jsonable(x):
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    return x


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    state = json.loads((path / "state.json").read_text())
    own = load_file(str(path / "trainable.safetensors"))
    current = model.state_dict()
    model.load_state_dict({k: dist.like(v, current.get(k)) for k, v in own.items()}, strict=False)
    tensors = load_file(str(path / "optimizer.safetensors"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict = {}
    for key, val in list(tensors.items()) + list(state["optimizer"]["scalars"].items()):
        idx, _, name = key.partition(".")
        if torch.is_tensor(val) and val.dim() and int(idx) < len(params):
            val = dist.like(val, params[int(idx)])
        opt_state.setdefault(int(idx), {})[name] = val
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    sched = {k: v for k, v in state["scheduler"].items() if k != "lr_lambdas"}
    scheduler.load_state_dict(sched | {"lr_lambdas": [None]})
    rng = load_file(str(path / "rng.safetensors"))
    mine = f"torch.rank{dist.rank()}"
    same_world = state["position"].get("world", 1) == dist.world()
    torch.set_rng_state(rng[mine] if same_world and mine in rng else rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuple(state["python_random"]))
    np_state = state["numpy_random"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state["position"]
