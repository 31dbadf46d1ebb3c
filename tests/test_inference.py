"""Evaluation inference paths (tunelab.evaluation.inference, packed choices, shared casts): the same scores, tags and spans as the plain paths."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

import tunelab
from tunelab.data.encoding import tokenize_prompt
from tunelab.evaluation import inference, scoring
from tunelab.runtime import precision
from tunelab.tasks import TASKS
from tunelab.tasks.ner import word_offsets
from tunelab.tasks.qa import best_span, windows

from conftest import shared_data, tiny_llama

PREFIX = "the cat sat on the mat and the dog ran to the "
PROMPTS = [PREFIX + w for w in ["park", "house and the cat sat", "mat", "dog on the mat and the cat"]]
CHOICES = [["red dog", "blue", "green cat mat"], ["yes", "no no no"], ["a", "b c", "d e f", "g"], ["cat dog", "sat"]]


def _plain(model, tok, prompts, choices):
    """Reference: each prompt + choice alone, a full forward, fp32."""
    out = []
    for p, cs in zip(prompts, choices, strict=True):
        pid, row = tokenize_prompt(tok, p), []
        for c in cs:
            cid = tok(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([pid + cid])
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            row.append(float(sum(logp[len(pid) - 1 + t, x] for t, x in enumerate(cid))))
        out.append(row)
    return out


def _close(a, b, tol=1e-5):
    assert [len(r) for r in a] == [len(r) for r in b]
    assert max(abs(x - y) for r, s in zip(a, b, strict=True) for x, y in zip(r, s, strict=True)) < tol


@pytest.mark.parametrize("prompts", [PROMPTS, [p[len(PREFIX):] for p in PROMPTS]], ids=["shared-prefix", "no-prefix"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_packed_choices_match_plain_rows(prompts, batch_size, tiny_tokenizer, monkeypatch):
    model = tiny_llama()
    assert inference.packable(model)
    ref = _plain(model, tiny_tokenizer, prompts, CHOICES)
    _close(scoring.score_choices(model, tiny_tokenizer, prompts, CHOICES, batch_size=batch_size), ref)
    monkeypatch.setattr(inference, "packable", lambda m: False)  # today's path: one row per prompt + choice
    _close(scoring.score_choices(model, tiny_tokenizer, prompts, CHOICES, batch_size=batch_size), ref)


def test_packed_choices_with_lora_and_training_mode_restored(tiny_tokenizer):
    model = tunelab.attach(tiny_llama(), "lora", r=4, target_modules="all-linear")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    assert inference.packable(model)
    got = scoring.score_choices(model, tiny_tokenizer, PROMPTS, CHOICES, batch_size=2)
    assert model.training
    model.eval()
    _close(got, _plain(model, tiny_tokenizer, PROMPTS, CHOICES))


def test_hooked_method_keeps_the_row_path(tiny_tokenizer):
    model = tunelab.attach(tiny_llama(), "loreft", rank=2, positions="f1+l1")
    assert not inference.packable(model)  # ReFT acts on prompt positions: rows stay prompt + choice
    got = scoring.score_choices(model, tiny_tokenizer, PROMPTS[:2], CHOICES[:2], batch_size=2)
    assert [len(r) for r in got] == [3, 2] and all(x < 0 for r in got for x in r)


def _no_cast(model, dtype, frozen_only=True):
    return contextlib.nullcontext(model)


@pytest.mark.parametrize("choices", [[["cat", "dog", "mat"]] * 4, CHOICES], ids=["single-token", "multi-token"])
def test_bf16_scores_bit_identical_with_cast_weights(choices, tiny_tokenizer, monkeypatch):
    model = tiny_llama()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scoring.score_choices(model, tiny_tokenizer, PROMPTS, choices, batch_size=2)
        monkeypatch.setattr(inference, "cast_weights", _no_cast)
        ref = scoring.score_choices(model, tiny_tokenizer, PROMPTS, choices, batch_size=2)
    assert got == ref
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_inference_casts_only_inside_and_restores():
    model = tiny_llama().train()
    with torch.autocast("cpu", dtype=torch.bfloat16), inference.inference(model):
        assert not model.training and not torch.is_grad_enabled()
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.training and model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with inference.inference(model):  # autocast off: nothing cast
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_inference_holds_copies_only_where_they_fit_in_free_memory(tiny_tokenizer, monkeypatch):
    model = tiny_llama()
    need = precision.saved_bytes(model, torch.bfloat16, frozen_only=False)
    up = model.model.layers[0].mlp.up_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(precision, "free_bytes", lambda device: 4 * need)
        with inference.inference(model):
            assert up.weight.dtype == torch.bfloat16
        held = scoring.score_choices(model, tiny_tokenizer, PROMPTS, CHOICES, batch_size=2)
        monkeypatch.setattr(precision, "free_bytes", lambda device: 4 * need - 1)  # a large model on a full machine
        with inference.inference(model):
            assert up.weight.dtype == torch.float32  # autocast casts per forward instead
        plain = scoring.score_choices(model, tiny_tokenizer, PROMPTS, CHOICES, batch_size=2)
    assert held == plain  # bit-identical: only where the casts happen changes


def test_best_spans_match_the_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        b, t = 5, 40
        # bf16-rounded logits: ties happen, as they do under autocast
        start = torch.randn(b, t, generator=g).to(torch.bfloat16).float().round(decimals=1)
        end = torch.randn(b, t, generator=g).to(torch.bfloat16).float().round(decimals=1)
        lengths = torch.randint(1, t + 1, (b,), generator=g).tolist()
        ok = torch.rand(b, t, generator=g) < (0.0 if trial == 0 else 0.7)
        offsets = [[(i, i + 1) if ok[r, i] else None for i in range(n)] for r, n in enumerate(lengths)]
        for r, n in enumerate(lengths):
            ok[r, n:] = torch.rand(t - n, generator=g) < 0.5  # beyond a window's length: never read
        got = inference.best_spans(start, end, ok, lengths, max_answer_tokens=4, n_best=6)
        ref = [best_span(start[r, :n], end[r, :n], offsets[r], 4, 6) for r, n in enumerate(lengths)]
        assert got == ref


NER_TOKENS = [["John", "Smith", "lives", "in", "Paris", "."], ["Mary", "has", "the", "cat"], ["the", "dog"],
              ["Paris", "is", "in", "the", "mat", "and", "John", "sat", "on", "the", "cat", "."]]


def ner_head_case(eval_max_length: int):
    """The NER family, NER_TOKENS as examples, a head config and a seeded tiny BERT token head."""
    ner = TASKS.get("ner")
    ex = [{"tokens": t, "tags": ["O"] * len(t), "_where": f"f:{i}"} for i, t in enumerate(NER_TOKENS)]
    cfg = ner.Config(formulation="head", labels=["O", "B-LOC", "I-LOC", "B-PER", "I-PER"],
                     eval_max_length=eval_max_length)
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=5)).eval()
    return ner, ex, cfg, model


def test_ner_head_tags_match_one_sentence_at_a_time(tiny_tokenizer):
    ner, ex, cfg, model = ner_head_case(9)
    got = ner._tag_with_head(model, tiny_tokenizer, ex, cfg, batch_size=3)
    for e, tags in zip(ex, got, strict=True):  # reference: `align` and an unpadded forward per sentence
        feat = ner.align(tiny_tokenizer, e["tokens"], None, {}, cfg.eval_max_length)
        with torch.no_grad():
            best = model(input_ids=torch.tensor([feat["input_ids"]])).logits[0].argmax(-1)
        want = ["O"] * len(e["tokens"])
        for pos, w in enumerate(feat["words"]):
            if w is not None:
                want[w] = cfg.labels[int(best[pos])]
        assert tags == want
    assert word_offsets(["a", "bc"]) == ("a bc", [(0, 1), (2, 4)])


def test_qa_head_answers_match_window_by_window(tiny_tokenizer):
    qa = TASKS.get("qa")
    ctx = "the cat sat on the mat and the dog sat on the mat . Mary lives in Paris . the dog has the cat ."
    ex = [{"id": str(i), "question": q, "context": ctx, "answers": ["Paris"], "answer_starts": [ctx.index("Paris")],
           "_where": f"f:{i}"} for i, q in enumerate(["who lives in Paris ?", "what has the dog ?", "where ?"])]
    cfg = qa.Config(formulation="head", window=16, stride=4, max_answer_tokens=3, n_best=5)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64)).eval()
    got = qa._extract(model, tiny_tokenizer, ex, cfg, batch_size=4)
    want = []
    for e in ex:  # reference: every window alone, the loop's span search
        best = None
        for w in windows(tiny_tokenizer, e["question"], e["context"], cfg.window, cfg.stride):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([w["input_ids"]]))
            span = best_span(out.start_logits[0], out.end_logits[0], w["offsets"], 3, 5)
            if span is not None and (best is None or span[0] > best[0]):
                best = (span[0], w["offsets"][span[1]][0], w["offsets"][span[2]][1])
        want.append(e["context"][best[1] : best[2]] if best else "")
    assert got == want and any(got)


@pytest.mark.slow
def test_real_openbookqa_same_predictions_as_row_scoring(monkeypatch):
    """SmolLM2 on 24 OpenBookQA questions under bf16 autocast: the packed path picks the same answers."""
    from tunelab.config import load_config
    from tunelab.training.loop import Run

    path = shared_data("llm_adapters", "openbookqa", "test.json")
    cfg = load_config(None, ["model.name=smollm2-135m", "task.name=reasoning", f"data.eval={path}", "data.max_eval=24",
                             "method.name=full", "eval.loss=false", "eval.batch_size=8", "train.threads=2"])
    r = Run(cfg)
    fast_metrics, fast_preds = r.evaluate()
    monkeypatch.setattr(inference, "packable", lambda m: False)
    monkeypatch.setattr(inference, "cast_weights", _no_cast)
    metrics, preds = r.evaluate()
    assert fast_metrics == metrics
    assert [p["prediction"] for p in fast_preds] == [p["prediction"] for p in preds]
    # bf16: the scores move with the shapes of the batch (today's row path at batch 3 against batch 8
    # differs by up to ~0.23 on these questions), so the packed path is held to twice that spread
    r.cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 3})})
    _, rows3 = r.evaluate()

    def spread(xs, ys):
        return max(abs(a["output"][k] - b["output"][k]) for a, b in zip(xs, ys, strict=True) for k in a["output"])

    noise = spread(rows3, preds)
    assert 0 < noise < 0.5 and spread(fast_preds, preds) <= 2 * noise


@pytest.mark.slow
@pytest.mark.parametrize("task", ["ner", "qa"])
def test_real_heads_same_predictions_with_cast_weights(task, monkeypatch):
    """MiniLM token and span heads on real dev data under bf16 autocast: the same predictions and metrics
    with the weights cast once as with autocast's per-call casts (today's path)."""
    from tunelab.config import load_config
    from tunelab.training.loop import Run

    data = {"ner": [f"data.eval={shared_data('conll2003', 'eng.testa')}", "data.max_eval=64"],
            "qa": [f"data.eval={shared_data('squad_v1.1', 'dev-v1.1.json')}#articles=40:41", "data.max_eval=40"]}[task]
    cfg = load_config(None, ["model.name=minilm-l6", f"task.name={task}", "task.formulation=head", *data,
                             "method.name=lora", "eval.loss=false", "eval.batch_size=16", "train.threads=2",
                             "train.precision=bf16"])
    r = Run(cfg)
    tunelab.attach(r.model, "lora")
    got = r.evaluate()
    monkeypatch.setattr(inference, "cast_weights", _no_cast)
    assert got == r.evaluate()


# ---------------------------------------------------------------- shared casts (each linear input cast once)
def _casts(model, ids) -> int:
    """How many fp32 -> bf16 casts of activations one forward makes (weights are held already)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and out.dtype == torch.bfloat16:
                Count.n += args[0].shape[0] == ids.shape[0]  # batch-leading: an activation, not a weight
            return out

    with Count():
        model(input_ids=ids)
    return Count.n


def _adapted(method):
    model = tunelab.attach(tiny_llama(), method, r=4, target_modules="all-linear") if method else tiny_llama()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("method", [None, "lora", "dora"])
def test_shared_casts_fewer_casts_same_bits(method, tiny_tokenizer, monkeypatch):
    model = _adapted(method)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), inference.inference(model, shared=False):
        plain_casts, plain = _casts(model, ids), model(input_ids=ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16), inference.inference(model):
        shared_casts, shared = _casts(model, ids), model(input_ids=ids).logits
    assert shared_casts < plain_casts  # Llama: 5 of the 7 per layer go (10 of 12 with an adapter's A)
    assert torch.equal(shared, plain)
    for choices in ([["cat", "dog", "mat"]] * 4, CHOICES):  # scoring, single- and multi-token
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = scoring.score_choices(model, tiny_tokenizer, PROMPTS, choices, batch_size=2)
            monkeypatch.setattr(inference, "shared_casts", contextlib.nullcontext)
            ref = scoring.score_choices(model, tiny_tokenizer, PROMPTS, choices, batch_size=2)
            monkeypatch.undo()
        assert got == ref


def test_shared_cast_follows_in_place_changes():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        want = [lin(x), lin(x + 1), lin(x * 2)]
        with inference.shared_casts():
            a = lin(x)
            x.add_(1)  # the same tensor, new contents: cast again
            b = lin(x)
            y = (x - 1) * 2  # another tensor
            c = lin(y)
            with torch.autocast("cpu", enabled=False):  # autocast off: nothing to share, fp32 as ever
                assert lin(x).dtype == torch.float32
    assert all(torch.equal(g, w) for g, w in zip([a, b, c], want, strict=True))


def test_bert_heads_same_bits_with_shared_casts(tiny_tokenizer, monkeypatch):
    ner, ex, cfg, model = ner_head_case(12)
    ids = torch.randint(3, 128, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with inference.inference(model, shared=False):
            plain_casts, plain = _casts(model, ids), model(input_ids=ids).logits
        with inference.inference(model):
            shared_casts, shared = _casts(model, ids), model(input_ids=ids).logits
        got = ner._tag_with_head(model, tiny_tokenizer, ex, cfg, batch_size=3)
        monkeypatch.setattr(inference, "shared_casts", contextlib.nullcontext)
        ref = ner._tag_with_head(model, tiny_tokenizer, ex, cfg, batch_size=3)
    assert shared_casts < plain_casts and torch.equal(shared, plain)  # q, k, v read one cast
    assert got == ref


def test_entities_memoized_as_seqeval():
    from seqeval.metrics.sequence_labeling import get_entities

    from tunelab.evaluation.metrics import entities

    for tags in (["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "I-ORG", "B-ORG", "O", "I-MISC"], []):
        assert entities(tags) == get_entities(list(tags)) == entities(list(tags))
    got = entities(["B-PER", "I-PER"])
    got.append(("X", 0, 0))  # a caller's list, not the cached chunks
    assert entities(["B-PER", "I-PER"]) == [("PER", 0, 1)]
