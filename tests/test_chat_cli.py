"""tunelab chat driven through stdin: a run's method on its base, the chat template (or the plain
User:/Assistant: format), history, /reset, /system, /exit; answers equal tunelab.evaluation.scoring.generate."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import tunelab
from tunelab.cli import app
from tunelab.config import dump_config, load_config
from tunelab.evaluation.scoring import generate
from tunelab.serve.loading import render_chat

from conftest import shaken_llama, tiny_tokenizer_obj

runner = CliRunner()
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}Answer :{% endif %}")


def perturbed(method, scale=0.5, **params):
    """A tiny Llama (weights shaken so it does more than repeat its input) with ``method`` attached and
    its trainable tensors moved off their init."""
    return shaken_llama(method, shake_seed=5, shake=0.1, moved=scale, **params)


def make_run(tmp_path, method, params, template=TEMPLATE):
    """A run directory as `tunelab train` leaves it: config.yaml naming the base, method/ with the tensors."""
    base, run = tmp_path / f"base-{method}", tmp_path / f"run-{method}"
    tok = tiny_tokenizer_obj()
    tok.chat_template = template
    perturbed(None).save_pretrained(base)
    tok.save_pretrained(base)
    model = perturbed(method, **params)
    tunelab.save(model, run / "method")
    cfg = load_config(None, [f"model.name={base}", f"method.name={method}", "task.name=generation", "train.precision=fp32",
                                f"output_dir={run}"])
    (run / "config.yaml").write_text(dump_config(cfg))
    return run, model, tok


def answers(output: str) -> list[str]:
    return [m.strip() for m in re.findall(r"^model> (.*)$", output, flags=re.M)]


def expected(model, tok, messages):
    prompt, stops = render_chat(tok, messages)
    return generate(model, tok, [prompt], max_new_tokens=6, stop=stops)[0]


# sensitive: this tiny model's answers differ with the history and the system message (so the test can fail)
@pytest.mark.parametrize("method,params,sensitive", [("lora", {"r": 2}, True), ("loreft", {"rank": 2}, False)])
def test_chat_history_reset_and_system(tmp_path, method, params, sensitive):
    run, model, tok = make_run(tmp_path, method, params)
    script = "hello\nhello\n/reset\nhello\n/system the cat sat\nhello\n/bogus\n/exit\nnever read\n"
    res = runner.invoke(app, ["chat", str(run), "--greedy", "--max-new-tokens", "6", "--threads", "1"], input=script)
    assert res.exit_code == 0, res.output
    assert f"tunelab chat: {run} ({method} on " in res.output and "its chat template" in res.output
    got = answers(res.output)
    assert len(got) == 4, res.output
    u = {"role": "user", "content": "hello"}
    a1 = expected(model, tok, [u])
    a2 = expected(model, tok, [u, {"role": "assistant", "content": a1}, u])
    sys_ = {"role": "system", "content": "the cat sat"}
    a4 = expected(model, tok, [sys_, u, {"role": "assistant", "content": a1}, u])  # /system keeps the history
    assert got == [a1, a2, a1, a4]  # /reset: the same first answer again
    assert len({a1, a2, a4}) == 3 or not sensitive  # history and system message really reach the model
    assert "(conversation reset)" in res.output and "(system message set: the cat sat)" in res.output
    assert "unknown command /bogus" in res.output and "never read" not in res.output


def test_chat_base_model_without_template_and_errors(tmp_path):
    run, _, tok = make_run(tmp_path, "lora", {"r": 2}, template=None)
    base = tmp_path / "base-lora"
    res = runner.invoke(app, ["chat", str(base), "--greedy", "--max-new-tokens", "6", "--system", "the cat sat"],
                        input="hello\n")
    assert res.exit_code == 0, res.output
    assert "base model" in res.output and "plain User:/Assistant: format" in res.output
    prompt, stops = render_chat(tok, [{"role": "system", "content": "the cat sat"}, {"role": "user", "content": "hello"}])
    assert prompt == "the cat sat\nUser: hello\nAssistant:" and stops == ["\nUser:"]
    assert answers(res.output) == [generate(perturbed(None), tok, [prompt], max_new_tokens=6, stop=stops)[0]]
    # Bad targets: one clear line, exit code 2, no traceback.
    res = runner.invoke(app, ["chat", str(tmp_path / "missing")], input="")
    assert res.exit_code == 2 and "missing" in res.output and "Traceback" not in res.output
    (run / "method" / "method.json").write_text(json.dumps({**json.loads((run / "method" / "method.json").read_text()),
                                                            "heads": ["score"]}))
    res = runner.invoke(app, ["chat", str(run)], input="")
    assert res.exit_code == 2 and "trained a task head (score)" in res.output
    (run / "method" / "method.json").unlink()
    res = runner.invoke(app, ["chat", str(run)], input="")
    assert res.exit_code == 2 and f"{run}: no trained method here" in res.output  # one message for merge, export, chat
