"""Which llama.cpp pre-tokenizer a byte-level BPE tokenizer needs (GGUF's ``tokenizer.ggml.pre``).

llama.cpp splits text before BPE with a regex chosen by this name; a wrong name (or "default") gives token
ids that differ from the Hugging Face tokenizer's on digits, whitespace runs or contractions, silently.

Identification, in order:

1. **hash** - llama.cpp's own rule: sha256 of ``str(tok.encode(CHECK_TEXT))`` looked up in the table its
   converter carries (``llamacpp_pretokenizers.HASHES``, read from the llama.cpp version named there by
   ``bench/llamacpp_pretokenizer_table.py``). This names released tokenizers (SmolLM/SmolLM2 -> "smollm",
   Llama 3 -> "llama-bpe", Qwen2 -> "qwen2", GPT-2 -> "gpt-2", ...).
2. **structure** - a tokenizer with its own vocabulary (trained or resized, so no hash can match) whose
   pre-tokenizer pipeline in tokenizer.json is exactly the one llama.cpp implements under a name:
   ``FAMILIES`` below, the four styles tunelab can check offline (gpt-2, smollm, llama-bpe, qwen2).
3. otherwise refused, naming what is known; ``--pretokenizer NAME`` (any name in the table) overrides.
"""

from __future__ import annotations

import difflib
import json
from hashlib import sha256

from tunelab.export.llamacpp_pretokenizers import CHECK_TEXT, HASHES, LLAMACPP_VERSION

# Split regexes as Hugging Face tokenizer.json files store them (the tokenizers' own patterns).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# name -> (pre-tokenizer steps, normalizers accepted, BPE ignore_merges as llama.cpp sets it for the name)
FAMILIES = {
    "gpt-2": ((("bytelevel", True, False),), (None,), False),
    "smollm": ((("digits", True), ("bytelevel", True, False)), (None,), False),
    "llama-bpe": ((("split", LLAMA3_REGEX, "Isolated", False), ("bytelevel", False, False)), (None,), True),
    "qwen2": ((("split", QWEN2_REGEX, "Isolated", False), ("bytelevel", False, False)), (None, "NFC"), False),
}


class PretokenizerError(ValueError):
    """The pre-tokenizer cannot be named for llama.cpp; the message says what is known and how to override."""


def known_names() -> list[str]:
    return sorted({name for name, _ in HASHES.values()})


def check_hash(tok) -> str:
    """llama.cpp's identification hash of ``tok`` (see the module docstring)."""
    return sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()


def _step(p: dict) -> tuple:
    kind = p.get("type")
    if kind == "ByteLevel":
        return ("bytelevel", bool(p.get("use_regex", True)), bool(p.get("add_prefix_space", False)))
    if kind == "Digits":
        return ("digits", bool(p.get("individual_digits", False)))
    if kind == "Split":
        pattern = p.get("pattern") or {}
        return ("split", pattern.get("Regex", pattern.get("String")), p.get("behavior"), bool(p.get("invert")))
    return (kind,)


def structure(tok) -> tuple[tuple, str | None, bool]:
    """(pre-tokenizer steps, normalizer type, ignore_merges) from the fast tokenizer's tokenizer.json."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise PretokenizerError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    norm = spec.get("normalizer")
    return tuple(_step(p) for p in steps), (norm or {}).get("type"), bool(spec["model"].get("ignore_merges", False))


def identify(tok) -> tuple[str, str]:
    """(name, how) with how "hash" or "structure"; `PretokenizerError` when neither names it."""
    digest = check_hash(tok)
    if digest in HASHES:
        return HASHES[digest][0], "hash"
    steps, norm, ignore_merges = structure(tok)
    for name, (want, norms, merges) in FAMILIES.items():
        if steps == want and norm in norms and ignore_merges == merges:
            return name, "structure"
    raise PretokenizerError(
        f"llama.cpp does not know this tokenizer's pre-tokenizer (check hash {digest[:16]}..., pre-tokenizer "
        f"{[s[0] for s in steps] or 'none'}): it is not one of the {len(HASHES)} tokenizers in llama.cpp's table "
        f"({LLAMACPP_VERSION}) nor built like {', '.join(FAMILIES)}; if you know which llama.cpp splits it like, "
        "pass --pretokenizer NAME (e.g. gpt-2, llama-bpe, qwen2, smollm)")


def check_name(requested: str) -> str:
    """``requested`` if llama.cpp's converter writes that name, else `PretokenizerError` (with "did you mean")."""
    names = known_names()
    if requested not in names:
        close = difflib.get_close_matches(requested, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(names)}"
        raise PretokenizerError(f"unknown --pretokenizer '{requested}' (not a name llama.cpp's converter writes){hint}")
    return requested


def choose(tok, requested: str | None = None) -> tuple[str, str]:
    """(name, how): ``requested`` checked against llama.cpp's names ("given"), else `identify`."""
    if requested is None:
        return identify(tok)
    return check_name(requested), "given"
