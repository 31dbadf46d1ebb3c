"""The end-of-turn token is in the loss for chat and generation training, a tiny model trained on short
answers stops by itself under greedy decoding, and a template that would leave the stop out is warned about."""

import json
import logging

import torch
from typer.testing import CliRunner

from test_export_llamacpp import bpe
from tunelab.cli import app
from tunelab.config import dump_config, load_config, task_config
from tunelab.tasks.base import TASKS

from conftest import tiny_llama

runner = CliRunner()
ANSWERS = ["yes", "no", "the cat", "hello world", "42", "fine thanks", "the mat", "apples"]
QUESTIONS = ["is it on?", "is it off?", "who sat?", "greet me", "what number?", "how are you?", "where?", "fruit?"]


def _chat_row(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_end_of_turn_token_is_the_last_labelled_token():
    tok = bpe("gpt2")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    chat = TASKS.get("chat")
    feat = chat.encode(_chat_row("hi", "the cat sat"), tok, task_config("chat", {}), 64)
    labels = [t for t in feat["labels"] if t != -100]
    assert labels[-1] == im_end and tok.decode(labels[:-1]) == "the cat sat"
    gen = TASKS.get("generation")
    for chat_on in (True, False):
        ex = {"instruction": "say it", "input": "", "output": "the mat", "_where": "row 0"}
        feat = gen.encode(ex, tok, task_config("generation", {"chat": chat_on}), 64)
        assert [t for t in feat["labels"] if t != -100][-1] == tok.eos_token_id


def test_a_template_that_leaves_the_stop_out_is_warned_before_training(caplog):
    from tunelab.training.preflight import check_run

    tok = bpe("gpt2")
    chat, cfg = TASKS.get("chat"), task_config("chat", {})
    rows = [dict(_chat_row(q, a), _where=f"row {i}") for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))]
    with caplog.at_level(logging.WARNING):
        check_run(chat, cfg, rows, rows, tok, tiny_llama(vocab_size=320), 64)
    assert "will not learn to stop" not in caplog.text
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with caplog.at_level(logging.WARNING):
        check_run(chat, cfg, rows, rows, tok, tiny_llama(vocab_size=320), 64)
    assert "8 of the first 8 training examples end their loss on" in caplog.text
    assert "will not learn to stop" in caplog.text


def test_trained_tiny_model_stops_by_itself(tmp_path):
    from tunelab.training.run_directory import load_trained

    tiny_llama(vocab_size=320).save_pretrained(tmp_path / "tiny")
    bpe("gpt2").save_pretrained(tmp_path / "tiny")
    rows = [_chat_row(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # scored on copies of the rows it trained on (stopping is what is tested, not generalisation)
    (tmp_path / "chat_eval.jsonl").write_text((tmp_path / "chat.jsonl").read_text())
    cfg = load_config(None, [
        f"model.name={tmp_path / 'tiny'}", "method.name=full", "task.name=chat", f"data.train={tmp_path / 'chat.jsonl'}",
        f"data.eval={tmp_path / 'chat_eval.jsonl'}", "data.max_eval=2", "train.batch_size=8", "train.max_steps=60",
        "train.lr=3e-3", "train.warmup=0", "train.progress=false", "train.precision=fp32", "train.threads=1",
        "eval.max_new_tokens=4", f"output_dir={tmp_path / 'run'}",
    ])
    (tmp_path / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert res.exit_code == 0, res.output
    model, tok, _ = load_trained(tmp_path / "run")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for q, a in zip(QUESTIONS, ANSWERS, strict=True):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        want = len(tok(a, add_special_tokens=False).input_ids) + 1
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=im_end, pad_token_id=im_end)
        new = out[0, ids.shape[1]:].tolist()
        assert im_end in new and len(new) <= want, (q, tok.decode(new))
