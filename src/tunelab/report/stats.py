"""Uncertainty for comparisons: t-intervals over seeds and a paired bootstrap over eval examples.

- ``t_interval``: the mean over seeds and its two-sided Student-t confidence interval,
  mean ± t_{0.975, n-1} · s / sqrt(n) (sample std s, ddof = 1). With one seed there is no interval.
- ``example_scores``: one number per eval example from a run's ``predictions.jsonl``: the task's own
  ``correct`` flag when it writes one (reasoning), correctness (prediction == reference) when the
  references are labels (classification; NER: the whole sentence's entities), token F1 for QA spans
  (a list of acceptable answers), ROUGE-L F1 when they are free text (summaries, instructions). Examples are keyed by
  ``where`` (file:line) when present, else by their position, so runs of the same eval set pair up.
- ``paired_bootstrap``: the difference in mean per-example score between two methods, with both
  methods' scores first averaged over their seeds per example (pooled by pairing the same example),
  resampled over examples (the same resample for both, hence "paired"). The CI is the percentile
  interval of the resampled differences; the p-value is two-sided, from the bootstrap distribution
  shifted to the null of no difference: p = (1 + #{|d* - d| >= |d|}) / (1 + B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
INTERVAL_NOTE = "95% CI: Student-t interval over seeds, mean ± t(0.975, n-1)·s/√n"


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """{"mean", "std", "lo", "hi", "half", "n"} of finite ``values``; lo/hi/half are None when n < 2."""
    vals = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=float)
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "lo": None, "hi": None, "half": None, "n": 0}
    mean = float(vals.mean())
    if n < 2:
        return {"mean": mean, "std": None, "lo": None, "hi": None, "half": None, "n": 1}
    std = float(vals.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "half": half, "n": n}


def _tokens(text: str) -> list[str]:
    return str(text).lower().split()


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    p, r = _tokens(prediction), _tokens(reference)
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))


def _first(v):
    """A list of acceptable references (QA) -> its items; anything else -> [v]."""
    return list(v) if isinstance(v, list) else [v]


def token_f1(prediction: str, reference: str) -> float:
    p, r = _tokens(prediction), _tokens(reference)
    common = sum(min(p.count(t), r.count(t)) for t in set(p))
    if not p or not r or common == 0:
        return float(p == r)
    return 2 * common / (len(p) + len(r))


def score_example(rec: dict, kind: str) -> float:
    """One example's score: ``kind`` is "correct" (the task's own flag), "match" (labels),
    "token_f1" (a span against a list of acceptable answers) or "rougeL" (free text)."""
    if kind == "correct":
        return float(bool(rec.get("correct")))
    pred = rec.get("prediction")
    refs = _first(rec.get("reference", rec.get("references", rec.get("answers"))))
    if kind == "match":
        return float(any(str(pred).strip() == str(r).strip() for r in refs))
    if kind == "token_f1":
        return max(token_f1(str(pred), str(r)) for r in refs)
    return max(rouge_l_f1(str(pred), str(r)) for r in refs)


def _kind(records: list[dict]) -> str:
    """The task's own correctness flag when it wrote one; token F1 for lists of acceptable answers
    (QA); labels when references are short and few distinct (classification, NER); else free text."""
    if records and all("correct" in r for r in records):
        return "correct"
    if records and all(isinstance(r.get("reference"), list) for r in records):
        return "token_f1"
    refs = [str(r) for rec in records for r in _first(rec.get("reference", rec.get("answers", "")))]
    distinct = len(set(refs))
    long = sum(len(r.split()) > 3 for r in refs) > len(refs) / 2
    return "rougeL" if long or (distinct > 20 and distinct > len(refs) / 4) else "match"


def read_predictions(run_dir) -> list[dict] | None:
    path = Path(run_dir) / "predictions.jsonl"
    if not path.exists():
        return None
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "prediction" not in rec:
            raise ValueError(f"{path}:{i}: expected an object with 'prediction' and 'reference'")
        out.append(rec)
    return out


def example_scores(records: list[dict], kind: str | None = None) -> tuple[dict, str]:
    """({example key: score}, kind) for one run's prediction records."""
    kind = kind or _kind(records)
    keys = [str(r.get("where") or r.get("id") or i) for i, r in enumerate(records)]
    return {k: score_example(r, kind) for k, r in zip(keys, records, strict=True)}, kind


def pooled(runs: list[dict]) -> dict:
    """Per-example mean over seeds of {key: score} dicts, over the keys every seed has."""
    common = set(runs[0]).intersection(*runs[1:]) if runs else set()
    return {k: sum(r[k] for r in runs) / len(runs) for k in sorted(common)}


def paired_bootstrap(a: dict, b: dict, *, n_boot: int = 10000, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Mean(a) - mean(b) over their shared example keys, with a paired bootstrap CI and p-value."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        raise ValueError(f"the paired bootstrap needs >= 2 shared eval examples (got {len(keys)})")
    diff = np.asarray([a[k] - b[k] for k in keys], dtype=float)
    obs = float(diff.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    boots = diff[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    extreme = int(np.sum(np.abs(boots - obs) >= abs(obs) - 1e-12)) if obs != 0 else n_boot
    return {"diff": obs, "lo": float(lo), "hi": float(hi), "p": min(1.0, (1 + extreme) / (1 + n_boot)),
            "n_examples": len(keys), "n_boot": n_boot}


__all__ = ["INTERVAL_NOTE", "compare_to_best", "environment", "example_scores", "paired_bootstrap", "pooled", "read_predictions", "t_interval"]


def compare_to_best(rows: list[dict], summary: list[dict], *, n_boot: int = 10000) -> str | None:
    """Add ``vs_best_*`` (paired bootstrap of each label against the first summary row) to ``summary``
    in place, from the runs' predictions.jsonl; returns the per-example score used, or None when the
    runs saved no predictions."""
    by_label: dict[str, list[dict]] = {}
    kind = None
    for r in rows:
        recs = read_predictions(r["run_dir"]) if r.get("run_dir") else None
        if recs:
            scores, kind = example_scores(recs, kind)
            by_label.setdefault(str(r["label"]), []).append(scores)
    if not summary or str(summary[0]["label"]) not in by_label:
        return None
    best = pooled(by_label[str(summary[0]["label"])])
    summary[0]["is_best"] = True
    for s in summary[1:]:
        runs = by_label.get(str(s["label"]))
        if not runs:
            continue
        try:
            t = paired_bootstrap(pooled(runs), best, n_boot=n_boot)
        except ValueError:
            continue
        s.update({f"vs_best_{k}": v for k, v in t.items() if k in ("diff", "lo", "hi", "p", "n_examples")})
    return kind


def environment() -> dict:
    """Package versions and the hardware, for the report (where the numbers came from)."""
    import os
    import platform
    from importlib import metadata

    env = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for pkg in ("tunelab", "torch", "transformers", "numpy", "scipy"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env["cpu"] = f"{cpu} ({os.cpu_count()} cores visible)"
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA install must not sink the report
        pass
    return env
