"""Load a finished run, fold its method into the base, and name the base the way a user would.

A run's model was loaded from a resolved path (for ``smollm2-135m`` a converted copy in the user's
cache), so ``model.config._name_or_path`` is machine-local. Exports record ``base_identity`` instead:
the Hugging Face hub id (the embedded alias's source repo, or the id the user gave) and the name as
the user wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TORCH_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
CANNOT_MERGE_HINT = (
    "export it unmerged instead: `tunelab export RUN OUT --format peft` (LoRA family and prompt tuning), "
    "or run it as is with `tunelab chat` / `tunelab serve`"
)


def base_identity(name: str) -> dict:
    """``{"name": what the user wrote, "hub_id": the hub repo or None}`` for a model name."""
    from tunelab.models.loading import EMBEDDED

    emb = EMBEDDED.get(name)
    if emb is not None:
        return {"name": name, "hub_id": emb.hub_id or None}
    if Path(name).exists():  # a local directory: the user's own name for it is all we know
        return {"name": name, "hub_id": None}
    return {"name": name, "hub_id": name if name.count("/") == 1 else None}


def recorded_base(name: str) -> str:
    """The one string an export writes as its base: the hub id when there is one, else the user's name."""
    ident = base_identity(name)
    return ident["hub_id"] or ident["name"]


def native_dtype(name: str) -> str:
    """The base checkpoint's own dtype ("bf16" | "fp16" | "fp32"), read from its config.json."""
    from tunelab.models.loading import EMBEDDED, resolve

    emb = EMBEDDED.get(name)
    if emb is not None:
        return _TORCH_NAMES.get(emb.dtype, "fp32")
    path = Path(resolve(name)) / "config.json"
    if path.exists():
        raw = json.loads(path.read_text())
        value = raw.get("dtype") or raw.get("torch_dtype")
    else:  # a hub id: the (cached) config says
        from transformers import AutoConfig

        value = str(getattr(AutoConfig.from_pretrained(name), "dtype", None) or "").replace("torch.", "")
    return _TORCH_NAMES.get(str(value), "fp32")


def load_trained(run_dir: str | Path):
    """``(model with the run's method, tokenizer, run config)`` for a finished run directory."""
    import tunelab
    from tunelab.config import load_config
    from tunelab.training.loop import Run

    run_dir = Path(run_dir)
    if not (run_dir / "method" / "method.json").exists():
        raise FileNotFoundError(f"{run_dir}: no trained method here (expected {run_dir / 'method' / 'method.json'})")
    cfg = load_config(run_dir / "config.yaml", []).model_copy(update={"output_dir": str(run_dir)})
    r = Run(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": None})}))
    return tunelab.load(r.model, run_dir / "method"), r.tok, cfg


def merged(model, method_name: str):
    """``tunelab.merge`` with a refusal that says what to use instead."""
    import tunelab

    try:
        return tunelab.merge(model)
    except ValueError as e:
        raise ValueError(f"{e}; {CANNOT_MERGE_HINT}") from None


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None, command: str | None = None) -> dict:
    """Write the merged model (+ tokenizer + README.md) of ``run_dir`` to ``out_dir`` in ``dtype``
    (default: the base checkpoint's dtype). Returns ``{"dir", "dtype", "bytes"}``."""
    from tunelab.export.card import write_card
    from tunelab.runtime.atomic_files import atomic_dir

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    model, tok, cfg = load_trained(run_dir)
    method = model.tunelab_method["name"]
    dtype = dtype or native_dtype(cfg.model.name)
    model = merged(model, method).to(DTYPES[dtype])
    model.config._name_or_path = recorded_base(cfg.model.name)
    if hasattr(model.config, "_model_name_or_path"):  # set by transformers' GGUF loader to the GGUF's title
        model.config._model_name_or_path = recorded_base(cfg.model.name)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_card(tmp, run_dir, cfg, kind="merged", extra={"dtype": dtype}, command=command)
    size = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    return {"dir": Path(out_dir), "dtype": dtype, "bytes": size}
