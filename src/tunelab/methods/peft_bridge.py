"""PEFT's other tuners (VeRA, IA3, AdaLoRA, OFT, BOFT, LoHa, LoKr, FourierFT, HRA, LN tuning, ...) behind tunelab's method interface.

``method: {name: peft, peft_type: VERA, r: 128}`` attaches any PEFT tuner type with its own config keys,
checked against PEFT's config class for that type ("did you mean"); the short names (``vera``, ``ia3``,
``adalora``, ``oft``, ``boft``, ``loha``, ``lokr``, ``fourierft``, ``hra``, ``ln_tuning``) fix the type and
give tunelab's defaults: target modules from the architecture table (``tunelab.models.arch``: the
attention q/v projections; IA3 adds the FFN output linear as its feed-forward module; LN tuning lets PEFT
pick the norms it knows for the model type) and a recommended learning rate (see ``TUNERS``).

How it works: PEFT's tuner class (``PEFT_TYPE_TO_TUNER_MAPPING``) injects its layers into the model in
place, as ``peft.inject_adapter_in_model`` does, so module names, the loop, the loss levers and generation
stay those of the plain model. A small ``PeftSwitch`` module (``model.tunelab_peft``) keeps the tuner
object and is tunelab's off switch (PEFT's ``disable_adapters`` flag on every tuner layer), so
``tunelab.disabled(model)`` computes the base model exactly. Saving is tunelab's: the tuner's trainable
tensors (+ AdaLoRA's importance averages) in method.safetensors and the config in method.json; a load
attaches the same config again (frozen parts such as VeRA's shared projections, BOFT's permutations or
FourierFT's frequencies are regenerated from PEFT's seeds) and loads only those tensors. Merge is PEFT's
``merge_and_unload``; where PEFT cannot merge, the refusal carries PEFT's reason. Export writes PEFT's own
adapter directory (``PeftModel.from_pretrained`` loads it).

AdaLoRA's rank allocation runs in the method's ``on_step`` hook (after each optimizer step, before the
gradients are cleared), with ``total_step`` = the run's steps unless given. AdaLoraModel's orthogonality
regulariser (``orth_reg_weight``, added in its own forward) is NOT applied: the loop calls the model
itself, whose loss is the task's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from pydantic import ConfigDict, model_validator
from torch import nn

from tunelab.errors import suggest
from tunelab.methods.base import METHODS, MethodConfig, freeze, linear_types
from tunelab.models import arch

ADAPTER = "default"
# keys of PEFT's config classes that tunelab sets itself (or that do not apply to an injected tuner)
RESERVED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "modules_to_save", "peft_version"}

# short name -> (PEFT type, recommended AdamW lr, where the lr comes from, default targets, paper)
# "method_comparison" is PEFT's benchmark (method_comparison/MetaMathQA, Llama-3.2-3B, AdamW, 5000 steps):
# its experiments run with default_training_params.json's lr 1e-4 unless their own training_params.json sets
# one (vera/llama-3.2-3B-default: 1e-3; the ia3 and lokr experiments: the lr in their names).
TUNERS = {
    "vera": ("VERA", 1e-3, "PEFT method_comparison vera/llama-3.2-3B-default (its training_params.json: lr 1e-3)", "qv",
             "VeRA, Kopiczko et al. 2024, arXiv:2310.11454"),
    "ia3": ("IA3", 5e-3, "PEFT method_comparison ia3/llama-3.2-3B-all-attn-5k-lr0.005", "ia3",
            "(IA)^3, Liu et al. 2022 (T-Few), arXiv:2205.05638"),
    "adalora": ("ADALORA", 1e-4, "PEFT method_comparison adalora/llama-3.2-3B-rank32 (lr 1e-4)", "qv",
                "AdaLoRA, Zhang et al. 2023, arXiv:2303.10512"),
    "oft": ("OFT", 1e-4, "PEFT method_comparison oft/llama-3.2-3B-rank32 (lr 1e-4)", "qv",
            "OFT, Qiu et al. 2023, arXiv:2306.07280"),
    "boft": ("BOFT", 1e-4, "PEFT method_comparison boft/llama-3.2-3B-default (lr 1e-4)", "qv",
             "BOFT, Liu et al. 2024, arXiv:2311.06243"),
    "loha": ("LOHA", 1e-4, "PEFT method_comparison loha/llama-3.2-3B-rank32 (lr 1e-4)", "qv",
             "LoHa, Hyeon-Woo et al. 2022 (FedPara), arXiv:2108.06098; LyCORIS"),
    "lokr": ("LOKR", 3e-3, "PEFT method_comparison lokr/llama-3.2-3B-rank32-factor4-lr0.003", "qv",
             "LoKr, Edalati et al. 2022 (KronA), arXiv:2212.10650; LyCORIS"),
    "fourierft": ("FOURIERFT", 1e-4, "PEFT method_comparison fourierft/llama-3.2-3B-default (lr 1e-4)", "qv",
                  "FourierFT, Gao et al. 2024, arXiv:2405.03003"),
    "hra": ("HRA", 1e-4, "PEFT method_comparison hra/llama-3.2-3B-rank32 (lr 1e-4)", "qv",
            "HRA, Yuan et al. 2024, arXiv:2405.17484"),
    "ln_tuning": ("LN_TUNING", 1e-4, "PEFT method_comparison ln_tuning/llama-3.2-3B-default (lr 1e-4)", None,
                  "LN tuning, Zhao et al. 2023, arXiv:2312.11420"),
}
DEFAULT_LR = 1e-4  # method 'peft' with another type: PEFT method_comparison's default_training_params


def peft_mappings():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


def config_class(peft_type: str):
    configs, tuners = peft_mappings()
    names = {str(getattr(t, "value", t)): t for t in tuners}
    if peft_type not in names:
        raise ValueError(f"peft_type {peft_type!r} is not a PEFT tuner that injects layers{suggest(peft_type, names)}; "
                         f"available: {', '.join(sorted(names))} (prompt tuning: method 'prompt_tuning')")
    return configs[names[peft_type]], tuners[names[peft_type]]


def peft_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in RESERVED]


class PeftBridgeConfig(MethodConfig):
    """``peft_type`` plus the tuner's own keys (those of PEFT's config class for that type)."""

    model_config = ConfigDict(extra="allow")
    peft_type: str

    @model_validator(mode="after")
    def _keys(self):
        cls, _ = config_class(self.peft_type)
        valid = peft_keys(cls)
        for key in self.model_extra or {}:
            if key not in valid:
                raise ValueError(f"unknown key '{key}' for PEFT's {cls.__name__}{suggest(key, valid)}; "
                                 f"valid keys: {', '.join(valid)}")
        return self

    def peft_kwargs(self) -> dict:
        return dict(self.model_extra or {})


def _fixed(short: str, fixed_type: str) -> type[PeftBridgeConfig]:
    """The config of a short name: its PEFT type fixed (PeftBridgeConfig's checks otherwise)."""

    class Fixed(PeftBridgeConfig):
        peft_type: str = fixed_type

        @model_validator(mode="after")
        def _type(self):
            if self.peft_type != fixed_type:
                raise ValueError(f"method '{short}' is PEFT's {fixed_type}; for another type use method 'peft'")
            return self

    Fixed.__name__ = Fixed.__qualname__ = f"{fixed_type.title().replace('_', '')}BridgeConfig"
    return Fixed


class PeftSwitch(nn.Module):
    """tunelab's handle on an injected PEFT tuner: its off switch (``tunelab_active``), whether it is
    merged, and state tunelab saves with the method (``tunelab_state``: AdaLoRA's importance averages)."""

    tunelab_state = True

    def __init__(self, tuner: nn.Module):
        super().__init__()
        self.__dict__["_tuner"] = (tuner,)  # a tuple: the tuner holds the model, so not a submodule
        self.keys: list[str] = []

    @property
    def tuner(self) -> nn.Module:
        return self.__dict__["_tuner"][0]

    def layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.tuner.model.modules() if isinstance(m, BaseTunerLayer)]

    @property
    def tunelab_active(self) -> bool:
        return not any(m._disable_adapters for m in self.layers())

    @tunelab_active.setter
    def tunelab_active(self, on: bool) -> None:
        for m in self.layers():  # the flag PEFT's forwards read (enable_adapters would also flip requires_grad)
            m._disable_adapters = not on

    @property
    def merged(self) -> bool:
        return any(m.merged for m in self.layers())


def switch(model: nn.Module) -> PeftSwitch:
    sw = getattr(model, "tunelab_peft", None)
    if not isinstance(sw, PeftSwitch):
        raise ValueError("no PEFT tuner is attached to this model")
    return sw


def default_targets(model: nn.Module, role: str | None) -> dict:
    """target_modules (and IA3's feedforward_modules) from tunelab's architecture table."""
    if role is None:
        return {}
    types = linear_types()
    qv = arch.default_targets(model, "qv", types)
    if role == "ia3":
        a = arch.of(model)
        ffn = arch.match(model, [a.parallel[-1]], types) if a.parallel else []
        return {"target_modules": qv + ffn, "feedforward_modules": ffn}
    return {"target_modules": qv}


class PeftTuner:
    """A PEFT tuner type behind tunelab's interface (see the module docstring)."""

    source = "peft"  # `tunelab methods` lists these apart from tunelab's own

    def __init__(self, name: str, peft_type: str | None = None, lr: float = DEFAULT_LR, lr_source: str = "",
                 targets: str | None = None, paper: str = ""):
        self.name, self.peft_type, self.recommended_lr, self.targets, self.paper = name, peft_type, lr, targets, paper
        self.Config = _fixed(name, peft_type) if peft_type else PeftBridgeConfig
        self.about_defaults = (f"{paper}; reference code: PEFT's {peft_type}; default lr from {lr_source}" if peft_type else
                               "any PEFT tuner type: peft_type plus that type's own config keys")

    def peft_config(self, model: nn.Module, cfg: PeftBridgeConfig):
        cls, _ = config_class(cfg.peft_type)
        kwargs = cfg.peft_kwargs()
        if "target_modules" not in kwargs and "target_parameters" not in kwargs:
            kwargs = {**default_targets(model, self.targets if self.peft_type else "qv"), **kwargs}
        if cfg.peft_type == "ADALORA" and kwargs.get("total_step") is None:
            kwargs["total_step"] = kwargs.get("tinit", 0) + kwargs.get("tfinal", 0) + 1  # the run's steps, in on_step
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"PEFT's {cls.__name__} refuses these settings: {e}") from None

    def attach(self, model: nn.Module, cfg: PeftBridgeConfig) -> nn.Module:
        _, tuner_cls = config_class(cfg.peft_type)
        pcfg = self.peft_config(model, cfg)
        freeze(model)
        try:
            tuner = tuner_cls(model, pcfg, ADAPTER)
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
            raise ValueError(f"PEFT's {cfg.peft_type} cannot attach to {type(model).__name__}: {e}") from None
        sw = PeftSwitch(tuner)
        model.add_module("tunelab_peft", sw)
        if hasattr(tuner, "rankallocator"):  # AdaLoRA: its importance averages are saved and resumed
            sw.keys = [n for n, p in model.named_parameters() if "lora_" in n and ADAPTER in n]
            for i, n in enumerate(sw.keys):
                p = model.get_parameter(n)
                sw.register_buffer(f"ema_ipt_{i}", torch.zeros_like(p, dtype=torch.float32))
                sw.register_buffer(f"ema_unc_{i}", torch.zeros_like(p, dtype=torch.float32))
        return model

    @torch.no_grad()
    def on_step(self, model: nn.Module, step: int, total: int) -> None:
        """After optimizer step ``step`` (1-based) of ``total``: AdaLoRA's rank allocation (PEFT's
        ``update_and_allocate(step - 1)``, as its examples call it), nothing for the other tuners."""
        sw = switch(model)
        tuner = sw.tuner
        if not hasattr(tuner, "update_and_allocate"):
            return
        pcfg = tuner.peft_config[ADAPTER]
        if (model.tunelab_method or {}).get("params", {}).get("total_step") is None:
            pcfg.total_step = total
        if pcfg.tinit >= pcfg.total_step - pcfg.tfinal:
            raise ValueError(f"adalora: tinit={pcfg.tinit} + tfinal={pcfg.tfinal} leave no steps of the run's "
                             f"{pcfg.total_step} to allocate ranks in; lower them or train longer")
        alloc = tuner.rankallocator
        for i, n in enumerate(sw.keys):  # the saved averages (a resumed run continues them)
            alloc.ipt.setdefault(n, torch.zeros_like(model.get_parameter(n)))
            alloc.exp_avg_ipt[n] = sw.get_buffer(f"ema_ipt_{i}").clone()
            alloc.exp_avg_unc[n] = sw.get_buffer(f"ema_unc_{i}").clone()
        tuner.update_and_allocate(step - 1)
        for i, n in enumerate(sw.keys):
            if n in alloc.exp_avg_ipt:
                sw.get_buffer(f"ema_ipt_{i}").copy_(alloc.exp_avg_ipt[n])
                sw.get_buffer(f"ema_unc_{i}").copy_(alloc.exp_avg_unc[n])

    def merge(self, model: nn.Module) -> nn.Module:
        sw = switch(model)
        try:
            plain = sw.tuner.merge_and_unload()
        except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError) as e:
            raise ValueError(f"PEFT cannot merge {sw.tuner.peft_config[ADAPTER].peft_type}: {e}") from None
        for attr in ("tunelab_peft", "peft_config"):
            if attr in plain._modules or attr in plain.__dict__:
                delattr(plain, attr)
        return plain

    def export_peft(self, model: nn.Module, directory: str | Path, base_model: str | None, task_type: str | None) -> Path:
        """PEFT's own adapter directory: adapter_config.json + adapter_model.safetensors (+ new heads as
        modules_to_save), as ``PeftModel.save_pretrained`` writes it."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        sw = switch(model)
        if sw.merged:
            raise ValueError("the tuner is merged into the weights; export it before merging")
        tuner = sw.tuner
        holder = nn.Module()  # named as a PeftModel is (base_model.model.<module>), for PEFT's key selection
        holder.base_model = tuner
        holder.peft_config = tuner.peft_config
        tensors = get_peft_model_state_dict(holder, adapter_name=ADAPTER, save_embedding_layers=False)
        heads = list(getattr(model, "tunelab_new_head", []))
        for head in heads:
            for pname, t in model.get_submodule(head).state_dict().items():
                tensors[f"base_model.model.{head}.{pname}"] = t.detach()
        pcfg = copy.deepcopy(tuner.peft_config[ADAPTER])
        pcfg.base_model_name_or_path = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
        pcfg.task_type, pcfg.inference_mode, pcfg.modules_to_save = task_type, True, heads or None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        pcfg.save_pretrained(str(directory))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
        json.loads((directory / "adapter_config.json").read_text())  # written whole
        return directory


class AnyPeftTuner(PeftTuner):
    """Method 'peft': any PEFT tuner type, ``peft_type`` plus that type's keys."""

    def lr_for(self, cfg: PeftBridgeConfig) -> float:
        """The short name's lr for the PEFT type (method 'peft' with peft_type VERA gets vera's)."""
        return next((t[1] for t in TUNERS.values() if t[0] == cfg.peft_type), self.recommended_lr)


METHODS.register("peft", AnyPeftTuner("peft"))
for _short, (_type, _lr, _src, _targets, _paper) in TUNERS.items():
    METHODS.register(_short, PeftTuner(_short, _type, _lr, _src, _targets, _paper))
