"""The run configuration: one YAML file + dotted ``key=value`` overrides, validated by a schema.

    model: smollm2-135m            # or {name: ..., dtype: ...}
    method: {name: lora, r: 8}     # the method's own params are checked by its Config
    task: {name: sentiment}        # likewise for the task family
    data: {train: ..., eval: ..., max_train: 2000}
    train: {max_steps: 200, batch_size: 8, lr: 3e-4}
    output_dir: runs/sst2-lora

Unknown keys and bad values are errors naming the key and suggesting the closest valid one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import explain


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = None


class NamedSection(BaseModel):
    """``name`` + free params, checked against the registered schema of that name."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MethodSection(NamedSection):
    name: str = "full"

    @model_validator(mode="after")
    def _check(self):
        from tunelab.methods import method_config

        method_config(self.name, self.params())
        return self


class TaskSection(NamedSection):
    name: str = "sentiment"

    @model_validator(mode="after")
    def _check(self):
        task_config(self.name, self.params())
        return self


class DataSection(Section):
    train: str | None = None
    eval: str | None = None
    max_train: int | None = Field(None, ge=1)
    max_eval: int | None = Field(None, ge=1)
    max_length: int = Field(256, ge=8)
    pack: bool = False
    group_by_length: bool = True
    skip_bad_rows: bool = False
    # hold out this share of data.train as the eval set (instead of data.eval): seeded by split_seed, no overlap
    eval_split: float | None = Field(None, gt=0, lt=1)
    split_seed: int = 0
    # worker processes for tokenizing (datasets.map num_proc); None: $TUNELAB_NUM_PROC, else automatic
    num_proc: int | None = Field(None, ge=1)


class TrainSection(Section):
    max_steps: int | None = Field(None, ge=0)
    epochs: float = Field(1.0, gt=0, allow_inf_nan=False)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, allow_inf_nan=False)  # None: the method's default learning rate
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    warmup: float = Field(0.06, ge=0, le=1)  # fraction of the steps
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, ge=0, allow_inf_nan=False)  # 0 / None: no clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    # MB of frozen weights the loop may keep in the autocast dtype (bf16 copies of plain and dequantized
    # quantized bases, bit-identical results); null: all of them when they fit in 512 MB and a quarter
    # of free memory, else none (tunelab.runtime.precision); 0: none
    shadow_mb: float | None = Field(None, ge=0, allow_inf_nan=False)
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # steps; 0 = only at the end
    save_every: int = Field(0, ge=0)  # steps; 0 = only at the end
    log_every: int = Field(10, ge=1)
    resume: bool = True  # continue from output_dir/checkpoints/last when it exists
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    progress: bool = True
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)  # see tunelab.training.tracking

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):  # "tensorboard,mlflow" from a command line; "none" / null: no tracking
        if v is None:
            return []
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",") if t.strip() and t.strip() != "none"]
        return v


class EvalSection(Section):
    batch_size: int = Field(16, ge=1)
    before: bool = False  # also score the model before training (the zero-shot baseline)
    max_new_tokens: int | None = Field(None, ge=1)  # None: the task family's default
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_beams: int = Field(1, ge=1)
    save_predictions: bool = True
    loss: bool = True  # also report eval_loss (the token-mean loss on the eval set)
    # score choices (multiple choice, label words) with autocast off: fp32 for a float32 model, so bf16 rounding
    # never ties two choices (tied_predictions counts ties either way); slower
    choices_fp32: bool = False
    # evaluate every N optimizer steps during training (log.jsonl, trackers, checkpoints/best); 0: only at
    # the end. train.eval_every is the older name of the same setting.
    every_steps: int = Field(0, ge=0)

    def gen(self) -> dict:
        keys = {"max_new_tokens", "do_sample", "temperature", "top_p", "num_beams"}
        return {k: v for k, v in self.model_dump(include=keys).items() if v is not None}


class RunConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    method: MethodSection = Field(default_factory=MethodSection)
    task: TaskSection = Field(default_factory=TaskSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output_dir: str = "runs/{task}-{method}"

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, values):
        if isinstance(values, dict):
            for key in ("model", "method", "task"):
                if isinstance(values.get(key), str):
                    values = dict(values, **{key: {"name": values[key]}})
        return values

    @model_validator(mode="after")
    def _one_eval_interval(self):
        a, b = self.eval.every_steps, self.train.eval_every
        if a and b and a != b:
            raise ValueError(f"eval.every_steps={a} and train.eval_every={b} are the same setting (the latter its older "
                             "name) with two values; set eval.every_steps alone")
        return self

    @field_validator("output_dir")
    @classmethod
    def _output_dir_placeholders(cls, v: str) -> str:
        import string

        try:
            names = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:  # an unmatched brace
            raise ValueError(f"output_dir {v!r}: {e}; the placeholders are {{task}}, {{method}}, {{seed}}") from None
        bad = [f for f in names if f not in ("task", "method", "seed")]
        if bad:
            raise ValueError(f"output_dir {v!r} uses the unknown placeholder {{{bad[0]}}}; the placeholders are "
                             "{task}, {method}, {seed}")
        return v

    def run_dir(self) -> Path:
        return Path(self.output_dir.format(task=self.task.name, method=self.method.name, seed=self.train.seed))


def task_config(name: str, params: dict):
    from tunelab.data import layouts
    from tunelab.tasks import TASKS

    task = TASKS.get(name)
    try:
        cfg = task.Config(**params)
    except ValidationError as e:
        raise ValueError(f"bad parameters for task '{name}':\n{explain(e, task.Config)}") from None
    if getattr(task, "reads_tables", False) and (cfg.layout is not None or cfg.layout_eval is not None):
        raise ValueError(f"task '{name}' reads its data as an Arrow table and takes no task.layout; name its "
                         "column with task.fields")
    return layouts.configure(name, cfg)  # the settings a data layout implies (label names, pair)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override '{text}' is not of the form key=value (e.g. train.lr=3e-4)")
    key, _, raw = text.partition("=")
    try:  # typed like YAML (3e-4, true, [a, b]); anything YAML cannot read stays a plain string
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "path#articles=40:" is a string, not a YAML mapping
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("model", "method", "task"):
                child = {"name": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return raw


def build_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig(**raw)
    except ValidationError as e:
        raise ValueError(f"{source}: invalid configuration\n{explain(e, RunConfig)}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read YAML ``path`` (or start from defaults when None) and apply ``key=value`` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    if path is not None:
        raw = resolve_data_paths(raw, path.parent)
    return build_config(apply_overrides(raw, list(overrides)), str(path or "config"))


def resolve_data_paths(raw: dict, base: Path) -> dict:
    """``data.train`` / ``data.eval`` of a config file, relative to the file's folder ``base``.

    Kept as written: ``hf:`` ids, absolute paths, names that look like hub ids (no suffix, nothing on
    disk), and (with a warning, for older configs) paths that exist only relative to the current
    directory. A ``#rows=...`` selector stays attached. Overrides on the command line are not touched:
    those are relative to the shell, as the user typed them."""
    import logging

    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    data = dict(data)
    for key in ("train", "eval"):
        value = data.get(key)
        if not isinstance(value, str) or not value or value.startswith("hf:"):
            continue
        path, hash_, frag = value.partition("#")
        if Path(path).is_absolute():
            continue
        here = base / path
        if here.exists():
            data[key] = str(here) + hash_ + frag
        elif Path(path).exists():
            logging.getLogger(__name__).warning(
                "data.%s %r exists only relative to the current directory; paths in a config are read relative to "
                "the config file (%s): write it as %r", key, path, base, str(Path(os.path.relpath(Path(path).resolve(), base.resolve()))))
        elif not Path(path).suffix and not path.startswith("."):
            continue  # a hub dataset name
        else:
            data[key] = str(here) + hash_ + frag
    return dict(raw, data=data)


def dump_config(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json")
    for key in ("method", "task"):
        sec = getattr(cfg, key)
        data[key] = {"name": sec.name, **sec.params()}
    return yaml.safe_dump(data, sort_keys=False)
