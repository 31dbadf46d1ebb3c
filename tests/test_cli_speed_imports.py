"""The CLI's quick answers import no heavy library: what each command loads, not how long it takes."""

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "torchao", "sklearn", "seqeval", "datasets", "matplotlib", "scipy", "pandas",
         "peft", "gguf", "mlflow", "tensorboard")
PROBE = """
import json, sys
{code}
print("@@" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def run_app(*commands) -> str:
    """Code that runs each command line in one process (what is loaded is the union)."""
    return "from tunelab.cli import app\n" + "".join(
        f"try:\n    app({list(c)!r})\nexcept SystemExit:\n    pass\n" for c in commands)


def loaded(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TORCHELASTIC_RUN_ID", None)
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)],
                         capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("@@")), None)
    assert line, out.stdout + out.stderr
    return json.loads(line[2:])


def test_import_tunelab_loads_no_torch():
    assert loaded("import tunelab") == []


def test_help_and_models_load_nothing_heavy():
    assert loaded(run_app(["--help"], ["train", "--help"], ["export", "--help"], ["models"])) == []


def test_listings_need_torch_only():
    # The method and task modules define torch modules, so torch itself is needed; nothing else is
    # (no transformers, torchao, sklearn, seqeval).
    assert loaded(run_app(["methods"], ["tasks"])) == ["torch"]


def test_the_public_api_still_loads_on_first_use():
    code = "import tunelab\nassert callable(tunelab.load)\nfrom tunelab import attach, merge\nassert callable(attach)"
    assert "torch" in loaded(code)


def test_evaluation_progress_bars_show_rows_per_second_and_follow_the_switch(monkeypatch, capsys):
    from tunelab.evaluation import scoring

    from conftest import tiny_llama, tiny_tokenizer_obj

    model, tok = tiny_llama(), tiny_tokenizer_obj()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    scoring.show_progress(True)
    try:
        scoring.generate(model, tok, ["the cat", "a dog sat"], max_new_tokens=2, batch_size=1)
        scoring.score_choices(model, tok, ["the cat", "a dog"], [["yes", "no"], ["yes", "no"]], batch_size=1)
        err = capsys.readouterr().err
        # the bars (total 2 rows, unit row/s); how often they redraw in between is up to tqdm
        assert "generating" in err and "scoring" in err and "row/s" in err and "/2 [" in err
        scoring.show_progress(False)  # train.progress: false
        scoring.generate(model, tok, ["the cat"], max_new_tokens=2)
        assert capsys.readouterr().err == ""
    finally:
        scoring.show_progress(True)
