"""Into llama.cpp and Ollama: the pre-tokenizer named as llama.cpp names it (tokenizers built offline in the
Llama-3, Qwen2, GPT-2 and SmolLM styles, and the embedded SmolLM2's own by its hash), unknown ones refused;
the Ollama Modelfile of a chat run; exports that never overwrite; the base recorded for offline loading."""

import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import dump_config, load_config

from conftest import tiny_llama

runner = CliRunner()
TEXTS = ["the cat sat on the mat in 1999, didn't it?", "hello world!   how are you 12345 today",
         "I'll say: 3.14 is pi\n\nnew lines too", "we've got 42 apples and 7 pears"] * 4
# The split regexes as Meta's Llama 3 and Qwen2's tokenizer.json files write them (written out here, not
# imported, so a typo in tunelab's copy fails the test).
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe(style: str) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained in code with ``style``'s pre-tokenizer pipeline."""
    tk = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    split = {"llama3": LLAMA3, "qwen2": QWEN2}.get(style)
    if split:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif style == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=style == "prefix-space")
    if style == "qwen2":
        tk.normalizer = normalizers.NFC()
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXTS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize("style, name", [("llama3", "llama-bpe"), ("qwen2", "qwen2"), ("gpt2", "gpt-2"),
                                         ("smollm", "smollm")])
def test_pretokenizer_of_offline_tokenizers_and_in_the_gguf(tmp_path, style, name):
    from gguf import GGUFReader

    from tunelab.export.gguf import write_gguf
    from tunelab.export.pretokenizer import identify

    tok = bpe(style)
    assert identify(tok) == (name, "structure")
    write_gguf(tiny_llama(vocab_size=320), tok, tmp_path / "m.gguf", "f32")
    assert GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.pre"].contents() == name


def test_embedded_smollm2_is_named_by_llama_cpps_hash():
    from transformers import AutoTokenizer

    from tunelab.export.pretokenizer import check_hash, identify
    from tunelab.models.loading import resolve

    try:
        path = resolve("smollm2-135m")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(path)
    # SmolLM-135M's row in llama.cpp's table (the SmolLM2 tokenizer is the same)
    assert check_hash(tok) == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert identify(tok) == ("smollm", "hash")


def test_unknown_pretokenizer_is_refused_or_named_explicitly(tmp_path):
    from gguf import GGUFReader

    from tunelab.export.gguf import write_gguf
    from tunelab.export.pretokenizer import PretokenizerError, choose

    tok = bpe("prefix-space")  # ByteLevel with add_prefix_space: no llama.cpp pre-tokenizer splits like it
    with pytest.raises(PretokenizerError, match=r"does not know .*gpt-2, smollm, llama-bpe, qwen2.*--pretokenizer"):
        write_gguf(tiny_llama(vocab_size=320), tok, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())  # refused before any file was written
    with pytest.raises(PretokenizerError, match="did you mean llama-bpe"):
        choose(tok, "llama-bp")
    write_gguf(tiny_llama(vocab_size=320), tok, tmp_path / "m.gguf", "f32", pre="gpt-2")
    assert GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.pre"].contents() == "gpt-2"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A 2-step LoRA chat run (chatml template, a system prompt) on a tiny Llama."""
    root = tmp_path_factory.mktemp("ollama")
    tiny_llama(vocab_size=320).save_pretrained(root / "tiny")
    bpe("smollm").save_pretrained(root / "tiny")
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[:9]}]} for t in TEXTS]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "chat_eval.jsonl").write_text((root / "chat.jsonl").read_text())  # train == eval is refused
    cfg = load_config(None, [
        f"model.name={root / 'tiny'}", "method.name=lora", "method.r=4", "task.name=chat",
        "task.system=You answer in nine characters.", f"data.train={root / 'chat.jsonl'}",
        f"data.eval={root / 'chat_eval.jsonl'}", "data.max_eval=2", "train.batch_size=4", "train.max_steps=2",
        "train.progress=false", "train.precision=fp32", "train.threads=1", "eval.max_new_tokens=4",
        f"output_dir={root / 'run'}",
    ])
    (root / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(root / "run.yaml")])
    assert res.exit_code == 0, res.output
    return root / "run"


def test_ollama_modelfile_of_a_chat_run(chat_run, tmp_path):
    out = tmp_path / "ollama"
    res = runner.invoke(app, ["export", str(chat_run), str(out), "--format", "ollama", "--outtype", "q8_0"])
    assert res.exit_code == 0, res.output
    assert "ollama create run -f Modelfile" in res.output
    text = (out / "Modelfile").read_text()
    assert text == (
        'FROM ./run-q8_0.gguf\n'
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'SYSTEM """You answer in nine characters."""\n')
    assert (out / "run-q8_0.gguf").exists() and "ollama create" in (out / "README.md").read_text()
    # --format gguf --modelfile is the same export
    res = runner.invoke(app, ["export", str(chat_run), str(tmp_path / "g"), "--format", "gguf", "--modelfile"])
    assert res.exit_code == 0 and (tmp_path / "g" / "Modelfile").read_text() == text.replace("q8_0", "f16")


def test_default_system_of_the_template_and_llama3_stops():
    from tunelab.export.modelfile import modelfile_text

    tok = bpe("gpt2")
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n{% endif %}"
                         + CHATML)
    assert modelfile_text("m.gguf", tok, {}).endswith('SYSTEM """Be kind."""\n')
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    text = modelfile_text("m.gguf", tok, {"template": "llama3"})
    assert 'PARAMETER stop "<|eot_id|>"\nPARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text
    assert '{{ else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>' in text


def test_untranslatable_template_bad_pretokenizer_and_existing_dir_are_one_line_errors(chat_run, tmp_path):
    import shutil

    run, base = tmp_path / "odd", tmp_path / "odd-base"
    shutil.copytree(chat_run, run)
    shutil.copytree(chat_run.parent / "tiny", base)
    tok = bpe("smollm")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(base)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(chat_run.parent / "tiny"), str(base)))
    res = runner.invoke(app, ["export", str(run), str(tmp_path / "o1"), "--format", "ollama"])
    assert res.exit_code == 2 and "[{{ m['role'] }}]" in res.output and "chatml" in res.output, res.output
    assert not (tmp_path / "o1").exists()
    res = runner.invoke(app, ["export", str(chat_run), str(tmp_path / "o2"), "--format", "gguf", "--pretokenizer", "smolm"])
    assert res.exit_code == 2 and "unknown --pretokenizer 'smolm'" in res.output and "smollm" in res.output
    assert len(res.output.strip().splitlines()) == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for cmd in (["export", str(chat_run), str(mine), "--format", "gguf"], ["export", str(chat_run), str(mine)],
                ["merge", str(chat_run), str(mine)]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2 and "is not empty" in res.output, res.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_exports_record_the_base_for_offline_loading(chat_run, tmp_path):
    for cmd, out in ((["export", str(chat_run), str(tmp_path / "p")], tmp_path / "p"),
                     (["merge", str(chat_run), str(tmp_path / "m")], tmp_path / "m")):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
        rec = json.loads((out / "base_model.json").read_text())
        assert rec["local_path"] == str((chat_run.parent / "tiny").resolve()) and rec["hub_id"] is None
        assert rec["local_path"] in (out / "README.md").read_text()


def test_embedded_base_records_hub_id_and_cache_path():
    from tunelab.models.loading import base_record, resolve

    try:
        path = resolve("smollm2-135m")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    rec = base_record("smollm2-135m")
    assert rec["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and rec["local_path"] == str(__import__("pathlib").Path(path).resolve())
