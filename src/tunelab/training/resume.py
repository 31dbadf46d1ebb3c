"""Where a training run starts: step 0, or the checkpoint every process agrees on.

Rank 0 picks ``checkpoints/last`` (else ``prev`` when ``last`` is corrupt), every rank checks it sees
the same one, and it is loaded into the model, the optimizer and the schedule (the RNG states too),
so the resumed run goes on exactly as an uninterrupted one (``tunelab.training.loop``). log.jsonl
keeps only the lines up to that step.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.runtime import distributed as dist
from tunelab.runtime.atomic_files import atomic_write_text, recover
from tunelab.training.checkpoint import check_fits, load_checkpoint, verify_checkpoint


def start_position(out: Path, tc, model, opt, sched, *, total: int, rows: int, lead: bool,
                   epoch_batches: int | None = None, reuse: int = 1) -> dict:
    """Where training starts: step 0, or the checkpoint every process agrees on (``agree_last``),
    loaded into ``model``, ``opt`` and ``sched`` (the RNG states too). The lead process drops the
    log lines past it. ``pos`` holds the step/epoch/batch position, the best eval score and the
    whole-run tokens / train_time_s / loss figures, which a checkpoint keeps so a resumed run reports them."""
    per_rank = tc.batch_size
    pos = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_metric": None, "world": dist.world(), "global_batch": per_rank * dist.world(),
           "tokens": 0, "train_time_s": 0.0, "loss": None, "loss_sum": 0.0}
    def fits(path: Path, state: dict) -> None:  # every tensor against the model, every field of the state
        check_fits(path, state, dist.unwrap(model), opt, epoch_batches=epoch_batches, grad_accum=tc.grad_accum,
                   global_batch=pos["global_batch"], reuse=reuse)

    last = agree_last(out / "checkpoints", lead, total, fits) if tc.resume else None
    if last is not None:
        pos = {**pos, **load_checkpoint(last, dist.unwrap(model), opt, sched)}
        dist.check_resume(pos, per_rank, rows)
        dist.log(f"resumed from {last} at step {pos['step']}")
    if lead:  # lines past the checkpoint (or all, starting afresh) belong to no run any more
        truncate_log(out / "log.jsonl", pos["step"])
    return pos


def agree_last(ckpt: Path, lead: bool, total: int, fits=None) -> Path | None:
    """Rank 0 decides whether to resume and from which checkpoint: ``last``, else (with a message)
    ``prev`` when ``last`` is corrupt (it repairs a half-renamed one too); every rank must then find
    the same checkpoint, i.e. output_dir must be on a filesystem all nodes share."""
    choice = None
    if lead:
        recover(ckpt / "last")
        problems = []
        for cand in (ckpt / "last", ckpt / "prev"):
            if not cand.exists():
                continue
            try:
                state = verify_checkpoint(cand, total)
                if fits is not None:
                    fits(cand, state)
                choice = [cand.name, state["position"]["step"]]
                break
            except ValueError as e:
                problems.append(str(e))
                dist.log(f"warning: checkpoint {cand} is unusable ({e})" + ("; trying the previous one" if cand.name == "last" and (ckpt / "prev").exists() else ""))
        if choice is None and problems:
            raise ValueError(f"{ckpt}: no usable checkpoint to resume from ({'; '.join(problems)}); "
                             "delete it or set train.resume=false to start over")
    choice = dist.broadcast_json(choice)
    if choice is None:
        return None
    name, step = choice
    last = ckpt / name
    mine = json.loads((last / "state.json").read_text())["position"]["step"] if (last / "state.json").exists() else None
    if mine != step:
        raise RuntimeError(f"rank {dist.rank()}: rank 0 resumes from {last} at step {step} but this process sees "
                           f"{'no checkpoint' if mine is None else f'step {mine}'} there: output_dir must be on a "
                           "filesystem every node shares")
    return last


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from, so the log reads as one clean run."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:  # a half-written line (killed mid-write, full disk): never resumed from
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
