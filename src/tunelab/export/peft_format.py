"""Read and write PEFT's LoRA adapter format, so adapters move between tunelab and ``peft``.

A PEFT LoRA directory holds ``adapter_config.json`` (peft_type "LORA", r, lora_alpha, target_modules,
use_rslora, use_dora, modules_to_save, ...) and ``adapter_model.safetensors`` with keys
    base_model.model.<module>.lora_A.weight            (r x d_in)
    base_model.model.<module>.lora_B.weight            (d_out x r)
    base_model.model.<module>.lora_magnitude_vector    (d_out, DoRA only)
    base_model.model.<head>.<param>                    (modules_to_save: a new classification head)
    base_model.model.<embedding>.lora_embedding_A      (r x vocab, LoRA on an nn.Embedding)
    base_model.model.<embedding>.lora_embedding_B      (dim x r)
tunelab's LoRALinear holds the same tensors (lora_A, lora_B, lora_magnitude), so the mapping is a rename.
GPT-2's Conv1D layers are written with ``fan_in_fan_out: true``, as PEFT requires for them; A and B have
the same shapes as for a linear (PEFT transposes only the merged delta).

A PiSSA/OLoRA adapter (``init``) is written as PEFT converts one: a plain LoRA of rank 2r over the
original base (A' = [A; A0], B' = [B, -B0]), so it loads over the untouched base model.

For "qlora" / "loftq" the adapter was trained over a quantized base: load it in PEFT over that base,
which ``save_dequantized_base`` writes (required for LoftQ, whose B A compensates W - Q_T).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tunelab.methods.base import METHODS, find_linears, linear_types, method_state_dict
from tunelab.methods.load_checks import check_peft_config, check_state, load_tensors, read_json_object
from tunelab.methods.lora import LoRAEmbedding, lora_modules

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_FAMILY = ("lora", "dora", "qlora", "loftq")
# Keys of adapter_config.json that change what LoRA computes and that tunelab does not implement.
UNSUPPORTED = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "lora_bias": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
}
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if cls.endswith(suffix)), None)


def _target_names(model: nn.Module, adapted: list[str]) -> list[str]:
    """Leaf names when PEFT's suffix match on them selects exactly ``adapted``, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    chosen = {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in leaves}
    return leaves if chosen == set(adapted) else sorted(adapted)


def export_peft(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write ``model``'s LoRA-family adapter (and its new head), or its prompt-tuning prompt, in PEFT's
    format; returns the directory. ``base_model`` is what ``base_model_name_or_path`` records (a hub id
    or the user's name for the base; the model's own ``_name_or_path`` may be a local cache path).

    ``peft.PeftModel.from_pretrained(fresh_base, directory)`` then gives the same outputs.
    """
    info = getattr(model, "tunelab_method", None) or {}
    if info.get("name") == "prompt_tuning":
        return export_prompt_tuning(model, directory, base_model)
    own = getattr(METHODS.get(info["name"]), "export_peft", None) if info.get("name") in METHODS else None
    if own is not None:  # a method that is PEFT's already (the PEFT bridge's tuners) writes its own directory
        return own(model, directory, base_model, _task_type(model))
    if info.get("name") not in LORA_FAMILY:
        raise ValueError(
            f"export_peft needs a LoRA-family method ({', '.join(LORA_FAMILY)}), prompt tuning or a PEFT-bridged "
            f"tuner; the model has {info.get('name')!r}"
        )
    mods = lora_modules(model)
    if any(m.merged for _, m in mods):
        raise ValueError("the adapters are merged into the weights; unmerge before exporting")
    p, heads = info["params"], list(getattr(model, "tunelab_new_head", []))
    tensors: dict[str, torch.Tensor] = {}
    for name, m in mods:
        if isinstance(m, LoRAEmbedding):
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = m.lora_A.detach()
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = m.lora_B.detach()
            continue
        A, B = m.lora_A.detach(), m.lora_B.detach()
        if m.init_A is not None:  # PiSSA/OLoRA: PEFT's conversion to a rank-2r LoRA over the original base
            A, B = torch.cat([A, m.init_A.to(A)], 0), torch.cat([B, -m.init_B.to(B)], 1)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
        if m.lora_magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude.detach()
    for head in heads:
        for pname, t in model.get_submodule(head).state_dict().items():
            tensors[f"{PREFIX}{head}.{pname}"] = t.detach()
    r, alpha = p["r"], p["alpha"]
    if any(m.init_A is not None for _, m in mods):  # W_res + s B A = W0 + s' [B, -B0] [A; A0] with s' = s
        r, alpha = 2 * r, alpha * (2**0.5 if p["rslora"] else 2)
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": p["dropout"],
        "use_rslora": p["rslora"],
        "use_dora": any(m.lora_magnitude is not None for _, m in mods),
        "target_modules": _target_names(model, [n for n, _ in mods]),
        "modules_to_save": heads or None,
        "bias": "none",
        # PEFT needs it for Conv1D (GPT-2) and ignores it for linears; embeddings never read it
        "fan_in_fan_out": any(m.transposed and not isinstance(m, LoRAEmbedding) for _, m in mods),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def save_dequantized_base(model: nn.Module, directory: str | Path) -> Path:
    """Write the base a QLoRA/LoftQ adapter was trained over, dequantized, as a Hugging Face model
    directory (``save_pretrained``). A LoftQ adapter must be loaded over this Q_T, not over the original
    W (its B A holds W - Q_T); a QLoRA adapter is close on either. Returns the directory."""
    mods = dict(lora_modules(model))
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in mods)}
    for name, m in mods.items():
        state[f"{name}.weight"] = m.base_weight().contiguous()
        if m.base_layer.bias is not None:
            state[f"{name}.bias"] = m.base_layer.bias.detach()
    model.save_pretrained(str(directory), state_dict=state)
    return Path(directory)


def import_peft(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach a PEFT LoRA (or DoRA) adapter saved in ``directory`` to ``model`` as tunelab "lora"/"dora".

    Heads listed in ``modules_to_save`` are loaded and keep training with the adapter.
    """
    import tunelab  # the public attach (late import: tunelab.api imports the methods package)

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: not found (is this a PEFT adapter directory?)")
    if not w_path.exists():
        raise FileNotFoundError(f"{w_path}: not found (only safetensors adapters are read)")
    cfg = read_json_object(cfg_path, "a PEFT adapter config")
    if cfg.get("peft_type") == "PROMPT_TUNING":
        return import_prompt_tuning(model, directory)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; only 'LORA' is")
    for key, default in UNSUPPORTED.items():
        if cfg.get(key) is not None and cfg[key] != default:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by tunelab (expected {default!r})")
    check_peft_config(cfg, cfg_path, getattr(model, "tunelab_new_head", []))
    state = {k.removeprefix(PREFIX): v for k, v in load_tensors(w_path).items()}
    embeds = sorted(k.removesuffix(".lora_embedding_A") for k in state if k.endswith(".lora_embedding_A"))
    adapted = sorted([k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")] + embeds)
    if not adapted:
        raise ValueError(f"{w_path}: holds no '*.lora_A.weight' (or '*.lora_embedding_A') tensor")
    for name in embeds:  # PEFT saves the embedding it adapted (save_embedding_layers): drop it if unchanged
        key = f"{name}.base_layer.weight"
        if key in state:
            if not torch.equal(state[key], model.get_submodule(name).weight.detach().to(state[key])):
                raise ValueError(f"{w_path}: {key} differs from the model's {name}.weight; "
                                 "load this adapter over the base it was trained on")
            del state[key]
    heads = list(cfg.get("modules_to_save") or [])
    present = [h for h in heads if any(k.startswith(h + ".") for k in state)]
    lora_keys = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B") + ((".lora_magnitude_vector",) if cfg.get("use_dora") else ())
    foreign = sorted(k for k in state if not k.endswith(lora_keys) and not any(k.startswith(h + ".") for h in present))
    if foreign:  # e.g. an embed_tokens that would overwrite the base (and be persisted by merge)
        raise ValueError(f"{w_path}: holds {len(foreign)} tensor(s) that are neither LoRA weights nor a head in "
                         f"modules_to_save, e.g. {foreign[:3]}; refusing to overwrite base weights")
    model.tunelab_new_head = sorted(set(getattr(model, "tunelab_new_head", [])) | set(present))
    targets = cfg.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets  # PEFT writes a set: any order
    try:
        types = (*linear_types(), nn.Embedding)
        same = isinstance(targets, list) and sorted(n for n, _ in find_linears(model, targets, types)) == adapted
    except ValueError:  # the list matched no linear
        same = False
    if not same:  # a regex, or names that select other modules too: use the exact module names
        targets = adapted
    model = tunelab.attach(
        model,
        "dora" if cfg.get("use_dora") else "lora",
        r=cfg["r"],
        alpha=cfg["lora_alpha"],
        dropout=cfg.get("lora_dropout", 0.0),
        rslora=bool(cfg.get("use_rslora")),
        target_modules=targets,
    )
    got = sorted(n for n, _ in lora_modules(model))
    if got != adapted:
        raise ValueError(f"{w_path}: the adapter's modules {adapted[:3]}... do not match the model's {got[:3]}...")
    ours = {}
    for name in adapted:
        a, b = ("lora_embedding_A", "lora_embedding_B") if name in embeds else ("lora_A.weight", "lora_B.weight")
        needed = [f"{name}.{b}"] + ([f"{name}.lora_magnitude_vector"] if cfg.get("use_dora") else [])
        missing = [k for k in needed if k not in state]
        if missing:
            why = "use_dora is set, so each adapted module needs one" if missing[0].endswith("magnitude_vector") else \
                "each adapted module needs lora_A and lora_B"
            raise ValueError(f"{w_path}: the tensor '{PREFIX}{missing[0]}' is missing ({why}); the adapter is incomplete")
        ours[f"{name}.lora_A"] = state[f"{name}.{a}"]
        ours[f"{name}.lora_B"] = state[f"{name}.{b}"]
        if cfg.get("use_dora"):
            ours[f"{name}.lora_magnitude"] = state[f"{name}.lora_magnitude_vector"]
    for head in present:
        ours.update({k: v for k, v in state.items() if k.startswith(head + ".")})
    absent = [h for h in model.tunelab_new_head if h not in present]  # heads the adapter does not carry stay fresh
    owned = {k: v for k, v in method_state_dict(model).items() if not any(k.startswith(h + ".") for h in absent)}
    check_state(ours, owned, w_path, model.tunelab_method["name"])
    model.load_state_dict(ours, strict=False)
    return model


# ---------------------------------------------------------------- prompt tuning
# PEFT's PROMPT_TUNING directory: adapter_config.json (num_virtual_tokens, token_dim, ...) and
# adapter_model.safetensors with one tensor, "prompt_embeddings" (p x d), prepended to the input
# embeddings exactly as tunelab's prompt_tuning does. PEFT's logits keep the p virtual positions in
# front (tunelab strips them): compare peft_logits[:, p:] with ours.


def export_prompt_tuning(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write a prompt-tuning run's P in PEFT's PROMPT_TUNING format; returns the directory."""
    prompt = getattr(model, "prompt_tuning", None)
    if prompt is None:
        raise ValueError("the model has no prompt_tuning prompt attached")
    if getattr(model, "tunelab_new_head", None):
        raise ValueError(
            f"a prompt-tuning run with a new task head ({', '.join(model.tunelab_new_head)}) cannot be exported "
            "to PEFT's format yet; use `tunelab chat`/`tunelab serve`, or tunelab.load on the run's method/ directory"
        )
    cfg_model = getattr(model, "config", None)
    p, d = prompt.weight.shape
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model or getattr(cfg_model, "_name_or_path", None) or None,
        "num_virtual_tokens": int(p),
        "token_dim": int(d),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg_model, "num_attention_heads", None),
        "num_layers": getattr(cfg_model, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",  # the trained P is in the weights; the init no longer matters
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "inference_mode": True,
        "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": prompt.weight.detach().float().contiguous().cpu()}, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def import_prompt_tuning(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach a PEFT PROMPT_TUNING adapter in ``directory`` to ``model`` as tunelab "prompt_tuning"."""
    import tunelab

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    cfg = read_json_object(cfg_path, "a PEFT adapter config")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{cfg_path}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                         "(encoder-decoder prompts) is not supported; only 1 is")
    if not w_path.exists():
        raise FileNotFoundError(f"{w_path}: not found (only safetensors adapters are read)")
    state = load_tensors(w_path)
    if "prompt_embeddings" not in state:
        raise ValueError(f"{w_path}: holds no 'prompt_embeddings' tensor (keys: {sorted(state)[:5]})")
    weight = state["prompt_embeddings"]
    p = cfg.get("num_virtual_tokens")
    d = model.get_input_embeddings().weight.shape[1]
    if weight.ndim != 2 or weight.shape[1] != d or (p is not None and weight.shape[0] != p):
        raise ValueError(f"{w_path}: prompt_embeddings has shape {tuple(weight.shape)}; the config and model "
                         f"expect ({p}, {d})")
    model = tunelab.attach(model, "prompt_tuning", num_virtual_tokens=weight.shape[0], init="random")
    with torch.no_grad():
        model.prompt_tuning.weight.copy_(weight.to(model.prompt_tuning.weight.dtype))
    return model
