"""The reference implementations, on the same model, data, batches, precision and hyperparameters.

- ``peft_loop``: PEFT (LoRA, or LoRA over a torchao NF4 base for QLoRA) in a plain PyTorch loop:
  forward under autocast, backward, clip, AdamW (torch's default implementation), schedule.
- ``trainer``: full fine-tuning with the Hugging Face Trainer (its default fused AdamW, bf16 via
  accelerate's autocast), fed the training loop's batches in the loop's order.
- ``pyreft_loop``: LoReFT with pyreft (pyvene) at the same positions (the paper's short-prompt rule,
  as tunelab's default), the same lr, schedule and clipping, in a plain loop, starting from the
  R, W, b that tunelab's run draws for train.seed (its orthogonal() base set to tunelab's base, its
  raw parameter at the identity point, as pyreft initialises it), so the two losses are comparable
  step by step and not only in distribution.
- ``score_plain``: label-word scoring by a plain forward over all positions (full logits), batches
  in file order, right padding, the last prompt position read per row.
- ``generate_plain``: ``model.generate`` over batches in file order, left padding.

Batches are collated before the clock starts (the tunelab loop times its own collation).
"""

from __future__ import annotations

import math
import time
import types

import torch

from tunelab.config import RunConfig, task_config
from tunelab.data.encoding import Collator, tokenize_prompt
from tunelab.models.loading import resolve
from tunelab.runtime.precision import autocast, autocast_dtype, pick_device
from tunelab.tasks import TASKS
from tunelab.training.optimizer import default_lr, lr_lambda
from tunelab.training.sizing import (
    batch_shape,
    eval_flops,
    loop_batches,
    matmul_counts,
    peak_memory_mb,
    summarize,
    train_flops,
)

MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def prepare(cfg: RunConfig, split: str = "train"):
    """Tokenizer, task and examples exactly as tunelab reads them, without loading a model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(cfg.model.name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    task = TASKS.get(cfg.task.name)
    tcfg = task_config(cfg.task.name, cfg.task.params())
    src = cfg.data.train if split == "train" else cfg.data.eval
    limit = cfg.data.max_train if split == "train" else cfg.data.max_eval
    examples = task.read(src, tcfg, limit=limit)
    if hasattr(task, "fit"):
        tcfg = task.fit(tcfg, examples)
    return types.SimpleNamespace(tok=tok, task=task, tcfg=tcfg, train_ex=examples, eval_ex=examples)


def load_plain(cfg: RunConfig, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name), dtype=torch.float32)
    return model.to(device)


def planned_batches(r, cfg: RunConfig, n: int) -> list[dict]:
    """The first ``n`` batches the tunelab loop draws (epoch after epoch) for this config."""
    out: list[dict] = []
    epoch = 0
    while len(out) < n:
        out += loop_batches(r, cfg, epoch)
        epoch += 1
    return out[:n]


def _shuffled_batches(r, cfg: RunConfig, seed: int) -> list[dict]:
    """What a plain loop does by default: a random permutation cut into batches, padded to the longest."""
    feats = [r.task.encode(ex, r.tok, r.tcfg, cfg.data.max_length) for ex in r.train_ex]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(feats), generator=g).tolist()
    bs = cfg.train.batch_size
    collate = Collator(r.tok.pad_token_id)
    return [collate([feats[i] for i in order[s : s + bs]]) for s in range(0, len(order), bs)]


def _timed_loop(model, batches, cfg: RunConfig, device, amp, warmup: int, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.schedule, int(cfg.train.warmup * total), total))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        inputs = {k: v.to(device) for k, v in b.items() if k in MODEL_KEYS}
        with autocast(device, amp):
            out = model(**inputs)
        out.loss.backward()
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        sync()
        times.append(time.perf_counter() - t)
    return times, sum(losses) / len(losses)


def _train_result(impl, cfg, device, amp, batches, times, warmup, counts, pad_id, peak_flops, loss, extra=None):
    shapes = [batch_shape(b, pad_id) for b in batches]
    tok_s = [s["tokens"] / t for s, t in zip(shapes[warmup:], times[warmup:], strict=True)]
    mfu = [train_flops(counts, s) / t / peak_flops for s, t in zip(shapes[warmup:], times[warmup:], strict=True)]
    return {
        "impl": impl, "kind": "train", "device": str(device),
        "precision": str(amp).replace("torch.", "") if amp else "float32",
        "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length, "steps": len(tok_s),
        "tokens_per_s": summarize(tok_s), "step_s": summarize(times[warmup:]), "peak_memory_mb": peak_memory_mb(device),
        "mean_loss": loss, "threads": torch.get_num_threads(), "mfu": summarize(mfu),
        "matmul_peak_tflops": peak_flops / 1e12,
    } | (extra or {})


def peft_loop(cfg: RunConfig, steps: int, warmup: int, peak_flops: float, *, lora: dict | None = None,
              tuner: dict | None = None, quantize: bool = False, defaults: bool = False, checkpointing: bool = False,
              loftq: bool = False) -> dict:
    """PEFT LoRA (``lora``: LoraConfig kwargs) in a plain loop; ``tuner``: another PEFT tuner instead
    ({"peft_type": "VERA", ...its config kwargs}, as ``get_peft_config`` takes them); ``defaults``:
    PEFT's and a plain loop's defaults (LoraConfig() as is, fp32, shuffled batches) instead of tunelab's
    settings; ``loftq``: over the NF4 base Q_T and from the (A_T, B_T) that tunelab's LoftQ computes for cfg."""
    from peft import LoraConfig, get_peft_config, get_peft_model

    device = pick_device(cfg.train.device)
    amp = None if defaults else autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg)
    if defaults:  # its own epoch, repeated: the timed pass sees only shapes it has seen
        batches = _shuffled_batches(r, cfg, cfg.train.seed)
        batches = (batches * (1 + (warmup + steps) // len(batches)))[: warmup + steps]
    else:
        batches = planned_batches(r, cfg, warmup + steps)
    start = _tunelab_loftq_start(cfg) if loftq else None
    model = load_plain(cfg, device)
    if quantize:
        _nf4_base(model, lora.get("target_modules", "all-linear"))
    if start:
        for name, mod in model.named_modules():
            if name in start:
                mod.weight = torch.nn.Parameter(start[name][0], requires_grad=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pcfg = get_peft_config({"task_type": "CAUSAL_LM", **tuner}) if tuner else LoraConfig(task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, pcfg)
    if start:
        with torch.no_grad():
            for name, mod in model.named_modules():
                key = name.removeprefix("base_model.model.")
                if key in start and hasattr(mod, "lora_A"):
                    mod.lora_A["default"].weight.copy_(start[key][1])
                    mod.lora_B["default"].weight.copy_(start[key][2])
    counts = matmul_counts(model)
    lr = cfg.train.lr or 1e-4
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = _timed_loop(model, batches, cfg, device, amp, warmup, lr)
    impl = f"peft-{tuner['peft_type'].lower()}" if tuner else "peft"
    res = _train_result(impl, cfg, device, amp, batches, times, warmup, counts, r.tok.pad_token_id, peak_flops, loss)
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res["settings"] = {k: v for k, v in model.peft_config["default"].to_dict().items()
                       if k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "feedforward_modules")}
    for k in ("target_modules", "feedforward_modules"):
        if k in res["settings"]:
            res["settings"][k] = sorted(res["settings"][k] or [])
    res["settings"]["peft_type"] = str(getattr(res["settings"].get("peft_type"), "value", res["settings"].get("peft_type")))
    return res


def _tunelab_loftq_start(cfg: RunConfig) -> dict:
    """{linear name: (Q_T as a torchao NF4Tensor, A_T, B_T)} as tunelab's LoftQ run computes them."""
    import tunelab
    from tunelab.training.loop import Run, seed_all

    seed_all(cfg.train.seed)
    r = Run(cfg)
    model = tunelab.attach(r.model, cfg.method.name, **cfg.method.params())
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and getattr(mod.base_layer, "is_nf4", False):
            out[name] = (mod.base_layer.weight.data, mod.lora_A.detach().clone(), mod.lora_B.detach().clone())
    if not out:
        raise ValueError("loftq reference: tunelab's run quantized no linear to NF4 (set method.bits=4)")
    del model, r
    return out


def _nf4_base(model, targets) -> None:
    """Store the target linears' weights as torchao NF4 (block 64, double-quantized scales), as
    QLoRA does; PEFT's LoRA then wraps linears whose weight dequantizes on the fly."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if targets != "all-linear" and not any(name.endswith(t) for t in targets):
            continue
        w = mod.weight.data
        mod.weight = torch.nn.Parameter(to_nf4(w, 64, math.gcd(w.numel() // 64, 256)), requires_grad=False)


def trainer(cfg: RunConfig, steps: int, warmup: int, peak_flops: float) -> dict:
    """Full fine-tuning with transformers.Trainer on the loop's batches (sequential sampler over the
    loop's order, the same collator); step times from a callback."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg)
    batches = planned_batches(r, cfg, warmup + steps)
    feats = [r.task.encode(ex, r.tok, r.tcfg, cfg.data.max_length) for ex in r.train_ex]
    order = _loop_order(r, cfg, feats, warmup + steps)
    flat = [feats[i] for idx in order for i in idx]
    collate = Collator(r.tok.pad_token_id)

    def data_collator(rows):
        return {k: v for k, v in collate(rows).items() if k in MODEL_KEYS}

    model = load_plain(cfg, device)
    counts = matmul_counts(model)  # every parameter trains
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.train.batch_size, max_steps=warmup + steps,
            learning_rate=cfg.train.lr or 2e-5, weight_decay=cfg.train.weight_decay, lr_scheduler_type=cfg.train.schedule,
            warmup_steps=int(cfg.train.warmup * (warmup + steps)), max_grad_norm=cfg.train.max_grad_norm or 0.0,
            bf16=amp == torch.bfloat16, use_cpu=device.type == "cpu", logging_steps=10**6, save_strategy="no",
            report_to=[], train_sampling_strategy="sequential", dataloader_num_workers=0, seed=cfg.train.seed,
            disable_tqdm=True,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = Trainer(model=model, args=args, train_dataset=flat, data_collator=data_collator, callbacks=[Clock()])
        out = t.train()
        peak = peak_memory_mb(device)
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    res = _train_result("hf-trainer", cfg, device, amp, batches, times, warmup, counts, r.tok.pad_token_id,
                        peak_flops, out.training_loss)
    res["peak_memory_mb"] = peak
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res["optimizer"] = str(args.optim)
    return res


def _loop_order(r, cfg, feats, n):
    from tunelab.data.encoding import batches as batch_order

    lengths = [len(f["input_ids"]) for f in feats]
    out, epoch = [], 0
    while len(out) < n:
        out += batch_order(lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch,
                           group_by_length=cfg.data.group_by_length)
        epoch += 1
    return out[:n]


def pyreft_loop(cfg: RunConfig, steps: int, warmup: int, peak_flops: float, *, rank: int, first: int, last: int) -> dict:
    """LoReFT on every block output with pyreft, interventions at the first/last prompt positions."""
    import pyreft

    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg)
    batches = planned_batches(r, cfg, warmup + steps)
    model = load_plain(cfg, device)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    start = _tunelab_loreft_start(cfg)
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": rank,
             "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank, dtype=torch.float32)}
            for i in range(layers)]
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
    with torch.no_grad():
        for (base, w, b), iv in zip(start, reft.interventions.values(), strict=True):
            iv = iv[0] if isinstance(iv, tuple) else iv
            iv.rotate_layer.parametrizations.weight[0].base = base.clone()
            iv.learned_source.weight.copy_(w)
            iv.learned_source.bias.copy_(b)
    reft.set_device(str(device))
    for b in batches:  # right padding: the prompt is columns [0, prompt_len)
        n = b["prompt_mask"].sum(1).tolist()
        locs = [_sites(k, first, last) for k in n]
        b["_locations"] = [locs] * layers
    counts = matmul_counts(model)
    counts["adapters"] = sum(p.numel() for p in reft.parameters() if p.requires_grad)
    counts["grad"] = True  # the interventions train; gradients flow back through the frozen blocks
    params = [p for p in reft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr or default_lr("loreft"), weight_decay=cfg.train.weight_decay)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.schedule, int(cfg.train.warmup * total), total))
    reft.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        base = {k: b[k].to(device) for k in ("input_ids", "attention_mask")}
        with autocast(device, amp):
            _, out = reft(base, unit_locations={"sources->base": (None, b["_locations"])}, labels=b["labels"].to(device))
        out.loss.backward()
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        times.append(time.perf_counter() - t)
    loss = sum(losses) / len(losses)
    res = _train_result("pyreft", cfg, device, amp, batches, times, warmup, counts, r.tok.pad_token_id, peak_flops, loss)
    res["trainable_params"] = counts["adapters"]
    res["losses"] = losses
    return res


def _tunelab_loreft_start(cfg: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(B, W, b) per layer, as tunelab's bench run draws them: seed_all, Run, attach (the same calls)."""
    import tunelab
    from tunelab.training.loop import Run, seed_all

    seed_all(cfg.train.seed)
    r = Run(cfg)
    model = tunelab.attach(r.model, cfg.method.name, **cfg.method.params())
    out = []
    for blk in model.model.layers:
        iv = blk.reft.both
        out.append((iv.rotate.parametrizations.weight[0].base().detach(), iv.learned_source.weight.detach().clone(),
                    iv.learned_source.bias.detach().clone()))
    del model, r
    return out


def _sites(n: int, first: int, last: int) -> list[int]:
    """The first/last prompt positions by the paper's short-prompt rule (tunelab's default), as a list;
    pyreft's own rule (n//2 for both) is tunelab's ``short_prompt: pyreft``."""
    if n < first + last:
        first, last = min(first, n // 2), min(last, (n + 1) // 2)
    return list(range(first)) + list(range(n - last, n))


@torch.no_grad()
def score_plain(cfg: RunConfig, peak_flops: float, max_examples: int | None = None) -> dict:
    """Label-word scoring with full logits, file order, right padding, at eval.batch_size."""
    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg, "eval")
    examples = r.eval_ex[:max_examples] if max_examples else r.eval_ex
    labels = r.tcfg.labels
    words = r.tcfg.label_words or labels
    word_ids = [r.tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    model = load_plain(cfg, device).eval()
    counts = matmul_counts(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
    t = time.perf_counter()
    correct, tokens, sq, bs = 0, 0, 0, cfg.eval.batch_size
    for s in range(0, len(examples), bs):
        chunk = examples[s : s + bs]
        rows = [tokenize_prompt(r.tok, r.task.prompt(ex, r.tok, r.tcfg, labels)) for ex in chunk]
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), r.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(rows):
            ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device, amp):
            logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(rows), device=device), mask.sum(1) - 1].float().log_softmax(-1)
        pred = last[:, word_ids].argmax(-1).tolist()
        correct += sum(p == r.task.label_id(ex, labels) for p, ex in zip(pred, chunk, strict=True))
        tokens += sum(len(x) for x in rows)
        sq += sum(len(x) ** 2 for x in rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n = len(examples)
    return {"impl": "plain-forward", "kind": "eval", "task": cfg.task.name, "device": str(device),
            "precision": str(amp).replace("torch.", "") if amp else "float32", "batch_size": bs, "examples": n,
            "seconds": dt, "examples_per_s": n / dt, "peak_memory_mb": peak_memory_mb(device),
            "metrics": {"accuracy": correct / n}, "threads": torch.get_num_threads(),
            "model_flops": eval_flops(counts, tokens, n, sq), "matmul_peak_tflops": peak_flops / 1e12}


@torch.no_grad()
def generate_plain(cfg: RunConfig, peak_flops: float, max_examples: int | None = None, max_new_tokens: int = 32) -> dict:
    """``model.generate`` (greedy, KV cache) over batches in file order with left padding."""
    device = pick_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)
    r = prepare(cfg, "eval")
    examples = r.eval_ex[:max_examples] if max_examples else r.eval_ex
    prompts = [r.task.prompt(ex, r.tok, r.tcfg) for ex in examples]
    model = load_plain(cfg, device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
    t, cpu = time.perf_counter(), time.process_time()
    bs, new_tokens, outputs = cfg.eval.batch_size, 0, []
    for s in range(0, len(prompts), bs):
        rows = [tokenize_prompt(r.tok, p) for p in prompts[s : s + bs]]
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), r.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(rows):
            ids[i, width - len(x) :], mask[i, width - len(x) :] = torch.tensor(x), 1
        with autocast(device, amp):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=r.tok.pad_token_id, eos_token_id=r.tok.eos_token_id)
        new_tokens += int((out[:, width:] != r.tok.pad_token_id).sum())
        outputs += [r.tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]  # as tunelab's generate
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n = len(prompts)
    return {"impl": "hf-generate", "kind": "eval", "task": cfg.task.name, "device": str(device),
            "precision": str(amp).replace("torch.", "") if amp else "float32", "batch_size": bs, "examples": n,
            "seconds": dt, "examples_per_s": n / dt, "new_tokens": new_tokens, "outputs": outputs,
            "cpu_seconds": time.process_time() - cpu,
            "peak_memory_mb": peak_memory_mb(device), "threads": torch.get_num_threads()}
