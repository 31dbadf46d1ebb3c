"""cast_weights: the same results as autocast's per-call casts, originals restored, trainables left alone."""

import torch
from conftest import tiny_llama

import tunelab
from tunelab.runtime.precision import cast_weights, saved_bytes


def _logits(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids).logits


def test_bit_identical_to_autocast_and_restored():
    model = tunelab.attach(tiny_llama(), "lora", r=4, target_modules="all-linear")
    ids = torch.randint(3, 128, (2, 9))
    before = {n: p for n, p in model.named_parameters()}
    ref = _logits(model, ids)
    with cast_weights(model, torch.bfloat16):
        inside = {n: p.dtype for n, p in model.named_parameters()}
        got = _logits(model, ids)
    assert torch.equal(ref, got)
    # frozen base linears were swapped, LoRA factors (trainable) and the tied embedding were not
    assert inside["model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert all(dt == torch.float32 for n, dt in inside.items() if "lora_" in n)
    assert inside["model.embed_tokens.weight"] == torch.float32
    after = {n: p for n, p in model.named_parameters()}
    assert all(after[n] is before[n] and after[n].dtype == torch.float32 for n in before)


def test_tied_head_is_cast_but_embedding_keeps_fp32():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(3, 128, (1, 7))
    ref = _logits(model, ids)
    with torch.no_grad(), cast_weights(model, torch.bfloat16, frozen_only=False):
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert model.model.embed_tokens.weight.dtype == torch.float32
        got = _logits(model, ids)
    assert torch.equal(ref, got)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gradients_of_trainable_factors_unchanged():
    model = tunelab.attach(tiny_llama(), "lora", r=4, target_modules="all-linear")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, 128, (2, 9))

    def grads():
        model.zero_grad()
        _logits(model, ids).float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = grads()
    with cast_weights(model, torch.bfloat16):
        got = grads()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_noop_without_autocast_dtype_and_skips_dora():
    model = tiny_llama()
    with cast_weights(model, None), cast_weights(model, torch.float32):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    dora = tunelab.attach(tiny_llama(), "dora", r=4, target_modules=["q_proj"])
    with cast_weights(dora, torch.bfloat16):
        q = dora.model.layers[0].self_attn.q_proj
        assert q.base_layer.weight.dtype == torch.float32  # DoRA reads the base weight's norm in fp32
        assert dora.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert saved_bytes(tiny_llama(), torch.bfloat16, frozen_only=True) == 0  # a fresh model trains everything


def test_gpt2_conv1d_weights_are_held_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 128, (2, 7))
    ref = _logits(model, ids)
    with cast_weights(model, torch.bfloat16):
        assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
        got = _logits(model, ids)
    assert torch.equal(ref, got)
