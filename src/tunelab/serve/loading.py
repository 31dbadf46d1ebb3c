"""What ``chat`` and ``serve`` talk to: a trained run (its base model + its method) or a plain model,
and how a conversation becomes a prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Base models without a chat template get this plain format; the model is stopped before it
# writes the next user turn itself.
PLAIN_STOP = ["\nUser:"]


@dataclass
class Target:
    model: object
    tokenizer: object
    name: str  # the id clients use (the path or model name as the user gave it)
    about: str  # one line for humans: method and base model


def load_target(target: str, *, device: str = "auto", dtype: str | None = None, threads: int | None = None) -> Target:
    """A run directory (``config.yaml`` + ``method/``) with its method loaded, or a model name/dir."""
    from tunelab.models.loading import load as load_model
    from tunelab.runtime.precision import pick_device
    from tunelab.training.run_directory import load_trained, method_meta

    if threads:
        torch.set_num_threads(threads)
    path = Path(target)
    run = path.is_dir() and (path / "config.yaml").exists()
    if run:
        meta = method_meta(path)
        if meta.get("heads"):
            raise ValueError(f"{path}: this run trained a task head ({', '.join(meta['heads'])}), not a language model "
                             "to chat with; use `tunelab predict` for it")
        model, tok, cfg = load_trained(path, device=device, dtype=dtype)
        about = f"{meta['name']} on {cfg.model.name}"
    else:
        model, tok = load_model(target, dtype=dtype or "float32")
        about = f"base model {target}"
    model.to(pick_device(device)).eval()
    return Target(model, tok, str(target).rstrip("/") or str(target), about)


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """The prompt for ``messages`` ({role, content}) with the assistant turn opened, and the stop
    strings the format needs: the tokenizer's chat template when it has one, else User:/Assistant:."""
    msgs = [{"role": m["role"], "content": _text(m["content"])} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), []
    parts = []
    for m in msgs:
        parts.append(m["content"] + "\n" if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}\n")
    return "".join(parts) + "Assistant:", list(PLAIN_STOP)
