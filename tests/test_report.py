"""Report: rows from run directories, mean ± std, CSV/Markdown, plots, and the HTML in a real browser."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tunelab.report import build_report, plots, stats, tables
from tunelab.report.fit import predict

ACC = {"lora": [0.80, 0.84], "loreft": [0.78, 0.79], "full": [0.90, 0.86]}
PARAMS = {"lora": 1_000_000, "loreft": 20_000, "full": 135_000_000}


def write_run(root: Path, name: str, metrics: dict, losses=(2.0, 1.5, 1.2), extra_log: str = "") -> Path:
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    lines = [json.dumps({"step": 10 * (i + 1), "loss": v, "lr": 1e-3}) for i, v in enumerate(losses)]
    lines.append(json.dumps({"step": 30, "eval": {"accuracy": 0.5}}))  # eval records carry no loss
    (d / "log.jsonl").write_text("\n".join(lines) + "\n" + extra_log)
    return d


@pytest.fixture
def cmp_dir(tmp_path):
    for method, accs in ACC.items():
        for seed, acc in enumerate(accs):
            write_run(
                tmp_path,
                f"{method}-s{seed}",
                {
                    "accuracy": acc,
                    "n": 200,
                    "method": method,
                    "task": "sentiment",
                    "seed": seed,
                    "trainable_params": PARAMS[method],
                    "total_params": 135_000_000,
                    "trainable_percent": 100 * PARAMS[method] / 135_000_000,
                    "train_tokens_per_s": 1000.0 + seed,
                    "wall_time_s": 60.0 + 10 * seed,
                    "peak_memory_mb": 900.0,
                    "final_loss": 1.2 - acc,
                    "before": {"accuracy": 0.5},
                },
                extra_log='{"step": 40, "lo',
            )  # a line cut off by a crash
            right = round(acc * 200)  # per-example predictions that score exactly `acc`
            preds = [{"where": f"dev.tsv:{i + 2}", "prediction": "pos" if i < right else "neg", "reference": "pos"}
                     for i in range(200)]
            (tmp_path / "runs" / f"{method}-s{seed}" / "predictions.jsonl").write_text(
                "".join(json.dumps(p) + "\n" for p in preds))
    (tmp_path / "runs" / "prompt_tuning-s0").mkdir()  # started, never finished
    return tmp_path


def test_collect_and_summarize_mean_and_sample_std(cmp_dir):
    rows, unfinished = tables.collect_runs(cmp_dir)
    assert len(rows) == 6 and unfinished == ["prompt_tuning-s0"]
    assert rows[0]["before.accuracy"] == 0.5  # nested metric groups are flattened
    metric = tables.primary_metric(rows)
    assert metric == "accuracy"
    summary = tables.summarize(rows, metric)
    assert [s["label"] for s in summary] == ["full", "lora", "loreft"]  # best first
    full = summary[0]
    assert full["accuracy_mean"] == pytest.approx(0.88)
    assert full["accuracy_std"] == pytest.approx(math.sqrt(2 * 0.02**2))  # ddof = 1
    assert full["seeds"] == 2 and full["wall_time_s_mean"] == pytest.approx(65.0)


def test_lower_is_better_metric_ranks_ascending(cmp_dir):
    rows, _ = tables.collect_runs(cmp_dir)
    summary = tables.summarize(rows, "final_loss")
    assert [s["label"] for s in summary] == ["full", "lora", "loreft"]
    assert not tables.higher_is_better("final_loss") and tables.higher_is_better("rougeL")


def test_unknown_metric_names_the_available_ones(cmp_dir):
    rows, _ = tables.collect_runs(cmp_dir)
    with pytest.raises(ValueError, match=r"metric 'bleu' is in no run.*accuracy"):
        tables.primary_metric(rows, "bleu")


def test_single_seed_has_no_std_and_markdown_shows_plus_minus():
    rows = [
        {"label": "a", "method": "a", "seed": 0, "f1": 0.5},
        {"label": "b", "method": "b", "seed": 0, "f1": 0.7},
        {"label": "b", "method": "b", "seed": 1, "f1": 0.9},
    ]
    summary = tables.summarize(rows, tables.primary_metric(rows))
    assert summary[1]["f1_std"] is None
    # two seeds: t(0.975, 1) = 12.706, half-width = 12.706 * 0.1414 / sqrt(2) = 1.27 -> [-0.471, 2.07],
    # which a bounded metric cannot take: without predictions the report cuts it to [0, 1] and says so
    assert summary[0]["f1_lo"] == pytest.approx(-0.4706, abs=1e-3)
    stats.bounded_t_rows(summary, "f1")
    assert summary[0]["f1_interval"] == "t over seeds, cut to the metric's range"
    md = tables.markdown_table(summary, "f1").splitlines()
    assert md[0].startswith("| label | method | f1 ↑ (mean) | 95% CI | seed sd | per seed |")
    assert "| 0.8 | [0, 1] | 0.14 | 0.7 0.9 |" in md[2] and "| 0.5 | – | – | 0.5 |" in md[3]


def test_build_report_writes_every_output(cmp_dir):
    page = build_report(cmp_dir)
    assert page == cmp_dir / "report.html"
    rows = list(csv.DictReader(io.StringIO((cmp_dir / "results.csv").read_text())))
    assert len(rows) == 6 and rows[0].keys() >= {"run", "accuracy", "trainable_params", "wall_time_s"}
    assert list(rows[0])[:6] == ["run", "label", "method", "task", "seed", "accuracy"]
    summary = list(csv.DictReader(io.StringIO((cmp_dir / "summary.csv").read_text())))
    assert [r["label"] for r in summary] == ["full", "lora", "loreft"]
    md = (cmp_dir / "results.md").read_text()
    # the two-level bootstrap interval (seeds x examples) stays inside [0, 1]; a t-interval over the
    # 2 seeds would be [0.626, 1.13]
    assert "| full | full | 0.88 | [0.825, 0.93] | 0.028 | 0.9 0.86 | best | 135M | 100% |" in md
    for s in summary:
        assert 0 <= float(s["accuracy_lo"]) < float(s["accuracy_mean"]) < float(s["accuracy_hi"]) <= 1
    assert "two-level bootstrap" in md and "## Environment" in md and "torch:" in md
    assert md.startswith("**Verdict: full is best (accuracy 0.88); lora and loreft are worse by 0.06 to 0.095")
    assert "only 2 seeds" in md and "Holm-Bonferroni" in md and '"Best" was chosen from these same data' in md
    # paired test vs full: lora scores 0.82 vs 0.88 on the same examples; every lora hit is a full hit
    lora = next(r for r in summary if r["label"] == "lora")
    assert float(lora["vs_best_diff"]) == pytest.approx(-0.06) and float(lora["vs_best_p"]) < 0.05
    assert float(lora["vs_best_p"]) <= float(lora["vs_best_p_holm"]) < 0.05 and lora["tied_with_best"] == "False"
    assert float(lora["vs_best_lo"]) < -0.06 < float(lora["vs_best_hi"]) < 0
    assert "paired two-level bootstrap against full" in md and "correct = prediction == reference" in md
    for name in ("metric_vs_params", "metric_vs_time", "loss_curves"):
        assert (cmp_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # self-contained: nothing fetched
    for run in ("lora-s0", "lora-s1", "loreft-s0", "full-s1"):
        assert f">{run}<" in text
    assert "prompt_tuning-s0" in text and "Unfinished" in text


def test_loss_curve_reader_skips_broken_lines(cmp_dir):
    assert plots.read_log(cmp_dir / "runs" / "lora-s0") == [(10.0, 2.0), (20.0, 1.5), (30.0, 1.2)]
    assert plots.read_log(cmp_dir / "runs" / "missing") == []


def test_html_escapes_run_names(tmp_path):
    write_run(tmp_path, "<i>x&y-s0", {"accuracy": 0.5, "method": "<i>m"})
    text = build_report(tmp_path).read_text()
    assert "<i>" not in text and "&lt;i&gt;x&amp;y-s0" in text and "&lt;i&gt;m" in text


def test_sweep_kind_and_text_table():
    from tunelab.report import html, sweep_kind

    named = [{"run": "16-n500-s0"}, {"run": "4-n250-s1"}]
    assert sweep_kind({}, named) == "scale" and sweep_kind({"kind": "compare"}, named) == "compare"
    assert sweep_kind({"kind": "advise"}, [{"run": "x"}]) == "advise" and sweep_kind({}, [{"run": "x"}]) == "compare"
    table = html.text_table(["a<b", "c"], [["<i>", "2"]])
    assert "<th>a&lt;b</th>" in table and '<td class="t">&lt;i&gt;</td><td class="t">2</td>' in table


def test_report_without_finished_runs_says_so(tmp_path):
    (tmp_path / "runs" / "a-s0").mkdir(parents=True)
    with pytest.raises(ValueError, match="no finished runs"):
        build_report(tmp_path)


def test_scale_report_fits_the_law_from_run_names(tmp_path):
    true = {"A": 30.0, "alpha": 0.1, "beta": 0.4, "E": 0.9}
    for r in (4, 16, 64):
        for n in (250, 500, 1000, 2000, 4000):
            loss = float(predict("multiplicative", true, n, r))
            write_run(tmp_path, f"{r}-n{n}-s0", {"eval_loss": loss, "accuracy": 0.5, "method": "lora", "seed": 0})
    page = build_report(tmp_path)
    result = json.loads((tmp_path / "scaling.json").read_text())
    mult = next(f for f in result["fits"] if f["form"] == "multiplicative")
    assert result["target"] == "eval_loss"
    assert mult["params"]["beta"] == pytest.approx(0.4, abs=1e-3) and mult["errors"]["max_rel_error"] < 1e-4
    assert {h["d"] for h in mult["heldout"]} == {4000.0}
    assert (tmp_path / "plots" / "scaling.png").exists()
    assert "Scaling law" in page.read_text() and "## Scaling law" in (tmp_path / "results.md").read_text()


# ---- the HTML in headless Chromium -------------------------------------------------------------------


def find_chromium() -> str | None:
    for exe in (os.environ.get("TUNELAB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if exe and shutil.which(exe):
            return shutil.which(exe)
    return None


def test_html_loads_in_headless_chromium_without_console_errors(cmp_dir, tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH (chromium/chromium-browser/google-chrome): run .ci/install-chromium")
    page = build_report(cmp_dir)
    profile = tmp_path_factory.mktemp("chromium-profile")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=3000",
        "--window-size=1280,900",
        "--dump-dom",
    ]
    # a copy of the page that records, after layout at 1280 px, how wide the page and each table are
    measure = page.with_name("measure.html")
    probe = ("<script>document.body.setAttribute('data-layout', [document.documentElement.scrollWidth, "
             "document.documentElement.clientWidth].concat(Array.prototype.map.call(document.querySelectorAll('.scroll'), "
             "function(d){return d.scrollWidth + '/' + d.clientWidth + '/' + getComputedStyle(d).overflowX;})).join(' '));"
             "</script></body>")
    measure.write_text(page.read_text().replace("</body>", probe))
    cmd_page, cmd_measure = [*cmd, page.resolve().as_uri()], [*cmd, measure.resolve().as_uri()]
    proc = subprocess.run(cmd_page, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # At 1280 px the page itself never scrolls sideways: the wide summary table scrolls inside its
    # wrapper (overflow-x: auto), so no column is cut off.
    laid = subprocess.run(cmd_measure, capture_output=True, text=True, timeout=120).stdout
    layout = re.search(r'data-layout="([^"]*)"', laid).group(1).split()
    page_w, view_w, boxes = int(layout[0]), int(layout[1]), [b.split("/") for b in layout[2:]]
    assert page_w <= view_w <= 1280, layout
    assert boxes and all(o == "auto" and int(c) <= view_w for _, c, o in boxes), layout
    assert int(boxes[0][0]) > int(boxes[0][1]), layout  # the summary is wider than the screen: it scrolls
    # The page's script ran to its last line (it sets data-ready) and every run is listed.
    assert re.search(r'<body[^>]*data-ready="1"', dom), dom[:500]
    for method, accs in ACC.items():
        for seed in range(len(accs)):
            assert f">{method}-s{seed}<" in dom
    # Chromium writes every console message (and uncaught exceptions) to stderr as CONSOLE lines.
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console
    # What a researcher cites is on the rendered page: intervals, the paired test, the settings, the machine.
    for text in ("95% CI", "[0.825, 0.93]", "vs best: Δ [95% CI] p", "p=", "Holm p=", "Verdict: full is best",
                 "Environment", "torch", "hyperparameters"):
        assert text in dom, text


def test_t_interval_is_an_option_and_still_stays_in_range(cmp_dir):
    build_report(cmp_dir, interval="t")
    md = (cmp_dir / "results.md").read_text()
    # the t-interval over full's 2 seeds is [0.626, 1.13]; the report cuts it to the metric's range and says so
    assert "| full | full | 0.88 | [0.626, 1] |" in md and "cut to the metric's range" in md
    assert "Verdict: full is best" in md  # the paired tests do not depend on the interval shown
    with pytest.raises(ValueError, match="interval='normal'"):
        build_report(cmp_dir, interval="normal")


def test_results_md_shows_a_parameter_value_as_text_never_markup():
    summary = [{"label": "lora-<b>x</b>", "method": "lora", "accuracy_mean": 0.5, "seeds": 1,
                "hyperparameters": "target_modules=<script>x</script> | r=8 & a"}]
    md = tables.markdown_table(summary, "accuracy")
    assert "<script>" not in md and "<b>" not in md
    assert "target_modules=&lt;script&gt;x&lt;/script&gt; \\| r=8 &amp; a" in md and "lora-&lt;b&gt;x&lt;/b&gt;" in md
