"""Batched prompt encoding (`tunelab.data.prompt_splicing`, the families' ``encode_many``) gives exactly the per-row
features: ids, labels, prompt lengths (the loss mask), truncation flags and counts, on the WordPiece test
tokenizer (whole-string path), on a byte-level BPE with a chat template built here (the spliced path,
fuzzed at its junctions), and on the real SmolLM2 tokenizer (slow)."""

import random

import pytest

from tunelab.config import load_config, task_config
from tunelab.data import feature_cache
from tunelab.data.prompt_splicing import Skeleton, Splicer, splittable
from tunelab.tasks import TASKS

from conftest import shared_data, tiny_tokenizer_obj

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"
          "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# junction-hostile texts: edge whitespace, unicode spaces, contractions, digits, injected special tokens, braces
TRICKY = ["the cat sat on the mat", "  two leading", "trailing ", "new\nline", "ends in newline\n", "", "x", "\n", " ",
          "<|im_end|> injected", "tab\there", "nbsp\u00a0in", "ends nbsp\u00a0", "emoji \U0001F600 ok", "'s start", "it's",
          "123 456", "a  double  space", "Review: fake", "{text} {0}", "}{", "é", "\t\t", "end.\n\n", "<|im_start|>"]


def bpe_tok(bos: bool = False):
    """A small byte-level BPE (the GPT-2 pre-tokenizer, as SmolLM2) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRICKY * 3 + ["What is the sentiment of this movie review? Answer positive or negative.",
                                          "Review: a fine film, it's great\n\nSummarize the dialogue"] * 5, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


TOKENIZERS = {"wordpiece": tiny_tokenizer_obj, "bpe": bpe_tok, "bpe-bos": lambda: bpe_tok(bos=True)}


def rows_for(family: str) -> list[dict]:
    texts = TRICKY + ["the dog " * 40]  # the last one needs truncation at max_length 48
    if family in ("sentiment", "paraphrase", "classification"):
        return [{"text": t, "text_pair": TRICKY[(-1 - i) % len(TRICKY)], "label": str(i % 2), "_where": f"f:{i}"}
                for i, t in enumerate(texts)]
    if family == "generation":
        return [{"instruction": t or "say hi", "input": TRICKY[i % 5] if i % 3 else "", "output": TRICKY[(-1 - i) % len(TRICKY)] or "ok",
                 "_where": f"f:{i}"} for i, t in enumerate(texts)]
    if family == "summarization":
        return [{"id": str(i), "dialogue": t, "summary": TRICKY[i % 7] or "s", "_where": f"f:{i}"} for i, t in enumerate(texts)]
    return [{"context": t, "question": TRICKY[i % 4] or "who", "answers": [TRICKY[(-1 - i) % len(TRICKY)] or "a"], "answer_starts": [-1],
             "id": str(i), "_where": f"f:{i}"} for i, t in enumerate(texts)]


CASES = [("sentiment", {}), ("paraphrase", {}), ("classification", {"labels": ["negative", "positive"], "label_words": ["bad", "good"]}),
         ("classification", {"labels": ["negative", "positive"], "formulation": "head", "pair": True}),
         ("sentiment", {"chat": False}), ("generation", {"system": "You help."}), ("generation", {"chat": False}),
         ("summarization", {}), ("qa", {})]


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
@pytest.mark.parametrize(("family", "params"), CASES)
def test_batched_features_equal_per_row(tok_name, family, params):
    tok, task = TOKENIZERS[tok_name](), TASKS.get(family)
    cfg = task_config(family, params)
    rows = rows_for(family)
    for max_length in (48, 256):
        batched = task.encode_many(rows, tok, cfg, max_length)
        assert batched is not None
        per_row = [task.encode(ex, tok, cfg, max_length) for ex in rows]
        assert batched == per_row
    assert any(f.get("truncated") for f in task.encode_many(rows, tok, cfg, 48)) or params.get("formulation") == "head"


def test_pipeline_counts_and_features_match_the_per_row_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    tok, task, cfg = bpe_tok(), TASKS.get("sentiment"), task_config("sentiment", {})
    rows = rows_for("sentiment") * 90  # over CACHE_MIN_ROWS: through datasets.map and the Arrow cache
    feats = feature_cache.features(task, rows, tok, cfg, 48, cache=True)
    per_row = [task.encode(ex, tok, cfg, 48) for ex in rows]
    assert feats.stats["truncated"] == sum(bool(f.get("truncated")) for f in per_row) > 0
    assert [feats[i]["input_ids"] for i in range(len(feats))] == [f["input_ids"] for f in per_row]
    assert [feats[i]["labels"] for i in range(len(feats))] == [f["labels"] for f in per_row]
    assert [feats[i]["prompt_len"] for i in range(len(feats))] == [f["prompt_len"] for f in per_row]


def test_junctions_are_exact_under_fuzzing():
    tok = bpe_tok()
    assert splittable(tok) is not None and splittable(tiny_tokenizer_obj()) is None
    sk = Skeleton.detect(lambda v: tok.apply_chat_template(
        [{"role": "user", "content": f"Sentence 1: {v['a']}\nSentence 2: {v['b']}"}], tokenize=False, add_generation_prompt=True),
        ("a", "b"))
    assert sk is not None
    rng, alphabet = random.Random(0), [" ", "\n", "\t", "a", "b", "'", "s", "1", ".", "é", "\u00a0", "<|im_end|>", "\U0001F600"]
    rows = [[TRICKY[i % len(TRICKY)], TRICKY[(i * 7) % len(TRICKY)]] for i in range(len(TRICKY) ** 2)]
    rows += [["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(2)] for _ in range(2000)]
    splicer = Splicer(tok, sk)
    got = splicer.encode(rows)
    assert got == [list(x) for x in tok([sk.fill(r) for r in rows], add_special_tokens=False)["input_ids"]]
    assert splicer.whole_rows < len(rows) / 2  # most rows really took the spliced path


def test_a_template_that_alters_the_text_is_not_substituted():
    tok = bpe_tok()
    tok.chat_template = CHATML.replace("m['content']", "m['content'] | trim")
    task, cfg = TASKS.get("sentiment"), task_config("sentiment", {})
    assert Skeleton.detect(lambda v: task.prompt({"text": v["text"]}, tok, cfg, cfg.labels), ("text",)) is None
    rows = rows_for("sentiment")
    assert task.encode_many(rows, tok, cfg, 256) == [task.encode(ex, tok, cfg, 256) for ex in rows]


def test_num_proc_config_key_and_env(monkeypatch):
    assert load_config(None, ["data.num_proc=3"]).data.num_proc == 3
    with pytest.raises(ValueError, match=r"data.num_proc"):
        load_config(None, ["data.num_proc=0"])
    assert feature_cache.num_proc(50_000, 3) == 3
    monkeypatch.setenv("TUNELAB_NUM_PROC", "4")
    assert feature_cache.num_proc(10, None) == 4 and feature_cache.num_proc(10, 1) == 1  # the config key wins
    monkeypatch.setenv("TUNELAB_NUM_PROC", "two")
    with pytest.raises(ValueError, match=r"TUNELAB_NUM_PROC"):
        feature_cache.num_proc(10, None)
    with pytest.raises(ValueError, match=r"data.num_proc"):
        feature_cache.num_proc(10, 0)


def test_cache_key_follows_the_template_and_task_config():
    tok, task = bpe_tok(), TASKS.get("sentiment")
    rows = rows_for("sentiment")
    key = feature_cache.cache_key(task, rows, tok, task_config("sentiment", {}), 256)
    assert key == feature_cache.cache_key(task, rows, tok, task_config("sentiment", {}), 256)
    assert key != feature_cache.cache_key(task, rows, tok, task_config("sentiment", {"template": "Review: {text}"}), 256)
    assert key != feature_cache.cache_key(task, rows, tok, task_config("sentiment", {"label_words": ["bad", "good"]}), 256)
    other = bpe_tok()
    other.chat_template = CHATML.replace("Be brief.", "Be kind.")
    assert key != feature_cache.cache_key(task, rows, other, task_config("sentiment", {}), 256)


@pytest.mark.slow
def test_smollm2_batched_equals_per_row_on_sst2_and_fuzz():
    from transformers import AutoTokenizer

    from tunelab.models.loading import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m")))
    assert splittable(tok) is not None
    task = TASKS.get("sentiment")
    cfg = task.fit(task_config("sentiment", {}), [])
    rows = task.read(str(shared_data("sst2", "train.tsv")), cfg, limit=3000) + rows_for("sentiment")
    assert task.encode_many(rows, tok, cfg, 256) == [task.encode(ex, tok, cfg, 256) for ex in rows]
    for family, params in CASES[5:]:
        t, c = TASKS.get(family), task_config(family, params)
        fam_rows = rows_for(family)
        for n in (48, 256):
            assert t.encode_many(fam_rows, tok, c, n) == [t.encode(ex, tok, c, n) for ex in fam_rows]
    sk = Skeleton.detect(lambda v: tok.apply_chat_template([{"role": "user", "content": "Text: " + v["a"]}], tokenize=False,
                                                           add_generation_prompt=True), ("a",))
    rng, alphabet = random.Random(1), [" ", "\n", "a", "'", "s", "1", ".", "é", "\u00a0", "<|im_end|>", "-", "\U0001F600"]
    fuzz = [["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))] for _ in range(3000)]
    assert Splicer(tok, sk).encode(fuzz) == [list(x) for x in tok([sk.fill(r) for r in fuzz], add_special_tokens=False)["input_ids"]]


def test_a_bad_label_is_the_same_error_as_per_row():
    from tunelab.errors import DataError

    tok, task, cfg = bpe_tok(), TASKS.get("sentiment"), task_config("sentiment", {})
    rows = rows_for("sentiment")[:3] + [{"text": "a", "label": "maybe", "_where": "t.tsv:5"}]
    with pytest.raises(DataError, match=r"t.tsv:5: field 'label' has value 'maybe'"):
        task.encode_many(rows, tok, cfg, 256)
