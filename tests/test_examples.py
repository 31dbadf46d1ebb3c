"""Config drift: every example YAML still validates against the schema (sweep sections included)."""

from pathlib import Path

import pytest

from tunelab.config import build_config
from tunelab.sweeps.compare import method_spec, read_sweep_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    raw, sweep = read_sweep_config(path)
    cfg = build_config(raw, str(path))
    assert cfg.task.name and cfg.method.name and cfg.data.eval
    entries = sweep.get("compare", {}).get("methods", []) + sweep.get("advise", {}).get("methods", [])
    for entry in entries:  # each variant validates too
        label, method, train = method_spec(entry, raw.get("method"))
        build_config({**raw, "method": method, "train": {**raw.get("train", {}), **train}}, f"{path} [{label}]")
