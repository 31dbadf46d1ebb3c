"""Config drift: every example YAML still validates against the schema."""

from pathlib import Path

import pytest

from tunelab.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    cfg = load_config(path)
    assert cfg.task.name and cfg.method.name and cfg.data.eval
