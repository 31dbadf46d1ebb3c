"""Prompt tuning (Lester et al., 2021): p trainable vectors prepended to the input embeddings.

    E' = [P ; E(input_ids)]           P (p x d) trainable, E the frozen input embedding, d = hidden size
    mask' = [1_p ; mask]   labels' = [-100_p ; labels]   positions' = [0..p-1 ; positions + p]
    (causal LMs: labels[0] also set to -100, so the loss scores exactly the tokens it scores without P)
    prompt_mask' = [False_p ; prompt_mask]   (virtual tokens are not text)

Trainable parameters: p * d. The model is frozen. Hooks on the top model do the bookkeeping, so the loop,
scoring and ``generate`` call the model as usual: on the first forward of a sequence (no cache yet) the
input ids get p placeholder ids in front (models that read input ids, e.g. last-token pooling, still
work), and a hook on the input embedding puts P in their place; mask, labels, token types, position ids
and the context's ``prompt_mask`` are extended to match. Later forwards of a KV-cached generation only
get the mask extended and the positions shifted by p (P already sits in the cache). Without explicit
position ids a causal LM gets them from the extended mask (cumsum - 1), so left and right padding agree.
Output logits at the virtual positions are **stripped**: callers see logits aligned with their own
input_ids (hidden_states/attentions, if requested, keep the virtual positions; tuple outputs are not
stripped). Encoders (BERT) get P before [CLS], so a [CLS]-pooled head reads virtual token 0, as in PEFT.

Inits: "vocab" (default): embeddings of random distinct ids among the first ``vocab_top`` (BPE ids
roughly follow frequency; pad/bos/eos excluded); "text": embeddings of ``init_text`` (or
``init_token_ids``) repeated or cut to p (the ids are stored in the config, so loading needs no
tokenizer); "random": uniform [-0.5, 0.5]. Paper: p = 100 (gains flatten past ~20), lr 0.3 with
Adafactor; ``recommended_lr`` gives 3e-2 for AdamW. Cannot be merged (it adds inputs, not a weight delta).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.methods.base import METHODS, MethodConfig, freeze, install_context


class PromptTuningConfig(MethodConfig):
    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["vocab", "text", "random"] = "vocab"
    init_text: str | None = None
    init_token_ids: list[int] | None = None  # alternative to init_text; filled in from it at attach
    tokenizer: str | None = None  # where to load a tokenizer for init_text (default: the model's path)
    vocab_top: int = Field(5000, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _text_source(self):
        if self.init == "text" and not (self.init_text or self.init_token_ids):
            raise ValueError("init='text' needs init_text (or init_token_ids)")
        return self


class PromptEmbedding(nn.Module):
    """P (p x d) and the hooks that splice it into every forward. ``visible = False`` masks P out;
    ``tunelab_active = False`` (tunelab.disabled) leaves every forward exactly as the base model's."""

    tunelab_active = True

    def __init__(self, weight: torch.Tensor, placeholder_id: int, causal: bool):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.placeholder_id, self.causal, self.visible = placeholder_id, causal, True
        self._pending, self._strip = False, 0

    def before_forward(self, model, args, kwargs):
        if args:  # model(input_ids) positionally
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("prompt tuning: pass model inputs as keyword arguments")
            kwargs["input_ids"], args = args[0], ()
        self._pending, self._strip = False, 0
        if not self.tunelab_active:
            return args, kwargs
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        b, n, p, dev = x.shape[0], x.shape[1], self.weight.shape[0], x.device
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        first = past == 0  # P enters on the first forward only; afterwards it is in the KV cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                "prompt tuning needs a 2D attention mask; 4D masks (packed batches, static caches) are not "
                "supported: turn packing off for this method"
            )
        if mask is None and not self.visible:
            mask = torch.ones(b, n if first else past - p + n, dtype=torch.long, device=dev)
        if first:
            if ids is not None:
                kwargs["input_ids"] = torch.cat([ids.new_full((b, p), self.placeholder_id), ids], 1)
                self._pending = True  # fill() swaps P in at the embedding output
            else:
                kwargs["inputs_embeds"] = torch.cat([self.weight.to(embeds.dtype).expand(b, -1, -1), embeds], 1)
            # Causal LMs shift labels: the last virtual position would predict labels[0], which no
            # position predicts without P; drop it so the loss scores the same tokens as other methods.
            for key, fill, skip in (("labels", -100, int(self.causal)), ("token_type_ids", 0, 0)):
                t = kwargs.get(key)
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == n:  # token-level only
                    kwargs[key] = torch.cat([t.new_full((t.shape[0], p + skip), fill), t[:, skip:]], 1)
            ctx = getattr(model, "tunelab_context", {})
            if isinstance(ctx.get("prompt_mask"), torch.Tensor) and ctx["prompt_mask"].shape[-1] == n:
                ctx["prompt_mask"] = torch.cat([ctx["prompt_mask"].new_zeros(b, p), ctx["prompt_mask"]], 1)
            self._strip = p + n
        if mask is not None:
            mask = torch.cat([mask.new_full((b, p), int(self.visible)), mask], 1)
            kwargs["attention_mask"] = mask
        pos = kwargs.get("position_ids")
        if pos is not None:
            pos = pos + p * int(self.visible)
            if first:
                pos = torch.cat([torch.arange(p, device=dev, dtype=pos.dtype).expand(pos.shape[0], p), pos], -1)
            kwargs["position_ids"] = pos
        elif self.causal and mask is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -(n + p if first else n) :]
        return args, kwargs

    def fill(self, embedding, args, out):
        if not self._pending:
            return out
        self._pending = False
        p = self.weight.shape[0]
        return torch.cat([self.weight.to(out.dtype).expand(out.shape[0], -1, -1), out[:, p:]], 1)

    def after_forward(self, model, args, kwargs, output):
        strip, self._strip, self._pending = self._strip, 0, False
        logits = getattr(output, "logits", None)
        if strip and isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == strip:
            output.logits = logits[:, self.weight.shape[0] :]
        return output


def _tokenizer_ids(model: nn.Module, cfg: PromptTuningConfig) -> list[int]:
    tok = getattr(model, "tunelab_tokenizer", None)
    where = cfg.tokenizer or getattr(model, "name_or_path", "")
    if tok is None or cfg.tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        except Exception as e:  # noqa: BLE001  (any failure means the same thing to the user)
            raise ValueError(
                f"prompt_tuning init='text': no tokenizer at {where!r} ({e.__class__.__name__}); "
                "set method.tokenizer=PATH (a tokenizer folder) or method.init_token_ids=[...]"
            ) from None
    ids = tok(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning init_text={cfg.init_text!r} tokenizes to nothing")
    return list(ids)


def _init_weight(model: nn.Module, emb: nn.Module, cfg: PromptTuningConfig) -> torch.Tensor:
    p, (vocab, d) = cfg.num_virtual_tokens, emb.weight.shape
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "random":
        return torch.empty(p, d).uniform_(-0.5, 0.5, generator=gen)
    if cfg.init == "text":
        if not cfg.init_token_ids:
            cfg.init_token_ids = _tokenizer_ids(model, cfg)  # saved with the params: load needs no tokenizer
        ids = (cfg.init_token_ids * math.ceil(p / len(cfg.init_token_ids)))[:p]
        ids = torch.tensor(ids)
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(f"prompt_tuning init_token_ids must lie in [0, {vocab})")
    else:
        c = model.config
        special = {getattr(c, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        pool = torch.tensor([i for i in range(min(vocab, cfg.vocab_top)) if i not in special])
        pick = (
            torch.randperm(len(pool), generator=gen)[:p]
            if len(pool) >= p
            else torch.randint(len(pool), (p,), generator=gen)
        )
        ids = pool[pick]
    with torch.no_grad():  # through the module, so embedding-side scaling (if any) is included
        return emb(ids.to(emb.weight.device)).float().cpu()


class PromptTuning:
    name = "prompt_tuning"
    Config = PromptTuningConfig
    merge_refusal = "prompt tuning adds trainable input vectors, not a weight update; there is nothing to fold"

    recommended_lr = 3e-2  # AdamW; the paper's 0.3 is for Adafactor

    def attach(self, model: nn.Module, cfg: PromptTuningConfig) -> nn.Module:
        if getattr(model.config, "is_encoder_decoder", False):
            return attach_encoder_decoder(model, cfg)
        install_context(model)  # its pre-hook must run before ours (it pops prompt_mask into the context)
        freeze(model)
        emb = model.get_input_embeddings()
        pad = getattr(model.config, "pad_token_id", None)
        # any id the embedding has (GPT-2 configs may name a bos id beyond a resized vocabulary)
        vocab = emb.weight.shape[0]
        ids = (getattr(model.config, "bos_token_id", None), 0, 1)
        placeholder = next(i for i in ids if isinstance(i, int) and i != pad and 0 <= i < vocab)
        causal = bool(getattr(model, "can_generate", lambda: False)())
        prompt = PromptEmbedding(_init_weight(model, emb, cfg).to(emb.weight.device), placeholder, causal)
        model.prompt_tuning = prompt
        # bound methods of the child module: a deep copy of the model re-binds them to the copy
        model.register_forward_pre_hook(prompt.before_forward, with_kwargs=True)
        emb.register_forward_hook(prompt.fill)
        model.register_forward_hook(prompt.after_forward, with_kwargs=True)
        return model


# ---------------------------------------------------------------- encoder-decoder models (T5, BART)
class EncoderPrompt(nn.Module):
    """Encoder-decoder prompt tuning (as the paper, on T5, and PEFT): P goes in front of the ENCODER's
    input embeddings only; the decoder, its labels and its positions are untouched.

        encoder input E' = [P ; E(source)]   encoder mask' = [1_p ; mask]   (the decoder's cross-attention
        mask is the same mask', so it attends to P as to the source)

    A pre-hook on the encoder turns ``input_ids`` into ``inputs_embeds`` with P in front (generation calls
    the encoder directly, not through the top model); a pre-hook on the top model widens the mask it hands
    the decoder, in training (input ids of width n, mask n) and in every decode step (encoder outputs of
    width n + p, mask n). The encoder widens a mask only when it is as wide as its ids, so nothing is
    widened twice. Encoder outputs (``encoder_last_hidden_state``) keep the p virtual positions."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def _widen(self, mask):
        return torch.cat([mask.new_ones(mask.shape[0], self.weight.shape[0]), mask], 1)

    def before_encoder(self, encoder, args, kwargs):
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("prompt tuning: pass encoder inputs as keyword arguments")
            kwargs["input_ids"], args = args[0], ()
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = encoder.embed_tokens(ids)  # the encoder's own (BART: scaled) embedding
        n = embeds.shape[1]
        kwargs["inputs_embeds"] = torch.cat([self.weight.to(embeds.dtype).expand(embeds.shape[0], -1, -1), embeds], 1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == n:
            kwargs["attention_mask"] = self._widen(mask)
        return args, kwargs

    def before_forward(self, model, args, kwargs):
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return args, kwargs
        enc = kwargs.get("encoder_outputs")
        if enc is not None:
            width = enc[0].shape[1] - self.weight.shape[0]
        else:
            x = kwargs.get("input_ids", args[0] if args else None)
            x = x if x is not None else kwargs.get("inputs_embeds")
            width = x.shape[1] if x is not None else -1
        if mask.shape[1] == width:
            kwargs["attention_mask"] = self._widen(mask)
        return args, kwargs


def attach_encoder_decoder(model: nn.Module, cfg: PromptTuningConfig) -> nn.Module:
    install_context(model)
    freeze(model)
    encoder = model.get_encoder()
    emb = getattr(encoder, "embed_tokens", None) or model.get_input_embeddings()
    prompt = EncoderPrompt(_init_weight(model, emb, cfg).to(emb.weight.device))
    model.prompt_tuning = prompt
    encoder.register_forward_pre_hook(prompt.before_encoder, with_kwargs=True)
    model.register_forward_pre_hook(prompt.before_forward, with_kwargs=True)
    return model


METHODS.register(PromptTuning.name, PromptTuning())
