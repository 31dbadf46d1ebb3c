"""Loading a finished run reads its run directory only (``tunelab.training.run_directory.load_trained``):
merge, export (peft, gguf) and chat/serve work for a run trained without an eval set and for a run
whose data files are gone; a task-head run rebuilds its head from the labels method/method.json
records (older runs without them fall back to the training data); a run directory without method/
gets one clear error naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from test_export_gguf import TEXTS, bpe_tokenizer
from tunelab.cli import app
from tunelab.config import dump_config, load_config

from conftest import tiny_llama, tiny_tokenizer_obj

runner = CliRunner()
HEAD_TRAIN = [{"text": f"the {w} sat on the mat", "label": ["neg", "neutral", "pos"][i % 3]}
              for i, w in enumerate("cat dog John Mary Tom apples city hello bye Paris Berlin Google".split())]
HEAD_EVAL = [r for r in HEAD_TRAIN if r["label"] != "neutral"]  # the eval set lacks a class training has


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(root, model_dir, train_rows, eval_rows, *overrides):
    """``tunelab train`` on a tiny model: a 2-step LoRA run in ``root/run`` (eval_rows None: data.eval=null)."""
    train_file = _jsonl(root / "train.jsonl", train_rows)
    eval_file = _jsonl(root / "dev.jsonl", eval_rows) if eval_rows is not None else None
    cfg = load_config(None, [
        f"model.name={model_dir}", "method.name=lora", "method.r=4", "task.name=classification", "task.chat=false",
        "task.template={text} ?", f"data.train={train_file}", f"data.eval={eval_file or 'null'}",
        "train.batch_size=4", "train.lr=5e-2", "train.max_steps=2", "train.progress=false", "train.precision=fp32",
        "train.threads=1", f"output_dir={root / 'run'}", *overrides,
    ])
    (root / "run.yaml").write_text(dump_config(cfg))
    res = runner.invoke(app, ["train", str(root / "run.yaml")])
    assert res.exit_code == 0, res.output
    return root / "run"


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (so GGUF export works too)."""
    d = tmp_path_factory.mktemp("lm-base")
    tiny_llama(vocab_size=320).save_pretrained(d)
    bpe_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def head_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("head-base")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    return d


def lm_rows():
    return [{"text": t, "label": ["bad", "good"][i % 2]} for i, t in enumerate(TEXTS)]


def merged_logits(directory, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()(ids).logits


def trained_logits(run, ids):
    from tunelab.training.run_directory import load_trained

    model, _, _ = load_trained(run, device="cpu")
    with torch.no_grad():
        return model.eval()(ids).logits


def merge_and_export(run, out):
    """`tunelab merge`, `tunelab export --format peft` and `--format gguf` of ``run`` all succeed."""
    for args in (["merge", str(run), str(out / "merged"), "--dtype", "fp32"],
                 ["export", str(run), str(out / "peft"), "--format", "peft"],
                 ["export", str(run), str(out / "gguf"), "--format", "gguf", "--outtype", "f32"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    assert (out / "merged" / "model.safetensors").exists() and (out / "peft" / "adapter_model.safetensors").exists()
    assert (out / "gguf" / "run-f32.gguf").exists()


def test_run_trained_without_eval_set_merges_and_exports(lm_base, tmp_path):
    run = train(tmp_path, lm_base, lm_rows(), None, 'task.labels=["bad", "good"]')
    assert load_config(run / "config.yaml").data.eval is None
    merge_and_export(run, tmp_path / "out")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    ref = trained_logits(run, ids)
    assert (merged_logits(tmp_path / "out" / "merged", ids) - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))


def test_run_whose_data_is_gone_merges_exports_and_serves(lm_base, tmp_path):
    from tunelab.serve.loading import load_target

    run = train(tmp_path, lm_base, lm_rows(), lm_rows()[:4])  # labels collected from the data
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    before = trained_logits(run, ids)
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "dev.jsonl").unlink()
    merge_and_export(run, tmp_path / "out")
    assert (trained_logits(run, ids) - before).abs().max() == 0
    target = load_target(str(run), device="cpu", threads=1)
    assert target.about.startswith("lora on ")
    with torch.no_grad():
        assert (target.model(ids).logits - before).abs().max() == 0
    res = runner.invoke(app, ["chat", str(run), "--greedy", "--max-new-tokens", "3", "--threads", "1"], input="hello\n/exit\n")
    assert res.exit_code == 0 and f"tunelab chat: {run} (lora on " in res.output, res.output


def _head_run(root, head_base):
    return train(root, head_base, HEAD_TRAIN, HEAD_EVAL, "task.formulation=head")


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn: F1 of the class the eval set lacks
def test_head_run_rebuilds_its_head_from_recorded_labels(head_base, tmp_path):
    """The labels training collected from data.train (three classes; the eval set has two) are
    recorded; the head is rebuilt from them with the data gone, and the merged model carries them."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.training.run_directory import load_trained

    run = _head_run(tmp_path, head_base)
    assert json.loads((run / "method" / "method.json").read_text())["head_labels"] == ["neg", "neutral", "pos"]
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "dev.jsonl").unlink()
    model, _, cfg = load_trained(run, device="cpu")
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"} and model.tunelab_new_head == ["score"]
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        ref = model.eval()(ids).logits
    for args in (["merge", str(run), str(tmp_path / "merged"), "--dtype", "fp32"],
                 ["export", str(run), str(tmp_path / "peft"), "--format", "peft"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert back.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max() < 1e-4
    res = runner.invoke(app, ["chat", str(run)], input="")
    assert res.exit_code == 2 and "trained a task head (score)" in res.output


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_older_head_run_without_recorded_labels_reads_its_training_data(head_base, tmp_path):
    from tunelab.training.run_directory import load_trained

    run = _head_run(tmp_path, head_base)
    meta_path = run / "method" / "method.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("head_labels", None)  # as runs trained before the labels were recorded
    meta_path.write_text(json.dumps(meta))
    model, _, _ = load_trained(run, device="cpu")  # labels from data.train, as training had them
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(ValueError) as e:
        load_trained(run, device="cpu")
    assert str(run) in str(e.value) and "task.labels" in str(e.value) and "train.jsonl" in str(e.value)


def test_run_directory_without_method_is_one_clear_error(lm_base, tmp_path):
    from tunelab.training.run_directory import load_trained

    run = train(tmp_path, lm_base, lm_rows(), None, 'task.labels=["bad", "good"]')
    shutil.rmtree(run / "method")  # as a run stopped before it finished
    (run / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_trained(run)
    msg = str(e.value)
    assert msg.startswith(f"{run}: no trained method here") and str(run / "method" / "method.json") in msg
    assert str(run / "checkpoints" / "last") in msg and "tunelab train" in msg  # how to finish it
    for args in (["merge", str(run), str(tmp_path / "m")], ["export", str(run), str(tmp_path / "p")],
                 ["export", str(run), str(tmp_path / "g"), "--format", "gguf"], ["chat", str(run)]):
        res = runner.invoke(app, args, input="")
        assert res.exit_code == 2 and f"{run}: no trained method here" in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert not any((tmp_path / n).exists() for n in "mpg")


def test_head_labels_in_method_json_are_checked(tmp_path):
    import tunelab

    tunelab.save(tunelab.attach(tiny_llama(), "lora", r=2), tmp_path)
    meta = json.loads((tmp_path / "method.json").read_text())
    assert "head_labels" not in meta  # a causal-LM run's method.json is as before
    (tmp_path / "method.json").write_text(json.dumps({**meta, "head_labels": "neg"}))
    with pytest.raises(ValueError, match=r"method.json: 'head_labels' must be a list of label names"):
        tunelab.load(tiny_llama(), tmp_path)
