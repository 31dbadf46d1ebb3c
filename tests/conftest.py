"""Shared fixtures: tiny random models built in code (fast), and the shared data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared benchmark data is not beside this clone")
    return path


def tiny_llama(vocab_size: int = 128, layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def shaken_llama(method=None, *, seed=0, shake_seed=11, shake=0.25, moved=0.5, **params):
    """A tiny Llama whose matrices are shaken (so greedy output varies by prompt and step), with
    ``method`` attached and its trainable tensors moved off their init when given."""
    import tunelab

    model = tiny_llama(seed=seed)
    torch.manual_seed(shake_seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * shake)
    if method:
        model = tunelab.attach(model, method, **params)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * moved)
    return model


def tiny_bert(num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer directory (a model name for tunelab.training.loop), one per test module."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    return d


# A tiny WordPiece tokenizer (ids < 128, so it fits tiny_llama): whole words for most of the vocab, a
# few words split into sub-tokens ("Smith" -> "Sm" "##ith") to exercise label alignment, and digit
# pieces so numbers round-trip. Built in code: no files, no hub.
TINY_WORDS = (
    "[PAD] <s> </s> [UNK] . , : ; ? ! ' - ( ) # = "
    "0 1 2 3 4 5 6 7 8 9 ##0 ##1 ##2 ##3 ##4 ##5 ##6 ##7 ##8 ##9 "
    "Sm ##ith Par ##is Lon ##don "
    "the a an is was in of to and on at with for has had he she it they "
    "John Mary Tom Berlin EU Google Paris PER LOC ORG MISC none "
    "Sentence Entities Answer Question Context Summary Summarize dialogue answer correct "
    "true false answer1 answer2 answer3 option1 option2 solution1 solution2 "
    "what who where how many did does cat dog sat mat apples bought gave more left "
    "The A yes no lives visited city capital says hello hi bye"
).split()


def tiny_tokenizer_obj():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_WORDS)}
    assert len(vocab) == len(TINY_WORDS) <= 128
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=50))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture
def tiny_tokenizer():
    return tiny_tokenizer_obj()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip (with the reason) on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _tasks_report_only_declared_metrics():
    """Every task family's evaluate, wherever a test calls it, checks that the metrics it reports are in its
    ``metrics`` declaration (what ``compare --metric`` checks before training); pyproject.toml turns the
    UndeclaredMetricWarning into an error."""
    from tunelab.tasks import TASKS
    from tunelab.tasks.base import check_reported

    def checked(task):
        bound = task.evaluate

        def evaluate(*args, **kwargs):
            metrics, preds = bound(*args, **kwargs)
            check_reported(task, metrics)
            return metrics, preds

        return evaluate

    tasks = [TASKS.get(name) for name in TASKS.names()]
    for task in tasks:
        task.evaluate = checked(task)
    yield
    for task in tasks:
        del task.evaluate
