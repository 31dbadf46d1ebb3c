"""The docs' result tables are rebuilt from committed result files (bench/results_table.py)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "bench" / "results_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_tables_equal_their_rebuild():
    rt = load()
    blocks = [(d, m["style"]) for name in rt.DOCS for m in rt.BLOCK.finditer((ROOT / name).read_text())
              for d in m["dir"].split(",")]  # a scaling or grpo table may join several result sets
    assert blocks, "no generated table in README.md or docs/results.md"
    for d, style in blocks:
        if style == "grpo":  # bench/grpo_measure.py's result files
            needed = [ROOT / f for f in d.split(",")]
        elif style == "runs":  # single runs: the commands, and each run's metrics.json and config.yaml
            runs = [p for p in (ROOT / d).iterdir() if p.is_dir()]
            assert (ROOT / d / "commands.txt").is_file() and runs, f"{d}: commands.txt and the run directories"
            needed = [p / f for p in runs for f in ("metrics.json", "config.yaml")]
        else:
            needed = [ROOT / d / f for f in ("summary.csv", "results.md", "manifest.json")
                      + (("scaling.json",) if style == "scaling" else ())]
        for f in needed:
            assert f.is_file(), f"{f.relative_to(ROOT)}: the result files behind a table must be committed"
    assert rt.docs_tables(write=False) == [], "run: python bench/results_table.py --write"


def test_a_changed_result_file_makes_the_table_stale(tmp_path, monkeypatch):
    rt = load()
    src = next(m["dir"] for m in rt.BLOCK.finditer((ROOT / "docs/results.md").read_text()))
    fake = tmp_path / "r"
    shutil.copytree(ROOT / src, fake)
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- results-table: r -->\nold\n<!-- /results-table -->\ny\n")
    monkeypatch.setattr(rt, "ROOT", tmp_path)
    monkeypatch.setattr(rt, "DOCS", ("doc.md",))
    assert rt.docs_tables(write=True) == ["doc.md"] and rt.docs_tables() == []
    first = doc.read_text()
    assert "Command: `tunelab compare " in first and "| method |" in first and first.endswith("y\n")
    summary = fake / "summary.csv"
    summary.write_text(summary.read_text().replace(",3,", ",4,", 1).replace("0.", "0.9", 1))
    assert rt.docs_tables() == ["doc.md"]
    with pytest.raises(FileNotFoundError):
        rt.comparison_table("nowhere")


def test_the_advise_score_table_equals_its_rebuild_from_the_committed_score_files(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("advise_score", ROOT / "bench" / "advise_score.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.doc_table(write=False) is False, "run: python bench/advise_score.py --write"
    doc = tmp_path / "results.md"
    doc.write_text("x\n" + mod.MARK[0] + "| an old table |\n" + mod.MARK[1] + "\ny\n")
    assert mod.doc_table(write=True, doc=doc) is True and mod.doc_table(write=False, doc=doc) is False
    assert mod.table() in doc.read_text() and "an old table" not in doc.read_text()


def test_the_costs_style_adds_tokens_per_s_and_peak_memory():
    rt = load()
    src = next(m["dir"] for m in rt.BLOCK.finditer((ROOT / "docs/results.md").read_text()))
    import csv

    rows = list(csv.DictReader((ROOT / src / "summary.csv").open()))
    table = rt.comparison_table(src, "costs").splitlines()
    header = next(ln for ln in table if ln.startswith("| method |"))
    assert header.endswith("| train tokens/s | peak memory MB |")
    for r in rows:
        line = next(ln for ln in table if ln.startswith(f"| {r['label']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == header.count("|") - 1
        tok = r["train_tokens_per_s_mean"]
        assert cells[-2] == ("–" if tok == "" else f"{float(tok):.0f}")
        assert cells[-1] == f"{float(r['peak_memory_mb_mean']):.0f}"
    assert "tokens/s" not in rt.comparison_table(src, "full")


def test_a_changed_scaling_fit_changes_its_table(tmp_path, monkeypatch):
    """The scaling style reads each seed's scaling.json: a changed exponent changes the row and the interval."""
    import json

    rt = load()
    for s in (0, 1):
        shutil.copytree(ROOT / f"docs/results/sst2-scale-s{s}", tmp_path / f"s{s}")
    monkeypatch.setattr(rt, "ROOT", tmp_path)
    before = rt.scaling_table("s0,s1")
    assert "| 0 | " in before and "| 1 | " in before and "mean [95% t-interval]" in before
    path = tmp_path / "s1" / "scaling.json"
    result = json.loads(path.read_text())
    next(f for f in result["fits"] if f["form"] == "multiplicative")["params"]["beta"] = 0.9
    path.write_text(json.dumps(result))
    after = rt.scaling_table("s0,s1")
    assert after != before and "| 0.900 |" in after


def test_a_changed_run_metric_changes_the_runs_table(tmp_path, monkeypatch):
    """The runs style reads each committed run's metrics.json: a changed after-training score changes its row,
    and a run directory without metrics.json is not shown."""
    import json

    rt = load()
    src = next(m["dir"] for m in rt.BLOCK.finditer((ROOT / "docs/results.md").read_text()) if m["style"] == "runs")
    shutil.copytree(ROOT / src, tmp_path / "r")
    monkeypatch.setattr(rt, "ROOT", tmp_path)
    before = rt.runs_table("r")
    runs = sorted(p for p in (tmp_path / "r").iterdir() if p.is_dir())
    assert before.startswith("Command") and all(f"| {p.name} |" in before for p in runs)
    path = runs[0] / "metrics.json"
    data = json.loads(path.read_text())
    section = data["metrics"] if "metrics" in data else data
    key = next(k for k, v in section.items() if isinstance(v, float) and k not in ("eval_loss",))
    section[key] = 0.123456
    path.write_text(json.dumps(data))
    after = rt.runs_table("r")
    assert after != before and "→ 0.123" in after
    path.unlink()
    assert f"| {runs[0].name} |" not in rt.runs_table("r")
