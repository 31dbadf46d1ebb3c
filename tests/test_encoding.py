"""Tokenization, loss masking, truncation, collation, packing without cross-example attention, batch order."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.encoding import (
    IGNORE,
    Collator,
    batches,
    encode_head,
    encode_lm,
    pack,
    packed_attention_mask,
    tokenize_prompt,
)

from conftest import TINY_WORDS, tiny_llama, tiny_tokenizer_obj


def bos_tokenizer():
    """Like the tiny tokenizer, but it puts <s> in front (Llama-2 style)."""
    from tokenizers import processors

    tok = tiny_tokenizer_obj()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_prompt_bos_only_when_tokenizer_adds_it():
    plain, with_bos = tiny_tokenizer_obj(), bos_tokenizer()
    assert with_bos("the cat")["input_ids"][0] == 1  # the fixture really adds BOS
    assert tokenize_prompt(plain, "the cat") == ids(plain, "the cat")
    assert tokenize_prompt(with_bos, "the cat") == [1] + ids(plain, "the cat")
    assert tokenize_prompt(with_bos, "<s> the cat") == [1] + ids(plain, "the cat")  # not twice


def test_encode_lm_masks_exactly_the_prompt():
    tok = tiny_tokenizer_obj()
    f = encode_lm(tok, "Question : what sat on the mat ? Answer :", "the cat", max_length=64)
    p, t = ids(tok, "Question : what sat on the mat ? Answer :"), ids(tok, "the cat")
    assert f["input_ids"] == p + t + [tok.eos_token_id]
    assert f["prompt_len"] == len(p)
    assert f["labels"] == [IGNORE] * len(p) + t + [tok.eos_token_id]
    g = encode_lm(tok, "hi", "yes", max_length=64, add_eos=False)
    assert g["labels"] == [IGNORE] + ids(tok, "yes")


def test_encode_lm_truncates_prompt_from_left_keeping_target():
    tok = tiny_tokenizer_obj()
    prompt = " ".join(["the cat sat on the mat ."] * 5)  # 35 tokens
    f = encode_lm(tok, prompt, "yes no", max_length=10)
    assert len(f["input_ids"]) == 10 and f["prompt_len"] == 7
    assert f["input_ids"][:7] == ids(tok, prompt)[-7:]
    assert f["labels"][7:] == ids(tok, "yes no") + [tok.eos_token_id]
    # target alone too long: the prompt keeps its last max_length // 2 tokens, the target its start, no EOS
    long_target = " ".join(["yes"] * 20)
    g = encode_lm(tok, prompt, long_target, max_length=10)
    assert g["prompt_len"] == 5 and g["input_ids"][:5] == ids(tok, prompt)[-5:]
    assert g["labels"][5:] == ids(tok, "yes") * 5 and tok.eos_token_id not in g["input_ids"]


def test_encode_lm_truncation_keeps_bos():
    tok = bos_tokenizer()
    f = encode_lm(tok, "the cat sat on the mat .", "yes", max_length=5)
    assert f["input_ids"] == [1] + ids(tok, "the mat .")[-2:] + ids(tok, "yes") + [2]
    assert f["prompt_len"] == 3


def test_encode_head_pairs_and_label():
    tok = bos_tokenizer()
    f = encode_head(tok, "the cat", "a dog", label=1, max_length=16)
    assert f["input_ids"] == [1] + ids(tok, "the cat") + [2] + ids(tok, "a dog") and f["labels"] == 1
    g = encode_head(tok, "the cat sat on the mat", "a dog sat", max_length=6)
    assert len(g["input_ids"]) == 6 and "labels" not in g


def test_collator_right_and_left_padding_and_prompt_mask():
    feats = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "prompt_len": 2},
             {"input_ids": [9, 10], "labels": [IGNORE, 10], "prompt_len": 1}]
    right = Collator(pad_id=0)(feats)
    assert right["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 10, IGNORE, IGNORE]]
    assert right["prompt_mask"].tolist() == [[True, True, False, False], [True, False, False, False]]
    left = Collator(pad_id=0, padding_side="left", pad_to_multiple_of=3)(feats)
    assert left["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8], [0, 0, 0, 0, 9, 10]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert left["prompt_mask"].tolist() == [[False, False, True, True, False, False],
                                            [False, False, False, False, True, False]]
    assert left["labels"][1].tolist() == [IGNORE] * 5 + [10]
    # no prompt_len: every real token counts as prompt (e.g. a classifier input)
    heads = Collator(pad_id=0)([{"input_ids": [3, 4, 5], "labels": 1, "token_type_ids": [0, 0, 1]},
                                {"input_ids": [6], "labels": 0, "token_type_ids": [0]}])
    assert heads["labels"].tolist() == [1, 0] and heads["labels"].dtype == torch.long
    assert heads["prompt_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert heads["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="padding_side"):
        Collator(0, padding_side="middle")


def test_left_padding_matches_unpadded_logits():
    model = tiny_llama()
    batch = Collator(pad_id=0, padding_side="left")([{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([[9, 10]])).logits
    torch.testing.assert_close(out[1, -2:], alone[0], atol=1e-5, rtol=1e-5)


def lm_features(tok):
    pairs = [("the cat sat on the mat ?", "yes"), ("who visited Paris ?", "John and Mary"),
             ("hi", "hello"), ("what is the capital ?", "Berlin is the capital"), ("", "bye bye")]
    return [encode_lm(tok, p, t, max_length=32) for p, t in pairs]


def test_pack_rows_positions_and_labels():
    tok = tiny_tokenizer_obj()
    feats = lm_features(tok)
    rows = pack(feats, max_length=14)
    assert all(len(r["input_ids"]) <= 14 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(f["input_ids"]) for f in feats)
    assert sum(r["prompt_mask"].count(True) for r in rows) == sum(f["prompt_len"] for f in feats)
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][s] == IGNORE for s in starts)
    with pytest.raises(ValueError, match="truncate it first"):
        pack(feats, max_length=4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_has_no_cross_example_attention(attn):
    tok = tiny_tokenizer_obj()
    assert len(TINY_WORDS) <= 128
    feats = lm_features(tok)
    model = tiny_llama()
    model.set_attn_implementation(attn)
    rows = pack(feats, max_length=16)
    assert len(rows) < len(feats)  # some rows really hold several examples
    batch = Collator(pad_id=0, mask_dtype=None if attn == "sdpa" else torch.float32)(rows)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "prompt_mask"})
        logits = packed.logits
        total, count = 0.0, 0
        for f, (r, start) in zip_examples(feats, rows):
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]))
            torch.testing.assert_close(logits[r, start:start + n], alone.logits[0], atol=1e-5, rtol=1e-5)
            k = sum(label != IGNORE for label in f["labels"][1:])
            total, count = total + alone.loss.item() * k, count + k
    assert packed.loss.item() == pytest.approx(total / count, rel=1e-5)


def zip_examples(feats, rows):
    """Where each feature landed: (feature, (row index, start)); found by matching token runs."""
    starts = [(r, i) for r, row in enumerate(rows) for i, p in enumerate(row["position_ids"]) if p == 0]
    used = set()
    for f in feats:
        for r, i in starts:
            n = len(f["input_ids"])
            if (r, i) not in used and rows[r]["input_ids"][i:i + n] == f["input_ids"]:
                used.add((r, i))
                yield f, (r, i)
                break
        else:
            raise AssertionError(f"feature {f} not found in packed rows")


def test_position_ids_alone_are_not_enough_with_default_cache():
    """Why the collator builds the mask: with attention_mask=None, transformers 5 infers packing from
    position_ids only when no cache is built, and Llama builds one by default (use_cache=True)."""
    model = tiny_llama()
    a, b = [5, 6, 7], [8, 9, 10, 11]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b])).logits[0]
        leaky = model(input_ids=torch.tensor([a + b]), position_ids=pos).logits[0, 3:]
        nocache = model(input_ids=torch.tensor([a + b]), position_ids=pos, use_cache=False).logits[0, 3:]
        ours = model(input_ids=torch.tensor([a + b]), position_ids=pos,
                     attention_mask=packed_attention_mask(pos)).logits[0, 3:]
    assert not torch.allclose(leaky, alone, atol=1e-4)
    torch.testing.assert_close(nocache, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)


def test_packed_mask_pads_see_only_themselves():
    pos = torch.tensor([[0, 1, 0, 1, 2, 0, 0]])  # examples of 2 and 3 tokens, then 2 pads
    m = packed_attention_mask(pos)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0],
                 [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1]]
    f = packed_attention_mask(pos, torch.bfloat16)
    assert f.dtype == torch.bfloat16 and f[0, 0, 1, 0] == 0 and f[0, 0, 1, 2] == torch.finfo(torch.bfloat16).min


def test_batches_deterministic_and_cover_every_index_once():
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    a = batches(lengths, 8, seed=3, epoch=1)
    assert a == batches(lengths, 8, seed=3, epoch=1)
    assert a != batches(lengths, 8, seed=3, epoch=2) and a != batches(lengths, 8, seed=4, epoch=1)
    for kw in ({}, {"group_by_length": False}, {"shuffle": False}, {"shuffle": False, "group_by_length": False}):
        got = batches(lengths, 8, seed=0, epoch=0, **kw)
        assert sorted(i for b in got for i in b) == list(range(1003)), kw
        assert sum(len(b) < 8 for b in got) == 1
    dropped = batches(lengths, 8, seed=0, epoch=0, drop_last=True)
    assert all(len(b) == 8 for b in dropped) and len({i for b in dropped for i in b}) == 1000
    assert batches(lengths, 8, seed=0, epoch=0, shuffle=False, group_by_length=False)[0] == list(range(8))


def test_length_grouping_cuts_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(4000)]

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    grouped = batches(lengths, 16, seed=0, epoch=0)
    plain = batches(lengths, 16, seed=0, epoch=0, group_by_length=False)
    assert padding(grouped) < 0.2 * padding(plain)
    # the batch order is still shuffled: not sorted by length
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts, reverse=True)
