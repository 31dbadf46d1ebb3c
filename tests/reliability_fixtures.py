"""A tiny model directory shared by a whole reliability test module (saving it per test costs seconds)."""

import pytest

from conftest import tiny_llama, tiny_tokenizer_obj


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    return d
