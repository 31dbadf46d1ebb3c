"""LoReFT / DiReFT: formula, orthonormality, positions (padding, short prompts, packing), generation
with and without the KV cache, parameter count, save/load, classification head, merge refusal."""

from __future__ import annotations

import math

import pytest
import torch

import tunelab
from tunelab.methods.base import method_state_dict
from tunelab.methods.reft import DiReFT, LoReFT, parse_positions, prompt_sites

from conftest import tiny_bert, tiny_llama

D, V = 64, 128


def ref_sites(mask_row: list[bool], p: int, s: int) -> tuple[set[int], set[int]]:
    """The rule written out with a loop: first p / last s columns of each run of True."""
    runs, cur = [], []
    for j, on in enumerate(mask_row):
        if on:
            cur.append(j)
        elif cur:
            runs, cur = runs + [cur], []
    if cur:
        runs.append(cur)
    pre, suf = set(), set()
    for cols in runs:
        n, pp, ss = len(cols), p, s
        if p and s and n < p + s:
            pp, ss = min(p, n // 2), min(s, math.ceil(n / 2))
        pre |= set(cols[:pp])
        suf |= set(cols[max(n - ss, 0) :]) if ss else set()
    return pre, suf - pre


def strengthen(model, scale=3.0, seed=1):
    """Make the interventions large enough to change outputs visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "rotate" not in name:  # W, b (and W2): R stays orthonormal
                p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1]))
    return model


def left_pad(seqs, pad=0):
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad)
    am = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :], am[i, L - len(s) :] = torch.tensor(s), 1
    return ids, am


# ---------------------------------------------------------------------------- positions


def test_parse_positions():
    assert parse_positions("f7+l7") == (7, 7)
    assert parse_positions("f5") == (5, 0) and parse_positions("l3") == (0, 3)
    for bad in ("x7", "", "f+l", "7"):
        with pytest.raises(ValueError, match="positions"):
            parse_positions(bad)


@pytest.mark.parametrize("p,s", [(7, 7), (2, 3), (3, 0), (0, 4), (1, 1)])
def test_prompt_sites_match_the_rule(p, s):
    g = torch.Generator().manual_seed(p * 10 + s)
    rows = [[False] * 3 + [True] * n + [False] * 4 for n in range(1, 18)]  # left pad + prompt + target
    rows.append([True] * 5 + [False] * 2 + [True] * 11 + [False] * 6)  # two packed prompts
    L = max(map(len, rows))
    rows = [r + [False] * (L - len(r)) for r in rows]
    rows.append((torch.rand(L, generator=g) > 0.5).tolist())
    pre, suf = prompt_sites(torch.tensor(rows), p, s)
    for i, r in enumerate(rows):
        want_pre, want_suf = ref_sites(r, p, s)
        assert set(pre[i].nonzero().flatten().tolist()) == want_pre, (i, r)
        assert set(suf[i].nonzero().flatten().tolist()) == want_suf, (i, r)


def test_short_prompt_rule_examples():
    pre, suf = prompt_sites(torch.ones(1, 5, dtype=torch.bool), 7, 7)  # n=5 < 14: p=2, s=3
    assert pre[0].tolist() == [1, 1, 0, 0, 0] and suf[0].tolist() == [0, 0, 1, 1, 1]
    pre, suf = prompt_sites(torch.ones(1, 20, dtype=torch.bool), 7, 7)
    assert pre[0].nonzero().flatten().tolist() == list(range(7))
    assert suf[0].nonzero().flatten().tolist() == list(range(13, 20))


def test_short_prompt_end_to_end_rows():
    """Untied f7+l7 on a 5-token prompt + 3 target tokens: prefix rows 0-1, suffix rows 2-4."""
    m = tunelab.attach(tiny_llama(), "loreft", rank=2, tied=False)
    ids = torch.randint(3, V, (1, 8))
    pm = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    m(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_mask=pm)
    rows = {k: v.tolist() for k, v in m.tunelab_reft.rows.items()}
    assert rows == {"prefix": [0, 1], "suffix": [2, 3, 4]}


# ---------------------------------------------------------------------------- the formula


def test_module_formulas_on_random_tensors():
    torch.manual_seed(0)
    h = torch.randn(11, D)
    lo = LoReFT(D, 8)
    R, W, b = lo.rotate.weight.detach(), lo.learned_source.weight.detach(), lo.learned_source.bias.detach()
    assert torch.allclose(R @ R.T, torch.eye(8), atol=1e-5)
    want = torch.stack([x + R.T @ (W @ x + b - R @ x) for x in h])
    assert torch.allclose(lo(h), want, atol=1e-5)
    di = DiReFT(D, 8)
    W1, b1, W2 = di.learned_source.weight.detach(), di.learned_source.bias.detach(), di.proj.weight.detach()
    want = torch.stack([x + W2.T @ (W1 @ x + b1) for x in h])
    assert torch.allclose(di(h), want, atol=1e-5)


@pytest.mark.parametrize("method,tied", [("loreft", True), ("loreft", False), ("direft", False)])
def test_forward_equals_independent_computation(method, tied):
    """Hooks written densely (mask x formula over every position) on an untouched copy of the base."""
    p, s = 2, 3
    m = strengthen(tunelab.attach(tiny_llama(), method, rank=4, positions=f"f{p}+l{s}", tied=tied))
    base = tiny_llama()
    ids, am = left_pad([[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]])
    pm = am.bool().clone()
    pm[0, -2:] = False  # the last two tokens of row 0 are target
    pre, suf = torch.zeros_like(pm), torch.zeros_like(pm)
    for i in range(2):
        a, b = ref_sites(pm[i].tolist(), p, s)
        pre[i, sorted(a)], suf[i, sorted(b)] = True, True

    def dense(mod):
        if method == "loreft":
            R, W, b = mod.rotate.weight, mod.learned_source.weight, mod.learned_source.bias
            return lambda h: (h @ W.T + b - h @ R.T) @ R
        return lambda h: (h @ mod.learned_source.weight.T + mod.learned_source.bias) @ mod.proj.weight

    for i, blk in enumerate(base.model.layers):
        reft = m.model.layers[i].reft
        sides = {"both": pre | suf} if tied else {"prefix": pre, "suffix": suf}
        fns = {k: dense(reft[k]) for k in sides}
        blk.register_forward_hook(
            lambda mod, a, out, fns=fns, sides=sides: out + sum(sides[k][..., None] * fns[k](out) for k in fns)
        )
    with torch.no_grad():
        got = m(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
        want = base(input_ids=ids, attention_mask=am).logits
        plain = tiny_llama()(input_ids=ids, attention_mask=am).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the intervention does something


def test_rotation_stays_orthonormal_under_adamw_with_weight_decay():
    m = tunelab.attach(tiny_llama(), "loreft", rank=8)
    rot = m.model.layers[0].reft.both.rotate
    before = rot.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    ids = torch.randint(3, V, (2, 12))
    for _ in range(5):
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    R = rot.weight.detach()
    assert (R - before).abs().max() > 1e-3  # it trained
    assert torch.allclose(R @ R.T, torch.eye(8), atol=1e-5)


# ---------------------------------------------------------------------------- counting


@pytest.mark.parametrize(
    "kw,n_interventions",
    [
        ({}, 2),
        ({"tied": False}, 4),
        ({"layers": [1]}, 1),
        ({"layers": "0;1", "positions": "f3"}, 2),
        ({"tied": False, "positions": "l5"}, 2),
    ],
)
@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_trainable_parameter_count(method, kw, n_interventions):
    r = 8
    m = tunelab.attach(tiny_llama(), method, rank=r, **kw)
    assert tunelab.trainable_parameters(m)["trainable"] == n_interventions * (2 * r * D + r)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="layers"):
        tunelab.attach(tiny_llama(), "loreft", layers=[2])
    with pytest.raises(ValueError, match="positions"):
        tunelab.attach(tiny_llama(), "loreft", positions="first7")
    with pytest.raises(ValueError, match="rnak"):
        tunelab.attach(tiny_llama(), "loreft", rnak=4)


# ---------------------------------------------------------------------------- padding


@pytest.mark.parametrize("with_prompt_mask", [True, False])
def test_left_and_right_padding_give_the_same_outputs(with_prompt_mask):
    m = strengthen(tunelab.attach(tiny_llama(), "loreft", rank=4, positions="f2+l2", tied=False))
    seqs = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
    plen = [4, 2, 5]  # prompt tokens at the start of each sequence (all of it in the last)
    L = max(map(len, seqs))
    outs = {}
    for side in ("left", "right"):
        ids = torch.zeros(3, L, dtype=torch.long)
        am = torch.zeros(3, L, dtype=torch.long)
        pm = torch.zeros(3, L, dtype=torch.bool)
        cols = []
        for i, s in enumerate(seqs):
            c = torch.arange(L - len(s), L) if side == "left" else torch.arange(len(s))
            ids[i, c], am[i, c], pm[i, c[: plen[i]]] = torch.tensor(s), 1, True
            cols.append(c)
        pos = (am.cumsum(1) - 1).clamp(min=0)
        kw = {"prompt_mask": pm} if with_prompt_mask else {}
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=am, position_ids=pos, **kw).logits
        outs[side] = [logits[i, c] for i, c in enumerate(cols)]
    for i, s in enumerate(seqs):
        one = torch.tensor([s])
        kw = {"prompt_mask": torch.arange(len(s))[None] < plen[i]} if with_prompt_mask else {}
        with torch.no_grad():
            alone = m(input_ids=one, **kw).logits[0]
        assert torch.allclose(outs["left"][i], alone, atol=1e-4)
        assert torch.allclose(outs["right"][i], alone, atol=1e-4)


# ---------------------------------------------------------------------------- generation


def greedy_reference(m, prompts, n_new):
    """No cache, no generate(): each step a full forward with the prompt marked explicitly."""
    out = []
    for s in prompts:
        ids = torch.tensor([s])
        for _ in range(n_new):
            pm = torch.arange(ids.shape[1])[None] < len(s)
            with torch.no_grad():
                nxt = m(input_ids=ids, prompt_mask=pm).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        out.append(ids[0, len(s) :].tolist())
    return out


@pytest.mark.parametrize("set_context", [True, False])
def test_generation_with_and_without_cache_gives_the_same_tokens(set_context):
    m = strengthen(tunelab.attach(tiny_llama(), "loreft", rank=4, positions="f2+l2"))
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21, 22]]
    ids, am = left_pad(prompts)
    n_new = 6
    got, logits = {}, {}
    for use_cache in (True, False):
        if set_context:  # what tunelab.evaluation.scoring does
            m.tunelab_context["prompt_mask"] = am.bool()
        out = m.generate(
            ids,
            attention_mask=am,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        m.tunelab_context.pop("prompt_mask", None)
        got[use_cache] = out.sequences[:, ids.shape[1] :].tolist()
        logits[use_cache] = torch.stack(out.logits)
    assert got[True] == got[False]
    assert torch.allclose(logits[True], logits[False], atol=1e-4)  # not just the argmax
    # per example, generated alone without padding and by a hand-written loop
    assert got[True] == greedy_reference(m, prompts, n_new)
    base = tiny_llama().generate(
        ids, attention_mask=am, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0
    )
    assert base[:, ids.shape[1] :].tolist() != got[True]  # the intervention changed the output


@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_positions_are_never_intervened(use_cache):
    m = tunelab.attach(tiny_llama(), "loreft", rank=4, positions="f2+l2")
    ids, am = left_pad([[5, 6, 7, 8, 9, 10], [20, 21, 22]])
    P, sites_per_prompt = ids.shape[1], [4, 3]  # 6 tokens -> 2+2; 3 tokens -> 1+2
    seen = []  # (T, intervened columns) per forward

    def spy(mod, args, kwargs, out):
        T = m.tunelab_reft.shape[1]
        seen.append((T, (m.tunelab_reft.rows["both"] % T).tolist()))

    m.register_forward_hook(spy, with_kwargs=True)
    m.tunelab_context["prompt_mask"] = am.bool()
    m.generate(
        ids, attention_mask=am, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0
    )
    m.tunelab_context.pop("prompt_mask")
    assert len(seen) == 5
    first_cols = seen[0][1]
    assert len(first_cols) == sum(sites_per_prompt) and max(first_cols) < P
    for T, cols in seen[1:]:
        if use_cache:
            assert T == 1 and cols == []
        else:
            assert T > P and cols == first_cols  # the same prompt columns, never a generated one


def test_beam_search_repeats_the_context_prompt_mask():
    m = strengthen(tunelab.attach(tiny_llama(), "loreft", rank=4, positions="f2+l2"))
    ids, am = left_pad([[5, 6, 7, 8, 9, 10], [20, 21, 22]])
    kw = dict(attention_mask=am, max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    m.tunelab_context["prompt_mask"] = am.bool()
    with_ctx = m.generate(ids, **kw)
    m.tunelab_context.pop("prompt_mask")
    assert torch.equal(with_ctx, m.generate(ids, **kw))  # fallback: attended tokens are the prompt


# ---------------------------------------------------------------------------- save / load / merge


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_save_load_round_trip(tmp_path, method):
    m = tunelab.attach(tiny_llama(), method, rank=4, tied=False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(3, V, (2, 12))
    for _ in range(3):
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    keys = list(method_state_dict(m))
    if method == "loreft":
        assert any(k.endswith("rotate.parametrizations.weight.original") for k in keys)
    assert not any("base" in k.split(".") for k in keys)
    tunelab.save(m, tmp_path / "out")
    fresh = tunelab.load(tiny_llama(), tmp_path / "out")
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, fresh(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, tiny_llama()(input_ids=ids).logits, atol=1e-3)


def test_merge_refuses_with_a_reason():
    m = tunelab.attach(tiny_llama(), "loreft")
    with pytest.raises(ValueError, match="cannot merge 'loreft'.*hidden states"):
        tunelab.merge(m)


# ---------------------------------------------------------------------------- classification


def test_classification_head_trains_with_the_intervention():
    torch.manual_seed(0)
    m = tiny_bert()
    m.tunelab_new_head = ["classifier"]
    m = tunelab.attach(m, "loreft", rank=1, positions="f1+l1")
    n_head = sum(p.numel() for p in m.classifier.parameters())
    assert tunelab.trainable_parameters(m)["trainable"] == 2 * (2 * D + 1) + n_head
    ids = torch.randint(5, V, (8, 10))
    am = torch.ones_like(ids)
    am[:4, 7:] = 0  # right padding on half the batch
    labels = torch.tensor([0, 1] * 4)
    head0 = m.classifier.weight.detach().clone()
    w0 = m.bert.encoder.layer[0].reft.both.learned_source.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(15):
        loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.allclose(m.classifier.weight, head0)
    assert not torch.allclose(m.bert.encoder.layer[0].reft.both.learned_source.weight, w0)


def test_stale_prompt_mask_kwarg_is_not_reused():
    """A prompt_mask passed with one batch stays in the context; the next call without one must not use it."""
    m = strengthen(tunelab.attach(tiny_llama(), "loreft", rank=4, positions="f2+l2"))
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        m(input_ids=ids, prompt_mask=torch.arange(9).expand(2, 9) < 3)
        again = m(input_ids=ids).logits  # no prompt_mask: every token is prompt
        want = m(input_ids=ids, prompt_mask=torch.ones(2, 9, dtype=torch.bool)).logits
    assert torch.allclose(again, want, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        m = tunelab.attach(tiny_llama(), "loreft", rank=4, positions="f2+l2", tied=False)
        if checkpointing:
            m.gradient_checkpointing_enable()
        m.train()
        ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(0))
        pm = torch.arange(10).expand(2, 10) < 6
        m(input_ids=ids, labels=ids, prompt_mask=pm).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
    assert all(g.abs().sum() > 0 for g in plain.values())


# ---------------------------------------------------------------------------- format and options


def test_rotation_state_is_x_at_zero_plus_a_d_by_r_base():
    m = tunelab.attach(tiny_llama(), "loreft", rank=4)
    state = method_state_dict(m)
    pre = "model.layers.0.reft.both.rotate.parametrizations.weight."
    assert state[pre + "original"].abs().max() == 0  # the identity point
    assert state[pre + "0.base_v"].shape == (D, 4) and state[pre + "0.base_tau"].shape == (4,)
    assert not any(t.shape == (D, D) for t in state.values())  # no d x d base is stored


def test_old_saved_loreft_runs_load_with_the_same_outputs(tmp_path):
    """A run saved by tunelab 0.1 (raw Householder vectors, no base) loads and computes the same edit."""
    from safetensors.torch import save_file

    m = tunelab.attach(tiny_llama(), "loreft", rank=4)
    tunelab.save(m, tmp_path / "run")
    g = torch.Generator().manual_seed(3)
    old, want = {}, {}
    h = torch.randn(6, D, generator=g)
    for i in range(2):
        pre = f"model.layers.{i}.reft.both."
        X = torch.geqrf(torch.nn.init.orthogonal_(torch.empty(D, 4)))[0].mT + 0.1 * torch.randn(4, D, generator=g)
        W, b = torch.randn(4, D, generator=g) / 8, torch.randn(4, generator=g)
        A = X.mT.tril(-1)
        R = torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(-2))).mT  # tunelab 0.1's R
        old |= {pre + "rotate.parametrizations.weight.original": X, pre + "learned_source.weight": W,
                pre + "learned_source.bias": b}
        want[i] = h + (h @ W.T + b - h @ R.T) @ R
    save_file(old, str(tmp_path / "run" / "method.safetensors"))
    fresh = tunelab.load(tiny_llama(), tmp_path / "run")
    for i in range(2):
        mod = fresh.model.layers[i].reft.both
        assert torch.allclose(mod.rotate.weight @ mod.rotate.weight.T, torch.eye(4), atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(mod(h), want[i], atol=1e-5)


def test_pyreft_short_prompt_rule():
    n = torch.arange(1, 20)
    for k in n.tolist():
        pre, suf = prompt_sites(torch.ones(1, k, dtype=torch.bool), 7, 7, rule="pyreft")
        p = s = min(7, k // 2)  # pyreft's get_intervention_locations: n//2 for both sides, always
        assert pre[0].nonzero().flatten().tolist() == list(range(p))
        assert suf[0].nonzero().flatten().tolist() == list(range(k - s, k))
    pre, suf = prompt_sites(torch.ones(1, 12, dtype=torch.bool), 3, 7, rule="pyreft")
    assert int(pre.sum()) == 3 and int(suf.sum()) == 6  # the paper's rule keeps 7 here
    m = tunelab.attach(tiny_llama(), "loreft", rank=2, tied=False, short_prompt="pyreft")
    ids = torch.randint(3, V, (1, 8))
    m(input_ids=ids, prompt_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool))
    assert {k: v.tolist() for k, v in m.tunelab_reft.rows.items()} == {"prefix": [0, 1], "suffix": [3, 4]}
    with pytest.raises(ValueError, match="short_prompt"):
        tunelab.attach(tiny_llama(), "loreft", short_prompt="both")


@pytest.mark.parametrize("cls", [LoReFT, DiReFT])
def test_dropout_placement_options(cls):
    torch.manual_seed(0)
    h = torch.randn(50, D) + 3.0
    edit_only, output = cls(D, 4, dropout=0.5), cls(D, 4, dropout=0.5, dropout_on="output")
    output.load_state_dict(edit_only.state_dict())
    edit_only.train(), output.train()
    assert not (edit_only(h) == 0).any()  # h always passes
    assert (output(h) == 0).float().mean() > 0.3  # pyreft: dropout(h + edit)
    edit_only.eval(), output.eval()
    assert torch.allclose(edit_only(h), output(h), atol=1e-6)
    with pytest.raises(ValueError, match="dropout_on"):
        tunelab.attach(tiny_llama(), "loreft", dropout_on="input")


def test_methods_listing_shows_default_lrs_and_why():
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.training.optimizer import default_lr

    out = CliRunner().invoke(app, ["methods"]).output
    block = out.split("loreft", 1)[1].split("\nparallel_adapter", 1)[0]
    assert "default lr: 0.002" in block and "short_prompt=pyreft" in block
    assert "init=zero_up" in out.split("series_adapter", 1)[1]
    for name in ("loreft", "direft", "lora", "qlora", "loftq", "series_adapter", "parallel_adapter", "random_mask"):
        assert default_lr(name) != 1e-4  # every method has its own, none falls to the generic default
    assert default_lr("loreft") == 2e-3


def test_old_state_converts_on_any_load_path():
    """model.load_state_dict (what resuming a checkpoint does) converts a 0.1 state as tunelab.load does."""
    torch.manual_seed(0)
    old = LoReFT(D, 4)
    X = torch.geqrf(torch.nn.init.orthogonal_(torch.empty(D, 4)))[0].mT
    A = X.mT.tril(-1)
    R = torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(-2))).mT
    W, b = old.learned_source.weight.detach(), old.learned_source.bias.detach()
    state = {"rotate.parametrizations.weight.original": X, "learned_source.weight": W, "learned_source.bias": b}
    new = LoReFT(D, 4)
    new.load_state_dict(state, strict=False)
    h = torch.randn(5, D)
    with torch.no_grad():
        assert torch.allclose(new(h), h + (h @ W.T + b - h @ R.T) @ R, atol=1e-5)
