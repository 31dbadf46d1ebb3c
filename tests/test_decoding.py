"""tunelab.evaluation.decoding against ``model.generate``: the same greedy tokens (fp32) for mixed prompt lengths,
with and without a shared prefix, with LoRA and with hook methods (which decode batch by batch),
rows ending at EOS at different steps, token budgets and stop strings; and under bf16 autocast the
same tokens with and without the weights held in bf16."""

from __future__ import annotations

import pytest
import torch

from tiny_models import SEQ2SEQ, tiny
from tunelab.evaluation import decoding
from tunelab.evaluation.scoring import _pad_left, generate
from tunelab.models import prefix_cache

from conftest import shaken_llama, tiny_tokenizer_obj

PRE = [1, 20, 31, 7, 44, 9, 58, 13, 66, 70]  # a shared "template" prefix (10 tokens)


def shaken(method=None, seed=0, **params):
    """A tiny Llama whose weights are shaken enough that greedy output varies by prompt and step."""
    return shaken_llama(method, seed=seed, shake_seed=seed + 11, **params).eval()


def prompts(shared: bool, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, 120, (n,), generator=g).tolist() for n in (3, 9, 1, 14, 6, 2, 11, 5, 8)]
    return [PRE + r for r in rows] if shared else [[1] + r for r in rows]


def hf(model, rows, n, eos, pad=0):
    """``model.generate`` on the rows as one left-padded batch: new tokens up to (not with) EOS."""
    ids, mask = _pad_left(rows, pad, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=pad, eos_token_id=sorted(eos))
    res = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((k for k, t in enumerate(row) if t in eos), len(row))
        res.append(row[:cut])
    return res


class Tok:
    pad_token_id = 0


def ours(model, rows, n, eos, batch_size=3, **kw):
    return decoding.complete(model, Tok(), rows, max_new_tokens=n, batch_size=batch_size, eos=eos, **kw)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("method,params", [(None, {}), ("lora", {"r": 4})])
def test_greedy_equals_generate(shared, method, params):
    model = shaken(method, **params)
    rows = prompts(shared)
    want = hf(model, rows, 10, {2})
    assert len({tuple(w) for w in want}) > 3 and any(len(set(w)) > 3 for w in want)  # outputs vary
    for bs in (1, 4, 16):
        dec = decoding.Decoder(model, 0)
        got = [[] for _ in rows]

        def advance(i, t, got=got):
            if t == 2:
                return True
            got[i].append(t)
            return len(got[i]) >= 10

        dec.run(rows, lambda lg, act: lg.argmax(-1).tolist(), advance, room=10, prefill_rows=bs)
        assert got == want, bs
        assert dec.stats["prefix"] == (len(PRE) if shared else 0)
        assert dec.stats["decode_batches"] == 1  # hook-free: every sub-batch decodes together


def test_rows_end_at_eos_at_different_steps_and_budgets():
    model = shaken()
    rows = prompts(True, seed=3)
    full = hf(model, rows, 12, {2})
    # EOS ids that occur mid-sequence in some rows and never in others.
    eos = {full[0][2], full[3][5]}
    want = hf(model, rows, 12, eos)
    lengths = {len(w) for w in want}
    assert len(lengths) >= 3 and 12 in lengths  # rows finish at different steps, some at the budget
    assert ours(model, rows, 12, eos) == want
    assert ours(model, rows, 1, eos) == [w[:1] for w in hf(model, rows, 1, eos)]
    assert ours(model, rows, 0, eos) == [[] for _ in rows]


@pytest.mark.parametrize("method,params", [("loreft", {"rank": 2}), ("prompt_tuning", {"num_virtual_tokens": 3})])
def test_hook_methods_decode_batch_by_batch(method, params):
    model = shaken(method, **params)
    assert not prefix_cache.hook_free(model)
    rows = prompts(True)
    tok = tiny_tokenizer_obj()
    want = hf(model, rows, 8, {2})  # one batch: what batch_size >= rows gives
    dec = decoding.Decoder(model, 0)
    got = [[] for _ in rows]
    dec.run(rows, lambda lg, act: lg.argmax(-1).tolist(), lambda i, t: t == 2 or got[i].append(t) or len(got[i]) >= 8,
            room=8, prefill_rows=len(rows))
    assert got == want and dec.stats["prefix"] == 0
    # Smaller batches: one prefill and one decode per batch, never stacked; the texts are those of
    # model.generate over the same length-sorted batches.
    texts = ["the cat sat on the mat", "John visited Paris", "how many apples did Mary buy ?", "hello", "the dog",
             "Mary has a cat", "where is the capital"]
    got = generate(model, tok, texts, max_new_tokens=6, batch_size=3)
    ids = [fast_ids(tok, t) for t in texts]
    assert got == [tok.decode(w, skip_special_tokens=True).strip() for w in hf_sorted(model, ids, 6, tok, 3)]
    dec = decoding.Decoder(model, 0)
    dec.run(rows, lambda lg, act: lg.argmax(-1).tolist(), lambda i, t: len(got) > 100, room=4, prefill_rows=4)
    assert dec.stats["decode_batches"] == dec.stats["prefill_batches"] == 3


def test_stop_strings_cut_as_the_full_budget_would():
    model = shaken(seed=1)
    tok = tiny_tokenizer_obj()
    texts = ["the cat sat on the mat", "John visited Paris", "how many apples", "hello", "Mary has a dog"]
    full = generate(model, tok, texts, max_new_tokens=16, batch_size=2)
    words = [w for t in full for w in t.split()]
    stops = [words[3], words[len(words) // 2] + " " if len(words) > 2 else "x", "zz-never"]
    want = []
    for t in full:
        for s in stops:
            t = t.split(s, 1)[0]
        want.append(t.strip())
    assert want != [t.strip() for t in full]  # the stop strings cut something
    assert generate(model, tok, texts, max_new_tokens=16, batch_size=2, stop=stops) == want
    # The settled-cut rule: a longer stop string that starts earlier may still complete.
    assert decoding.settled_cut("a b", ["b"]) == 2
    assert decoding.settled_cut("xab", ["b", "abcd"]) is None
    assert decoding.settled_cut("xabcd e", ["b", "abcd"]) == 1
    assert decoding.settled_cut("no stop", ["zz"]) is None


def test_generate_matches_model_generate_text():
    # evaluate.generate (through decode) against its old path, model.generate in length-sorted batches.
    model = shaken("lora", r=4)
    tok = tiny_tokenizer_obj()
    texts = ["the cat sat on the mat", "John visited Paris", "how many apples did Mary buy ?", "hello", "the dog"]
    got = generate(model, tok, texts, max_new_tokens=10, batch_size=2)
    rows = [fast_ids(tok, t) for t in texts]
    ref = [tok.decode(w, skip_special_tokens=True).strip() for w in hf_sorted(model, rows, 10, tok)]
    assert got == ref and len(set(got)) > 2


def fast_ids(tok, text):
    from tunelab.data.encoding import tokenize_prompt

    return tokenize_prompt(tok, text)


def hf_sorted(model, rows, n, tok, bs=2):
    """model.generate over length-sorted batches, as evaluate.generate did before tunelab.evaluation.decoding."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [None] * len(rows)
    for s in range(0, len(order), bs):
        batch = order[s : s + bs]
        for i, w in zip(batch, hf(model, [rows[i] for i in batch], n, {tok.eos_token_id}, tok.pad_token_id), strict=True):
            out[i] = w
    return out


def test_sampling_is_seeded_and_follows_top_p():
    model = shaken()
    tok = tiny_tokenizer_obj()
    texts = ["the cat sat", "John visited Paris", "hello"]
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    a, b = generate(model, tok, texts, **kw), generate(model, tok, texts, **kw)
    assert a == b and a != generate(model, tok, texts, **{**kw, "seed": 8})
    assert generate(model, tok, texts, **{**kw, "top_p": 1e-6}) == generate(model, tok, texts, max_new_tokens=8)
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {decoding.choose(logits, [(1.0, 1.0, 2, g)])[0] for _ in range(200)}
    assert draws == {1, 2}  # top_k=2 keeps the two best
    assert decoding.choose(logits, [(0.0, 1.0, 0, None)]) == [1]


def test_bf16_autocast_with_and_without_bf16_weights():
    model = shaken("lora", r=4)
    tok = tiny_tokenizer_obj()
    texts = ["the cat sat on the mat", "John visited Paris", "how many apples did Mary buy ?", "hello"]
    with torch.autocast("cpu", torch.bfloat16):
        got = generate(model, tok, texts, max_new_tokens=10, batch_size=2)
        from tunelab.runtime import precision

        original = precision.cast_weights
        precision.cast_weights = lambda m, d, frozen_only=True: original(m, None)
        try:
            plain = generate(model, tok, texts, max_new_tokens=10, batch_size=2)
        finally:
            precision.cast_weights = original
    assert got == plain


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "gemma2", "qwen3", "phi3"])
def test_architectures_equal_generate(family):
    model = tiny(family).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.25)
    assert decoding.supported(model)
    rows = prompts(True)
    assert ours(model, rows, 8, {2}) == hf(model, rows, 8, {2})


def test_encoder_decoders_and_beams_keep_model_generate():
    assert not decoding.supported(tiny(SEQ2SEQ[0]))
    model = shaken()
    tok = tiny_tokenizer_obj()
    texts = ["the cat sat", "John visited Paris"]
    assert len(generate(model, tok, texts, max_new_tokens=4, num_beams=2)) == 2
    model.generation_config.repetition_penalty = 1.3
    assert not decoding.plain_generation(model)
    ids = [fast_ids(tok, t) for t in texts]
    want = [tok.decode(w, skip_special_tokens=True).strip() for w in hf_sorted(model, ids, 6, tok)]
    assert generate(model, tok, texts, max_new_tokens=6, batch_size=2) == want
