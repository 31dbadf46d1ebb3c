"""Peak memory of LoRA, QLoRA, LoftQ and full fine-tuning on a randomly initialised ~1.1B Llama,
tunelab against PEFT on the same model, plus load time (not run in CI).

    python bench/memory_1b.py --out bench/results/memory_1b.json     # all, one subprocess each
    python bench/memory_1b.py --only tunelab:qlora                    # one measurement

The model is TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 heads / 4 KV heads, vocab
32000), random weights written once as bf16 safetensors to --model-dir (2.2 GB; no download). Every
measurement is a fresh process (so ru_maxrss is that run's own peak) that loads the model, attaches
the method and runs --steps AdamW steps on batch 1 x --seq random tokens; it reports the peak RSS
after loading and after the steps, the load(+attach) time and the step time. Runs go one at a time and
each waits for --need-gb free memory (``free``). Full fine-tuning (weights + grads + 2 AdamW states) runs
in --full-dtype on both sides (bf16 by default: ~9 GB; fp32 needs ~18 GB), else it is reported as not run.

Both sides load the tokenizer too (``tunelab.models.loading.load`` returns one; ~70 MB of the peak).
tunelab: ``tunelab.models.loading.load`` (+ the method's quantize_on_load for QLoRA / LoftQ, so the base is
quantized shard by shard) then ``tunelab.attach``. PEFT: ``from_pretrained`` then ``get_peft_model``;
QLoRA through transformers' bitsandbytes 4-bit (nf4, double quant; bitsandbytes has CPU kernels).
LoftQ with PEFT's ``init_lora_weights="loftq"`` (LoftQConfig(loftq_bits=4, loftq_iter=1)): PEFT's
own ``loftq_utils.loftq_init`` runs per linear (bitsandbytes ``Params4bit`` NF4 without double quant,
dequantize, full ``torch.linalg.svd`` of W - deq(Q), rank-r split), and the base keeps deq(Q) in the
load dtype (full precision, not 4-bit: that is PEFT's documented non-GPU LoftQ path). PEFT 0.21
hard-codes its compute device to "cuda" (or "xpu") in that function (``weight.to("cuda")`` fails on a
CPU-only torch), so the bench compiles PEFT's installed source of ``loftq_init`` with that one line
set to "cpu" (``peft_loftq_on_cpu``; it refuses if the line is not found) and installs it where the
LoRA layer calls it. Everything else is PEFT's and bitsandbytes' code. Both PEFT 4-bit rows need
bitsandbytes (``pip install bitsandbytes``; not a tunelab dependency).

Smaller shapes for smoke runs: ``--layers 2 --hidden 256`` (the MLP width follows hidden x 2.75 unless
``--mlp`` says; vocab and heads stay). A --model-dir holding another shape is refused, not reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
RUNS = ["tunelab:lora", "peft:lora", "tunelab:qlora", "peft:qlora", "tunelab:loftq", "peft:loftq",
        "tunelab:full", "peft:full"]
LORA = dict(r=16, alpha=32)


def free_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shape(layers: int, hidden: int, mlp: int | None) -> dict:
    """SHAPE with another depth / width (smoke runs); the defaults give SHAPE itself."""
    return dict(SHAPE, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=mlp or round(hidden * 2.75))


def write_model(model_dir: Path, dims: dict = SHAPE) -> None:
    """Random bf16 weights of shape ``dims``, written tensor by tensor (no fp32 copy of the model)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (model_dir / "model.safetensors").exists():
        have = json.loads((model_dir / "config.json").read_text())
        keys = ("num_hidden_layers", "hidden_size", "intermediate_size")
        if any(have.get(k) != dims[k] for k in keys):
            raise SystemExit(f"{model_dir} holds a model of another shape ({[have.get(k) for k in keys]}, asked "
                             f"{[dims[k] for k in keys]}); pass another --model-dir")
        return
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**dims, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, s in shapes.items():
        t = torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
        state[k] = t.to(torch.bfloat16)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(model_dir))
    vocab = {f"t{i}": i for i in range(SHAPE["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2",
                            unk_token="t3").save_pretrained(str(model_dir))


def _tunelab(method: str, path: str, dtype: str):
    import tunelab
    from tunelab.api import method_config  # tunelab's API loads lazily: import it by name
    from tunelab.methods.base import METHODS
    from tunelab.models.loading import load

    params = {"full": {}, "lora": LORA, "qlora": LORA, "loftq": dict(LORA, iters=1)}[method]
    hook = getattr(METHODS.get(method), "quantize_on_load", None)
    plan = hook(method_config(method, params)) if hook else None
    model, _ = load(path, dtype=dtype, quantize=plan)
    return tunelab.attach(model, method, **params)


def peft_loftq_on_cpu() -> None:
    """Make PEFT's LoRA layers call PEFT's own ``loftq_init`` with its compute device set to the CPU.

    peft.utils.loftq_utils.loftq_init moves the weight to a hard-coded "cuda" ("xpu" where present);
    this compiles the installed function's source with only that assignment replaced, in that module's
    namespace, and installs it where peft.tuners.lora.layer looks it up."""
    import inspect
    import textwrap

    from peft.tuners.lora import layer
    from peft.utils import loftq_utils

    src = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    if src.count(line) != 1:
        raise RuntimeError(f"peft {__import__('peft').__version__}: loftq_init no longer has {line!r}; "
                           "update peft_loftq_on_cpu")
    space = dict(vars(loftq_utils))
    exec(compile(src.replace(line, 'compute_device = "cpu"'), inspect.getsourcefile(loftq_utils), "exec"), space)
    layer.loftq_init = space["loftq_init"]


def _peft(method: str, path: str, dtype: str):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch_dtype = getattr(torch, dtype)
    AutoTokenizer.from_pretrained(path)  # a training script loads it, as tunelab.models.loading.load does (~70 MB)
    lcfg = dict(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if method == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, quantization_config=q)
        return peft.get_peft_model(model, peft.LoraConfig(**lcfg))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if method == "loftq":
        lcfg.update(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=1))
        if not torch.cuda.is_available():
            peft_loftq_on_cpu()
    return peft.get_peft_model(model, peft.LoraConfig(**lcfg))


def measure(run: str, path: str, dtype: str, steps: int, seq: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    impl, method = run.split(":")
    t0 = time.perf_counter()
    model = (_tunelab if impl == "tunelab" else _peft)(method, path, dtype)
    load_s, load_peak = time.perf_counter() - t0, peak_mb()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"run": run, "dtype": dtype, "load_s": round(load_s, 1), "load_peak_mb": round(load_peak),
            "peak_mb": round(peak_mb()), "step_s": round(min(times), 1), "loss": float(loss),
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=os.environ.get("TUNELAB_BENCH_1B", "/tmp/tunelab-llama-1b"))
    ap.add_argument("--only", default=",".join(RUNS), help="comma list of impl:method")
    ap.add_argument("--dtype", default="float32", help="compute / base dtype of the non-quantized weights")
    ap.add_argument("--full-dtype", default="bfloat16", help="dtype of both full fine-tuning rows")
    ap.add_argument("--full-need-gb", type=float, default=None,
                    help="free memory the full rows wait for (default 20 fp32 / 11 bf16: the 1.1B model)")
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="smoke runs: fewer layers")
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden_size"], help="smoke runs: a narrower model")
    ap.add_argument("--mlp", type=int, default=None, help="MLP width (default: hidden x 2.75, 5632 at 2048)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--need-gb", type=float, default=8.0, help="free memory required before each run")
    ap.add_argument("--max-wait", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = measure(a.child, a.model_dir, a.dtype, a.steps, a.seq, a.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return
    write_model(Path(a.model_dir), shape(a.layers, a.hidden, a.mlp))
    results = []
    for run in a.only.split(","):
        dtype = a.dtype
        need = a.need_gb
        if run.endswith(":full"):  # 1.1B x (weights + grads + 2 AdamW states) x 4 bytes ~ 18 GB in fp32
            dtype = a.full_dtype  # the same on both sides, whatever memory is free
            need = a.full_need_gb or (20 if dtype == "float32" else 11)
        waited = time.time()
        while free_gb() < need and time.time() - waited < a.max_wait:
            time.sleep(10)
        if free_gb() < need:
            res = {"run": run, "dtype": dtype, "not_run": f"only {free_gb():.1f} GB free, {need} GB needed"}
        else:
            env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
            cmd = [sys.executable, __file__, "--child", run, "--model-dir", a.model_dir, "--dtype", dtype,
                   "--steps", str(a.steps), "--seq", str(a.seq), "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"run": run, "dtype": dtype,
                                                          "failed": out.stderr.strip().splitlines()[-1:]}
        res["free_gb_before"] = round(free_gb(), 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        if a.out:  # after every run, so a cut-short sweep keeps what it measured
            Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
