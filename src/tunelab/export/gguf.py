"""Write a merged Llama-family model as a llama.cpp GGUF file (``tunelab export --format gguf``).

What llama.cpp's convert_hf_to_gguf.py writes for a ``LlamaForCausalLM``, with the ``gguf`` package:

- tensors renamed by gguf's own table (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``);
  ``lm_head`` is left out when the embeddings are tied (llama.cpp then reuses ``token_embd``);
- q_proj / k_proj rows permuted from Hugging Face's rotate-half RoPE layout to the interleaved
  layout llama.cpp computes with: per head (heads = n_head for q, n_head_kv for k) the rows
  [0..h/2) and [h/2..h) are interleaved, i.e. W.reshape(heads, 2, h/2, d_in).swapaxes(1, 2);
  transformers' GGUF loader applies the inverse on load;
- 1-D tensors (norms, biases) stay F32; matrices take ``outtype``: f32, f16, bf16, q8_0 or q4_0
  (gguf.quants; a matrix whose rows are not a multiple of the 32-value block falls back to f16);
- metadata: llama.* hyperparameters, general.* naming the base by its hub id, and the tokenizer as
  "gpt2" BPE (byte-level tokens, merges, token types, bos/eos/unk/pad ids, add_bos, chat template).
  ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer regex family) is named as llama.cpp's converter names
  it (`tunelab.export.pretokenizer`: the hash of its check string, else the pre-tokenizer's structure);
  an unknown one is refused unless ``pre=`` (``--pretokenizer``) names it; never a silent "default".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tunelab.export.pretokenizer import check_name, choose

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
SUPPORTED = ("llama", "mistral")  # Hugging Face model_type values with llama.cpp's "llama" layout


def _types(outtype: str):
    import gguf

    q, ft = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, ft.ALL_F32), "f16": (q.F16, ft.MOSTLY_F16), "bf16": (q.BF16, ft.MOSTLY_BF16),
            "q8_0": (q.Q8_0, ft.MOSTLY_Q8_0), "q4_0": (q.Q4_0, ft.MOSTLY_Q4_0)}[outtype]


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rotate-half rows -> llama.cpp interleaved rows (what convert_hf_to_gguf does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_supported(config) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"GGUF export supports Llama-family models ({', '.join(SUPPORTED)}); this model is "
                         f"'{kind}'. Use `tunelab merge` (a transformers directory) or `--format peft` instead")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"GGUF export: hidden_act '{config.hidden_act}' is not Llama's silu")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"GGUF export: RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not "
                         "written yet (only unscaled RoPE)")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def tokenizer_fields(tok, vocab_size: int) -> dict:
    """GGUF's "gpt2" tokenizer arrays from a fast byte-level BPE tokenizer."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers) tokenizer")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError("GGUF export writes byte-level BPE (gpt2-style) tokenizers; this one is "
                         f"{model.get('type')}{' with byte_fallback (sentencepiece-style)' if model.get('byte_fallback') else ''}")
    vocab = dict(model["vocab"])
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    for i, t in added.items():
        vocab[t.content] = i
    by_id = {i: s for s, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has id {max(by_id)} but the model's vocabulary is {vocab_size}")
    tokens, types = [], []
    tt = gguf.TokenType
    for i in range(vocab_size):
        if i not in by_id:  # rows the embedding has and the tokenizer never produces (llama.cpp: [PAD{i}])
            tokens.append(f"[PAD{i}]")
            types.append(tt.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(tt.NORMAL if a is None else tt.CONTROL if a.special else tt.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(model, tok, path: str | Path, outtype: str = "f16", *, base: dict | None = None,
               name: str | None = None, pre: str | None = None, progress: bool = False) -> Path:
    """Write ``model`` (a plain, merged Llama-family causal LM) and ``tok`` to the GGUF file ``path``."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype '{outtype}' is not one of {', '.join(OUTTYPES)}")
    check_supported(model.config)
    choose(tok, pre)  # refuse an unknown pre-tokenizer before any file is written
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write(model, tok, tmp, outtype, base, name or path.stem, pre, progress)
    except BaseException:
        tmp.unlink(missing_ok=True)  # only the file this call created
        raise
    os.replace(tmp, path)
    return path


def _write(model, tok, tmp: Path, outtype: str, base, name: str, pre, progress: bool) -> None:
    import gguf
    from gguf import quants

    c = model.config
    qtype, ftype = _types(outtype)
    w = gguf.GGUFWriter(str(tmp), "llama")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_type("model")
    w.add_name(name)
    if base and base.get("hub_id"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, base["hub_id"].split("/")[-1])
        w.add_base_model_organization(0, base["hub_id"].split("/")[0])
        w.add_base_model_repo_url(0, f"https://huggingface.co/{base['hub_id']}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
    w.add_rope_freq_base(_rope_theta(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    t = tokenizer_fields(tok, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(choose(tok, pre)[0])
    w.add_token_list(t["tokens"])
    w.add_token_types(t["types"])
    w.add_token_merges(t["merges"])
    for key, adder in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                       ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        if getattr(tok, key, None) is not None:
            adder(int(getattr(tok, key)))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    w.add_add_space_prefix(False)
    if isinstance(getattr(tok, "chat_template", None), str):
        w.add_chat_template(tok.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    tied = bool(getattr(c, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")
        data = tensor.detach().float().cpu()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, n_kv)
        arr = data.numpy()
        kind = qtype if arr.ndim >= 2 else gguf.GGMLQuantizationType.F32
        if kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) and arr.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # llama.cpp's fallback for rows that are not whole blocks
        packed = quants.quantize(np.ascontiguousarray(arr), kind)
        w.add_tensor(new, packed, raw_dtype=kind if packed.dtype == np.uint8 else None)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
    finally:
        w.close()


def export_run(run_dir: str | Path, out_dir: str | Path, outtype: str = "f16", command: str | None = None,
               progress: bool = False, checkpoint: str = "final", *, pretokenizer: str | None = None,
               modelfile: bool = False, overwrite: bool = False) -> Path:
    """Merge ``run_dir``'s method (``checkpoint`` "final" or "best") into its base and write
    ``out_dir/<run>-<outtype>.gguf`` + README.md (+ an Ollama ``Modelfile`` with ``modelfile=True``).
    ``out_dir``: new or empty unless ``overwrite``; never the run directory (see ``merge_run``)."""
    from tunelab.export.card import write_card
    from tunelab.export.merge import check_out_dir, merged
    from tunelab.models.loading import base_identity
    from tunelab.runtime.atomic_files import files_into
    from tunelab.training.run_directory import load_trained

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype '{outtype}' is not one of {', '.join(OUTTYPES)}")
    check_out_dir(run_dir, out_dir, overwrite, "export")
    if pretokenizer is not None:
        check_name(pretokenizer)
    model, tok, cfg = load_trained(run_dir, checkpoint=checkpoint)
    check_supported(model.config)
    if getattr(model, "tunelab_new_head", None):
        raise ValueError(f"GGUF export is for causal LMs; this run trained a new head ({', '.join(model.tunelab_new_head)})")
    pre, how = choose(tok, pretokenizer)
    run_name = Path(run_dir).resolve().name
    path = Path(out_dir) / f"{run_name}-{outtype}.gguf"
    text = None
    if modelfile:  # before the (slow) merge and write, so a template it cannot translate fails at once
        from tunelab.export.modelfile import modelfile_text

        text = modelfile_text(path.name, tok, cfg.task.params())
    model = merged(model, model.tunelab_method["name"])
    base = base_identity(cfg.model.name)
    extra = {"file": path.name, "outtype": outtype, "pre-tokenizer": f"{pre} ({how})"}
    with files_into(out_dir, overwrite=overwrite) as tmp:
        write_gguf(model, tok, tmp / path.name, outtype, base=base,
                   name=f"{(base['hub_id'] or base['name']).split('/')[-1]}-{run_name}", pre=pre, progress=progress)
        if text is not None:
            (tmp / "Modelfile").write_text(text)
            extra["Modelfile"] = "Modelfile"
        write_card(tmp, run_dir, cfg, kind="gguf", extra=extra, command=command)
    return path
