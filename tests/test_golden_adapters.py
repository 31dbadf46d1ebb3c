"""Golden test: series and parallel adapters against LLM-Adapters' bottleneck.py.

The reference below is re-typed (not imported) from ``peft/src/peft/tuners/bottleneck.py`` of
github.com/AGI-Edgerunners/LLM-Adapters at commit 0059d7ce1a62303570f65e93ff1991a353d3adbc
(``TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING``, ``Linear.__init__`` / ``reset_parameters`` /
``forward``; the repository ships a modified PEFT that cannot be installed beside today's): each
host linear is replaced by the reference's module, built from the same frozen W, b and our D, U.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tunelab
from tunelab.methods import adapters as ad
from tunelab.methods.base import replace_module

from conftest import tiny_llama

COMMIT = "0059d7ce1a62303570f65e93ff1991a353d3adbc"
ADAPTER_TYPE = {"llama": {"gate_proj": "mh_adapter", "up_proj": "mh_adapter", "down_proj": "output_adapter"}}
IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


class RefLinear(nn.Linear):
    """bottleneck.py's ``Linear`` (adapter_dropout 0, non_linearity tanh)."""

    def __init__(self, host: nn.Linear, adapter_type, bottleneck, scaling, init_weights="bert"):
        d = {"mh_adapter": (host.in_features, host.in_features),
             "output_adapter": (host.out_features, host.out_features),
             "parallel_adapter": (host.in_features, host.out_features)}[adapter_type]
        super().__init__(*d, bias=host.bias is not None)
        self.weight, self.bias = host.weight, host.bias  # _replace_module shares the frozen weights
        self.adapter_type = adapter_type
        self.adapter_scaling = nn.Parameter(torch.ones(1)) if scaling == "learned" else scaling
        self.adapter_down = nn.Linear(d[0], bottleneck, bias=False)
        self.adapter_up = nn.Linear(bottleneck, d[1], bias=False)
        if init_weights == "bert":
            self.adapter_down.weight.data.normal_(mean=0.0, std=0.02)
            self.adapter_up.weight.data.normal_(mean=0.0, std=0.02)
        else:  # "mam_adapter"
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_up.weight)

    def forward(self, x):
        a = lambda z: self.adapter_up(torch.tanh(self.adapter_down(z))) * self.adapter_scaling  # noqa: E731
        if self.adapter_type == "mh_adapter":
            return F.linear(a(x) + x, self.weight, bias=self.bias)
        if self.adapter_type == "output_adapter":
            x = F.linear(x, self.weight, bias=self.bias)
            return a(x) + x
        return F.linear(x, self.weight, bias=self.bias) + a(x)


def reference_model(ours, use_parallel, scaling):
    ref = tiny_llama()
    for name, mod in ad.adapted(ours):
        host = ref.get_submodule(name)
        kind = "parallel_adapter" if use_parallel else ADAPTER_TYPE["llama"][name.rsplit(".", 1)[-1]]
        new = RefLinear(host, kind, mod.adapter.down.out_features, scaling)
        with torch.no_grad():
            new.adapter_down.weight.copy_(mod.adapter.down.weight)
            new.adapter_up.weight.copy_(mod.adapter.up.weight)
        replace_module(ref, name, new)
    return ref


@pytest.mark.parametrize(
    "method,targets",
    [
        ("series_adapter", ["gate_proj", "up_proj", "down_proj"]),  # the reference's LLaMA series recipe
        ("parallel_adapter", ["v_proj", "down_proj"]),  # its LLaMA parallel recipe
        ("parallel_adapter", ["up_proj", "down_proj"]),
    ],
)
@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_forward_equals_the_reference(method, targets, scaling):
    ours = tunelab.attach(tiny_llama(), method, init="bert", bottleneck=8, target_modules=targets, scaling=scaling)
    ref = reference_model(ours, method == "parallel_adapter", scaling)
    with torch.no_grad():
        got, want = ours(input_ids=IDS).logits, ref(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - tiny_llama()(input_ids=IDS).logits).abs().max() > 1e-4


def test_series_placement_by_host_and_shapes():
    ours = tunelab.attach(tiny_llama(), "series_adapter", bottleneck=8, target_modules=["gate_proj", "up_proj",
                                                                                        "down_proj"])
    got = {n.rsplit(".", 1)[-1]: (m.adapter.placement, tuple(m.adapter.down.weight.shape)) for n, m in ad.adapted(ours)}
    assert got == {"gate_proj": ("series_before", (8, 64)), "up_proj": ("series_before", (8, 64)),
                   "down_proj": ("series_after", (8, 64))}  # before: d_in (64) wide, not d_out (128)
    after = tunelab.attach(tiny_llama(), "series_adapter", bottleneck=8, target_modules=["up_proj"],
                           series_placement="after")
    assert ad.adapted(after)[0][1].adapter.placement == "series_after"


def test_learned_scaling_trains_like_the_reference():
    ours = tunelab.attach(tiny_llama(), "series_adapter", init="bert", bottleneck=8, scaling="learned",
                          target_modules=["gate_proj", "down_proj"])
    ref = reference_model(ours, False, "learned")
    losses = {}
    for key, model in (("ours", ours), ("ref", ref)):
        params = [p for n, p in model.named_parameters() if "adapter" in n and p.requires_grad]
        if key == "ref":
            for n, p in model.named_parameters():
                p.requires_grad_("adapter" in n)
        opt = torch.optim.AdamW(params, lr=1e-2)
        out = []
        for _ in range(3):
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        losses[key] = out
    assert losses["ours"] == pytest.approx(losses["ref"], rel=1e-4)
    scales = [m.adapter.scale.item() for _, m in ad.adapted(ours)]
    assert all(s != 1.0 for s in scales)  # the scalar trained


def test_init_options_match_the_reference_statistics():
    torch.manual_seed(0)
    host = nn.Linear(64, 128)  # tiny_llama's up_proj
    for init, ref_name in (("bert", "bert"), ("mam", "mam_adapter"), ("zero_up", "mam_adapter")):
        model = tunelab.attach(tiny_llama(), "parallel_adapter", bottleneck=128, init=init, target_modules=["up_proj"])
        a = ad.adapted(model)[0][1].adapter
        r = RefLinear(host, "parallel_adapter", 128, 1.0, ref_name)
        for mine, theirs in ((a.down.weight, r.adapter_down.weight), (a.up.weight, r.adapter_up.weight)):
            assert mine.std().item() == pytest.approx(theirs.std().item(), rel=0.15, abs=1e-9)

