"""THE training loop, shared by every method and task.

It calls ``model(**batch).loss`` and knows nothing about which method is attached. Per optimizer
step it accumulates ``grad_accum`` micro-batches, weighting each micro-batch's mean loss by its
share of the step's loss tokens (so the step's gradient is the token-mean over the whole step,
whatever the padding), clips, steps AdamW and the warmup + linear/cosine schedule. The task's
objective, when it has one, gives the loss instead; it may also make each step's batches itself from
the drawn ones (``step_batches``: GRPO samples and scores its completions there) and ask for each drawn
batch to serve ``reuse`` optimizer steps. The loop calls these hooks without knowing whose they are.

Exact resume: the batch order is a pure function of (seed, epoch) (``tunelab.data.encoding.batches``), and a
checkpoint holds the trainable tensors, the optimizer state, the step/epoch/batch position and the
RNG states, so a resumed run produces the same loss sequence as an uninterrupted one.
Checkpoints are written atomically (``checkpoint.atomic_dir``): a crash mid-save leaves the last
good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import tunelab
from tunelab.config import RunConfig, dump_config, task_config
from tunelab.data import feature_cache
from tunelab.data.encoding import Collator, batches
from tunelab.evaluation import inference
from tunelab.evaluation.metrics import better, higher_is_better, selection_metric
from tunelab.evaluation.scoring import choices_fp32, progress_to, show_progress
from tunelab.methods import method_config
from tunelab.methods.base import METHODS, method_state_dict
from tunelab.methods.load_checks import check_tensors
from tunelab.models import lm_loss
from tunelab.models.loading import load as load_model
from tunelab.models.loading import resolve
from tunelab.results import read_metrics
from tunelab.runtime import distributed as dist
from tunelab.runtime import precision
from tunelab.runtime.atomic_files import atomic_write_text, remove_stale
from tunelab.runtime.precision import autocast, autocast_dtype, peak_memory_mb, pick_device
from tunelab.tasks import TASKS
from tunelab.tasks.base import check_reported
from tunelab.tasks.splits import read_run_data
from tunelab.training import cpu_attention, optimizer, tracking
from tunelab.training.checkpoint import save_checkpoint
from tunelab.training.divergence import check_step
from tunelab.training.preflight import check_data_sources, check_run, memory_note, overlap_warning, warn_lr, warn_rank
from tunelab.training.resume import start_position
from tunelab.training.run_directory import BEST_JSON, EVAL_LOG, TASK_JSON
from tunelab.training.run_lock import RunLock, StopOnSignal, Stopped, stop_says_where

# ---------------------------------------------------------------- environment


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_tokens(batch: dict, causal: bool) -> int:
    """How many targets the batch's loss averages over: shifted next tokens for a causal LM,
    labelled tokens for a token head, one per row for a sequence head."""
    labels = batch["labels"]
    if labels.dim() == 1 or labels.dtype.is_floating_point:
        return labels.shape[0]
    if causal:
        labels = labels[..., 1:]
    return int((labels != -100).sum())


def real_tokens(batch: dict, pad_id: int) -> int:
    """Non-pad tokens (packed batches carry a 4D block mask, so count ids there)."""
    mask = batch["attention_mask"]
    return int(mask.sum()) if mask.dim() == 2 else int((batch["input_ids"] != pad_id).sum())


# ---------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------- the run
class Run:
    """Everything a run needs, loaded once: task, data, model with its method, features."""

    tracker = None  # tunelab.training.tracking.Tracker of a training run (lead process only)
    log_path = None  # eval_log.jsonl of a training run (lead process): evaluations write their progress there
    step = 0  # the training step an evaluation belongs to (its progress lines carry it)

    def __init__(self, cfg: RunConfig, fitted: dict | None = None):
        """``fitted``: what a finished run's fit added to its task config (``task.json``, e.g. the labels): no
        fit then, so no training data is needed; settings the config names itself win."""
        self.cfg = cfg
        self.dir = cfg.run_dir()
        show_progress(cfg.train.progress)  # evaluation bars follow train.progress too
        self.task = TASKS.get(cfg.task.name)
        self.tcfg = task_config(cfg.task.name, cfg.task.params())
        if fitted:
            self.tcfg = self.tcfg.model_copy(update={k: v for k, v in fitted.items() if k not in self.tcfg.model_fields_set})
        self.device = pick_device(cfg.train.device)
        self.amp = autocast_dtype(cfg.train.precision, self.device)
        d = cfg.data
        if not d.train and not d.eval:
            raise ValueError("data.train and data.eval are both empty: nothing to train or evaluate")
        self.train_ex, self.eval_ex = read_run_data(self.task, self.tcfg, d)  # layouts, #rows=, data.eval_split
        self.fitted: dict = {}  # what fit() set: saved as task.json for evaluations of the finished run
        if hasattr(self.task, "fit") and fitted is None:
            given = self.tcfg
            self.tcfg = self.task.fit(self.tcfg, self.train_ex or self.eval_ex)
            self.fitted = {k: v for k, v in self.tcfg.model_dump(mode="json").items() if getattr(given, k) != getattr(self.tcfg, k)}
        head = self.task.head(self.tcfg, self.train_ex or self.eval_ex)
        self.causal = head is None
        if d.pack and not self.causal:
            raise ValueError(f"data.pack=true needs a causal-LM formulation, but task '{cfg.task.name}' uses a "
                             f"{head.kind} head here: packing would mix rows' labels; set data.pack=false")
        m = cfg.model
        # a method may quantize its targets while the weights load (QLoRA, LoftQ): it says so itself
        on_load = getattr(METHODS.get(cfg.method.name), "quantize_on_load", None)
        plan = on_load(method_config(cfg.method.name, cfg.method.params())) if on_load else None
        self.model, self.tok = load_model(m.name, head=head, dtype=m.dtype, trust_remote_code=m.trust_remote_code, revision=m.revision, quantize=plan, device=self.device)
        check_run(self.task, self.tcfg, self.train_ex, self.eval_ex, self.tok, self.model, d.max_length)  # before step 1
        self.model.to(self.device)
        # The task decides how features batch and what the loss is (token cross-entropy by default).
        self.collate = self.task.collator(self.tok) if hasattr(self.task, "collator") else Collator(self.tok.pad_token_id)
        self.objective = self.task.objective(self.tcfg) if hasattr(self.task, "objective") else None

    def units(self, batch: dict) -> int:
        """What the batch's loss is a mean over (targets, or the objective's units, e.g. pairs)."""
        return self.objective.units(batch) if self.objective else loss_tokens(batch, self.causal)

    def evaluate(self, phase: str = "final") -> tuple[dict, list[dict]]:
        if not self.eval_ex:
            return {}, []
        t0 = time.perf_counter()
        watch = progress_to(_eval_progress(self, phase)) if self.log_path else contextlib.nullcontext()
        with watch, choices_fp32(self.cfg.eval.choices_fp32), autocast(self.device, self.amp):  # ranks share the examples unless the model is sharded
            metrics, preds = self.task.evaluate(self.model, self.tok, self.eval_ex, self.tcfg, batch_size=self.cfg.eval.batch_size,
                                                gen=self.cfg.eval.gen(), split=not dist.is_sharded(self.model))
        check_reported(self.task, metrics)
        # a task may report it itself (on the way); rows without references (tunelab predict) have none
        held_out = getattr(self.objective, "scores_held_out", True)  # an objective without a held-out loss says so
        if self.cfg.eval.loss and held_out and "eval_loss" not in metrics and not metrics.get("without_reference"):
            with autocast(self.device, self.amp):
                metrics["eval_loss"] = self.eval_loss()
        self.eval_time_s = getattr(self, "eval_time_s", 0.0) + time.perf_counter() - t0  # every evaluation of the run
        return metrics, preds

    @functools.cached_property
    def eval_features(self):
        """The eval set's training features: built once a run, read by every evaluation's eval_loss."""
        return feature_cache.features(self.task, self.eval_ex, self.tok, self.tcfg, self.cfg.data.max_length, desc="tokenizing eval",
                                 num_proc=self.cfg.data.num_proc)

    def eval_loss(self) -> float:
        """Token-mean training loss on the eval set (what scaling-law fits use); eval mode, no autograd
        and the weights cast once for the whole pass (``inference.inference``)."""
        feats, collate = self.eval_features, self.collate
        total, count, levers = 0.0, 0, None
        with inference.inference(self.model):
            for idx in batches(feats.lengths, self.cfg.eval.batch_size, seed=0, epoch=0, shuffle=False):
                batch = {k: v.to(self.device) for k, v in collate([feats[i] for i in idx]).items()}
                if levers is None:  # the LM head only where a target is, a shared prefix once, ... (tunelab.models.lm_loss)
                    levers = (lm_loss.loss_levers(self.model, batch) if self.causal and not self.objective
                              else {"trim": False})
                n = self.units(batch)
                if n:
                    loss = self.objective.loss(self.model, batch) if self.objective else lm_loss.loss(self.model, batch, **levers)
                    total += float(loss) * n
                    count += n
        return total / max(count, 1)


def _eval_progress(r: Run, phase: str):
    """The sink of an evaluation's progress (``tunelab.evaluation.scoring.progress_to``): a line in the run's
    eval_log.jsonl, ``{"time", "step", "phase", "desc", "done", "total", "elapsed_s", "eta_s"}`` (log.jsonl keeps
    its step and eval lines alone), and where stderr is not a terminal (no bar there) the same in words on the
    console."""
    def sink(rec: dict) -> None:
        with open(r.log_path, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": r.step, "phase": phase, **rec}) + "\n")
        if r.cfg.train.progress and not sys.stderr.isatty():
            eta = f", about {rec['eta_s']:.0f} s left" if rec["eta_s"] else ""
            dist.log(f"evaluation {phase}: {rec['desc']} {rec['done']}/{rec['total']} rows in {rec['elapsed_s']:.0f} s{eta}")
    return sink


def run(cfg: RunConfig) -> dict:
    """Train (and evaluate) as ``cfg`` says; write the run directory; return its metrics record in
    the namespaced form of ``tunelab.results`` ({"metrics", "before", "run"}).

    Only one process writes a run directory (``tunelab.training.run_lock``); a finished run (metrics.json
    there, same config, resume on) is not redone: its record is returned as it is."""
    t_start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dist.init()
    tracking.check(cfg.train.report_to)  # a missing tracking library fails here, before any loading
    out = cfg.run_dir()
    with RunLock(out) if dist.is_lead() else contextlib.nullcontext():
        if dist.is_lead():
            remove_stale(out)
            remove_stale(out / "checkpoints")
        done = _finished(cfg, out)
        if done is not None:
            dist.log(f"{out}: finished before with this config; metrics.json kept (train.resume=false to redo it)")
            return done
        return _run(cfg, t_start)


def _finished(cfg: RunConfig, out: Path) -> dict | None:
    """The saved record when ``out`` holds a finished run of this very config (and resume is on)."""
    if not cfg.train.resume or not (out / "config.yaml").exists():
        return None
    try:
        same = (out / "config.yaml").read_text() == dump_config(cfg)
        return dist.broadcast_json(read_metrics(out) if same else None)
    except (OSError, ValueError):
        return None


def _run(cfg: RunConfig, t_start: float) -> dict:
    if dist.active():  # an embedded model is converted on first use: once per machine, not per process
        if dist.local_rank() == 0:
            resolve(cfg.model.name)
        dist.barrier_if(True)
    seed_all(cfg.train.seed)
    check_data_sources(cfg.data.train, cfg.data.eval)  # before reading: a folder never swallows the eval file
    r = Run(cfg)
    leak = overlap_warning(r.train_ex, r.eval_ex)
    if leak:
        dist.log(leak)
    out = r.dir
    lead = dist.is_lead()
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    if lead:
        (out / "metrics.json").unlink(missing_ok=True)  # a metrics.json always belongs to the config beside it
        r.log_path = out / EVAL_LOG
        # the fitted task config (labels from the training data): `tunelab eval RUN` reads it, not data.train
        atomic_write_text(out / TASK_JSON, json.dumps(r.fitted, indent=2))
    note = memory_note(cfg, r.model, r.device) if r.train_ex else None
    if note:
        dist.log(f"note: {note}")
    r.tracker = tracking.start(cfg, lead)
    record: dict = {}
    for w in warn_lr(cfg.method.name, cfg.method.params(), cfg.train.lr) if r.train_ex else []:
        dist.log(f"warning: {w}")
    if cfg.eval.before and not r.eval_ex:
        dist.log("warning: eval.before=true but there is no eval data ("
                 + (f"data.eval={cfg.data.eval} holds no examples" if cfg.data.eval else "data.eval is not set")
                 + "): no score before training; set data.eval to a held-out file")
    if cfg.eval.before and r.eval_ex:
        with stop_says_where("during the evaluation before training (eval.before): nothing was trained yet; "
                             "run the same `tunelab train` command again to start"):
            before, _ = r.evaluate("before training")
        record["before"] = before
        if r.tracker:
            r.tracker.log_eval(0, before)
        dist.log(f"before training: {before}")

    model = tunelab.attach(r.model, cfg.method.name, **cfg.method.params())
    for w in warn_rank(model, cfg.method.params()):
        dist.log(f"warning: {w}")
    counts = tunelab.trainable_parameters(model)
    train_stats = {}
    if r.train_ex and (cfg.train.max_steps is None or cfg.train.max_steps > 0):
        train_stats = _train(r, model, out, lead)
    with dist.gathered(model):
        if lead:
            check_tensors(method_state_dict(model), f"{out / 'method'} (the trained weights)")
            tunelab.save(model, out / "method")
    with stop_says_where(f"during the final evaluation: training finished and the trained method is saved in "
                         f"{out / 'method'}, but metrics.json was not written; run the same `tunelab train` command "
                         "again to evaluate it (nothing is trained again)"):
        r.step = getattr(r, "position", {}).get("step", 0)
        final, preds = r.evaluate("after training")
    if getattr(r, "position", None) and r.position.get("best") is not None:  # evaluated during training
        _keep_best(model, final, out, r.position)
    record = {"metrics": final, **record}
    record["run"] = dict(
        method=cfg.method.name, task=cfg.task.name, model=cfg.model.name, seed=cfg.train.seed,
        trainable_params=counts["trainable"], total_params=counts["total"], trainable_percent=counts["percent"],
        precision=str(r.amp).replace("torch.", "") if r.amp else "float32", device=str(r.device),
        world_size=dist.world(), **train_stats,
        wall_time_s=time.time() - t_start, eval_time_s=getattr(r, "eval_time_s", 0.0),
        peak_memory_mb=peak_memory_mb(r.device),
    )
    if lead:
        if preds and cfg.eval.save_predictions:
            atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
        atomic_write_text(out / "metrics.json", json.dumps(record, indent=2))
    if r.tracker:
        r.tracker.finish(record)
    return record


def _train(r: Run, model, out: Path, lead: bool) -> dict:
    """Train ``model`` (``r.model`` with its method attached) for train.max_steps, else train.epochs;
    the lead process writes log.jsonl and the checkpoints under ``out``. Returns the training facts
    of the run's record (``run`` in metrics.json)."""
    tc = r.cfg.train
    feats = _train_features(r)
    epoch_batches = len(_epoch_batches(r, feats.lengths, 0))
    reuse = _reuse(r)
    total = _total_steps(tc, epoch_batches, reuse)
    base, model, levers = _prepare_model(r, model, feats)
    params, opt, sched, lr = _optimizer_and_schedule(r.cfg, model, total)
    pos = start_position(out, tc, model, opt, sched, total=total, rows=len(feats.lengths), lead=lead,
                         epoch_batches=epoch_batches, reuse=reuse)
    if lead and pos["step"] == 0:  # starting afresh: a best checkpoint of an earlier run is not this run's
        shutil.rmtree(out / "checkpoints" / "best", ignore_errors=True)
    t = _Training(r=r, feats=feats, model=model, base=base, params=params, opt=opt, sched=sched, levers=levers,
                  pos=pos, total=total, out=out)
    with contextlib.ExitStack() as stack:
        if lead and tc.progress:
            t.bar = stack.enter_context(_progress_bar(r.cfg, total, pos["step"]))
        model.train()
        if lead:
            t.log_f = stack.enter_context(open(out / "log.jsonl", "a"))
        # frozen weights kept in the autocast dtype instead of re-cast / re-dequantized per call (same results)
        held = stack.enter_context(precision.held_weights(base, r.amp, 0 if dist.is_sharded(model) else tc.shadow_mb, r.device))
        t.stop = stack.enter_context(StopOnSignal())
        stack.enter_context(_lost_peer_explained(t.ckpt))
        while pos["step"] < total:
            t.end_of_step(t.step())
        t.save()
    r.position = pos  # the final evaluation competes for checkpoints/best too
    return _train_facts(feats, pos, lr, held)


# ---------------------------------------------------------------- before the first step
def _train_features(r: Run):
    """The training set's features: batched, cached, memory-mapped where the task and the data size
    allow (``tunelab.data.feature_cache``); says how many rows were truncated."""
    cfg = r.cfg
    feats = feature_cache.features(r.task, r.train_ex, r.tok, r.tcfg, cfg.data.max_length, pack=cfg.data.pack, desc="tokenizing train",
                              num_proc=cfg.data.num_proc)
    if not len(feats):
        raise ValueError(f"{cfg.data.train}: no training features left ({feats.stats['dropped']} rows dropped)")
    truncated = feats.stats["truncated"]
    if truncated:
        dist.log(f"warning: {truncated} of {feats.stats['rows']} training rows are longer than data.max_length="
                 f"{cfg.data.max_length} and were truncated (their document part; see metrics.json run.truncated_rows)")
    return feats


def _epoch_batches(r: Run, lengths, epoch: int) -> list:
    """This process's share of ``epoch``'s batches (feature indices): a pure function of the seed and
    the epoch, so a resumed run draws the very same ones."""
    tc, per_rank = r.cfg.train, r.cfg.train.batch_size
    return dist.shard(
        batches(lengths, per_rank * dist.world(), seed=tc.seed, epoch=epoch, group_by_length=r.cfg.data.group_by_length),
        per_rank,
    )


def _reuse(r: Run) -> int:
    """Optimizer steps per drawn batch: 1, or what the objective asks (GRPO's num_iterations: each rollout
    batch is optimised that many times). Checkpoints then fall between drawn batches only."""
    reuse = getattr(r.objective, "reuse", 1)
    if reuse > 1 and r.cfg.train.save_every and r.cfg.train.save_every % reuse:
        raise ValueError(f"train.save_every={r.cfg.train.save_every} is not a multiple of the {reuse} optimizer steps each "
                         f"batch is used for ({getattr(r.objective, 'reuse_key', 'the objective')}): a checkpoint must "
                         "fall between batches to resume exactly")
    return reuse


def _total_steps(tc, epoch_batches: int, reuse: int = 1) -> int:
    """train.max_steps, else train.epochs worth of optimizer steps (``grad_accum`` batches each, each
    drawn batch used ``reuse`` times)."""
    steps_per_epoch = max(1, epoch_batches // tc.grad_accum) * reuse
    return tc.max_steps if tc.max_steps is not None else math.ceil(tc.epochs * steps_per_epoch)


def _prepare_model(r: Run, model, feats) -> tuple:
    """Make ``model`` ready to train: gradient checkpointing if asked, the loss levers, the objective's
    own preparation, then the data-parallel wrapper. Returns (``model`` itself, the model the steps
    call, the levers)."""
    cfg = r.cfg
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method '{cfg.method.name}' left no parameter trainable")
    if cfg.train.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # LM head and loss only where a target is (same loss and grads; see tunelab.models.lm_loss)
    probe = {k: v.to(r.device) for k, v in r.collate(feats[:2]).items()}
    levers = (lm_loss.loss_levers(model, probe, autocast(r.device, r.amp), distributed=dist.active())
              if r.causal and not r.objective else {"trim": False})
    if r.objective:
        r.objective.prepare(model)  # e.g. DPO's frozen reference for a method without an off switch
    return model, dist.wrap(model, full=cfg.method.name == "full"), levers


def _optimizer_and_schedule(cfg: RunConfig, model, total: int) -> tuple:
    """AdamW over the trainable parameters (fused where it runs) and the warmup + decay schedule over
    ``total`` steps. Returns (parameters, optimizer, schedule, learning rate)."""
    tc = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    lr = tc.lr or optimizer.default_lr(cfg.method.name, cfg.method.params())
    opt = optimizer.build(cfg.method.name, cfg.method.params(), dist.unwrap(model), lr, tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optimizer.lr_lambda(tc.schedule, int(tc.warmup * total), total))
    return params, opt, sched, lr


def _progress_bar(cfg: RunConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{cfg.method.name} on {cfg.task.name}", unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def _lost_peer_explained(ckpt: Path):
    """A collective failing because another process died or hung becomes an error that says so and
    whether a checkpoint is there to resume from."""
    try:
        yield
    except Exception as e:
        if dist.lost_peer(e):
            saved = _last_saved(ckpt)
            raise RuntimeError(
                f"rank {dist.rank()}: another process of this {dist.world()}-process run failed or stopped "
                f"answering ({type(e).__name__}); "
                + (f"the last checkpoint {saved} is intact: relaunch the same command to resume"
                   if saved else "no checkpoint was written yet (set train.save_every to keep one)")
            ) from e
        raise


def _train_facts(feats, pos: dict, lr: float, held: dict) -> dict:
    data = {f"data_{k}": feats.stats[k] for k in ("rows", "dropped", "cached", "seconds")}
    tokens, t_train = pos["tokens"], pos["train_time_s"]
    return {**data, "steps": pos["step"], "train_tokens": tokens, "train_time_s": t_train,
            "train_tokens_per_s": tokens / t_train if t_train else 0.0,
            "final_loss": pos["loss"] if pos["loss"] is not None else float("nan"),
            "mean_train_loss": pos["loss_sum"] / pos["step"] if pos["step"] else float("nan"), "lr": lr,
            "truncated_rows": feats.stats["truncated"], "held_weights_mb": held["held_mb"]}


# ---------------------------------------------------------------- the steps
class _StepFacts(NamedTuple):
    loss: float  # the step's token-mean loss over every process
    grad_norm: torch.Tensor | None  # before clipping; None without train.max_grad_norm
    tokens: int  # non-pad tokens of the step, every process
    seconds: float


@dataclasses.dataclass(eq=False)
class _Training:
    """A training run under way: what its steps share. ``pos`` is the position a checkpoint keeps
    (``tunelab.training.resume.start_position``); ``model`` is what the steps call (data-parallel
    wrapped), ``base`` the model with its method attached. The steps call ``model(**batch).loss`` or
    the task's objective: they never name a method or a task."""

    r: Run
    feats: object
    model: torch.nn.Module
    base: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    levers: dict
    pos: dict
    total: int
    out: Path  # the run directory
    log_f: object = None  # log.jsonl, open on the lead process
    bar: object = None  # the progress bar (lead process, train.progress)
    stop: StopOnSignal | None = None
    held: list | None = None  # the drawn micro-batches while the objective reuses them (``_reuse``)

    def __post_init__(self):
        self.ckpt = self.out / "checkpoints"
        self.order = _epoch_batches(self.r, self.feats.lengths, self.pos["epoch"])
        # a method may ask to be called after every optimizer step: ``on_step(model, step, total)``
        self.on_step = getattr(METHODS.get(self.r.cfg.method.name), "on_step", None)

    def next_batch(self) -> dict:
        """The next batch in the loop's order, moving ``pos`` on (into the next epoch at the end of one)."""
        pos = self.pos
        if pos["batch"] >= len(self.order):
            pos["epoch"] += 1
            pos["batch"] = 0
            self.order = _epoch_batches(self.r, self.feats.lengths, pos["epoch"])
        idx = self.order[pos["batch"]]
        pos["batch"] += 1
        return self.r.collate([self.feats[i] for i in idx])

    def step(self) -> _StepFacts:
        """One optimizer step over train.grad_accum micro-batches, timed; the whole-run figures in
        ``pos`` move on with it."""
        r, pos, obj = self.r, self.pos, self.r.objective
        t0 = time.perf_counter()
        if self.held is None or pos["step"] % _reuse(r) == 0:
            micro = [{k: v.to(r.device) for k, v in self.next_batch().items()} for _ in range(r.cfg.train.grad_accum)]
            if hasattr(obj, "step_batches"):  # the objective makes the step's batches itself (e.g. sampled rollouts)
                with autocast(r.device, r.amp):
                    micro = obj.step_batches(self.base, r.tok, micro)
            self.held = micro if _reuse(r) > 1 else None
        else:
            micro = self.held
        loss, gnorm = self.optimizer_step(micro)
        dt = time.perf_counter() - t0
        n_tok = dist.all_sum(sum(real_tokens(b, r.tok.pad_token_id) for b in micro))
        pos.update(tokens=pos["tokens"] + n_tok, train_time_s=pos["train_time_s"] + dt, loss=loss,
                   loss_sum=pos["loss_sum"] + loss)
        return _StepFacts(loss, gnorm, n_tok, dt)

    def optimizer_step(self, micro: list[dict]) -> tuple[float, torch.Tensor | None]:
        """Accumulate the micro-batches' gradients, clip them, check the step for divergence, then update
        the weights and the schedule. Returns the step's loss and gradient norm."""
        tc = self.r.cfg.train
        step_loss = self.accumulate(micro)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm) if tc.max_grad_norm else None
        gnorm = dist.full(gnorm)
        loss = dist.mean(step_loss).item()
        check_step(self.pos["step"] + 1, loss, gnorm, _last_saved(self.ckpt))  # before the update touches the weights
        self.opt.step()
        self.sched.step()
        self.pos["step"] += 1
        if self.on_step is not None:  # the method's own end-of-step work (e.g. a rank allocation), gradients still there
            self.on_step(self.base, self.pos["step"], self.total)
        self.opt.zero_grad(set_to_none=True)
        return loss, gnorm

    def accumulate(self, micro: list[dict]) -> torch.Tensor:
        """Backward through each micro-batch, its mean loss weighted by its share of the step's loss units
        over every process (so the gradient is the unit-mean over the whole step, whatever the padding);
        returns this process's share of the step's loss."""
        r, model, obj = self.r, self.model, self.r.objective
        n_total = dist.all_sum(sum(r.units(b) for b in micro))
        step_loss = torch.zeros((), device=r.device)
        for i, b in enumerate(micro):
            sync = dist.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext()
            with sync, autocast(r.device, r.amp), cpu_attention.attention_for(model, b, r.device):
                out_loss = obj.loss(model, b, self.base) if obj else lm_loss.loss(model, b, **self.levers)
            weight = r.units(b) / n_total * dist.world()
            (out_loss * weight).backward()
            step_loss += out_loss.detach() * weight
        return step_loss

    # ------------------------------------------------ end of a step
    def end_of_step(self, facts: _StepFacts) -> None:
        """Log the step; evaluate and save a checkpoint when due; stop here if a signal came."""
        tc, step = self.r.cfg.train, self.pos["step"]
        if self.log_f is not None:  # the lead process
            self.log_step(facts)
        every = eval_every(self.r.cfg)
        if every and step % every == 0 and step < self.total:
            _eval_and_keep_best(self.r, dist.unwrap(self.model), self.out, self.pos, self.log_f)
        if tc.save_every and step % tc.save_every == 0 and step < self.total:
            self.save()
        dist.barrier_if(tc.save_every and step % tc.save_every == 0)
        self.stop_if_signalled()

    def log_step(self, facts: _StepFacts) -> None:
        """The lead process's line in log.jsonl (every train.log_every steps, the first and the last),
        the same record to the tracker, and the progress bar."""
        pos, obj, tracker = self.pos, self.r.objective, self.r.tracker
        rec = {"step": pos["step"], "epoch": pos["epoch"], "loss": facts.loss, "lr": self.sched.get_last_lr()[0],
               "tokens_per_s": facts.tokens / facts.seconds, "elapsed_s": pos["train_time_s"]}
        if facts.grad_norm is not None:
            rec["grad_norm"] = float(facts.grad_norm)
        rec["step_s"] = facts.seconds
        if obj:  # e.g. reward accuracy and margin of the step's last micro-batch
            rec.update(obj.last)
        if pos["step"] % self.r.cfg.train.log_every == 0 or pos["step"] in (1, self.total):
            self.log_f.write(json.dumps(rec) + "\n")
            self.log_f.flush()
            if tracker:
                tracker.log_step(rec)
        if self.bar:
            self.bar.update(1)
            extra = {k: f"{obj.last[k]:.3g}" for k in getattr(obj, "bar_keys", ()) if k in getattr(obj, "last", {})}
            self.bar.set_postfix(loss=f"{facts.loss:.4f}", tok_s=f"{pos['tokens'] / pos['train_time_s']:,.0f}", **extra)

    def save(self) -> None:
        save_checkpoint(self.ckpt / "last", dist.unwrap(self.model), self.opt, self.sched, self.pos)

    def stop_if_signalled(self) -> None:
        """After SIGTERM/SIGINT on any process: save a checkpoint and raise ``Stopped`` saying how to resume."""
        stop, step = self.stop, self.pos["step"]
        signum = dist.all_sum(stop.signum or 0) if dist.active() else stop.signum
        if signum and step < self.total and step % _reuse(self.r) == 0:  # between drawn batches (see ``_reuse``)
            self.save()
            name = stop.name or f"signal {signum}"
            raise Stopped(f"stopped by {name} at step {step} of {self.total}: checkpoint saved in {self.ckpt / 'last'}; "
                          "run the same `tunelab train` command again (train.resume=true) to continue from it", signum)


def _last_saved(ckpt: Path) -> Path | None:
    return next((p for p in (ckpt / "last", ckpt / "prev", ckpt / ".last.old") if p.exists()), None)


def eval_every(cfg: RunConfig) -> int:
    """Steps between evaluations during training: eval.every_steps, or its older name train.eval_every; 0: none."""
    return cfg.eval.every_steps or cfg.train.eval_every


def _eval_and_keep_best(r: Run, model, out: Path, pos: dict, log_f) -> None:
    r.step = pos["step"]
    metrics, _ = r.evaluate(f"at step {pos['step']}")  # the same on every rank
    if not metrics:
        return
    if log_f:
        log_f.write(json.dumps({"step": pos["step"], "eval": metrics}) + "\n")
        log_f.flush()
        if r.tracker:
            r.tracker.log_eval(pos["step"], metrics)
    _keep_best(model, metrics, out, pos)


def _keep_best(model, metrics: dict, out: Path, pos: dict) -> None:
    """Save the method as ``checkpoints/best`` when this evaluation beats the best so far on the task's
    selection metric, in that metric's direction (``tunelab.evaluation.metrics``); ``best.json`` beside
    it says which step and score. ``tunelab eval/merge/export RUN --checkpoint best`` read it."""
    name = selection_metric(metrics)
    if name is None:
        return
    if pos.get("best_metric") != name:  # a position from before the metric was recorded: start afresh
        pos["best"] = None
    if not better(name, metrics[name], pos["best"]):
        return
    pos["best"], pos["best_metric"] = metrics[name], name
    best = out / "checkpoints" / "best"
    with dist.gathered(model):
        if dist.is_lead():
            tunelab.save(model, best)
            atomic_write_text(best / BEST_JSON, json.dumps({
                "step": pos["step"], "metric": name, "value": metrics[name],
                "higher_is_better": higher_is_better(name)}, indent=2))


def evaluate_run(cfg: RunConfig, method_dir: str | os.PathLike | None = None) -> tuple[dict, list[dict]]:
    """Score ``cfg``'s eval set with the base model, or with the saved method in ``method_dir``.

    A trained run's fitted task config (``task.json``: labels and the like) stands in for its training data,
    which is then not read (unless data.eval_split carves the eval set out of it)."""
    fitted = None
    saved = cfg.run_dir() / TASK_JSON
    if method_dir is not None and saved.exists():
        fitted = json.loads(saved.read_text())
        if not cfg.data.eval_split:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": None})})
    r = Run(cfg, fitted)
    if method_dir is not None:
        tunelab.load(r.model, method_dir)
    r.model.to(r.device)
    metrics, preds = r.evaluate()
    return metrics, preds
