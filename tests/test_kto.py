"""KTO on unpaired rows: the loss and its gradients against TRL 1.16.0, the reader, a tiny run that learns."""

import json
import math

import pytest
import torch

from tunelab.errors import DataError
from tunelab.tasks import TASKS
from tunelab.tasks.objectives import kto_loss


class _LogpModel(torch.nn.Module):
    """Stands in for TRL's fused-LM-head model: per-token log-probabilities of the rows, or of the KL rows."""

    def __init__(self, per_token, kl_ids, kl_per_token):
        super().__init__()
        self.per_token, self.kl_ids, self.kl_per_token = per_token, kl_ids, kl_per_token

    def forward(self, input_ids=None, **kw):
        from types import SimpleNamespace

        lp = self.kl_per_token if input_ids is self.kl_ids else self.per_token
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z)


def _trl_kto(per_token, kl_per_token, labels, ref, ref_kl, beta, dw, uw):
    """TRL 1.16.0's `KTOTrainer._compute_loss` (reference log-probabilities precomputed) on a stand-in trainer."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.kto_trainer import KTOTrainer

    b, t = per_token.shape
    ids, kl_ids = torch.zeros(b, t + 1, dtype=torch.long), torch.zeros(b, t + 1, dtype=torch.long)
    model = _LogpModel(per_token, kl_ids, kl_per_token).eval()
    tr = KTOTrainer.__new__(KTOTrainer)
    tr.__dict__.update(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x), calculate_KL=True,
        aux_loss_enabled=False, precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=dw,
        undesirable_weight=uw, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)
    ones = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": ones, "completion_mask": ones, "KL_input_ids": kl_ids,
              "KL_attention_mask": ones, "KL_completion_mask": ones, "label": labels, "ref_logps": ref,
              "ref_KL_logps": ref_kl}
    return tr._compute_loss(model, inputs, False), tr._metrics["eval"]


@pytest.mark.parametrize("beta, dw, uw", [(0.1, 1.0, 1.0), (0.5, 1.33, 1.0), (2.0, 1.0, 0.7)])
def test_kto_loss_and_gradients_are_trls(beta, dw, uw):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 5
    per_token = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    kl_per_token = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([True, False, False, True, True, False])
    ref = -torch.rand(b, generator=g, dtype=torch.float64) * 15
    ref_kl = kl_per_token.sum(1) - torch.rand(b, generator=g, dtype=torch.float64)  # a positive KL estimate
    theirs, metrics = _trl_kto(per_token, kl_per_token, labels, ref, ref_kl, beta, dw, uw)
    kl = (kl_per_token.sum(1) - ref_kl).mean().clamp(min=0)
    assert kl > 0
    ours = kto_loss(per_token.sum(1), ref, labels, kl, beta, dw, uw).mean()
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0), (ours.item(), theirs.item())
    assert metrics["kl"][0] == pytest.approx(kl.item(), rel=1e-12)
    g_ours = torch.autograd.grad(ours, per_token)[0]
    g_theirs = torch.autograd.grad(_trl_kto(per_token, kl_per_token, labels, ref, ref_kl, beta, dw, uw)[0], per_token)[0]
    assert torch.allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-15) and g_ours.abs().sum() > 0


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row, error", [
    ({"prompt": "p", "completion": "c"}, r"d.jsonl:1: field 'label' is missing"),
    ({"prompt": "p", "completion": "c", "label": "maybe"}, r"d.jsonl:1: field 'label' is 'maybe'; a label is true"),
    ({"prompt": "p", "completion": "c", "label": 2}, r"field 'label' is 2"),
])
def test_reader_errors_name_the_row_and_field(tmp_path, row, error):
    cfg = TASKS.get("unpaired").Config()
    with pytest.raises(DataError, match=error):
        TASKS.get("unpaired").read(str(_write(tmp_path / "d.jsonl", [row])), cfg)


def test_reader_reads_labels_in_their_forms(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": v} for v in (True, False, "true", "False", 1, 0)]
    got = TASKS.get("unpaired").read(str(_write(tmp_path / "d.jsonl", rows)), TASKS.get("unpaired").Config())
    assert [ex["desirable"] for ex in got] == [True, False, True, False, True, False]


WORDS = "the cat sat on mat dog was in John Mary Tom Paris Berlin visited city".split()


def _rows(n, seed):
    import random

    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(WORDS, 4)), "completion": "yes" if i % 2 else "no", "label": bool(i % 2)}
            for i in range(n)]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_tiny_kto_run_learns(tiny_dir, tmp_path, method):
    from tunelab.config import load_config
    from tunelab.training.loop import run

    train, dev = _write(tmp_path / "train.jsonl", _rows(32, 0)), _write(tmp_path / "dev.jsonl", _rows(8, 1))
    cfg = load_config(None, [
        f"model.name={tiny_dir}", f"method.name={method}", "task.name=unpaired", "task.chat=false", "task.beta=0.5",
        f"data.train={train}", f"data.eval={dev}", "train.batch_size=8", f"train.lr={'1e-3' if method == 'full' else '1e-2'}",
        "train.max_steps=12", "train.progress=false", "train.precision=fp32", "train.threads=1", "train.log_every=1",
        "eval.before=true", f"output_dir={tmp_path / 'run'}"])
    m = run(cfg)
    assert m["before"]["accuracy"] == 0.5  # nothing trained: every implicit reward is 0
    assert m["metrics"]["accuracy"] > 0.5 and m["metrics"]["desirable_reward"] > m["metrics"]["undesirable_reward"]
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r) and "kl" in log[-1]
