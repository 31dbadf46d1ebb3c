"""Prompt tuning: bookkeeping in training, scoring and (cached) generation; inits; save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tunelab
from tunelab.methods import prompt_tuning as pt
from tunelab.methods.base import context

from conftest import tiny_bert, tiny_llama

P = 4
SEQS = [[5, 17, 33, 80, 9, 41], [7, 99, 23, 64]]  # two lengths, to pad


def _pad(seqs, side, pad=0):
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def _base():
    """tiny_llama with an untied random head: tied tiny models just repeat their last token."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(128, 64, generator=g) * 0.3)
    return model


def _attach(**kw):
    kw.setdefault("num_virtual_tokens", P)
    model = tunelab.attach(_base(), "prompt_tuning", **kw)
    with torch.no_grad():  # make P matter clearly (vocab init rows are small)
        model.prompt_tuning.weight.mul_(20)
    return model


def test_counts_and_training_touch_only_the_prompt():
    model = _attach()
    assert tunelab.trainable_parameters(model)["trainable"] == P * 64
    base = {k: v.clone() for k, v in model.state_dict().items() if "prompt_tuning" not in k}
    ids, mask = _pad(SEQS, "right")
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_mask": mask.bool() & False}
    opt = torch.optim.AdamW([model.prompt_tuning.weight], lr=1e-2)
    model.train()
    out = model(**batch)
    assert out.logits.shape == (2, ids.shape[1], 128)  # virtual positions stripped
    assert context(model)["prompt_mask"].shape == (2, P + ids.shape[1])  # context extended too
    # the loss over extended labels equals the CE of the caller-aligned logits with the caller's labels
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_out_virtual_tokens_give_the_base_model(side):
    model = _attach()
    ids, mask = _pad(SEQS, side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        base = _base()(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        shown = model(input_ids=ids, attention_mask=mask).logits
        model.prompt_tuning.visible = False
        hidden = model(input_ids=ids, attention_mask=mask).logits
        no_mask = model(input_ids=ids[1:, -4:] if side == "left" else ids[1:, :4]).logits
    real = mask.bool()
    torch.testing.assert_close(hidden[real], base[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_mask[0], base[1][real[1]], atol=1e-5, rtol=1e-5)
    assert (shown[real] - base[real]).abs().max() > 1e-2  # visible, P changes the outputs


def test_left_and_right_padding_agree_with_unpadded_runs():
    model = _attach()
    with torch.no_grad():
        outs = {
            s: (model(input_ids=i, attention_mask=m).logits, m.bool())
            for s in ("left", "right")
            for i, m in [_pad(SEQS, s)]
        }
        alone = [model(input_ids=torch.tensor([s])).logits[0] for s in SEQS]
    for logits, real in outs.values():
        for row, want in enumerate(alone):
            torch.testing.assert_close(logits[row][real[row]], want, atol=1e-5, rtol=1e-5)


def _greedy_by_hand(model, seq, steps):
    seq = list(seq)
    for _ in range(steps):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[-steps:]


def test_generation_with_and_without_cache_and_by_hand_agree():
    model = _attach()
    ids, mask = _pad(SEQS, "left")
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        plain = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        by_hand = [_greedy_by_hand(model, s, 5) for s in SEQS]
    assert torch.equal(cached.sequences, plain.sequences)
    assert len(set(cached.sequences[0, ids.shape[1] :].tolist())) > 1  # a continuation worth comparing
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(plain.logits), atol=1e-4, rtol=1e-4)
    assert cached.sequences[:, ids.shape[1] :].tolist() == by_hand
    # P steers generation: the base model continues differently
    base = _base().generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(base, cached.sequences)


def test_inits():
    emb = tiny_llama().get_input_embeddings().weight
    vocab = tunelab.attach(tiny_llama(), "prompt_tuning", num_virtual_tokens=6, vocab_top=50, seed=3)
    rows = vocab.prompt_tuning.weight.detach()
    hits = [(emb[:50] == r).all(-1).nonzero().flatten().tolist() for r in rows]
    assert all(len(h) == 1 and h[0] not in (0, 1, 2) for h in hits) and len({h[0] for h in hits}) == 6
    text = tunelab.attach(tiny_llama(), "prompt_tuning", num_virtual_tokens=5, init="text", init_token_ids=[7, 8])
    torch.testing.assert_close(text.prompt_tuning.weight.detach(), emb[[7, 8, 7, 8, 7]])
    rnd = tunelab.attach(tiny_llama(), "prompt_tuning", init="random").prompt_tuning.weight
    assert rnd.shape == (20, 64) and rnd.abs().max() <= 0.5 and rnd.std() > 0.2
    with pytest.raises(ValueError, match="init_text"):
        tunelab.attach(tiny_llama(), "prompt_tuning", init="text")
    with pytest.raises(ValueError, match="tokenizer"):
        tunelab.attach(tiny_llama(), "prompt_tuning", init="text", init_text="great", tokenizer="/nonexistent")


SMOL = Path("/tmp/smol_st")


@pytest.mark.skipif(not (SMOL / "tokenizer.json").exists(), reason=f"{SMOL} (a local tokenizer) is absent")
def test_text_init_through_a_tokenizer_is_stored_as_ids(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL)
    ids = tok("positive negative", add_special_tokens=False)["input_ids"]
    model = tunelab.attach(
        tiny_llama(vocab_size=len(tok)),
        "prompt_tuning",
        num_virtual_tokens=3,
        init="text",
        init_text="positive negative",
        tokenizer=str(SMOL),
    )
    assert model.tunelab_method["params"]["init_token_ids"] == ids
    tunelab.save(model, tmp_path / "p")
    loaded = tunelab.load(tiny_llama(vocab_size=len(tok)), tmp_path / "p")  # no tokenizer needed now
    torch.testing.assert_close(loaded.prompt_tuning.weight, model.prompt_tuning.weight)


def test_save_load_roundtrip_and_merge_refusal(tmp_path):
    model = _attach(init="random")
    tunelab.save(model, tmp_path / "p")
    loaded = tunelab.load(_base(), tmp_path / "p")
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="nothing to fold"):
        tunelab.merge(model)


def test_encoder_classifier_and_positional_input():
    model = tunelab.attach(tiny_bert(), "prompt_tuning", num_virtual_tokens=3)
    ids, mask = _pad(SEQS, "right")
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.prompt_tuning.weight.grad.abs().sum() > 0
    llama = _attach()
    with torch.no_grad():
        torch.testing.assert_close(
            llama(torch.tensor([SEQS[0]])).logits, llama(input_ids=torch.tensor([SEQS[0]])).logits
        )
    assert pt.PromptTuning.recommended_lr == 3e-2
