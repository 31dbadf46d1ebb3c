"""GRPO with verifiable rewards: rewards on tricky strings, the loss against TRL 1.16.0, a tiny run
whose reward rises, exact resume, and bad reward functions refused before training."""

import json
import sys

import pytest
import torch

import tunelab.training.loop as train_mod
from tunelab.config import load_config
from tunelab.tasks import rewards as rw
from tunelab.tasks.grpo import group_advantages, policy_loss, token_logps

from conftest import tiny_llama


# ---- rewards: the parsing rules of docs/tasks.md
@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),
    ("first 12 then 7\n#### 1,234", 1234),
    ("#### -5", -5),
    ("#### 3.25 dollars", 3.25),
    ("She had 5 apples, ate 2, so 3 are left. The answer is 3.", 3),
    ("It costs $1,200.", 1200),
    ("1,234,567 grains", 1234567),
    ("values 1,23", 23),  # not a thousands group: two numbers, the last one counts
    ("10-4 = 6", 6),
    ("10-4", 4),  # the minus after a digit is an operator: 10 and 4
    ("x = -4", -4),
    ("so \\boxed{42} and later 7", 42),
    ("\\boxed{\\frac{1}{2}} 9", 2),  # the boxed part's last number
    ("<answer> -17 </answer> then 3", -17),
    ("no number here", None),
    ("", None),
    ("#### no number", None),
])
def test_answer_number(text, number):
    assert rw.answer_number(text) == number


def test_numeric_reward_on_tricky_strings():
    ex = {"prompt": "q", "answer": "Step 1: 2+2=4\n#### 1,000"}
    assert rw.numeric("so it is 1000", ex) == 1.0
    assert rw.numeric("1,000 then 1001", ex) == 0.0  # the last number counts
    assert rw.numeric("nothing", ex) == 0.0
    assert rw.numeric("-1000", ex) == 0.0
    assert rw.numeric("42", {"answer": "42"}) == 1.0 and rw.numeric("42", {"answer": ""}) == 0.0


def test_label_format_length_rewards():
    assert rw.label(" Positive.", {"answer": "positive"}) == 1.0
    assert rw.label("positive, because it is fun", {"answer": "positive"}) == 1.0
    assert rw.label("positively not", {"answer": "positive"}) == 0.0
    assert rw.label("negative", {"answer": "positive"}) == 0.0
    assert rw.format_tag("think <answer>5</answer>", {}) == 1.0
    assert rw.format_tag("<answer> </answer>", {}) == 0.0 and rw.format_tag("5", {}) == 0.0
    assert rw.length("a b c", {}, limit=3) == 0.0
    assert rw.length("a b c d e f", {}, limit=3) == -1.0
    assert rw.length("a b c d", {}, limit=2) == -1.0 and rw.length("a b c", {}, limit=2) == -0.5


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def digits(completion, example):\n"
        "    return sum(c.isdigit() for c in completion) / max(1, len(completion.replace(' ', '')))\n"
        "def broken(completion, example):\n"
        "    raise KeyError('label')\n"
        "def wordy(completion, example):\n"
        "    return 'many'\n"
        "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


def test_user_reward_by_path(user_rewards):
    assert rw.load("my_rewards:digits")("a1", {}) == 0.5
    with pytest.raises(ValueError, match=r"task.reward: reward 'nope:f': module 'nope' cannot be imported"):
        rw.load("nope:f")
    with pytest.raises(ValueError, match=r"module 'my_rewards' has no 'missing'"):
        rw.load("my_rewards:missing")
    with pytest.raises(ValueError, match=r"is not a function"):
        rw.load("my_rewards:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match=r"reward 'numerik' is unknown; built in: format, label, length, numeric"):
        rw.load("numerik")


# ---- the loss against TRL 1.16.0's own code
def _trl_grpo_loss(per_token, mask, advantages, old, ref, *, loss_type, beta, epsilon, epsilon_high, max_len):
    """TRL 1.16.0's `GRPOTrainer._compute_loss` on a stand-in trainer whose model gives ``per_token``."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    t = GRPOTrainer.__new__(GRPOTrainer)
    acc = SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                          gather_for_metrics=lambda x: x)
    t.__dict__.update(
        model=torch.nn.Linear(1, 1).train(), aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=acc, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token, torch.zeros_like(per_token), None))
    b, n = mask.shape
    inputs = {"prompt_ids": torch.zeros(b, 3, dtype=torch.long), "prompt_mask": torch.ones(b, 3, dtype=torch.long),
              "completion_ids": torch.zeros(b, n, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    return t._compute_loss(None, inputs), t._metrics["train"]


def _batch(seed=0, b=8, n=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, : 1 + (i * 5) % n] = True  # completions of different lengths
    per_token = (-torch.rand(b, n, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = per_token.detach() + 0.3 * torch.randn(b, n, generator=g, dtype=torch.float64)  # ratios far from 1: clipping
    ref = per_token.detach() + 0.5 * torch.randn(b, n, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)  # the 2nd group: zero std
    return per_token, mask, old, ref, rewards


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta, epsilon_high, with_old", [(0.0, None, False), (0.04, None, True), (0.1, 0.28, True)])
def test_grpo_loss_and_gradients_are_trls(loss_type, beta, epsilon_high, with_old):
    per_token, mask, old, ref, rewards = _batch()
    adv, _ = group_advantages(rewards, 4, "group")
    kw = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high)
    theirs, metrics = _trl_grpo_loss(per_token, mask, adv, old if with_old else None, ref, max_len=6, **kw)
    ours, stats = policy_loss(per_token, old if with_old else per_token.detach(), ref, adv, mask, max_new_tokens=6, **kw)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-15), (ours.item(), theirs.item())
    g_ours = torch.autograd.grad(ours, per_token)[0]
    g_theirs = torch.autograd.grad(_trl_grpo_loss(per_token, mask, adv, old if with_old else None, ref, max_len=6, **kw)[0],
                                   per_token)[0]
    assert torch.allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-15)
    assert g_ours.abs().sum() > 0
    assert stats["clip_fraction"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)  # TRL counts in float32
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"][0], rel=1e-6)
    if with_old:
        assert stats["clip_fraction"] > 0  # the batch exercises the clip


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_trls(scale):
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0])
    adv, zero = group_advantages(rewards, 4, scale)
    mean = rewards.view(-1, 4).mean(1).repeat_interleave(4)
    std = (nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4) if scale != "batch" else nanstd(rewards).expand(12))
    want = (rewards - mean) / (std + 1e-4) if scale != "none" else rewards - mean
    assert torch.allclose(adv, want, atol=1e-6)
    assert zero.tolist() == [False] * 4 + [True] * 4 + [False] * 4 or scale == "batch"


def test_token_logps_are_the_completion_tokens_log_probabilities():
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 10, 11, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, -100], [-100, -100, -100, 11, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    lp, mask = token_logps(model, batch, temperature=0.7)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    want = torch.log_softmax(logits[0, 1:4] / 0.7, -1)[torch.arange(3), torch.tensor([7, 8, 9])]
    assert torch.allclose(lp[0, 1:4], want, atol=1e-6)
    assert mask.sum().item() == 4 and lp[~mask].abs().sum() == 0


# ---- tiny runs
WORDS = "the cat sat on mat dog was in John Mary Tom Paris Berlin visited city".split()


def _prompts(path, n, seed):
    import random

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": " ".join(rng.sample(WORDS, 4)), "answer": "7"}) + "\n" for _ in range(n)))
    return path


def _cfg(tiny_dir, tmp_path, out, *extra):
    return load_config(None, _overrides(tiny_dir, tmp_path, out, *extra))


def _overrides(tiny_dir, tmp_path, out, *extra):
    return [
        f"model.name={tiny_dir}", "method.name=lora", "task.name=rl", "task.chat=false", "task.reward=[my_rewards:digits]",
        "task.num_generations=8", "task.max_new_tokens=4", f"data.train={_prompts(tmp_path / 'train.jsonl', 16, 0)}",
        f"data.eval={_prompts(tmp_path / 'dev.jsonl', 8, 1)}", "train.batch_size=2", "train.lr=3e-2",
        "train.progress=false", "train.precision=fp32", "train.threads=1", "train.log_every=1", "train.seed=0",
        f"output_dir={out}", *extra]


def _log(out):
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if "loss" in json.loads(ln)]


def test_tiny_grpo_run_raises_the_mean_reward(tiny_dir, tmp_path, user_rewards):
    """Reward: the share of digit characters in a 4-token completion (a tiny random model can learn it)."""
    out = tmp_path / "run"
    m = train_mod.run(_cfg(tiny_dir, tmp_path, out, "train.max_steps=30", "eval.before=true", "method.name=full",
                           "train.lr=1e-2"))
    log = _log(out)
    assert len(log) == 30
    for key in ("reward", "reward_std_in_group", "zero_std_groups", "completion_length", "clip_fraction",
                "rollout_tokens_per_s", "step_s"):
        assert key in log[0], key
    first, last = sum(r["reward"] for r in log[:5]) / 5, sum(r["reward"] for r in log[-5:]) / 5
    assert last > first + 0.25, (first, last)  # about 0.08 -> 0.65 with this seed
    assert m["metrics"]["accuracy"] > m["before"]["accuracy"]


def test_grpo_resume_is_exact_sampling_included(tiny_dir, tmp_path, user_rewards, monkeypatch):
    steps = ["train.max_steps=6", "train.save_every=2", "task.num_iterations=2", "task.beta=0.05"]
    full = tmp_path / "full"
    train_mod.run(_cfg(tiny_dir, tmp_path, full, *steps))

    class Crash(Exception):
        pass

    real = train_mod.save_checkpoint

    def crash_after_save(path, model, opt, sched, pos):
        real(path, model, opt, sched, pos)
        if pos["step"] == 4:
            raise Crash

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_save)
    part = tmp_path / "part"
    with pytest.raises(Crash):
        train_mod.run(_cfg(tiny_dir, tmp_path, part, *steps))
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    train_mod.run(_cfg(tiny_dir, tmp_path, part, *steps))
    a, b = _log(full), _log(part)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert any(r["kl"] > 0 for r in a) and any(r["clip_fraction"] > 0 for r in a)  # mu = 2: pi_old differs from pi


def test_save_every_must_fall_between_rollout_batches(tiny_dir, tmp_path, user_rewards):
    with pytest.raises(ValueError, match=r"train.save_every=3 is not a multiple of the 2 .*task.num_iterations"):
        train_mod.run(_cfg(tiny_dir, tmp_path, tmp_path / "run", "train.max_steps=4", "train.save_every=3",
                           "task.num_iterations=2"))


@pytest.mark.parametrize("reward, error", [
    ("no_such_module:f", r"task.reward\[0\]: reward 'no_such_module:f': module 'no_such_module' cannot be imported"),
    ("my_rewards:missing", r"module 'my_rewards' has no 'missing'"),
    ("my_rewards:broken", r"reward 'my_rewards:broken' raised KeyError: 'label' on .*train.jsonl:1"),
    ("my_rewards:wordy", r"reward 'my_rewards:wordy' returned 'many' on .*train.jsonl:1; a reward must return a finite"),
])
def test_bad_reward_is_refused_before_training(tiny_dir, tmp_path, user_rewards, reward, error, monkeypatch):
    started = []
    monkeypatch.setattr(train_mod, "_train", lambda *a, **k: started.append(1))
    with pytest.raises(ValueError, match=error):
        train_mod.run(_cfg(tiny_dir, tmp_path, tmp_path / "run", "train.max_steps=2", f"task.reward=[{reward}]"))
    assert not started


def test_two_processes_each_sample_their_own_groups(tiny_dir, tmp_path, user_rewards, monkeypatch):
    """torchrun with 2 processes (gloo): each rank rolls out its own prompts (whole groups), the run trains,
    and the ranks sample independently (their first steps' rewards are not copies of each other)."""
    import os

    from test_distributed import launch

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path.parent / "my_rewards_dir"), os.environ.get("PYTHONPATH", "")]))
    mod = tmp_path.parent / "my_rewards_dir"
    mod.mkdir(exist_ok=True)
    (mod / "my_rewards.py").write_text(
        "import json, os\n"
        "def digits(completion, example):\n"
        "    with open(os.environ['GRPO_SEEN'] + os.environ['RANK'], 'a') as f:\n"
        "        f.write(json.dumps([example['prompt'], completion]) + '\\n')\n"
        "    return sum(c.isdigit() for c in completion) / max(1, len(completion.replace(' ', '')))\n")
    monkeypatch.setenv("GRPO_SEEN", str(tmp_path / "seen."))
    out = tmp_path / "two"
    cfg = [*(f"{a}" for a in _overrides(tiny_dir, tmp_path, out)), "train.max_steps=2", "train.batch_size=1"]
    res = launch({"runs": [cfg]}, tmp_path, "grpo", 2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["world_size"] == 2 and len(_log(out)) == 2
    seen = {r: [json.loads(ln) for ln in (tmp_path / f"seen.{r}").read_text().splitlines()] for r in (0, 1)}
    # per rank: the reward check before training (1 row), 2 steps x 1 prompt x 8 completions, then the
    # final evaluation's 8 dev rows (every rank scores the gathered generations)
    train = {r: seen[r][1:17] for r in (0, 1)}
    for r in (0, 1):
        assert len(seen[r]) == 1 + 16 + 8
        assert len({p for p, _ in train[r][:8]}) == 1 and len({p for p, _ in train[r][8:]}) == 1  # a group: one prompt
    assert {p for p, _ in train[0]}.isdisjoint({p for p, _ in train[1]})  # each rank its own prompts
    assert len({c for r in (0, 1) for _, c in train[r]}) > 8  # sampled apart, not copies


def test_compare_runs_grpo_across_methods(tiny_dir, tmp_path):
    """`tunelab compare` on an rl config: each method trains with GRPO and is ranked on held-out accuracy."""
    import yaml

    from tunelab.sweeps.compare import compare

    cfg = {"model": str(tiny_dir), "method": {"name": "lora"},
           "task": {"name": "rl", "chat": False, "reward": ["length"], "num_generations": 4, "max_new_tokens": 3},
           "data": {"train": str(_prompts(tmp_path / "t.jsonl", 8, 0)), "eval": str(_prompts(tmp_path / "d.jsonl", 4, 1))},
           "train": {"max_steps": 2, "batch_size": 2, "progress": False, "precision": "fp32", "threads": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = compare(path, methods=["lora", "loreft:rank=2"], seeds=[0], out_dir=tmp_path / "cmp", say=lambda m: None)
    for run in ("lora-s0", "loreft-rank2-s0"):
        m = json.loads((out / "runs" / run / "metrics.json").read_text())
        assert m["run"]["steps"] == 2 and m["metrics"]["n"] == 4 and "accuracy" in m["metrics"]
        assert "eval_loss" not in m["metrics"]  # GRPO has no held-out loss
        assert "reward" in _log(out / "runs" / run)[0]
    assert "accuracy" in (out / "results.md").read_text()


def test_prompts_without_answers_give_predictions_only(tmp_path):
    from tunelab.tasks import TASKS
    from tunelab.tasks.base import targets_optional

    task = TASKS.get("rl")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    with pytest.raises(Exception, match="answer"):
        task.read(str(path), task.Config())
    with targets_optional():
        rows = task.read(str(path), task.Config())
    assert rows[0]["answer"] == ""
    model, tok = tiny_llama(), __import__("conftest").tiny_tokenizer_obj()
    metrics, preds = task.evaluate(model, tok, rows, task.Config(chat=False, max_new_tokens=2))
    assert metrics == {"n": 1, "without_reference": 1} and "prediction" in preds[0] and "reference" not in preds[0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kl_reference_is_the_off_switch_or_a_frozen_copy(tiny_dir, tmp_path, user_rewards, monkeypatch, method):
    """beta > 0: LoRA's reference is the model with its update switched off (no copy); full fine-tuning keeps
    a frozen copy made before step 1. Either way the first step's KL is 0 (the policy is still the base)."""
    from tunelab.tasks.grpo import GRPO

    seen = {}
    real = GRPO.prepare

    def spy(self, model):
        real(self, model)
        seen["copy"] = "tunelab_reference" in model.__dict__

    monkeypatch.setattr(GRPO, "prepare", spy)
    out = tmp_path / "run"
    train_mod.run(_cfg(tiny_dir, tmp_path, out, "train.max_steps=3", f"method.name={method}", "task.beta=0.1",
                       "train.lr=1e-2"))
    log = _log(out)
    assert seen["copy"] == (method == "full")
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and log[-1]["kl"] > 1e-6
