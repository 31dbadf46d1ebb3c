"""Errors are one clear line, never a traceback or a pydantic dump; files a run writes are group-readable."""

import stat

import pytest
import torch
from typer.testing import CliRunner

import tunelab.training.loop as train_mod
from test_train import cfg_for, data  # noqa: F401  (fixtures)
from tunelab.cli import app
from tunelab.config import dump_config, load_config

runner = CliRunner()


def one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output and "pydantic" not in res.output and "https://" not in res.output
    for n in needles:
        assert n in res.output, res.output


def test_method_parameter_errors_suggest_like_other_keys():
    with pytest.raises(ValueError) as e:
        load_config(None, ["method.name=lora", "method.alpah=8"])
    msg = str(e.value)
    assert "unknown key 'alpah'" in msg and "did you mean 'alpha'" in msg and "valid keys here: r, alpha" in msg
    assert "errors.pydantic.dev" not in msg and "Value error," not in msg


def write_spec(tmp_path, cfg):
    spec = tmp_path / "run.yaml"
    spec.write_text(dump_config(cfg))
    return spec


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tiny_dir, data, tmp_path):  # noqa: F811
    spec = write_spec(tmp_path, cfg_for(tiny_dir, data, tmp_path / "run", "train.device=cuda"))
    one_line_error(runner.invoke(app, ["train", str(spec)]), "train.device=cuda but CUDA is not available")


def test_packing_with_a_head_model_is_one_line(tiny_dir, data, tmp_path):  # noqa: F811
    cfg = cfg_for(tiny_dir, data, tmp_path / "run", "task.formulation=head", "data.pack=true")
    one_line_error(runner.invoke(app, ["train", str(write_spec(tmp_path, cfg))]), "data.pack=true needs a causal-LM")


def test_unknown_template_key_is_one_line(tiny_dir, data, tmp_path):  # noqa: F811
    cfg = cfg_for(tiny_dir, data, tmp_path / "run", "task.template={sentence} ?")
    one_line_error(runner.invoke(app, ["train", str(write_spec(tmp_path, cfg))]), "uses {sentence}")


@pytest.mark.parametrize("args, needle", [
    (["compare", "c.yaml", "--methods", "lora", "--seeds", "0,x"], "--seeds: 'x' is not a whole number"),
    (["compare", "c.yaml", "--methods", "lora", "--seeds", ","], "--seeds: no numbers"),
    (["compare", "c.yaml", "--methods", "lora", "--seeds", ""], "--seeds: no numbers in ''"),
    (["compare", "c.yaml", "--methods", "lora", "--seeds", "-1,2"], "--seeds: -1 is below 0"),
    (["advise", "c.yaml", "--methods", "lora", "--sizes", "0,8,16"], "--sizes: 0 is below 1"),
    (["scale", "c.yaml", "--sizes", "10,1.5", "--factor", "rank", "--values", "2"], "--sizes: '1.5' is not a whole number"),
    (["scale", "c.yaml", "--sizes", "0,10", "--factor", "rank", "--values", "2"], "--sizes: every size must be at least 1"),
])
def test_bad_seeds_and_sizes_are_one_line(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("task: sentiment\n")
    one_line_error(runner.invoke(app, args), needle)


def test_files_a_run_writes_are_group_readable(tiny_dir, data, tmp_path):  # noqa: F811
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2"))
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".tunelab.lock"]
    assert {"metrics.json", "config.yaml", "log.jsonl", "method.safetensors", "state.json"} <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for d in [p for p in out.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


@pytest.mark.parametrize("override, needle", [
    ("task.max_answer_tokens=0", "max_answer_tokens: Input should be greater than or equal to 1 (got 0)"),
    ("task.n_best=0", "n_best: Input should be greater than or equal to 1 (got 0)"),
    ("task.stride=-1", "stride: Input should be greater than or equal to 0 (got -1)"),
    ("task.stride=384", "stride: task.stride=384 must be below task.window=384"),
    ("task.window=0", "window: Input should be greater than or equal to 8 (got 0)"),
])
def test_qa_integer_settings_out_of_range(override, needle):
    with pytest.raises(ValueError) as e:
        load_config(None, ["task.name=qa", override])
    assert "bad parameters for task 'qa'" in str(e.value) and needle in str(e.value)
    assert "errors.pydantic.dev" not in str(e.value)


def test_ner_eval_max_length_out_of_range():
    with pytest.raises(ValueError, match=r"eval_max_length: Input should be greater than or equal to 8 \(got 0\)"):
        load_config(None, ["task.name=ner", "task.eval_max_length=0"])


@pytest.mark.parametrize("output_dir, needle", [
    ("runs/{foo}", "output_dir 'runs/{foo}' uses the unknown placeholder {foo}; the placeholders are {task}, {method}, {seed}"),
    ("runs/{task", "output_dir 'runs/{task': expected '}' before end of string"),
])
def test_an_unknown_output_dir_placeholder_is_one_line(tmp_path, monkeypatch, output_dir, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(f"task: sentiment\noutput_dir: '{output_dir}'\n")
    one_line_error(runner.invoke(app, ["train", "c.yaml"]), needle)
