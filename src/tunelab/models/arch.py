"""One table of what tunelab needs to know about each architecture family, and the lookups methods use.

Methods never guess module names: they ask ``arch.of(model)`` (keyed by ``config.model_type``) for
- ``stacks``: the ModuleList(s) of transformer blocks, by stack ("decoder", "encoder"), as a regex on the
  qualified module name, and ``reft_stack``: the stack ReFT edits by default;
- ``qv``: the attention query/value projections (random masking's default targets, as in its reference
  code); a *fused* projection (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) is
  named once and ``fused`` says where its q and v output rows lie, so only those rows are masked;
- ``series`` / ``parallel``: the bottleneck adapters' hosts. LLaMA-style models take LLM-Adapters'
  recipe (series on gate_proj and up_proj, placed before them as its mh_adapter; parallel beside
  up_proj and down_proj); the others get
  their MLP linears; BERT-style encoders keep the FFN output projection (Houlsby's place);
- ``heads``: output-head module names that "all-linear" never adapts;
- ``encoder_decoder``: T5/BART (seq2seq: the loss is on decoder labels).
An unknown ``model_type`` gets ``GENERIC``, which recognises the common naming schemes. GPT-2's linears
are ``transformers.pytorch_utils.Conv1D`` (weight stored d_in x d_out): methods handle them through
``tunelab.methods.base`` (``linear_dims``, ``dense_weight``), as PEFT's fan_in_fan_out does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

HEADS = ("lm_head", "score", "classifier", "qa_outputs", "cls", "classification_head")
LLAMA_MLP = dict(series=(r"mlp\.gate_proj", r"mlp\.up_proj"), parallel=(r"mlp\.up_proj", r"mlp\.down_proj"))
BERT_FFN = dict(series=(r"layer\.\d+\.output\.dense",), parallel=(r"layer\.\d+\.output\.dense",))


@dataclass(frozen=True)
class Arch:
    family: str
    model_types: tuple[str, ...]
    stacks: dict[str, str]  # stack -> regex matching the qualified name of its block ModuleList
    qv: tuple[str, ...]  # regexes (matched at the end of a module name) of the q / v projections
    series: tuple[str, ...]
    parallel: tuple[str, ...]
    fused: dict[str, str] = field(default_factory=dict)  # leaf name -> layout kind (see ``qv_rows``)
    encoder_decoder: bool = False
    kind: str = "decoder"  # decoder | encoder | seq2seq
    heads: tuple[str, ...] = HEADS

    @property
    def reft_stack(self) -> str:
        return "decoder" if self.kind == "decoder" else "encoder"


def _decoder(family, types, stack=r"model\.layers", **kw) -> Arch:
    spec = dict(qv=(r"q_proj", r"v_proj"), **LLAMA_MLP)
    spec.update(kw)
    return Arch(family, types, {"decoder": stack}, **spec)


TABLE: tuple[Arch, ...] = (
    _decoder("llama", ("llama",)),
    _decoder("qwen2", ("qwen2", "qwen3")),
    _decoder("gemma", ("gemma", "gemma2", "gemma3_text")),
    _decoder("mistral", ("mistral", "mixtral")),
    _decoder("phi3", ("phi3",), qv=(r"qkv_proj",), fused={"qkv_proj": "qkv"},
             series=(r"mlp\.gate_up_proj",), parallel=(r"mlp\.gate_up_proj", r"mlp\.down_proj")),
    _decoder("gpt2", ("gpt2",), stack=r"transformer\.h", qv=(r"attn\.c_attn",), fused={"c_attn": "qkv"},
             series=(r"mlp\.c_fc",), parallel=(r"mlp\.c_fc", r"mlp\.c_proj")),
    _decoder("opt", ("opt",), stack=r"decoder\.layers", series=(r"fc1",), parallel=(r"fc1", r"fc2")),
    _decoder("gpt_neox", ("gpt_neox",), stack=r"gpt_neox\.layers", qv=(r"query_key_value",),
             fused={"query_key_value": "qkv_per_head"},
             series=(r"mlp\.dense_h_to_4h",), parallel=(r"mlp\.dense_h_to_4h", r"mlp\.dense_4h_to_h")),
    Arch("bert", ("bert", "roberta", "xlm-roberta"), {"encoder": r"encoder\.layer"},
         qv=(r"self\.query", r"self\.value"), kind="encoder", **BERT_FFN),
    Arch("deberta_v2", ("deberta-v2",), {"encoder": r"encoder\.layer"},
         qv=(r"self\.query_proj", r"self\.value_proj"), kind="encoder", **BERT_FFN),
    Arch("t5", ("t5", "mt5", "umt5"), {"encoder": r"encoder\.block", "decoder": r"decoder\.block"},
         qv=(r"\w*Attention\.q", r"\w*Attention\.v"), series=(r"DenseReluDense\.wi(_0|_1)?",),
         parallel=(r"DenseReluDense\.wi(_0|_1)?", r"DenseReluDense\.wo"), encoder_decoder=True, kind="seq2seq"),
    Arch("bart", ("bart", "mbart"), {"encoder": r"encoder\.layers", "decoder": r"decoder\.layers"},
         qv=(r"\w*attn\.q_proj", r"\w*attn\.v_proj"), series=(r"fc1",), parallel=(r"fc1", r"fc2"),
         encoder_decoder=True, kind="seq2seq"),
)
BY_TYPE = {t: a for a in TABLE for t in a.model_types}

# Unknown families: the common schemes, tried in order (each must match at least one module).
GENERIC = Arch("generic", (), {}, qv=(), series=(), parallel=())
GENERIC_QV = ((r"q_proj", r"v_proj"), (r"query", r"value"), (r"c_attn",), (r"qkv_proj",), (r"query_key_value",))


def _config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def of(model: nn.Module) -> Arch:
    """The table row for ``model`` (``GENERIC`` for a family not in the table)."""
    cfg = getattr(model, "config", None)
    arch = BY_TYPE.get(getattr(cfg, "model_type", None))
    if arch is None and cfg is not None and hasattr(cfg, "get_text_config"):
        arch = BY_TYPE.get(getattr(cfg.get_text_config(), "model_type", None))
    if arch is None and getattr(cfg, "is_encoder_decoder", False):
        return Arch("generic", (), {}, qv=(), series=(), parallel=(), encoder_decoder=True, kind="seq2seq")
    return arch or GENERIC


def match(model: nn.Module, patterns, types=(nn.Module,)) -> list[str]:
    """Qualified names of modules of ``types`` whose name ends with one of the regex ``patterns``."""
    rx = re.compile(r"(^|\.)(" + "|".join(f"(?:{p})" for p in patterns) + r")$")
    return [n for n, m in model.named_modules() if n and isinstance(m, types) and rx.search(n)]


def blocks(model: nn.Module, stack: str | None = None) -> nn.ModuleList:
    """The ModuleList of blocks of ``stack`` (default: ``reft_stack``)."""
    arch = of(model)
    stack = stack or arch.reft_stack
    if arch.stacks:
        if stack not in arch.stacks:
            raise ValueError(f"{arch.family} has no '{stack}' stack; its stacks are {sorted(arch.stacks)}")
        found = match(model, [arch.stacks[stack]], (nn.ModuleList,))
        if found:
            return model.get_submodule(found[0])
        raise ValueError(f"{arch.family}: no block list matching {arch.stacks[stack]!r} in {type(model).__name__}")
    cfg = _config(model)
    n = getattr(cfg, "num_hidden_layers", None)
    for _, mod in model.named_modules():  # unknown family: the one list as long as the layer count
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"found no list of {n} blocks (config.num_hidden_layers) in {type(model).__name__}")


def hidden_size(model: nn.Module) -> int:
    cfg = _config(model)
    for key in ("hidden_size", "d_model", "n_embd"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"{type(model).__name__}: its config names no hidden size")


def default_targets(model: nn.Module, role: str, types=(nn.Module,)) -> list[str]:
    """Qualified module names a method attaches to by default. ``role``: "qv" (random masking),
    "series" or "parallel" (adapters). A clear error when the family has none."""
    arch = of(model)
    options = (getattr(arch, role),) if getattr(arch, role) else ()
    if arch is GENERIC or arch.family == "generic":
        options = GENERIC_QV if role == "qv" else ((r"mlp",), (r"layer\.\d+\.output\.dense",))
    for patterns in options:
        found = match(model, patterns, types)
        if found:
            return found
    raise ValueError(
        f"no default {role} targets for {type(model).__name__} (family '{arch.family}'); "
        "pass target_modules (see docs/architectures.md)"
    )


def qv_rows(model: nn.Module, name: str, d_out: int) -> list[tuple[int, int]] | None:
    """For a fused q/k/v projection named ``name`` with ``d_out`` output rows: the (start, stop) row
    ranges holding q and v. None when ``name`` is not fused (the whole matrix is q or v)."""
    layout = of(model).fused.get(name.rsplit(".", 1)[-1])
    if layout is None:
        return None
    cfg = _config(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden_size(model) // heads
    if layout == "qkv_per_head":  # GPT-NeoX: rows are (head, [q k v], head_dim)
        return [r for h in range(heads) for r in ((3 * h * head_dim, (3 * h + 1) * head_dim),
                                                  ((3 * h + 2) * head_dim, (3 * h + 3) * head_dim))]
    kv = getattr(cfg, "num_key_value_heads", None) or heads  # [q | k | v] (Phi-3, GPT-2)
    q, k = heads * head_dim, kv * head_dim
    if q + 2 * k != d_out:
        raise ValueError(f"{name}: {d_out} output rows do not split as q {q} + k {k} + v {k}")
    return [(0, q), (q + k, q + 2 * k)]


def conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_transposed(mod: nn.Module) -> bool:
    """True when the weight is stored d_in x d_out (GPT-2's Conv1D, an embedding seen as one-hot x W)."""
    return isinstance(mod, (conv1d_class(), nn.Embedding))


def linear_dims(mod: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear, a Conv1D (weight d_in x d_out) or an embedding (vocab -> dim)."""
    if isinstance(mod, nn.Embedding):
        return mod.num_embeddings, mod.embedding_dim
    if isinstance(mod, conv1d_class()):
        return mod.weight.shape[0], mod.nf
    return mod.in_features, mod.out_features


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
