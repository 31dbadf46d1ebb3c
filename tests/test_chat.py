"""Task `chat`: OpenAI/ShareGPT normalisation, templates, assistant-only loss (decoded), errors, evaluation."""

import json

import pytest

from tunelab.config import task_config
from tunelab.data import feature_cache
from tunelab.data.chat_templates import ChatError, normalize, render
from tunelab.errors import DataError
from tunelab.tasks import TASKS

from conftest import tiny_llama, tiny_tokenizer_obj

CHAT = TASKS.get("chat")
CHATML_JINJA = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nhi<|im_end|>\n"
                "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONV = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi the dog"}, {"role": "user", "content": "how many apples"},
        {"role": "assistant", "content": "yes 3"}]


def chat_tok(own_template=True):
    tok = tiny_tokenizer_obj()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML_JINJA if own_template else None
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def runs(labels):
    """Contiguous runs of loss positions."""
    out, cur = [], []
    for t in labels:
        if t == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("template", [None, "chatml", "zephyr", "alpaca"])
def test_loss_on_every_assistant_turn_only(template):
    tok = chat_tok()
    cfg = task_config("chat", {"template": template})
    f = CHAT.encode({"messages": CONV, "_where": "x"}, tok, cfg, 256)
    decoded = [tok.decode(r) for r in runs(f["labels"])]
    end = "<|im_end|>" if template in (None, "chatml") else "</s>"
    assert decoded == [f"hi the dog {end}", f"yes 3 {end}"]
    # everything else (system, user turns, role headers) carries no loss, and ids match labels where scored
    assert all(lab in (-100, i) for lab, i in zip(f["labels"], f["input_ids"], strict=True))
    assert f["prompt_len"] == f["labels"].index(next(t for t in f["labels"] if t != -100))


def test_own_template_matches_named_chatml_text():
    tok = chat_tok()
    own, spans_own = render(CONV, tok, None)
    named, spans_named = render(CONV, tok, "chatml")
    assert own == named and spans_own == spans_named
    prompt, _ = render(CONV[:4], tok, None, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "hi the dog" in prompt


def test_no_template_on_a_base_tokenizer_is_a_clear_error():
    with pytest.raises(ChatError, match="no chat template.*chatml"):
        render(CONV, chat_tok(own_template=False), None)


def test_normalize_sharegpt_and_tool_calls():
    msgs = normalize([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "sharegpt")
    assert msgs == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
    msgs = normalize([{"role": "user", "content": "q"}, call, {"role": "tool", "content": "42"},
                      {"role": "assistant", "content": [{"type": "text", "text": "it is 42"}]}])
    assert '"name": "f"' in msgs[1]["content"] and msgs[3]["content"] == "it is 42"


@pytest.mark.parametrize("turns, style, match", [
    ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "openai", r"turn 0: field 'role' has unknown role 'robot'"),
    ([{"role": "user", "content": "x"}], "openai", "no assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "assistant"}], "openai", "turn 1: field 'content' is missing"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "openai", "turn 0 field 'content': content must be text"),
    ([{"from": "alien", "value": "x"}], "sharegpt", "field 'from' has unknown role 'alien'"),
    ([], "openai", "non-empty list"),
])
def test_bad_conversations(turns, style, match):
    with pytest.raises(ChatError, match=match):
        normalize(turns, style)


def test_read_detects_formats_and_names_bad_rows(tmp_path):
    tok, cfg = chat_tok(), task_config("chat", {})
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}])
    f = feature_cache.features(CHAT, CHAT.read(str(share), cfg), tok, cfg, 64)
    assert [tok.decode(r) for r in runs(f[0]["labels"])] == ["hi <|im_end|>"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONV}, {"messages": CONV[:2]}, {"messages": CONV}])
    with pytest.raises(DataError, match=r"bad.jsonl row 2: no assistant turn"):
        feature_cache.features(CHAT, CHAT.read(str(bad), cfg), tok, cfg, 64)
    f = feature_cache.features(CHAT, CHAT.read(str(bad), cfg, skip_bad=True), tok, cfg, 64)
    assert len(f) == 2 and f.stats["dropped"] == 1
    with pytest.raises(DataError, match=r"no 'messages' \(OpenAI\) or 'conversations'.*present: \['text'\]"):
        CHAT.read(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])), cfg)
    sel = CHAT.read(f"{bad}#rows=2:3", cfg)
    assert len(sel) == 1 and sel[0]["_where"].endswith("bad.jsonl row 3")


def test_too_long_cuts_turns_from_the_start_or_errors(tmp_path):
    tok = chat_tok()
    long = [{"role": "system", "content": "the"}] + [
        m for i in range(4) for m in ({"role": "user", "content": "the cat sat on the mat " * 2},
                                      {"role": "assistant", "content": f"yes {i}"})]
    cfg = task_config("chat", {"template": "chatml"})
    full = CHAT.encode({"messages": long}, tok, cfg, 1000)
    n = len(full["input_ids"])
    f = feature_cache.features(CHAT, CHAT.read(str(write_jsonl(tmp_path / "l.jsonl", [{"messages": long}])), cfg), tok, cfg, n - 10)
    assert f.stats["truncated"] == 1 and f.lengths[0] <= n - 10
    text = tok.decode(f[0]["input_ids"])
    assert text.startswith("<|im_start|> [UNK] the") and "yes 0" not in text and "yes 3" in text  # system kept, oldest exchange cut
    err = task_config("chat", {"template": "chatml", "truncation": "error"})
    with pytest.raises(DataError, match=r"l.jsonl row 1: the conversation is longer than max_length \d+; cutting the first 2 turns would fit"):
        feature_cache.features(CHAT, CHAT.read(str(tmp_path / "l.jsonl"), err), tok, err, n - 10)


def test_evaluate_scores_last_assistant_turn_and_perplexity(tmp_path):
    tok = chat_tok()
    model = tiny_llama()
    cfg = task_config("chat", {"template": "chatml"})
    ex = CHAT.read(str(write_jsonl(tmp_path / "e.jsonl", [{"messages": CONV}] * 2)), cfg)
    metrics, preds = CHAT.evaluate(model, tok, ex, cfg, batch_size=2, gen={"max_new_tokens": 3})
    assert list(metrics)[:2] == ["rougeL", "perplexity"] and metrics["n"] == 2
    assert 1 < metrics["perplexity"] < 1e4 and preds[0]["reference"] == "yes 3"
    assert preds[0]["input"].endswith("<|im_start|>assistant\n")


def test_unknown_template_is_rejected():
    with pytest.raises(ValueError, match="unknown template 'chatlm'.*chatml"):
        CHAT.read("x.jsonl", task_config("chat", {"template": "chatlm"}))


def test_template_skeleton_is_exact_or_not_used():
    from tunelab.data.chat_templates import _sentinel

    tok = chat_tok()
    convs = [[{"role": "user", "content": f"the cat {i}"}, {"role": "assistant", "content": f"yes {i}"}] for i in range(6)]
    assert [render(c, tok, None) for c in convs] == [_sentinel(c, tok, False) for c in convs]
    tok.chat_template = CHATML_JINJA.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")  # alters contents
    padded = [[{"role": "user", "content": f"  the cat {i} "}, {"role": "assistant", "content": f" yes {i}  "}] for i in range(6)]
    assert [render(c, tok, None) for c in padded] == [_sentinel(c, tok, False) for c in padded]
    assert "<|im_start|>user\nthe cat 5<|im_end|>" in render(padded[5], tok, None)[0]


@pytest.mark.parametrize("row, match", [
    ({"text": "no conversation here"}, r"bad.jsonl row 2: field 'messages' is missing or null, expected a list of turns"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                {"type": "image_url", "image_url": {"url": "cat.png"}}]},
                   {"role": "assistant", "content": "a cat"}]},
     r"bad.jsonl row 2: turn 0 field 'content': holds a non-text part of type 'image_url' \(an image, audio or file\): "
     "tunelab trains on text only"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]},
     r"bad.jsonl row 2: turn 1: the assistant answer is empty: nothing to learn from"),
    ({"messages": [{"role": "user", "content": "hi\x00"}, {"role": "assistant", "content": "yo"}]},
     r"bad.jsonl row 2: turn 0: field 'content' contains a NUL character \(\\x00\) at character 3"),
])
def test_chat_rows_without_messages_with_an_image_or_an_empty_answer_are_refused(tmp_path, row, match):
    tok, cfg = chat_tok(), task_config("chat", {})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONV}, row, {"messages": CONV}])
    with pytest.raises(DataError, match=match):
        feature_cache.features(CHAT, CHAT.read(str(bad), cfg), tok, cfg, 64)
    f = feature_cache.features(CHAT, CHAT.read(str(bad), cfg, skip_bad=True), tok, cfg, 64)
    assert len(f) == 2 and f.stats["dropped"] == 1
