"""Preference tuning: the off switch of every method, DPO/SimPO/ORPO against TRL, the data, a tiny run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tunelab
from tunelab.errors import DataError
from tunelab.tasks import TASKS
from tunelab.tasks.objectives import dpo_loss, log1mexp, orpo_loss, sequence_logps, simpo_loss

from conftest import tiny_llama, tiny_tokenizer_obj

SWITCHED = {
    "lora": {}, "dora": {}, "qlora": {}, "loftq": {"iters": 1}, "loreft": {"rank": 2, "positions": "f2+l2"},
    "direft": {"rank": 2, "positions": "f2+l2"}, "random_mask": {"fraction": 0.05},
    "series_adapter": {"bottleneck": 8}, "parallel_adapter": {"bottleneck": 8}, "prompt_tuning": {"num_virtual_tokens": 3},
}


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    return {"input_ids": ids, "attention_mask": mask}


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", sorted(SWITCHED))
def test_disabled_gives_the_base_models_logits_exactly(method):
    batch = _inputs()
    model = tiny_llama()
    base = model(**batch).logits
    model = tunelab.attach(model, method, **SWITCHED[method])
    if method in ("qlora", "loftq"):  # their base is the quantized one: B = 0 gives exactly it
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.zero_()
            base = model(**batch).logits
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    _perturb(model)
    on = model(**batch).logits
    assert not torch.allclose(on, base, atol=1e-4), "the perturbed method must change the output"
    with tunelab.disabled(model):
        off = model(**batch).logits
    assert torch.equal(off, base)
    assert torch.equal(model(**batch).logits, on)  # switched back on when the block ends


def test_full_fine_tuning_has_no_off_switch():
    model = tunelab.attach(tiny_llama(), "full")
    with pytest.raises(ValueError, match="no off switch"), tunelab.disabled(model):
        pass


def test_disabled_refuses_a_merged_update():
    from tunelab.methods.lora import merge_in_place

    model = tunelab.attach(tiny_llama(), "lora")
    merge_in_place(model)
    with pytest.raises(ValueError, match="merged"), tunelab.disabled(model):
        pass


# ---- the objectives against TRL 1.16.0
def _trl_dpo_sigmoid(pc, pr, rc, rr, beta, ls):
    # trl/trainer/dpo_trainer.py (TRL 1.16.0, `_compute_loss`), f_divergence "reverse_kl", loss_type "sigmoid":
    #   delta_score = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    #   per_sequence_loss = -(1 - ls) * logsigmoid(beta * delta) - ls * logsigmoid(-beta * delta)
    delta = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls


def test_dpo_loss_matches_trls_formula_and_gradients():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) * 5 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    for beta, ls in ((0.1, 0.0), (0.5, 0.2)):
        ours = dpo_loss(pc, pr, rc, rr, beta, ls)
        theirs = _trl_dpo_sigmoid(pc, pr, rc, rr, beta, ls)
        assert torch.allclose(ours, theirs, rtol=1e-12)
        g_ours = torch.autograd.grad(ours.sum(), (pc, pr))
        g_theirs = torch.autograd.grad(theirs.sum(), (pc, pr))
        for a, b in zip(g_ours, g_theirs, strict=True):
            assert torch.allclose(a, b, rtol=1e-12)


def test_simpo_and_orpo_match_trl():
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from types import SimpleNamespace

    torch.manual_seed(0)
    avg_c, avg_r = -torch.rand(5, dtype=torch.float64) * 3 - 0.01, -torch.rand(5, dtype=torch.float64) * 3 - 0.01
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.1,
                           accelerator=SimpleNamespace(device="cpu"))
    theirs, _, _ = trl_cpo.CPOTrainer.cpo_loss(stub, avg_c, avg_r)
    assert torch.allclose(simpo_loss(avg_c, avg_r, 2.0, 0.5, 0.1), theirs, rtol=1e-12)
    stub = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    or_term, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(stub, avg_c, avg_r)
    # ORPO = NLL(chosen) - mean(beta * log sigmoid(log odds)); our NLL is the chosen response's token mean
    assert torch.allclose(orpo_loss(avg_c, avg_r, 0.1), -avg_c - or_term.double(), rtol=1e-6)
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), trl_orpo.log1mexp(x), rtol=1e-12)


def test_sequence_logps_counts_only_the_response_tokens():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 7))
    labels = ids.clone()
    labels[:, :4] = -100
    s, n = sequence_logps(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    want = sum(logp[:, t - 1].gather(1, ids[:, t : t + 1]).squeeze(1) for t in range(4, 7))
    assert torch.allclose(s, want, atol=1e-5) and n.tolist() == [3, 3]


# ---- the data
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reader_plain_and_chat_forms(tmp_path):
    task = TASKS.get("preference")
    cfg = task.Config()
    (a,) = task.read(str(_write(tmp_path / "p.jsonl", [{"prompt": "2 + 2 =", "chosen": "4", "rejected": "5"}])), cfg)
    (b,) = task.read(str(_write(tmp_path / "c.jsonl", [
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}]}])), cfg)
    assert (a["prompt"], a["chosen"], a["rejected"]) == ("2 + 2 =", "4", "5")
    assert b["prompt"] == [{"role": "user", "content": "hi"}] and (b["chosen"], b["rejected"]) == ("hello", "bye")


@pytest.mark.parametrize("row, error", [
    ({"prompt": "q", "chosen": "a"}, r"p\.jsonl:1: field 'rejected' is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": None, "rejected": "a"}, r"p\.jsonl:1: field 'chosen' is (empty|null)"),
    ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "unknown role 'wizard'"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "y"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]}, "not 'assistant'"),
    ({"chosen": "a", "rejected": "b"}, "field 'prompt' is missing"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "y"},
                 {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]}, "one assistant answer"),
])
def test_reader_errors_name_the_row_and_field(tmp_path, row, error):
    src = _write(tmp_path / "p.jsonl", [row])
    task = TASKS.get("preference")
    with pytest.raises(DataError, match=error):
        task.read(str(src), task.Config())


# ---- a tiny run: held-out reward accuracy rises above 0.5
WORDS = "the cat sat on mat dog was in John Mary Tom Paris Berlin visited city".split()


def _pairs(n, seed):
    import random

    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(WORDS, 4)), "chosen": "yes", "rejected": "no"} for _ in range(n)]


@pytest.mark.parametrize("method, objective", [("lora", "dpo"), ("loreft", "dpo"), ("full", "dpo"), ("lora", "simpo"), ("lora", "orpo")])
def test_tiny_preference_run_learns(tiny_dir, tmp_path, method, objective):
    from tunelab.config import load_config
    from tunelab.results import read_metrics
    from tunelab.training.loop import run

    train, dev = _write(tmp_path / "train.jsonl", _pairs(32, 0)), _write(tmp_path / "dev.jsonl", _pairs(8, 1))
    lr = {"full": 1e-3, "loreft": 1e-2}.get(method, 1e-2)
    cfg = load_config(None, [
        f"model.name={tiny_dir}", f"method.name={method}", "task.name=preference", f"task.objective={objective}",
        "task.chat=false", "task.beta=0.5", f"data.train={train}", f"data.eval={dev}", "train.batch_size=8",
        f"train.lr={lr}", "train.max_steps=12", "train.progress=false", "train.precision=fp32", "train.threads=1",
        "train.log_every=1", "eval.before=true", f"output_dir={tmp_path / 'run'}",
    ])
    m = run(cfg)
    assert read_metrics(tmp_path / "run") == m
    after, before = m["metrics"], m["before"]
    assert before["reward_accuracy"] == 0.5  # nothing trained yet: every reward is 0
    assert after["reward_accuracy"] > 0.5, after
    assert after["chosen_logp"] > before["chosen_logp"] or objective != "dpo" or after["reward_margin"] > 0
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    if objective == "dpo":
        assert "reward_accuracy" in log[-1]
    if method == "lora" and objective == "dpo":  # a finished run re-scores to the same numbers (tunelab eval)
        from tunelab.training.loop import evaluate_run

        again, _ = evaluate_run(cfg, tmp_path / "run" / "method")
        assert again["reward_accuracy"] == after["reward_accuracy"]
        assert again["reward_margin"] == pytest.approx(after["reward_margin"], abs=1e-5)


def test_packing_preference_pairs_is_refused(tmp_path):
    task = TASKS.get("preference")
    with pytest.raises(ValueError, match="cannot be packed"):
        task.collator(tiny_tokenizer_obj())([{"input_ids": [1, 2], "labels": [-100, 2], "position_ids": [0, 1]}])
