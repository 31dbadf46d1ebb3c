"""Instruction-following family: reader, templates (chat and plain), perplexity against a manual
forward, and generation that does not depend on how prompts are batched."""

import json
import math

import pytest
import torch

from tunelab.errors import DataError
from tunelab.evaluation.scoring import generate
from tunelab.methods.base import install_context
from tunelab.tasks import TASKS

from conftest import shared_data, tiny_llama

GEN = TASKS.get("generation")
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
PROMPTS = ["the cat sat on the mat", "John", "who lives in Paris ? John Smith lives in Berlin and Mary lives in Paris",
           "how many apples did Tom buy", "Tom gave the dog more apples"]


def sharp_llama():
    """Tiny random Llama with large weights, so its outputs depend on every position and pad/position
    mistakes change them (small-init random models just repeat their last input token)."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return install_context(model)


def test_read_alpaca(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"},
                                {"instruction": "Add", "input": "2 and 3", "output": "5"},
                                {"instruction": "", "input": "", "output": "dropped"}]))
    ex = GEN.read(str(path), GEN.Config(), limit=None, skip_bad=False)
    assert [(e["instruction"], e["input"], e["output"]) for e in ex] == [("Say hi", "", "hi"), ("Add", "2 and 3", "5")]
    path.write_text(json.dumps([{"prompt": "Say hi", "response": "hi"}]))
    cfg = GEN.Config(fields={"instruction": "prompt", "output": "response"})
    assert GEN.read(str(path), cfg, limit=None, skip_bad=False)[0]["output"] == "hi"
    with pytest.raises(DataError, match=r"alpaca.json:\[0\]: field 'instruction' is missing"):
        GEN.read(str(path), GEN.Config(), limit=None, skip_bad=False)


def test_row_range_split(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    train = GEN.read(f"{path}#rows=0:7", GEN.Config(), limit=None, skip_bad=False)
    evals = GEN.read(f"{path}#rows=7:", GEN.Config(), limit=None, skip_bad=False)
    assert [e["instruction"] for e in train] == [f"q{i}" for i in range(7)]
    assert [e["instruction"] for e in evals] == ["q7", "q8", "q9"]
    assert len(GEN.read(f"{path}#rows=7:", GEN.Config(), limit=2, skip_bad=False)) == 2
    with pytest.raises(DataError, match="allowed: '#rows=START:STOP'"):
        GEN.read(f"{path}#articles=0:1", GEN.Config(), limit=None, skip_bad=False)


def test_templates_plain_and_chat(tiny_tokenizer):
    ex = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    plain = GEN.Config(chat=False)
    assert GEN.prompt(ex, tiny_tokenizer, plain) == "Add\n\n2 and 3"
    assert GEN.prompt({**ex, "input": ""}, tiny_tokenizer, plain) == "Add"
    tiny_tokenizer.chat_template = CHAT
    assert GEN.prompt(ex, tiny_tokenizer, GEN.Config()) == "<user>Add\n\n2 and 3\n<assistant>"
    assert GEN.prompt(ex, tiny_tokenizer, GEN.Config(system="Be brief.", template="Q: {instruction} [{input}]")) == \
        "<system>Be brief.\n<user>Q: Add [2 and 3]\n<assistant>"


def test_generation_does_not_depend_on_batching(tiny_tokenizer):
    model = sharp_llama()
    one = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=8, batch_size=1)
    many = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=8, batch_size=len(PROMPTS))
    pairs = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=8, batch_size=2)
    assert one == many == pairs
    assert len(set(one)) == len(one)  # the model really answers each prompt differently


def test_perplexity_matches_a_manual_forward(tiny_tokenizer):
    model = sharp_llama()
    ex = [{"instruction": p, "input": "", "output": o, "_where": str(i)}
          for i, (p, o) in enumerate([("the cat sat", "on the mat"), ("who lives in Paris ?", "John Smith lives in Paris")])]
    cfg = GEN.Config(chat=False)
    metrics, preds = GEN.evaluate(model, tiny_tokenizer, ex, cfg, batch_size=2, gen={"max_new_tokens": 4})
    total, count = 0.0, 0
    for e in ex:
        p = tiny_tokenizer(e["instruction"], add_special_tokens=False)["input_ids"]
        t = tiny_tokenizer(e["output"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([p + t])).logits.log_softmax(-1)[0]
        total += sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(t))
        count += len(t)
    assert metrics["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-4)
    assert list(metrics)[0] == "rougeL" and metrics["n"] == 2 and 0 <= metrics["bleu"] <= 100
    assert preds[0]["reference"] == "on the mat" and isinstance(preds[0]["prediction"], str)
    again, _ = GEN.evaluate(model, tiny_tokenizer, ex, cfg, batch_size=1, gen={"max_new_tokens": 4})
    assert again == pytest.approx(metrics, rel=1e-4)  # padding changes float32 sums slightly


@pytest.mark.data
def test_real_alpaca_demo():
    ex = GEN.read(str(shared_data("alpaca_demo", "alpaca_en_demo.json")), GEN.Config(), limit=None, skip_bad=False)
    assert len(ex) == 999 and sum(1 for e in ex if not e["input"]) == 587
