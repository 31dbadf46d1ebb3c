"""Speed levers leave the loss and the gradients unchanged; the bench measures the real loop."""

import json

import pytest
import torch

import tunelab
from tunelab.config import load_config
from tunelab.data.encoding import Collator, pack
from tunelab.models import lm_loss, prefix_cache
from tunelab.training import cpu_attention
from tunelab.training.sizing import batch_shape, bench, matmul_counts, train_flops

from conftest import tiny_llama, tiny_tokenizer_obj

FEATS = [
    {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, -100, 9, 10], "prompt_len": 4},
    {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "labels": [-100] * 6 + [11, 12, 13], "prompt_len": 6},
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_len": 1},
]


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora_model(method="lora", **params):
    model = tunelab.attach(tiny_llama(), method, **params)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # LoRA's B starts at 0: make the adapters matter
    return model.train()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["lora", "full", "loreft"])
def test_loss_positions_only_keeps_loss_and_grads(side, method):
    model = _lora_model(method) if method != "full" else tunelab.attach(tiny_llama(), "full").train()
    batch = Collator(0, padding_side=side)(FEATS)
    assert lm_loss.supports_loss_inputs(model, batch)
    ref_loss, ref = _grads(model, batch)
    trimmed = lm_loss.loss_inputs(batch)
    assert trimmed["labels"].tolist() == [9, 10, 11, 12, 13, 6, 7]  # the shifted targets, row by row
    loss, got = _grads(model, trimmed)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_loss_positions_only_on_packed_rows():
    model = _lora_model()
    batch = Collator(0)(pack(FEATS, 12))
    assert batch["attention_mask"].dim() == 4
    ref_loss, ref = _grads(model, batch)
    loss, got = _grads(model, lm_loss.loss_inputs(batch))
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)


def test_probe_refuses_a_method_that_changes_the_sequence():
    model = tunelab.attach(tiny_llama(), "prompt_tuning", num_virtual_tokens=3, init="random").train()
    batch = Collator(0)(FEATS)
    assert not lm_loss.supports_loss_inputs(model, batch)
    assert model.training  # the probe restores the mode


def test_probe_refuses_sequence_labels():
    model = tiny_llama()
    batch = Collator(0)([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7], "labels": 0}])
    assert not lm_loss.supports_loss_inputs(model, batch)


def test_flops_count_the_body_once_per_pass_and_the_head_at_loss_positions():
    model = _lora_model(r=4)
    c = matmul_counts(model)
    d, layers = 64, 2
    per_layer = d * d + 2 * d * 32 + d * d + 3 * d * 128  # q, k, v (2 kv heads of 16), o, mlp
    assert c["body_frozen"] == layers * per_layer and c["body_trained"] == 0
    assert c["head"] == 128 * d and not c["head_trains"]
    assert c["adapters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = batch_shape(Collator(0)(FEATS), 0)
    assert shape == {"tokens": 18, "loss_positions": 7, "sq_len": 36 + 81 + 9}
    f = train_flops(c, shape)
    expect = 4 * c["body_frozen"] * 18 + 4 * c["head"] * 7 + 6 * c["adapters"] * 18 + 6 * layers * d * 126
    assert f == expect


@pytest.fixture
def tiny_run(tmp_path):
    d = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    rows = [{"sentence": " ".join(["the cat sat on mat"] * (1 + i % 3)), "label": i % 2} for i in range(40)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(None, [
        f"model.name={d}", "method.name=lora", "task.name=sentiment", "task.chat=false",
        'task.labels=["no", "yes"]', "task.template={text} ?", f"data.train={data}", f"data.eval={data}",
        "train.batch_size=4", "train.threads=1", "eval.batch_size=8", f"output_dir={tmp_path / 'unused'}",
    ])


def test_bench_runs_the_loop_and_reports(tiny_run):
    res = bench(tiny_run, steps=3, warmup=1, eval_examples=8)
    t, e = res["train"], res["eval"]
    assert t["steps"] == 3 and t["tokens_per_s"]["median"] > 0 and t["peak_memory_mb"] > 0
    assert t["tokens_per_s"]["min"] <= t["tokens_per_s"]["median"] <= t["tokens_per_s"]["max"]
    assert 0 < t["mfu"]["median"] < 1
    assert e["examples"] == 8 and e["examples_per_s"] > 0 and "accuracy" in e["metrics"]
    assert not (tiny_run.run_dir()).exists()  # the timing run lives in a temporary directory


PREFIX = "the cat sat on the mat . the dog was in the city ."
PROMPTS = [PREFIX + " John visited Paris", PREFIX + " Mary", PREFIX + " it was"]


@pytest.mark.parametrize("choices", [["yes", "no"], ["Paris", "Smith", "the dog"]])
@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_shared_prefix_scoring_matches_full_rows(monkeypatch, choices, method):
    from tunelab.evaluation.scoring import score_choices

    tok = tiny_tokenizer_obj()
    model = _lora_model(method)
    made = []
    real = prefix_cache.PrefixForward

    def spy(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(prefix_cache, "PrefixForward", spy)
    fast_scores = score_choices(model, tok, PROMPTS, [choices] * 3, batch_size=2)
    assert len(made) == (1 if method == "lora" else 0)  # ReFT's hooks read positions: no prefix reuse
    monkeypatch.setattr(prefix_cache, "MIN_PREFIX", 10**6)
    plain = score_choices(model, tok, PROMPTS, [choices] * 3, batch_size=2)
    torch.testing.assert_close(torch.tensor(fast_scores), torch.tensor(plain), rtol=1e-4, atol=1e-4)


def test_shared_prefix_leaves_each_row_its_tail():
    assert prefix_cache.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert prefix_cache.shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps one token
    assert prefix_cache.shared_prefix([[1, 2, 3, 7, 8], [1, 2, 3, 4, 9]], keep_last=3) == 2
    assert prefix_cache.shared_prefix([[1, 2]]) == 0


def test_eager_attention_only_for_short_cpu_training_rows(monkeypatch):
    model = _lora_model()
    batch = Collator(0)(FEATS)
    cpu = torch.device("cpu")

    def impl(m, device):
        with cpu_attention.attention_for(m, batch, device):
            return m.config._attn_implementation

    assert model.config._attn_implementation == "sdpa"
    assert impl(model, cpu) == "eager" and model.config._attn_implementation == "sdpa"
    assert impl(model, torch.device("cuda")) == "sdpa"
    monkeypatch.setattr(cpu_attention, "EAGER_MAX_BYTES", 6 * 3 * 4 * 9**2 * 2 - 1)  # B x heads x L^2 x layers
    assert impl(model, cpu) == "sdpa"
    monkeypatch.undo()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert impl(model, cpu) == "sdpa"  # the recompute in backward must use the same kernel


def test_eager_attention_gives_the_same_loss_and_grads():
    model = _lora_model()
    batch = Collator(0)(FEATS)
    ref_loss, ref = _grads(model, batch)
    with cpu_attention.attention_for(model, batch, torch.device("cpu")):
        loss, got = _grads(model, batch)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


SHARED = list(range(10, 22))  # a 12-token "template" every row starts with
PFEATS = [
    {"input_ids": SHARED + [30, 31, 32, 40], "labels": [-100] * 15 + [40], "prompt_len": 15},
    {"input_ids": SHARED + [33, 41, 42], "labels": [-100] * 13 + [41, 42], "prompt_len": 13},
    {"input_ids": SHARED + [34, 35, 36, 37, 38, 43], "labels": [-100] * 17 + [43], "prompt_len": 17},
]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_shared_prefix_training_keeps_loss_and_grads(method):
    model = _lora_model(method) if method != "full" else tunelab.attach(tiny_llama(), "full").train()
    batch = Collator(0)(PFEATS)
    assert lm_loss.batch_prefix(batch, lm_loss.loss_inputs(batch)["logits_to_keep"]) == 12
    assert lm_loss.supports_shared_prefix(model, batch)
    ref_loss, ref = _grads(model, batch)
    model.zero_grad(set_to_none=True)
    loss = lm_loss.loss(model, batch, trim=True, prefix=True)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prefix_runs_the_head_only_on_loss_positions():
    # the prefix carries no loss: its forward must not project any row onto the vocabulary
    model = _lora_model()
    batch = Collator(0)(PFEATS)
    rows = []
    model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    lm_loss.loss(model, batch, trim=True, prefix=True).backward()
    assert rows == [0, int(lm_loss.loss_inputs(batch)["logits_to_keep"].sum())]


def test_shared_prefix_stops_before_the_first_loss_position():
    feats = [dict(f) for f in PFEATS]
    feats[1] = {"input_ids": SHARED + [33, 41, 42], "labels": [-100] * 10 + SHARED[10:] + [33, 41, 42], "prompt_len": 10}
    batch = Collator(0)(feats)
    assert lm_loss.batch_prefix(batch, lm_loss.loss_inputs(batch)["logits_to_keep"]) == 9  # position 9 predicts 10


def test_shared_prefix_refused_where_it_would_not_be_exact():
    batch = Collator(0)(PFEATS)
    assert not lm_loss.supports_shared_prefix(_lora_model("loreft"), batch)  # hooks read positions
    assert not lm_loss.supports_shared_prefix(_lora_model(dropout=0.1), batch)  # one dropout mask for all rows
    assert not lm_loss.supports_shared_prefix(_lora_model(), batch, distributed=True)
    ckpt = _lora_model()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not lm_loss.supports_shared_prefix(ckpt, batch)
    assert not lm_loss.supports_shared_prefix(_lora_model(), Collator(0)(FEATS))  # no shared prefix to check
    assert lm_loss.batch_prefix(Collator(0, padding_side="left")(PFEATS)) == 0


def test_levers_together_keep_loss_and_grads():
    model = _lora_model()
    batch = Collator(0)(PFEATS)
    ref_loss, ref = _grads(model, batch)
    model.zero_grad(set_to_none=True)
    with cpu_attention.attention_for(model, batch, torch.device("cpu")):
        loss = lm_loss.loss(model, batch, trim=True, prefix=True)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)
