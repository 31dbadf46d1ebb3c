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


# ---- the objectives against TRL 1.16.0: TRL's own loss code on the same log-probabilities
class _LogpModel(torch.nn.Module):
    """Stands in for TRL's fused-LM-head model: returns the given per-token log-probabilities."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token

    def forward(self, **kw):
        from types import SimpleNamespace

        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def _trl_dpo(per_token, completion_mask, ref_c, ref_r, beta, ls, loss_type):
    """TRL 1.16.0's `DPOTrainer._compute_loss` (reference log-probabilities precomputed), on a stub trainer."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    model = _LogpModel(per_token).eval()
    t = DPOTrainer.__new__(DPOTrainer)
    t.__dict__.update(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=ls, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    ids = torch.zeros(completion_mask.shape, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return t._compute_loss(model, inputs, False)


@pytest.mark.parametrize("beta, ls, loss_type", [(0.1, 0.0, "sigmoid"), (0.5, 0.0, "sigmoid"), (0.5, 0.2, "robust"),
                                                 (0.1, 0.45, "robust")])
def test_dpo_loss_is_trls_own_and_so_are_its_gradients(beta, ls, loss_type):
    torch.manual_seed(0)
    b, t = 4, 7
    completion_mask = torch.zeros(2 * b, t + 1, dtype=torch.long)
    for i in range(2 * b):
        completion_mask[i, 2 + i % 3 :] = 1  # responses of different lengths after the prompt
    per_token = (-torch.rand(2 * b, t, dtype=torch.float64) * 3 * completion_mask[:, 1:]).requires_grad_(True)
    ref_c, ref_r = -torch.rand(b, dtype=torch.float64) * 15, -torch.rand(b, dtype=torch.float64) * 15
    theirs = _trl_dpo(per_token, completion_mask, ref_c, ref_r, beta, ls, loss_type)
    sums = per_token.sum(1)  # TRL sums the completion's per-token log-probabilities (zero elsewhere)
    ours = dpo_loss(sums[:b], sums[b:], ref_c, ref_r, beta, ls).mean()
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0), (ours.item(), theirs.item())
    g_ours, g_theirs = torch.autograd.grad(ours, per_token)[0], torch.autograd.grad(theirs, per_token)[0]
    assert torch.allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-15)


def test_simpo_is_trls_cpo_loss():
    from types import SimpleNamespace

    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    torch.manual_seed(0)
    avg_c, avg_r = -torch.rand(5, dtype=torch.float64) * 3 - 0.01, -torch.rand(5, dtype=torch.float64) * 3 - 0.01
    for ls in (0.0, 0.1):
        stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=ls,
                               accelerator=SimpleNamespace(device="cpu"))
        theirs, _, _ = CPOTrainer.cpo_loss(stub, avg_c, avg_r)
        assert torch.allclose(simpo_loss(avg_c, avg_r, 2.0, 0.5, ls), theirs, rtol=1e-12)


def _orpo_batch(seed=0):
    """Two pairs, right-padded as tunelab's collator pads: prompt (labels -100), response, pads."""
    torch.manual_seed(seed)
    b, t = 2, 11
    ids = torch.randint(3, 128, (2 * b, t))
    lens, prompts = [11, 8, 9, 11], [4, 4, 5, 5]
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, p) in enumerate(zip(lens, prompts, strict=True)):
        attn[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _trl_orpo(model, batch, lam):
    """TRL 1.16.0's `ORPOTrainer.get_batch_loss_metrics` (its NLL and `odds_ratio_loss`) on a stub trainer."""
    from types import SimpleNamespace

    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    t = ORPOTrainer.__new__(ORPOTrainer)
    t.__dict__.update(is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=lam,
                      accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x))
    b = batch["input_ids"].shape[0] // 2
    trl_batch = {f"{side}_{k}": batch[k][rows] for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, None)))
                 for k in ("input_ids", "attention_mask", "labels")}
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(t, model, trl_batch)
    return loss, metrics


def test_orpo_loss_is_trls_own_by_default_and_the_papers_as_an_option():
    from tunelab.tasks.objectives import Preference

    model = tiny_llama()
    batch = _orpo_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    theirs, metrics = _trl_orpo(model, batch, lam=0.1)
    ours = Preference("orpo", lam=0.1).loss(model, batch)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=0), (ours.item(), theirs.item())
    g_ours = torch.autograd.grad(ours, params)
    g_theirs = torch.autograd.grad(_trl_orpo(model, batch, 0.1)[0], params)
    for a, c in zip(g_ours, g_theirs, strict=True):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-7)
    # the paper's NLL (option): the chosen responses' own token means, not TRL's batch mean over prompt + response
    paper = Preference("orpo", lam=0.1, orpo_nll="response").loss(model, batch)
    s, n = sequence_logps(model, batch)
    or_term = theirs - metrics["nll_loss"]  # TRL's -lam * mean log sigmoid(log odds)
    assert torch.allclose(paper, (-s[:2] / n[:2]).mean() + or_term, rtol=1e-5)
    assert not torch.allclose(paper, theirs, rtol=1e-4)
    assert torch.allclose(orpo_loss(s[:2] / n[:2], s[2:] / n[2:], 0.1).mean(), paper)  # the function's default NLL
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    assert torch.allclose(log1mexp(x), trl_log1mexp(x), rtol=1e-12)


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
