"""The model card (README.md) every export writes: base, method and its params, data, metrics, command.

The front matter follows the Hugging Face hub's model-card metadata (``base_model``, ``library_name``,
``tags``), so the hub links the export to its base when it is uploaded.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

LIBRARY = {"merged": "transformers", "peft": "peft", "gguf": "gguf"}
USAGE = {
    "merged": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "model = AutoModelForCausalLM.from_pretrained(\"{dir}\")\ntok = AutoTokenizer.from_pretrained(\"{dir}\")",
    "peft": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            "base = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"{dir}\")",
    "gguf": "llama-cli -m {dir}/{file} -cnv        # llama.cpp\n"
            "# transformers: AutoModelForCausalLM.from_pretrained(\"{dir}\", gguf_file=\"{file}\")",
}


def cli_command(*parts) -> str:
    """A tunelab command line as a user would retype it (``parts``; default: this process's argv)."""
    return shlex.join(["tunelab", *(str(x) for x in parts)] if parts else ["tunelab", *sys.argv[1:]])


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _table(rows: dict) -> list[str]:
    lines = ["| | |", "|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {_fmt(v)} |")
    return lines


def card_text(run_dir: str | Path, cfg, kind: str, extra: dict | None = None, command: str | None = None) -> str:
    from tunelab.api import read_method
    from tunelab.models.loading import base_identity, base_record
    from tunelab.results import read_metrics

    run_dir = Path(run_dir)
    base = base_identity(cfg.model.name)
    method = read_method(run_dir / "method")
    recorded = base["hub_id"] or base["name"]
    front = {"base_model": recorded, "library_name": LIBRARY[kind],
             "tags": ["tunelab", method["name"], cfg.task.name]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(run_dir).name}: {recorded} + {method['name']}", ""]
    alias = f" (tunelab name `{base['name']}`)" if base["hub_id"] and base["name"] != base["hub_id"] else ""
    lines += [f"Fine-tuned from **{recorded}**{alias} with tunelab "
              f"method `{method['name']}` on task `{cfg.task.name}`; exported as {kind}"
              + "".join(f", {k} {v}" for k, v in (extra or {}).items()) + ".", ""]
    where = base_record(cfg.model.name)["local_path"]
    if where:
        lines += [f"Offline, the base was read from `{where}` on the machine that trained it (base_model.json).", ""]
    lines += ["## Method", "", *_table(method.get("params") or {"(no parameters)": "-"}), ""]
    d = cfg.data
    data = {"train": d.train, "eval": d.eval, "max_train": d.max_train, "max_length": d.max_length,
            "task params": cfg.task.params() or "-"}
    lines += ["## Data", "", *_table({k: v for k, v in data.items() if v is not None}), ""]
    record = read_metrics(run_dir)
    if record:
        lines += ["## Metrics (held-out eval set)", ""]
        scalar = {k: v for k, v in record["metrics"].items() if isinstance(v, int | float)}
        before = record.get("before") or {}
        lines += ["| metric | after | before |", "|---|---|---|"]
        for k, v in scalar.items():
            b = before.get(k)
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(b) if b is not None else ''} |")
        run = record.get("run") or {}
        facts = {k: run[k] for k in ("steps", "lr", "seed", "trainable_params", "train_tokens_per_s", "precision")
                 if k in run}
        lines += ["", "## Training", "", *_table(facts), ""]
    else:
        lines += ["## Metrics", "", "The run has no metrics.json (it did not finish evaluating).", ""]
    files = extra or {}
    lines += ["## How it was made", "", "```", command or cli_command(), "```", "",
              "## Use", "", "```", USAGE[kind].format(dir=".", base=recorded, file=files.get("file", "model.gguf")),
              *([f"ollama create {Path(run_dir).name} -f Modelfile && ollama run {Path(run_dir).name}   # Ollama"]
                if "Modelfile" in files else []),
              "```", ""]
    return "\n".join(lines)


def write_card(out_dir: str | Path, run_dir: str | Path, cfg, kind: str, extra: dict | None = None,
               command: str | None = None) -> Path:
    """README.md (the card) and base_model.json (`tunelab.models.loading.base_record`: hub id and local path)."""
    from tunelab.models.loading import base_record

    (Path(out_dir) / "base_model.json").write_text(json.dumps(base_record(cfg.model.name), indent=2) + "\n")
    path = Path(out_dir) / "README.md"
    path.write_text(card_text(run_dir, cfg, kind, extra, command))
    return path
