"""tunelab against the reference implementations, side by side (not run in CI).

    python bench/run.py                          # every configuration, CPU (CUDA when present)
    python bench/run.py --configs lora,score --repeats 3 --threads 2 --out bench/results.json
    python bench/run.py --configs lora,full --ablate  # also tunelab without each lever

Each measurement runs in a fresh process (one configuration, one implementation), so peak memory
is that run's own. Configurations (embedded SmolLM2-135M, SST-2 at batch 8 x max_length 128 unless
noted, the same rows, batches, precision and hyperparameters on both sides):

    full           tunelab full fine-tuning        vs the Hugging Face Trainer
    lora           tunelab LoRA r8 all-linear      vs PEFT LoRA, same settings, plain PyTorch loop
    vera, ia3      PEFT's VeRA / IA3 through tunelab's bridge (its default targets, lr 1e-3 / 5e-3)
                                                   vs the same PEFT tuner by get_peft_model, plain PyTorch loop
    lora-defaults  tunelab LoRA, all its defaults  vs PEFT LoraConfig() defaults, fp32, shuffled batches
    lora-ckpt      lora with gradient checkpointing on both sides (its cost: compare with lora)
    qlora          tunelab QLoRA (NF4 base)        vs PEFT LoRA over a torchao NF4 base
    qlora-lowmem   qlora without held bf16 copies of the base (train.shadow_mb=0: QLoRA's memory at scale)
    loftq          tunelab LoftQ (NF4, 1 iteration) vs PEFT LoRA over the same LoftQ-initialised NF4 base
    loreft         tunelab LoReFT r8 f7+l7         vs pyreft (PEFT LoRA if pyreft is not importable)
    score          SST-2 dev label-word scoring    vs a full-logits forward in file order
    generate       Alpaca prompts, 32 new tokens   vs model.generate in file order (bf16 autocast where the
                   CPU has bf16, as the other rows); generate-fp32 the same in fp32. Both sides return
                   their texts: the table counts the prompts whose greedy outputs differ.
    choice         OpenBookQA test choice scoring  vs one full-logits row per (prompt, choice) in file order
    ner-head       CoNLL-2003 dev, MiniLM token head  vs a plain token-classification forward in file order
    qa-head        SQuAD dev articles 40:48, MiniLM span head  vs plain forwards + the n-best loop per window
    score-lora     score with a LoRA attached (frozen base weights: what the demo and most runs evaluate)
    lora-text      lora on SAMSum dialogues as plain text (task text, loss on every token, rows <= 256 tokens)
    text-ppl       perplexity of 200 SAMSum validation dialogues (task text, LoRA attached); tunelab only (--before)

Every evaluation row runs once more, untimed, under torch's FlopCounterMode: its MFU is the matmul and
attention FLOPs that side executed (padding included, a shared prefix once) over its time and the
measured peak, "Y% (ran X TFLOP)": how close each side's own work runs to the hardware. Only FLOPs a
side ran count, so MFU cannot pass 100% (the plain forward's work over a faster side's time could: that
is a speed-up, not a utilisation).

--before DIR adds a side "tunelab-before": the tunelab half run from DIR/src (e.g. a `git worktree` of
main), for before/after figures in one interleaved run.

The machine is shared in some setups: before each measurement the script waits (up to
--max-wait s) until other processes use less than --quiet CPUs, and it records the CPU that others
used during the measurement (``foreign_cpu``); a measurement disturbed by more than --quiet CPUs is
retried up to --retries times and flagged if it never ran clean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SST2 = [f"data.train={DATA / 'sst2/train.tsv'}", f"data.eval={DATA / 'sst2/dev.tsv'}"]
BASE = ["model.name=smollm2-135m", "task.name=sentiment", *SST2, "data.max_length=128",
        "train.batch_size=8", "train.seed=0", "eval.batch_size=32"]
LORA = ["method.name=lora", "method.r=8", "method.alpha=16", "train.lr=1e-4"]
PEFT_LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}
ALPACA = [f"data.eval={DATA / 'alpaca_demo/alpaca_en_demo.json'}#rows=900:999", "task.name=generation",
          "eval.batch_size=8", "eval.max_new_tokens=32"]
OBQA = [f"data.eval={DATA / 'llm_adapters/openbookqa/test.json'}", "task.name=reasoning", "eval.batch_size=16"]
NER = ["model.name=minilm-l6", "task.name=ner", "task.formulation=head", f"data.eval={DATA / 'conll2003/eng.testa'}",
       "eval.batch_size=64"]
QA = ["model.name=minilm-l6", "task.name=qa", "task.formulation=head", "data.max_length=384", "eval.batch_size=32",
      f"data.eval={DATA / 'squad_v1.1/dev-v1.1.json'}#articles=40:48"]
EVAL = ["method.name=full", "eval.loss=false"]
TEXT = ["task.name=text", f"data.train={DATA / 'samsum/train.json'}", "task.fields={text: dialogue}", "data.max_length=256",
        "data.eval=null"]

CONFIGS = {
    "full": {"tunelab": ["method.name=full", "train.lr=2e-5"], "ref": ("trainer", {})},
    "lora": {"tunelab": LORA, "ref": ("peft", {"lora": PEFT_LORA})},
    # PEFT's own tuners through tunelab's bridge (tunelab.methods.peft_bridge) vs the same tuner with
    # get_peft_model in a plain loop; the bridge's default targets for LLaMA (q_proj, v_proj; IA3 also
    # down_proj as its feed-forward module) spelled out for PEFT
    "vera": {"tunelab": ["method.name=vera", "train.lr=1e-3"],
             "ref": ("peft", {"tuner": {"peft_type": "VERA", "target_modules": ["q_proj", "v_proj"]}})},
    "ia3": {"tunelab": ["method.name=ia3", "train.lr=5e-3"],
            "ref": ("peft", {"tuner": {"peft_type": "IA3", "target_modules": ["q_proj", "v_proj", "down_proj"],
                                       "feedforward_modules": ["down_proj"]}})},
    "lora-defaults": {"tunelab": ["method.name=lora"], "ref": ("peft", {"lora": {}, "defaults": True})},
    "lora-ckpt": {"tunelab": [*LORA, "train.gradient_checkpointing=true"],
                  "ref": ("peft", {"lora": PEFT_LORA, "checkpointing": True})},
    "qlora": {"tunelab": ["method.name=qlora", "method.r=8", "method.alpha=16", "train.lr=1e-4"],
              "ref": ("peft", {"lora": PEFT_LORA, "quantize": True})},
    "qlora-lowmem": {"tunelab": ["method.name=qlora", "method.r=8", "method.alpha=16", "train.lr=1e-4",
                                 "train.shadow_mb=0"], "ref": ("peft", {"lora": PEFT_LORA, "quantize": True})},
    "loftq": {"tunelab": ["method.name=loftq", "method.r=8", "method.alpha=16", "method.iters=1", "train.lr=1e-4"],
              "ref": ("peft", {"lora": PEFT_LORA, "loftq": True})},
    "loreft": {"tunelab": ["method.name=loreft", "method.rank=8", "method.positions=f7+l7", "train.lr=2e-3"],
               "ref": ("pyreft", {"rank": 8, "first": 7, "last": 7})},
    "score": {"tunelab": ["method.name=full", "eval.loss=false"], "ref": ("score", {}), "eval": True},
    "generate": {"tunelab": ["method.name=full", *ALPACA], "ref": ("generate", {}), "eval": True, "max_examples": 32},
    "generate-fp32": {"tunelab": ["method.name=full", *ALPACA, "train.precision=fp32"], "ref": ("generate", {}),
                      "eval": True, "max_examples": 32},
    # a freshly attached LoRA (B = 0: the base model's outputs) has frozen weights, the usual case after
    # PEFT training; the reference decodes the plain base model, which is less work
    "generate-lora": {"tunelab": ["method.name=lora", *ALPACA], "ref": ("generate", {}), "eval": True,
                      "max_examples": 32},
    # sizes by data.max_eval (so --set data.max_eval=N shrinks both sides alike)
    "choice": {"tunelab": [*EVAL, *OBQA, "data.max_eval=200"], "ref": ("choice", {}), "eval": True},
    "ner-head": {"tunelab": [*EVAL, *NER, "data.max_eval=1000"], "ref": ("ner", {}), "eval": True},
    "qa-head": {"tunelab": [*EVAL, *QA, "data.max_eval=500"], "ref": ("qa", {}), "eval": True},
    "score-lora": {"tunelab": ["method.name=lora", "eval.loss=false"], "ref": ("score", {}), "eval": True},
    # loss on every token (continued pretraining): the vocabulary loss dominates memory (tunelab.models.chunked_loss)
    "lora-text": {"tunelab": [*LORA, *TEXT], "ref": ("peft", {"lora": PEFT_LORA})},
    # perplexity and token accuracy of held-out text (the text/chat families' metric); no reference
    # implementation: compare with --before
    "text-ppl": {"tunelab": ["method.name=lora", "eval.loss=false", "task.name=text", "task.fields={text: dialogue}",
                             f"data.eval={DATA / 'samsum/val.json'}", "data.max_eval=200", "eval.batch_size=8"],
                 "ref": None, "eval": True},
}


# Levers of the tunelab loop that an ablation can turn off (bench/run.py --ablate).
def _no_loss_positions():
    from tunelab.models import lm_loss

    lm_loss.supports_loss_inputs = lambda *a, **k: False


def _no_eager():
    from tunelab.training import cpu_attention

    cpu_attention.EAGER_MAX_BYTES = 0


def _no_fused():
    import torch

    from tunelab.training import optimizer

    optimizer.adamw = lambda params, **kw: torch.optim.AdamW(params, foreach=True, **kw)


def _no_prefix():
    from tunelab.models import lm_loss

    lm_loss.supports_shared_prefix = lambda *a, **k: False


def _no_chunked():
    from tunelab.models import lm_loss

    lm_loss.supports_chunked_loss = lambda *a, **k: False


def _no_held():
    from tunelab.runtime import precision

    precision.AUTO_MB = 0  # the automatic rule then holds nothing


LEVERS = {"loss-positions": _no_loss_positions, "shared-prefix": _no_prefix, "eager-attention": _no_eager,
          "fused-adamw": _no_fused, "held-weights": _no_held,
          "chunked-loss": _no_chunked}


# ---------------------------------------------------------------- the child: one measurement
def executed_flops(fn) -> float:
    """FLOPs of the matmuls and attention that ``fn()`` runs (torch's FlopCounterMode): the work done,
    padding included and a shared prefix once, unlike the model FLOPs of the plain computation."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)  # not in torch's table
    with FlopCounterMode(display=False, custom_mapping={cpu_sdpa: sdpa} if cpu_sdpa else None) as counter:
        fn()
    return float(counter.get_total_flops())


def mfu_cell(rs: list[dict], config_rows: dict, side: str) -> str:
    """The MFU column: FLOPs over time over the measured matmul peak (2048^3, compute dtype), counting
    only FLOPs a side ran, so it cannot pass 100% unless a kernel beats that matmul. Train rows: the
    model FLOPs the step needs (tunelab.training.sizing: padding and unread logits excluded, so no more
    than any implementation runs). Evaluation rows: the FLOPs the side executed
    (FlopCounterMode); without that count, the plain forward's work is an MFU only for the plain
    forward itself ("-" for a side that may skip work, e.g. a shared prefix computed once)."""
    if all(isinstance(r.get("mfu"), dict) for r in rs):
        return f"{100 * statistics.median(r['mfu']['median'] for r in rs):.1f}%"
    if all("executed_mfu" in r for r in rs):  # evaluation rows: the work each side actually ran
        done = statistics.median(r["executed_flops"] for r in rs) / 1e12
        return f"{100 * statistics.median(r['executed_mfu'] for r in rs):.1f}% (ran {done:,.2f} TFLOP)"
    flops = next((x["model_flops"] for x in config_rows.get("reference", []) if "model_flops" in x), None)
    if side == "reference" and flops and all("seconds" in r for r in rs):
        return f"{100 * statistics.median(flops / r['seconds'] / (r['matmul_peak_tflops'] * 1e12) for r in rs):.1f}%"
    return "-"


def child(spec: dict) -> dict:
    """One measurement; an evaluation row then runs once more, untimed, to count the FLOPs it executes."""
    res = _child(spec)
    if CONFIGS[spec["config"]].get("eval") and "seconds" in res:
        flops = executed_flops(lambda: _child(spec))
        peak_tflops = res.setdefault("matmul_peak_tflops", spec["peak_flops"] / 1e12)
        res |= {"executed_flops": flops, "executed_mfu": flops / res["seconds"] / (peak_tflops * 1e12)}
    return res


def _child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    for extra in spec.get("pythonpath", []):
        if extra not in sys.path:
            sys.path.append(extra)
    from tunelab.config import load_config

    conf = CONFIGS[spec["config"]]
    overrides = BASE + conf["tunelab"] + [f"train.threads={spec['threads']}", f"train.device={spec['device']}",
                                          *spec.get("extra", [])]
    cfg = load_config(None, overrides)
    steps, peak = spec["steps"], spec["peak_flops"]
    warmup = steps if spec["warmup"] is None else spec["warmup"]
    if spec["impl"] == "tunelab":
        return _tunelab(spec, cfg, conf, steps, warmup, peak)
    if not conf.get("eval"):
        from tunelab.training.sizing import bench_config

        cfg = bench_config(cfg, steps, warmup, "unused")  # the same rows as the tunelab half
    import reference

    kind, kw = conf["ref"]
    if kind == "trainer":
        return reference.trainer(cfg, steps, warmup, peak)
    if kind == "peft":
        res = reference.peft_loop(cfg, steps, warmup, peak, **kw)
        if kw.get("quantize"):
            res["impl"] = "peft+torchao-nf4"
        if kw.get("loftq"):
            res["impl"] = "peft+loftq-nf4"
        return res
    if kind == "pyreft":
        try:
            import pyreft  # noqa: F401
        except ImportError:
            res = reference.peft_loop(cfg, steps, warmup, peak, lora=PEFT_LORA)
            res["impl"] = "peft-lora (pyreft not installed)"
            return res
        return reference.pyreft_loop(cfg, steps, warmup, peak, **kw)
    if kind == "score":
        return reference.score_plain(cfg, peak, conf.get("max_examples"))
    if kind in ("choice", "ner", "qa"):  # the evaluation rows with a plain Hugging Face reference
        import reference_eval

        return getattr(reference_eval, f"{kind}_plain")(cfg, conf.get("max_examples"))
    return reference.generate_plain(cfg, peak, conf.get("max_examples"), cfg.eval.max_new_tokens)


def _tunelab(spec, cfg, conf, steps, warmup, peak) -> dict:
    import torch

    from tunelab.training import sizing

    for lever in spec.get("disable", []):  # ablation: the loop without one of its levers
        LEVERS[lever]()
    if not conf.get("eval"):
        return sizing.bench_train(cfg, steps=steps, warmup=warmup, peak_flops=peak)
    if conf["ref"] is None or conf["ref"][0] in ("score", "choice", "ner", "qa"):
        return sizing.bench_eval(cfg, max_examples=conf.get("max_examples"), peak_flops=peak)
    # generation: tunelab.evaluation.scoring.generate alone (the task's evaluate also scores perplexity)
    import tunelab
    from tunelab.evaluation.scoring import generate
    from tunelab.runtime.precision import autocast
    from tunelab.training.loop import Run

    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": None, "max_eval": conf.get("max_examples")})})
    r = Run(cfg)
    tunelab.attach(r.model, cfg.method.name)
    prompts = [r.task.prompt(ex, r.tok, r.tcfg) for ex in r.eval_ex]
    t, cpu = time.perf_counter(), time.process_time()
    with autocast(r.device, r.amp):
        outputs = generate(r.model, r.tok, prompts, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"impl": "tunelab", "kind": "eval", "task": cfg.task.name, "device": str(r.device),
            "precision": str(r.amp).replace("torch.", "") if r.amp else "float32", "batch_size": cfg.eval.batch_size,
            "examples": len(prompts), "seconds": dt, "examples_per_s": len(prompts) / dt,
            "cpu_seconds": time.process_time() - cpu,
            "peak_memory_mb": sizing.peak_memory_mb(r.device), "threads": torch.get_num_threads(), "outputs": outputs}


# ---------------------------------------------------------------- the parent: schedule and report
def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (from /proc/stat)."""
    try:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_busy(seconds: float = 3.0) -> float:
    """CPUs kept busy by other processes, sampled over ``seconds`` (we run nothing meanwhile)."""
    a = _busy_seconds()
    time.sleep(seconds)
    return (_busy_seconds() - a) / seconds


def wait_quiet(quiet: float, max_wait: float) -> float:
    t0, busy = time.time(), others_busy()
    while busy > quiet and time.time() - t0 < max_wait:
        print(f"  waiting: other processes use {busy:.2f} CPUs (> {quiet})", flush=True)
        time.sleep(20)
        busy = others_busy()
    return busy


def measure(spec: dict, quiet: float, max_wait: float, retries: int) -> dict:
    res: dict = {}
    for attempt in range(retries + 1):
        before = wait_quiet(quiet, max_wait)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, t0 = _busy_seconds(), time.time()
        env = None
        if spec.get("src"):  # the tunelab half from another checkout (--before)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([spec["src"], os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              env=env)
        wall = time.time() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        foreign = max(0.0, (_busy_seconds() - busy0 - mine) / wall)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            res = {"error": (proc.stderr or proc.stdout)[-3000:]}
            print(f"  {spec['config']}/{spec['impl']} failed:\n{res['error'][-1500:]}", flush=True)
            return res | {"config": spec["config"], "side": spec["side"]}
        res = json.loads(line[len("RESULT "):])
        res.update(config=spec["config"], side=spec["side"], others_before=before, foreign_cpu=foreign,
                   wall_s=wall, attempt=attempt, disturbed=foreign > quiet)
        if not res["disturbed"]:
            break
        print(f"  disturbed: others used {foreign:.2f} CPUs during the run; retrying", flush=True)
    return res


def speed(res: dict) -> float:
    return res["tokens_per_s"]["median"] if res["kind"] == "train" else res["examples_per_s"]


def differing(a: list[str], b: list[str]) -> int:
    """Prompts whose outputs differ (generation rows: tunelab's texts against the reference's)."""
    return sum(x != y for x, y in zip(a, b, strict=True))


def table(results: list[dict]) -> str:
    """Markdown: per configuration and side, median and min..max over repeats, and the ratio."""
    rows = ["| config | implementation | precision | speed (median) | spread over repeats | peak memory MB | MFU | mean loss / acc | tunelab / ref |",
            "|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in results:
        if "error" not in r:
            by.setdefault(r["config"], {}).setdefault(r["side"], []).append(r)
    for name in CONFIGS:
        if name not in by:
            continue
        med = {}
        for side in sorted(by[name], key=lambda s: (s == "reference", s)):
            rs = by[name][side]
            if not rs:
                continue
            sp = [speed(r) for r in rs]
            med[side] = statistics.median(sp)
            unit = "tok/s" if rs[0]["kind"] == "train" else "ex/s"
            mem = statistics.median(r["peak_memory_mb"] for r in rs)
            mfu_s = mfu_cell(rs, by[name], side)
            q = rs[0].get("mean_loss")
            if side != "reference" and "outputs" in rs[0] and by[name].get("reference") and "outputs" in by[name]["reference"][0]:
                q = f"{differing(rs[0]['outputs'], by[name]['reference'][0]['outputs'])}/{len(rs[0]['outputs'])} differ"
            q = f"{q:.3f}" if isinstance(q, float) else (f"{rs[0]['metrics'].get('accuracy', float('nan')):.3f}"
                                                         if "accuracy" in rs[0].get("metrics", {}) else "-")
            flag = " (disturbed)" if any(r.get("disturbed") for r in rs) else ""
            ratio = f"**{med['tunelab'] / med['reference']:.2f}x**" if side == "reference" and "tunelab" in med else ""
            if side == "tunelab-before" and "tunelab" in med:
                ratio = f"{med['tunelab'] / med[side]:.2f}x (tunelab / before)"
            impl = rs[0]["impl"] if side in ("tunelab", "reference") else side
            rows.append(f"| {name} | {impl} | {rs[0]['precision']} | {med[side]:,.1f} {unit} | "
                        f"{min(sp):,.1f} .. {max(sp):,.1f} (n={len(sp)}){flag} | {mem:,.0f} | {mfu_s} | {q} | {ratio} |")
    return "\n".join(rows)


def machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    import peft
    import transformers

    info.update(transformers=transformers.__version__, peft=peft.__version__)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement; the data is one epoch of them")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: one epoch, so every shape is seen)")
    ap.add_argument("--repeats", type=int, default=3, help="processes per configuration and side")
    ap.add_argument("--quiet", type=float, default=0.3, help="CPUs other processes may use during a measurement")
    ap.add_argument("--max-wait", type=float, default=600)
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--pythonpath", action="append", default=[], help="extra import path for the children (e.g. pyreft)")
    ap.add_argument("--ablate", action="store_true", help="also run tunelab without each of its levers (and all)")
    ap.add_argument("--levers", default=",".join(LEVERS), help="the levers --ablate turns off, one at a time")
    ap.add_argument("--set", action="append", default=[], dest="extra", help="config override for both sides (key=value)")
    ap.add_argument("--skip-reference", action="store_true", help="tunelab sides only (a reference measured in another run)")
    ap.add_argument("--before", help="a checkout (e.g. a git worktree of main) whose src/ runs a 'tunelab-before' side")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return

    import torch

    from tunelab.training.sizing import matmul_peak

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(a.threads)
    from tunelab.runtime.precision import autocast_dtype

    dtype = autocast_dtype("auto", torch.device(device)) or torch.float32
    peak = matmul_peak(device, dtype, seconds=2.0)
    peak32 = matmul_peak(device, torch.float32, seconds=2.0)
    print(f"matmul peak: {peak / 1e12:.2f} TFLOP/s in {dtype}, {peak32 / 1e12:.2f} in float32 ({a.threads} threads)")
    results: list[dict] = []
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    for rep in range(a.repeats):
        for name in names:
            ablate = [lv.strip() for lv in a.levers.split(",")] if a.ablate else []
            sides = [("tunelab", [])] + [(f"tunelab without {lv}", [lv]) for lv in ablate]
            if len(ablate) > 1:
                sides.append(("tunelab without any", ablate))
            if a.before:
                sides.append(("tunelab-before", []))
            no_ref = a.skip_reference or CONFIGS[name]["ref"] is None
            for side, off in [*sides, *([] if no_ref else [("reference", [])])]:
                spec = {"config": name, "impl": "reference" if side == "reference" else "tunelab", "side": side,
                        "disable": off, "threads": a.threads, "device": device, "steps": a.steps, "warmup": a.warmup,
                        "peak_flops": peak, "pythonpath": a.pythonpath, "extra": a.extra}
                if side == "tunelab-before":
                    spec["src"] = str(Path(a.before).resolve() / "src")
                print(f"[{rep + 1}/{a.repeats}] {name} / {side}", flush=True)
                res = measure(spec, a.quiet, a.max_wait, a.retries)
                if "error" not in res:
                    print(f"  {res['impl']}: {speed(res):,.1f} {'tok/s' if res['kind'] == 'train' else 'ex/s'}, "
                          f"peak {res['peak_memory_mb']:,.0f} MB, others {res['foreign_cpu']:.2f} CPUs", flush=True)
                results.append(res)
                Path(a.out).write_text(json.dumps({"machine": machine(device), "threads": a.threads, "device": device,
                                                   "matmul_peak_tflops": {str(dtype): peak / 1e12, "float32": peak32 / 1e12},
                                                   "results": results}, indent=1))
    print(table(results))
    print(f"results written to {a.out}")


if __name__ == "__main__":
    main()
