"""GGUF export: a tiny trained Llama LoRA run -> GGUF file -> transformers' GGUF loader gives the merged
model's logits (within the outtype's rounding) and the same tokenizer; refusals are clear."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import dump_config, load_config

from conftest import tiny_llama

runner = CliRunner()
TEXTS = [
    "the cat sat on the mat and the dog ran to the park",
    "a good film with a great story, lovely acting; 10/10!",
    "the worst movie I have seen this year: boring and long",
    "hello world, how are you today? fine, thanks.",
] * 4
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def bpe_tokenizer():
    """A byte-level BPE tokenizer (the gpt2 kind SmolLM2 and Llama 3 use), trained in code, < 320 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXTS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step LoRA run on a tiny Llama with a BPE tokenizer (what `tunelab train` writes)."""
    root = tmp_path_factory.mktemp("gguf")
    model_dir = root / "tiny"
    tiny_llama(vocab_size=320).save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    rows = [{"sentence": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "dev.jsonl").write_text((root / "train.jsonl").read_text())  # train == eval is refused (a leak)
    cfg = load_config(None, [
        f"model.name={model_dir}", "method.name=lora", "method.r=4", "task.name=sentiment", "task.chat=false",
        'task.labels=["bad", "good"]', "task.template={text} ?", f"data.train={root / 'train.jsonl'}",
        f"data.eval={root / 'dev.jsonl'}", "train.batch_size=4", "train.lr=5e-2", "train.max_steps=2",
        "train.progress=false", "train.precision=fp32", "train.threads=1", f"output_dir={root / 'run'}",
    ])
    (root / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(root / "run.yaml")])
    assert res.exit_code == 0, res.output
    return root / "run"


def _merged(run):
    import tunelab
    from tunelab.export.merge import load_trained
    from tunelab.methods.lora import lora_modules

    model, tok, _ = load_trained(run)
    assert any(float(m.lora_B.detach().abs().sum()) > 0 for _, m in lora_modules(model))  # training moved B off 0
    return tunelab.merge(model).eval(), tok


@pytest.mark.parametrize("outtype, tol", [("f32", 1e-4), ("f16", 2e-2), ("bf16", 8e-2), ("q8_0", 0.05), ("q4_0", 0.3)])
def test_gguf_round_trip_logits_and_tokenizer(trained_run, tmp_path, outtype, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / outtype
    res = runner.invoke(app, ["export", str(trained_run), str(out), "--format", "gguf", "--outtype", outtype])
    assert res.exit_code == 0, res.output
    gguf_file = f"run-{outtype}.gguf"
    assert (out / gguf_file).exists() and (out / "README.md").exists()
    merged, tok = _merged(trained_run)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = tok(TEXTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = merged(ids).logits, back(ids).logits
    err = float((want - got).abs().max())
    assert err < tol * float(want.abs().max()), (outtype, err)
    # A wrong Q/K permutation or tensor name would be far off, not within rounding:
    assert float((want - got).abs().mean()) < tol * float(want.abs().mean()) + 1e-6
    tok_back = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file)
    for text in TEXTS[:4] + ["unseen wörds ✓ 123"]:
        assert tok_back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert tok_back.eos_token == "<|im_end|>" and tok_back.pad_token == "<|endoftext|>"


def test_gguf_metadata_and_layout(trained_run, tmp_path):
    from gguf import GGUFReader

    from tunelab.export.gguf import permute_qk

    res = runner.invoke(app, ["export", str(trained_run), str(tmp_path), "--format", "gguf", "--outtype", "q8_0"])
    assert res.exit_code == 0, res.output
    r = GGUFReader(str(tmp_path / "run-q8_0.gguf"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2 and f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.chat_template"] == CHAT
    assert len(f["tokenizer.ggml.tokens"]) == 320 and f["tokenizer.ggml.tokens"][319] == "[PAD319]"
    assert f["tokenizer.ggml.eos_token_id"] == 2 and f["general.file_type"] == 7
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    readme = (tmp_path / "README.md").read_text()
    assert "library_name: gguf" in readme and "lora" in readme and "--outtype q8_0" in readme
    # llama.cpp's permutation, checked on a known layout: head rows [a0 a1 b0 b1] -> [a0 b0 a1 b1]
    w = torch.arange(8.0).reshape(8, 1)
    assert permute_qk(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_refusals(trained_run, tmp_path):
    res = runner.invoke(app, ["export", str(trained_run), str(tmp_path), "--format", "gguf", "--outtype", "q3"])
    assert res.exit_code == 2 and "q3" in res.output and "q8_0" in res.output
    res = runner.invoke(app, ["export", str(trained_run), str(tmp_path), "--format", "onnx"])
    assert res.exit_code == 2 and "gguf" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "nope"), str(tmp_path), "--format", "gguf"])
    assert res.exit_code == 2 and "no trained method" in res.output


def test_unmergeable_method_is_refused_with_the_alternative(trained_run, tmp_path):
    import shutil

    import tunelab
    from tunelab.models.loading import load

    run = tmp_path / "reft"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("method"))
    model, _ = load(str(trained_run.parent / "tiny"))
    tunelab.save(tunelab.attach(model, "loreft", rank=2), run / "method")
    for cmd in (["export", str(run), str(tmp_path / "o"), "--format", "gguf"], ["merge", str(run), str(tmp_path / "m")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2 and "cannot merge 'loreft'" in res.output and "tunelab serve" in res.output, res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_quantized_rows_not_a_block_multiple_fall_back_to_f16(tmp_path):
    from gguf import GGUFReader

    from tunelab.export.gguf import write_gguf

    model = tiny_llama(vocab_size=320, hidden=48).eval()  # 48 is not a multiple of the 32-value block
    write_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # 96 = 3 blocks


def test_first_conversion_of_a_gguf_model_says_so_once(tmp_path, capsys):
    """GGUF in (the embedded-model path, on a GGUF we write) -> safetensors copy, with a one-line notice."""
    from tunelab.export.gguf import write_gguf
    from tunelab.models.loading import _gguf_to_safetensors

    src = tmp_path / "pkg"
    model = tiny_llama(vocab_size=320).eval()
    write_gguf(model, bpe_tokenizer(), src / "m.gguf", "f32")
    _gguf_to_safetensors(src, "m.gguf", tmp_path / "copy")
    err = capsys.readouterr().err
    assert err.count("tunelab: converting the embedded m.gguf") == 1 and "first use only" in err
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    ids = torch.tensor([[5, 9, 30, 7]])
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max() < 1e-4
