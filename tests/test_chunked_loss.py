"""The vocabulary loss in chunks gives the model's own loss and gradients, chunk by chunk."""

import pytest
import torch

import tunelab
from tunelab.data.encoding import Collator
from tunelab.models import chunked_loss, lm_loss

from conftest import tiny_llama

# text-like rows: most positions carry loss, as in chat and continued pretraining
ROWS = [
    {"input_ids": list(range(3, 19)), "labels": [-100, -100] + list(range(5, 19)), "prompt_len": 2},
    {"input_ids": list(range(40, 51)), "labels": [-100] + list(range(41, 51)), "prompt_len": 1},
    {"input_ids": list(range(60, 80)), "labels": list(range(60, 80)), "prompt_len": 0},
]
SHARED = list(range(90, 100))  # a template every row starts with, then loss on every later token
PROWS = [{"input_ids": SHARED + t, "labels": [-100] * 10 + t, "prompt_len": 10}
         for t in ([20, 21, 22, 23, 24], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46])]


def _model(method):
    model = tunelab.attach(tiny_llama(), method)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad and method != "full":
            torch.nn.init.normal_(p, std=0.1)  # LoRA's B starts at 0: make the adapter matter
    return model.train()


def _loss_and_grads(model, fn, scale=1.0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks for both paths (GPT-2 and OPT train with dropout)
    loss = fn()
    (loss * scale).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _head_rows(model):
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    return seen


@pytest.mark.parametrize("method", ["lora", "full"])  # a frozen head / a trained head tied to the embedding
@pytest.mark.parametrize("scale", [1.0, 0.25])  # 0.25: a micro-batch's weight under gradient accumulation
def test_chunked_loss_gives_the_models_loss_and_grads(method, scale):
    model = _model(method)
    inputs = lm_loss.loss_inputs(Collator(0)(ROWS))
    ref_loss, ref = _loss_and_grads(model, lambda: model(**inputs).loss, scale)
    seen = _head_rows(model)
    loss, got = _loss_and_grads(model, lambda: chunked_loss.chunked_loss(model, inputs, rows=7), scale)
    n = inputs["labels"].numel()
    assert n == 43 and seen == [0] + [7] * 6 + [1]  # the head's own call saw no row; chunks of 7
    torch.testing.assert_close(loss, ref_loss)
    assert ref.keys() == got.keys() and ("model.embed_tokens.weight" in got) == (method == "full")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_under_bf16_autocast_stays_within_rounding():
    model = _model("lora")
    inputs = lm_loss.loss_inputs(Collator(0)(ROWS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = _loss_and_grads(model, lambda: model(**inputs).loss)
        loss, got = _loss_and_grads(model, lambda: chunked_loss.chunked_loss(model, inputs, rows=7))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-4)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=2e-2, atol=1e-4, msg=name)


def test_fast_loss_chunks_only_past_one_chunk_and_with_the_shared_prefix(monkeypatch):
    model = _model("lora")
    batch = Collator(0)(PROWS)
    ref_loss, ref = _loss_and_grads(model, lambda: model(**batch).loss)
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * 4)  # 4 positions a chunk
    assert lm_loss.supports_shared_prefix(model, batch) and lm_loss.supports_chunked_loss(model, batch)
    seen = _head_rows(model)
    loss, got = _loss_and_grads(model, lambda: lm_loss.loss(model, batch, trim=True, prefix=True, chunked=True))
    assert seen == [0, 0, 4, 4, 4, 3]  # prefix: no row; tail: the head skipped, 15 positions in chunks
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    seen.clear()
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * 64)  # all fit one chunk
    lm_loss.loss(model, batch, trim=True, prefix=True, chunked=True)
    assert seen == [0, 15]  # the model's own path, unchanged


def test_chunked_loss_without_grad_computes_no_gradient():
    model = _model("full")
    inputs = lm_loss.loss_inputs(Collator(0)(ROWS))
    with torch.no_grad():
        ref = model(**inputs).loss
        got = chunked_loss.chunked_loss(model, inputs, rows=3)
    assert not got.requires_grad and all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(got, ref)


def test_gemma_soft_capping_applied_per_chunk():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, pad_token_id=0)
    model = Gemma2ForCausalLM(cfg).eval()
    inputs = lm_loss.loss_inputs(Collator(0)(ROWS))
    with torch.no_grad():
        torch.testing.assert_close(chunked_loss.chunked_loss(model, inputs, rows=5), model(**inputs).loss)
    assert lm_loss.supports_chunked_loss(model, Collator(0)(ROWS))


def test_probe_refuses_a_head_whose_logits_the_forward_changes():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, logit_scale=0.0625, pad_token_id=0)
    model = CohereForCausalLM(cfg).eval()  # multiplies the head's logits by logit_scale afterwards
    batch = Collator(0)(ROWS)
    assert lm_loss.supports_loss_inputs(model, batch)
    assert not lm_loss.supports_chunked_loss(model, batch)
    assert not lm_loss.supports_chunked_loss(_model("lora"), batch, distributed=True)
    assert lm_loss.supports_chunked_loss(_model("lora"), batch)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])  # prompt tuning changes the sequence: full logits
def test_text_perplexity_in_chunks_equals_full_logits(monkeypatch, method):
    from tunelab.tasks import shared

    from conftest import tiny_tokenizer_obj

    model = _model(method).eval()
    tok = tiny_tokenizer_obj()
    feats = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ROWS + PROWS]
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * 5)
    calls, stats = [], chunked_loss.token_stats
    monkeypatch.setattr(chunked_loss, "token_stats", lambda *a, **k: calls.append(1) or stats(*a, **k))
    fast_path = shared.nll(model, tok, feats, batch_size=8)
    assert len(calls) == (1 if method == "lora" else 0)  # all six rows in one batch
    monkeypatch.setattr(lm_loss, "supports_chunked_loss", lambda *a, **k: False)
    full = shared.nll(model, tok, feats, batch_size=8)
    assert fast_path[1:] == full[1:] and fast_path[1] == 43 + 15
    assert fast_path[0] == pytest.approx(full[0], rel=1e-6)
    assert not model.training and all(p.grad is None for p in model.parameters())


DECODERS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "mistral", "phi3", "gpt2", "opt", "gpt_neox")


@pytest.mark.parametrize("family", DECODERS)
def test_every_decoder_family_chunks_to_its_own_loss_and_grads(family, monkeypatch):
    from tiny_models import batch, tiny

    model = tunelab.attach(tiny(family), "lora", r=4)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    b = batch(family, n=12)
    assert lm_loss.supports_loss_inputs(model, b), family  # else the loop keeps the model's own path anyway
    inputs = lm_loss.loss_inputs(b)
    ref_loss, ref = _loss_and_grads(model, lambda: model(**inputs).loss)
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * 5)
    assert lm_loss.supports_chunked_loss(model, b), family
    loss, got = _loss_and_grads(model, lambda: lm_loss.loss(model, b, trim=True, chunked=True))
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
