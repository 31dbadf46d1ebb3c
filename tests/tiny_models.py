"""Tiny random models of every architecture family tunelab covers, built from transformers configs
(offline, ~1-2 layers, hidden 32-64), for the architecture matrix test and the arch table's tests."""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, tie_word_embeddings=False)


def _spec(family: str):
    import transformers as tf

    kv = dict(num_key_value_heads=2)
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(DECODER, **kv)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(DECODER, **kv)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(DECODER, head_dim=16, **kv)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(DECODER, head_dim=16, **kv)),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(DECODER, head_dim=16, sliding_window=16, **kv)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(DECODER, sliding_window=None, **kv)),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(DECODER, **kv)),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
        "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                      num_attention_heads=4, max_position_embeddings=128,
                                                      word_embed_proj_dim=64)),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(DECODER)),
        "bert": (tf.BertConfig, tf.BertForSequenceClassification, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)),
        "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=130, pad_token_id=1)),
        "deberta_v2": (tf.DebertaV2Config, tf.DebertaV2ForSequenceClassification, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, relative_attention=True, position_buckets=32,
            pos_att_type=["p2c", "c2p"])),
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration, dict(
            d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)),
        "bart": (tf.BartConfig, tf.BartForConditionalGeneration, dict(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_position_embeddings=128, decoder_start_token_id=2)),
    }[family]


FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "mistral", "phi3", "gpt2", "opt", "gpt_neox",
            "bert", "roberta", "deberta_v2", "t5", "bart")
ENCODERS = ("bert", "roberta", "deberta_v2")
SEQ2SEQ = ("t5", "bart")


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")


def tiny(family: str, seed: int = 0, layers: int = 2):
    """A tiny random model of ``family`` in eval mode (encoders get a 2-label classification head)."""
    config_cls, model_cls, kw = _spec(family)
    kw = {k: (layers if k in LAYER_KEYS else v) for k, v in kw.items()}
    torch.manual_seed(seed)
    cfg = config_cls(**{**COMMON, **kw})
    if family in ENCODERS:
        cfg.num_labels = 2
    return model_cls(cfg).eval()


def batch(family: str, seed: int = 0, b: int = 2, n: int = 8) -> dict:
    """A small batch with labels that ``tiny(family)`` accepts (padding on the last row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, -2:] = 0
    if family in ENCODERS:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1] * (b // 2) + [0] * (b % 2))}
    if family in SEQ2SEQ:
        dec = torch.randint(3, VOCAB, (b, 5), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": dec}
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
