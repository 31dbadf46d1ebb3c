"""Load a finished run, fold its method into the base, and save it under the base's own name
(``tunelab.models.loading.recorded_base``: the hub id, not the machine-local path it was loaded from)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.models.loading import native_dtype, recorded_base
from tunelab.training.run_directory import load_trained  # merge, export and serve load a run one way

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CANNOT_MERGE_HINT = (
    "export it unmerged instead: `tunelab export RUN OUT --format peft` (LoRA family, prompt tuning, PEFT-bridged tuners), "
    "or run it as is with `tunelab chat` / `tunelab serve`"
)


def merged(model, method_name: str):
    """``tunelab.merge`` with a refusal that says what to use instead."""
    import tunelab

    try:
        return tunelab.merge(model)
    except ValueError as e:
        raise ValueError(f"{e}; {CANNOT_MERGE_HINT}") from None


def check_out_dir(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, what: str = "merge") -> None:
    """Before any work: ``out_dir`` is neither the run directory nor inside it, and (without
    ``overwrite``) new or empty, so writing there never deletes a file tunelab did not write."""
    from tunelab.runtime.atomic_files import check_output_dir

    check_output_dir(out_dir, overwrite=overwrite, protect=(run_dir,) if Path(run_dir).is_dir() else (), what=what)


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None, command: str | None = None,
              checkpoint: str = "final", *, overwrite: bool = False) -> dict:
    """Write the merged model (+ tokenizer + README.md) of ``run_dir`` to ``out_dir`` in ``dtype``
    (default: the base checkpoint's dtype); ``checkpoint`` "final" or "best" (``load_trained``).
    Returns ``{"dir", "dtype", "bytes"}``.

    ``out_dir`` must be new or empty (with ``overwrite``: files of the same names are replaced, others
    kept); it may not be the run directory or a folder inside it. Files are written beside it first
    and moved in only when complete."""
    from tunelab.export.card import write_card
    from tunelab.runtime.atomic_files import files_into

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    check_out_dir(run_dir, out_dir, overwrite, "merge")
    model, tok, cfg = load_trained(run_dir, checkpoint=checkpoint)
    method = model.tunelab_method["name"]
    dtype = dtype or native_dtype(cfg.model.name)
    model = merged(model, method).to(DTYPES[dtype])
    model.config._name_or_path = recorded_base(cfg.model.name)
    if hasattr(model.config, "_model_name_or_path"):  # set by transformers' GGUF loader to the GGUF's title
        model.config._model_name_or_path = recorded_base(cfg.model.name)
    with files_into(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_card(tmp, run_dir, cfg, kind="merged", extra={"dtype": dtype}, command=command)
        written = [f.name for f in tmp.glob("*.safetensors")]
    size = sum((Path(out_dir) / f).stat().st_size for f in written)
    return {"dir": Path(out_dir), "dtype": dtype, "bytes": size}
