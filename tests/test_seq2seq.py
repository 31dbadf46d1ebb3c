"""Encoder-decoder (T5, BART) ``seq2seq`` formulation: encoding, collation, generation, scoring, every
method that applies through the real loop, and SAMSum through ``tunelab train`` with a tiny random T5."""

import json

import pytest
import torch

import tunelab
import tunelab.training.loop as train_mod
from tunelab.config import load_config, task_config
from tunelab.data.encoding import Collator, encode_seq2seq, pack
from tunelab.evaluation.scoring import generate, score_choices
from tunelab.models.loading import load as load_model
from tunelab.tasks import TASKS

from conftest import shared_data, tiny_tokenizer_obj


def tiny_t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.0)).eval()


def tiny_bart(seed=0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.3)).eval()


MODELS = {"t5": tiny_t5, "bart": tiny_bart}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for name, make in MODELS.items():
        d = tmp_path_factory.mktemp(f"tiny-{name}")
        make().save_pretrained(d)
        tiny_tokenizer_obj().save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.fixture
def tok():
    return tiny_tokenizer_obj()


SOURCES = ["summarize: Tom: hi", "summarize: Mary: hello Tom: bye the cat sat on the mat", "the dog"]


# ---------------------------------------------------------------- encoding and collation
def test_encode_and_collate(tok):
    f = encode_seq2seq(tok, "Tom: hi", "Tom says hi", 32)
    assert f["input_ids"] == tok("Tom: hi")["input_ids"] and f["prompt_len"] == len(f["input_ids"])
    assert tok.decode(f["labels"]) == "Tom says hi </s>"  # the target closed by EOS, no -100 in it
    long = encode_seq2seq(tok, "the " * 50, "the cat " * 20, 8)
    assert len(long["input_ids"]) == 8 and len(long["labels"]) == 8 and long["labels"][-1] != tok.eos_token_id
    g = encode_seq2seq(tok, "Tom: hello Mary: hi the cat", "yes", 32)
    for side in ("right", "left"):
        b = Collator(0, padding_side=side)([f, g])
        assert b["input_ids"].shape == (2, len(g["input_ids"])) and b["labels"].shape == (2, len(f["labels"]))
        assert b["labels"][1].tolist() == g["labels"] + [-100] * (len(f["labels"]) - len(g["labels"]))
        assert b["prompt_mask"].equal(b["attention_mask"].bool())  # the whole source is prompt
    with pytest.raises(ValueError, match="data.pack does not apply to encoder-decoder"):
        pack([f, g], 64)


def test_formulation_and_model_mismatch_are_clear(model_dirs, tmp_path):
    from tunelab.tasks.base import HeadSpec

    d = tmp_path / "llama"
    from conftest import tiny_llama

    tiny_llama().save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    with pytest.raises(ValueError, match=r"formulation=seq2seq needs an encoder-decoder model .* is llama"):
        load_model(str(d), head=HeadSpec("seq2seq"))
    with pytest.raises(ValueError, match=r"\(t5\) is an encoder-decoder: set task.formulation=seq2seq"):
        load_model(str(model_dirs["t5"]))
    with pytest.raises(ValueError, match="formulation"):
        task_config("ner", {"formulation": "seq2seq"})  # a family without a seq2seq formulation
    model, _ = load_model(str(model_dirs["bart"]), head=HeadSpec("seq2seq"))
    assert model.config.is_encoder_decoder and model.tunelab_new_head == []


# ---------------------------------------------------------------- generation and scoring
@pytest.mark.parametrize("arch", list(MODELS))
def test_generate_is_the_decoder_only_and_padding_free(arch, tok):
    model = MODELS[arch]()
    batched = generate(model, tok, SOURCES, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tok, [s], max_new_tokens=6)[0] for s in SOURCES]
    assert batched == alone
    ids = torch.tensor([tok(SOURCES[1])["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    assert alone[1] == tok.decode(out[0], skip_special_tokens=True).strip()  # not shifted by the source length


def test_t5_left_and_right_padding_agree(tok):
    # T5's relative positions do not move under left padding: the encoder's states of real tokens agree.
    model = tiny_t5()
    a, b = tok(SOURCES[0])["input_ids"], tok(SOURCES[1])["input_ids"]
    k = len(b) - len(a)
    right = torch.tensor([a + [0] * k, b])
    left = torch.tensor([[0] * k + a, b])
    enc = model.get_encoder()
    hr = enc(input_ids=right, attention_mask=(right != 0).long() | torch.tensor([[1] * len(a) + [0] * k, [1] * len(b)])).last_hidden_state
    hl = enc(input_ids=left, attention_mask=torch.tensor([[0] * k + [1] * len(a), [1] * len(b)])).last_hidden_state
    assert torch.allclose(hr[0, : len(a)], hl[0, k:], atol=1e-5) and torch.allclose(hr[1], hl[1], atol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_score_choices_is_the_decoder_likelihood(arch, tok):
    model = MODELS[arch]()
    got = score_choices(model, tok, SOURCES[:2], [["Tom says hi", "yes"], ["the cat"]], batch_size=2)
    for i, (src, cs) in enumerate(zip(SOURCES[:2], [["Tom says hi", "yes"], ["the cat"]], strict=True)):
        for j, c in enumerate(cs):
            ids = torch.tensor([tok(src)["input_ids"]])
            labels = torch.tensor([tok(c, add_special_tokens=False)["input_ids"]])
            loss = model(input_ids=ids, labels=labels).loss
            assert got[i][j] == pytest.approx(-loss.item() * labels.shape[1], rel=1e-4)


# ---------------------------------------------------------------- methods
def lora_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A")]


@pytest.mark.parametrize("arch", list(MODELS))
def test_lora_all_linear_covers_both_stacks_not_the_head(arch):
    model = tunelab.attach(MODELS[arch](), "lora", r=2)
    names = lora_modules(model)
    assert any(".encoder." in n or n.startswith("encoder.") for n in names)
    assert any(".decoder." in n or n.startswith("decoder.") for n in names)
    assert not any("lm_head" in n for n in names)
    if arch == "t5":
        assert any("EncDecAttention" in n for n in names)  # the cross-attention too
    else:
        assert any("encoder_attn" in n for n in names)


def reft_blocks(model, stack):
    s = model.get_encoder() if stack == "encoder" else model.get_decoder()
    blocks = getattr(s, "block", None) or s.layers  # T5Stack.block, BartEncoder/Decoder.layers
    return [i for i, b in enumerate(blocks) if hasattr(b, "reft")]


@pytest.mark.parametrize("arch", list(MODELS))
def test_reft_stacks_and_positions(arch, tok):
    model = tunelab.attach(MODELS[arch](), "loreft", rank=2, layers="0", positions="f1+l1")
    assert reft_blocks(model, "encoder") == [0] and reft_blocks(model, "decoder") == []
    model = tunelab.attach(MODELS[arch](), "loreft", rank=2, stack="both", layers="all", positions="f1+l1")
    assert reft_blocks(model, "encoder") == [0, 1] and reft_blocks(model, "decoder") == [0, 1]
    b = Collator(0)([encode_seq2seq(tok, s, "Tom says hi", 32) for s in SOURCES[:2]])
    model(**b)
    enc, dec = model.tunelab_reft["encoder"], model.tunelab_reft["decoder"]
    n0, width = int(b["attention_mask"][0].sum()), b["input_ids"].shape[1]
    # encoder: the first and last real source token of each row (padding excluded)
    assert enc.rows["both"].tolist() == [0, n0 - 1, width, 2 * width - 1]
    # decoder: only its start token (column 0) of each row
    assert dec.rows["both"].tolist() == [0, b["labels"].shape[1]]
    # generation (encoder called alone, decoder step by step with a KV cache) edits what training edits:
    # greedy tokens = the argmax of the teacher-forced forward over them, and the edit changes the output
    ids = torch.tensor([tok(SOURCES[1])["input_ids"]])
    one = torch.ones_like(ids)
    gen = model.generate(input_ids=ids, attention_mask=one, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=2)[:, :-1]  # BART forces EOS as the last token: drop it
    forced = model(input_ids=ids, attention_mask=one, decoder_input_ids=gen[:, :-1]).logits
    assert forced.argmax(-1).tolist() == gen[:, 1:].tolist()
    base = MODELS[arch]()(input_ids=ids, attention_mask=one, decoder_input_ids=gen[:, :-1]).logits
    assert not torch.allclose(base, forced, atol=1e-3)
    with pytest.raises(ValueError, match="the decoder has 2 blocks"):
        tunelab.attach(MODELS[arch](), "direft", stack="decoder", layers=[5])


def test_reft_stack_on_a_decoder_only_model_is_refused(llama):
    with pytest.raises(ValueError, match="stack='encoder' applies to encoder-decoder models"):
        tunelab.attach(llama, "loreft", stack="encoder")


@pytest.mark.parametrize("arch", list(MODELS))
def test_prompt_tuning_prepends_to_the_encoder_input(arch, tok):
    base = MODELS[arch]()
    model = tunelab.attach(MODELS[arch](), "prompt_tuning", num_virtual_tokens=3)
    b = Collator(0)([encode_seq2seq(tok, s, "Tom says hi", 32) for s in SOURCES[:2]])
    b.pop("prompt_mask")
    got = model(**b)
    P = model.prompt_tuning.weight
    emb = base.get_encoder().embed_tokens(b["input_ids"])
    embeds = torch.cat([P.expand(2, -1, -1), emb], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), b["attention_mask"]], 1)
    want = base(inputs_embeds=embeds, attention_mask=mask, labels=b["labels"])
    assert got.logits.shape == want.logits.shape == (2, b["labels"].shape[1], 128)  # the decoder is untouched
    assert torch.allclose(got.logits, want.logits, atol=1e-5) and torch.allclose(got.loss, want.loss, atol=1e-6)
    # generation (encoder called directly, cross-attention mask widened every step) agrees with the base model
    # fed the same embeddings, and batching does not change it
    out = generate(model, tok, SOURCES, max_new_tokens=5, batch_size=3)
    assert out == [generate(model, tok, [s], max_new_tokens=5)[0] for s in SOURCES]
    ids = torch.tensor([tok(SOURCES[0])["input_ids"]])
    e = torch.cat([P[None], base.get_encoder().embed_tokens(ids)], 1)
    ref = base.generate(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long), max_new_tokens=5,
                        do_sample=False, pad_token_id=0, eos_token_id=2)
    assert out[0] == tok.decode(ref[0], skip_special_tokens=True).strip()


# Every method that applies to an encoder-decoder; targets given where the defaults do not know T5/BART yet.
METHOD_ARGS = {
    "full": [],
    "lora": ["method.r=4"],
    "dora": ["method.r=4"],
    "loreft": ["method.rank=4", "method.stack=both"],
    "direft": ["method.rank=4", "method.positions=f3+l3"],
    "prompt_tuning": ["method.num_virtual_tokens=4"],
    "random_mask": ["method.fraction=0.2"],
    "series_adapter": ["method.bottleneck=8"],
    "parallel_adapter": ["method.bottleneck=8"],
}
ADAPTER_TARGETS = {"t5": "DenseReluDense", "bart": "fc2"}
MASK_TARGETS = {"t5": "q,v", "bart": "q_proj,v_proj"}
LR = {"full": 3e-3, "prompt_tuning": 0.3, "loreft": 2e-2, "direft": 2e-2, "random_mask": 3e-2}


def summaries(tmp_path, n=4):
    rows = [{"id": str(i), "dialogue": f"Tom: hi\r\nMary: hello {w}", "summary": f"Tom says hi to {w}"}
            for i, w in enumerate(["Mary", "John", "the cat", "the dog"][:n])]
    path = tmp_path / "samsum.json"
    path.write_text(json.dumps(rows))
    return path


def _dev(data):
    """The same rows under another name (train == eval is refused as a leak)."""
    dev = data.with_name("dev-" + data.name)
    dev.write_text(data.read_text())
    return dev


def overrides(model_dir, data, out, method, arch, steps=12, task="summarization"):
    args = [f"model.name={model_dir}", f"method.name={method}", *METHOD_ARGS[method], f"task.name={task}",
            "task.formulation=seq2seq", f"data.train={data}", f"data.eval={_dev(data)}", "data.max_length=48",
            f"train.max_steps={steps}", "train.batch_size=4", f"train.lr={LR.get(method, 1e-2)}", "train.log_every=1",
            "train.progress=false", "train.precision=fp32", "train.threads=1", "train.warmup=0",
            "train.schedule=constant", "eval.max_new_tokens=8", "eval.before=true", f"output_dir={out}"]
    if method.endswith("_adapter"):
        args.append(f"method.target_modules=[{ADAPTER_TARGETS[arch]}]")
    if method == "random_mask":
        args.append(f"method.target_modules=[{MASK_TARGETS[arch]}]")
    return args


CELLS = [(a, m) for a in MODELS for m in METHOD_ARGS] + [("t5", "qlora"), ("bart", "loftq")]  # quantized: one each
METHOD_ARGS.update(qlora=["method.r=4"], loftq=["method.r=4"])


@pytest.mark.parametrize("arch,method", CELLS)
def test_every_method_trains_through_the_loop(arch, method, model_dirs, tmp_path):
    data = summaries(tmp_path)
    cfg = load_config(None, overrides(model_dirs[arch], data, tmp_path / "run", method, arch))
    out = train_mod.run(cfg)
    metrics, facts = out["metrics"], out["run"]
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(ln)]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    assert facts["steps"] == 12 and metrics["n"] == 4 and list(metrics)[0] == "rouge1"
    assert 0.0 <= metrics["rouge1"] <= 1.0 and "rouge1" in out["before"]
    preds = [json.loads(ln) for ln in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and preds[0]["reference"] == "Tom says hi to Mary"
    assert 0 < facts["trainable_params"] <= facts["total_params"]
    if method != "full":  # the saved method reloads onto a fresh base and gives the same predictions
        model, tk = load_model(str(model_dirs[arch]), head=TASKS.get("summarization").head(cfg.task, []) or None)
        tunelab.load(model, tmp_path / "run" / "method")
        srcs = [f"summarize: {json.loads(data.read_text())[i]['dialogue'].replace(chr(13), '')}" for i in range(4)]
        assert generate(model, tk, srcs, max_new_tokens=8) == [p["prediction"] for p in preds]


@pytest.mark.parametrize("task", ["qa", "generation"])
def test_qa_and_generation_seq2seq(task, model_dirs, tmp_path):
    if task == "qa":
        rows = [{"title": f"t{i}", "context": f"Tom has a cat . {w} lives in Paris .", "question": "who lives in Paris ?",
                 "answers": [w]} for i, w in enumerate(["Mary", "John", "Tom", "Mary"])]
    else:
        rows = [{"instruction": f"say {w}", "input": "", "output": w} for w in ("hello", "hi", "bye", "yes")]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    cfg = load_config(None, overrides(model_dirs["t5"], data, tmp_path / "run", "lora", "t5", steps=20, task=task)
                      + ["train.lr=3e-2"])
    out = train_mod.run(cfg)
    metrics, before = out["metrics"], out["before"]
    first = {"qa": "f1", "generation": "rougeL"}[task]
    assert list(metrics)[0] == first and metrics[first] >= before[first]
    if task == "generation":
        assert metrics["perplexity"] < before["perplexity"]
    else:
        assert "exact_match" in metrics


def test_task_prompts_for_seq2seq(tok):
    s = TASKS.get("summarization")
    ex = {"dialogue": "Tom: hi", "summary": "hi", "id": "1", "_where": "-"}
    assert s.prompt(ex, tok, s.Config(formulation="seq2seq")) == "summarize: Tom: hi"
    q = TASKS.get("qa")
    qex = {"context": "Mary lives in Paris .", "question": "who ?", "answers": ["Mary"]}
    assert q.prompt(qex, tok, q.Config(formulation="seq2seq")) == "question: who ? context: Mary lives in Paris ."
    assert q.head(q.Config(formulation="seq2seq"), []).kind == "seq2seq"


# ---------------------------------------------------------------- SAMSum through the CLI
@pytest.mark.data
def test_cli_train_samsum_with_a_tiny_t5(model_dirs, tmp_path):
    samsum = shared_data("samsum")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {model_dirs['t5']}
method: {{name: lora, r: 4}}
task: {{name: summarization, formulation: seq2seq}}
data: {{train: {samsum / 'train.json'}, eval: {samsum / 'val.json'}, max_train: 16, max_eval: 4, max_length: 96}}
train: {{max_steps: 2, batch_size: 4, threads: 1, progress: false, precision: fp32}}
eval: {{max_new_tokens: 8, before: true}}
output_dir: {tmp_path / 'run'}
""")
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.results import read_metrics

    res = CliRunner().invoke(app, ["train", str(cfg)])
    assert res.exit_code == 0, res.output[-2000:]

    m = read_metrics(tmp_path / "run")
    flat = {**m.get("run", {}), **m.get("metrics", m)}
    assert flat["n"] == 4 and "rouge1" in flat
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 4
