"""Uncertainty for comparisons: intervals and paired tests that respect the metric and the seeds.

What the report uses (``analyse``):
- ``metric_terms``: a run's ``predictions.jsonl`` as per-example terms of the table's own metric
  (``tunelab.evaluation.metrics``): (score, 1) for means (accuracy, the task's ``correct`` flag,
  SQuAD F1/EM with the official normalisation, ROUGE with rouge-score's tokenizer and Porter
  stemming), (TP, predicted, gold) per sentence for entity-level P/R/F1 (seqeval chunks of the saved
  tags) and per class for macro F1, recomputed from the summed counts. The mean over seeds of
  ``value(terms.sum())`` is the table's mean.
- ``two_level_replicates``: each bootstrap replicate draws the eval examples with replacement (one
  draw shared by every method: paired) and, per method, its seeds with replacement; the replicate's
  value is the mean over the drawn seeds of the metric recomputed on the drawn examples.
- ``compare_methods``: percentile intervals of those replicates (inside the metric's range by
  construction), and each method's difference from the best with a percentile CI and a two-sided
  p-value from the distribution shifted to the null, p = (1 + #{|d* - d| >= |d|}) / (1 + B),
  Holm-Bonferroni-adjusted over the comparisons against the best (chosen from the same data).
- ``t_interval``: mean ± t_{0.975, n-1} · s / sqrt(n) over seeds; kept for losses and for runs
  without predictions (``bounded_t_rows`` cuts it to the metric's range and says so).

Kept for callers of the earlier API: ``example_scores`` / ``score_example`` (now with metrics.py's
ROUGE-L and SQuAD F1), ``pooled`` and ``paired_bootstrap`` (examples only, seeds averaged first: it
cannot see seed-to-seed variation; the report no longer uses it), ``compare_to_best``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from tunelab.evaluation import metrics

CONFIDENCE = 0.95
INTERVAL_NOTE = "95% CI: Student-t interval over seeds, mean ± t(0.975, n-1)·s/√n"  # losses, and rows without predictions


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


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair exactly as the table's ``metrics.rouge`` scores it (rouge-score's tokenizer,
    Porter stemming)."""
    return _rouge_scorer("rougeL").score(str(reference), str(prediction))["rougeL"].fmeasure


@functools.lru_cache(maxsize=8)
def _rouge_scorer(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def _first(v):
    """A list of acceptable references (QA) -> its items; anything else -> [v]."""
    return list(v) if isinstance(v, list) else [v]


def token_f1(prediction: str, reference: str) -> float:
    """The official SQuAD v1.1 token F1 of one pair (``metrics.squad_f1``: normalised answers)."""
    return metrics.squad_f1(str(prediction), [str(reference)])


def score_example(rec: dict, kind: str) -> float:
    """One example's score: ``kind`` is "correct" (the task's own flag), "match" (labels),
    "token_f1" (SQuAD F1 against a list of acceptable answers) or "rougeL" (free text)."""
    if kind == "correct":
        return float(bool(rec.get("correct")))
    pred = rec.get("prediction")
    refs = _first(rec.get("reference", rec.get("references", rec.get("answers"))))
    if kind == "match":
        return float(any(str(pred).strip() == str(r).strip() for r in refs))
    if kind == "token_f1":
        return metrics.squad_f1(str(pred), [str(r) for r in refs])
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


# ---- the table's metric as per-example terms ---------------------------------------------------------
#
# Each example contributes a row of terms; the metric is a function of their sums. For the metrics that are
# means (accuracy, SQuAD F1/EM, ROUGE) the terms are (score, 1); entity F1 is corpus-level (micro over
# sentences), so a sentence's terms are (true positives, predicted entities, gold entities) and every
# resample recomputes F1 = 2·TP / (predicted + gold) from the summed counts; macro F1 keeps those three
# counts per class and averages the per-class F1.

NER_METRICS = ("f1", "precision", "recall")
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_NER_TEXT = re.compile(r"^(none|[A-Za-z_-]+: [^;]+(; [A-Za-z_-]+: [^;]+)*)$")
# Metrics whose values lie in a known range (an interval must stay inside it).
METRIC_RANGE = {
    **dict.fromkeys(("accuracy", "f1", "macro_f1", "micro_f1", "precision", "recall", "exact_match", "em",
                     *ROUGE_METRICS), (0.0, 1.0)),
    "matthews": (-1.0, 1.0), "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0),
    "bleu": (0.0, 100.0), "chrf": (0.0, 100.0),
}


def metric_range(metric: str) -> tuple[float, float] | None:
    """The range of ``metric``'s values when it has one (accuracy, F1, ROUGE ...); None for losses."""
    return METRIC_RANGE.get(metric.split(".")[-1])


@dataclass
class Terms:
    """One run's per-example terms of a metric: ``comps[i]`` are example ``keys[i]``'s terms, and
    ``value(comps.sum(0))`` is the metric. ``exact`` is False when the ranking metric has no
    per-example form here and ``metric`` names the score used instead."""

    keys: list[str]
    comps: np.ndarray  # (N, m)
    agg: str  # "mean" | "f1" | "precision" | "recall" | "macro_f1"
    metric: str
    how: str
    exact: bool = True

    def value(self, totals: np.ndarray) -> np.ndarray:
        return aggregate(self.agg, np.asarray(totals, dtype=float))


def _safe_div(a, b):
    a, b = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    out = np.zeros(a.shape)
    np.divide(a, b, out=out, where=b > 0)
    return out


def aggregate(agg: str, t: np.ndarray) -> np.ndarray:
    """The metric from summed terms ``t`` (..., m)."""
    if agg == "mean":
        return _safe_div(t[..., 0], t[..., 1])
    if agg == "f1":
        return _safe_div(2 * t[..., 0], t[..., 1] + t[..., 2])
    if agg == "precision":
        return _safe_div(t[..., 0], t[..., 1])
    if agg == "recall":
        return _safe_div(t[..., 0], t[..., 2])
    if agg == "macro_f1":
        c = t.reshape(*t.shape[:-1], -1, 3)
        return _safe_div(2 * c[..., 0], c[..., 1] + c[..., 2]).mean(-1)
    raise ValueError(f"unknown aggregate {agg!r}")


def _keys(records: list[dict]) -> list[str]:
    return [str(r.get("where") or r.get("id") or i) for i, r in enumerate(records)]


def _ner_records(records: list[dict]) -> bool:
    if all("gold_tags" in r and "pred_tags" in r for r in records):
        return True
    refs = [r.get("reference") for r in records]
    return bool(records) and all(isinstance(x, str) and _NER_TEXT.match(x) for x in refs) and any(
        x != "none" for x in refs)


def _ner_counts(rec: dict) -> tuple[int, int, int]:
    """(true positives, predicted entities, gold entities) of one sentence: seqeval's chunks of the saved
    tags (what ``metrics.entity_prf`` counts), else the rendered "TYPE: words; ..." lists (older runs)."""
    if "gold_tags" in rec and "pred_tags" in rec:
        g, p = set(metrics.entities(rec["gold_tags"])), set(metrics.entities(rec["pred_tags"]))
        return len(g & p), len(p) + int(rec.get("unplaced") or 0), len(g)

    def parts(text):
        return Counter(x.strip() for x in str(text).split(";") if x.strip() and x.strip() != "none")

    g, p = parts(rec.get("reference")), parts(rec.get("prediction"))
    return sum((g & p).values()), sum(p.values()), sum(g.values())


def metric_terms(records: list[dict], metric: str) -> Terms:
    """Per-example terms of the table's ``metric`` for one run's predictions (see the module notes)."""
    keys, name = _keys(records), metric.split(".")[-1]
    kind = _kind(records)

    def mean_of(scores, how, used=metric, exact=True):
        comps = np.column_stack([np.asarray(scores, dtype=float), np.ones(len(scores))])
        return Terms(keys, comps, "mean", used, how, exact)

    if kind == "correct":
        return mean_of([bool(r.get("correct")) for r in records], "the task's own per-example correctness flag")
    if kind == "token_f1":
        refs = [[str(x) for x in _first(r.get("reference"))] for r in records]
        preds = [str(r.get("prediction")) for r in records]
        if name in ("exact_match", "em"):
            return mean_of([metrics.squad_em(p, g) for p, g in zip(preds, refs, strict=True)],
                           "SQuAD v1.1 exact match (normalised answers; metrics.squad_em)")
        return mean_of([metrics.squad_f1(p, g) for p, g in zip(preds, refs, strict=True)],
                       "SQuAD v1.1 token F1 (normalised answers; metrics.squad_f1)",
                       exact=name == "f1", used=metric if name == "f1" else "f1")
    if name in NER_METRICS and _ner_records(records):
        comps = np.asarray([_ner_counts(r) for r in records], dtype=float).reshape(-1, 3)
        return Terms(keys, comps, name, metric,
                     f"entity-level {name} (seqeval chunks, micro over sentences): each resample sums the "
                     "sentences' true positives, predicted and gold entities and recomputes it")
    if kind == "rougeL" or name in ROUGE_METRICS:
        rtype = name if name in ROUGE_METRICS else "rougeL"
        scorer = _rouge_scorer(rtype)
        scores = [max(scorer.score(str(g), str(r.get("prediction")))[rtype].fmeasure for g in _first(r.get("reference")))
                  for r in records]
        return mean_of(scores, f"{rtype} F1 (rouge-score, Porter stemming; metrics.rouge)",
                       used=rtype, exact=name == rtype)
    refs = [str(_first(r.get("reference"))[0]).strip() for r in records]
    preds = [str(r.get("prediction")).strip() for r in records]
    if name == "macro_f1":
        labels = sorted(set(refs) | set(preds))
        comps = np.zeros((len(records), 3 * len(labels)))
        for i, (g, p) in enumerate(zip(refs, preds, strict=True)):
            comps[i, 3 * labels.index(g) + 2] = 1
            comps[i, 3 * labels.index(p) + 1] = 1
            comps[i, 3 * labels.index(g)] += g == p
        return Terms(keys, comps, "macro_f1", metric, "macro F1 over the labels seen: per-class TP, predicted "
                     "and gold counts summed per resample, then the mean of the per-class F1")
    return mean_of([g == p for g, p in zip(refs, preds, strict=True)], "correct = prediction == reference",
                   used="accuracy", exact=name == "accuracy")


# ---- two-level bootstrap: seeds, then eval examples -------------------------------------------------------


def _example_counts(rng, n_rep: int, n: int) -> np.ndarray:
    """(n_rep, n) how often each example is drawn in each resample of n examples with replacement."""
    idx = rng.integers(0, n, size=(n_rep, n)) + (np.arange(n_rep) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_rep * n).reshape(n_rep, n).astype(float)


def two_level_replicates(groups: dict[str, list[Terms]], *, n_boot: int = 10000, seed: int = 0,
                         chunk: int = 1000) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each group's metric, resampling seeds and examples.

    Each replicate draws one resample of the eval examples, shared by every group (so differences are
    paired), and, per group, a resample of its seeds (S of S with replacement, independently per group);
    the replicate's value is the mean over the drawn seeds of the metric recomputed from that seed's
    terms summed over the drawn examples. All of a group's Terms must have the same keys in the same order."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(groups.values()))[0].keys)
    out: dict[str, list[np.ndarray]] = {g: [] for g in groups}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        w = _example_counts(rng, b, n)
        for g, runs in groups.items():
            s = len(runs)
            per_seed = np.stack([t.value(w @ t.comps) for t in runs], axis=1)
            u = rng.multinomial(s, np.full(s, 1.0 / s), size=b).astype(float)
            out[g].append((u * per_seed).sum(1) / s)
        done += b
    return {g: np.concatenate(v) for g, v in out.items()}


def point_value(runs: list[Terms]) -> float:
    """The mean over seeds of each seed's metric over all examples (the table's mean)."""
    return float(np.mean([t.value(t.comps.sum(0)) for t in runs]))


def percentile_interval(reps: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_p(diff_reps: np.ndarray, observed: float) -> float:
    """Two-sided p from the bootstrap distribution shifted to the null of no difference:
    (1 + #{|d* - d| >= |d|}) / (1 + B)."""
    if observed == 0:
        return 1.0
    extreme = int(np.sum(np.abs(diff_reps - observed) >= abs(observed) - 1e-12))
    return min(1.0, (1 + extreme) / (1 + len(diff_reps)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down), in the order given."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adj, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def compare_methods(groups: dict[str, list[Terms]], best: str, *, n_boot: int = 10000, seed: int = 0,
                    alpha: float = 0.05, confidence: float = CONFIDENCE) -> dict:
    """Each group's mean and two-level bootstrap interval, and each other group's paired test against
    ``best`` with Holm-Bonferroni over those tests. Returns {"groups": {g: {...}}, "tied": [...]}."""
    reps = two_level_replicates(groups, n_boot=n_boot, seed=seed)
    out = {}
    for g, runs in groups.items():
        lo, hi = percentile_interval(reps[g], confidence)
        out[g] = {"mean": point_value(runs), "lo": lo, "hi": hi, "seeds": len(runs), "n_examples": len(runs[0].keys)}
    others = [g for g in groups if g != best]
    for g in others:
        d = out[g]["mean"] - out[best]["mean"]
        diff = reps[g] - reps[best]
        lo, hi = percentile_interval(diff, confidence)
        out[g].update(diff=d, diff_lo=lo, diff_hi=hi, p=bootstrap_p(diff, d))
    for g, ph in zip(others, holm([out[g]["p"] for g in others]), strict=True):
        out[g]["p_holm"] = ph
        out[g]["tied"] = ph >= alpha
    tied = [g for g in others if out[g]["tied"]]
    return {"groups": out, "best": best, "tied": tied, "alpha": alpha, "n_boot": n_boot}


def _aligned(groups: dict[str, list[Terms]]) -> dict[str, list[Terms]]:
    """The same runs restricted to the eval examples every run scored, in one order."""
    common = set.intersection(*(set(t.keys) for runs in groups.values() for t in runs))
    keys = sorted(common)
    out = {}
    for g, runs in groups.items():
        out[g] = []
        for t in runs:
            pos = {k: i for i, k in enumerate(t.keys)}
            out[g].append(Terms(keys, t.comps[[pos[k] for k in keys]], t.agg, t.metric, t.how, t.exact))
    return out


def analyse(rows: list[dict], summary: list[dict], metric: str, *, n_boot: int = 10000, alpha: float = 0.05,
            seed: int = 0, intervals: bool = True) -> dict | None:
    """The comparison's statistics from the runs' predictions.jsonl, written into ``summary`` in place:
    ``{metric}_lo/_hi/_ci`` become the two-level bootstrap interval (``{metric}_interval`` says which
    interval a row has), and every row but the best gets ``vs_best_diff/lo/hi/p/p_holm/n_examples`` and
    ``tied_with_best``. Returns what the report says about it, or None when there is nothing to test
    (no predictions, or a metric with no per-example form such as a loss)."""
    if metric_range(metric) is None:
        return None
    groups: dict[str, list[Terms]] = {}
    for r in rows:
        recs = read_predictions(r["run_dir"]) if r.get("run_dir") else None
        if recs:
            groups.setdefault(str(r["label"]), []).append(metric_terms(recs, metric))
    by_label = {str(s["label"]): s for s in summary}
    groups = {g: v for g, v in groups.items() if g in by_label and len(v) == by_label[g]["seeds"]}
    if not groups:
        return None
    groups = _aligned(groups)
    if len(next(iter(groups.values()))[0].keys) < 2:
        return None
    best = next((str(s["label"]) for s in summary if str(s["label"]) in groups), None)
    result = compare_methods(groups, best, n_boot=n_boot, seed=seed, alpha=alpha)
    for g, res in result["groups"].items():
        s = by_label[g]
        if intervals:
            s[f"{metric}_lo"], s[f"{metric}_hi"] = res["lo"], res["hi"]
            s[f"{metric}_ci"] = (res["hi"] - res["lo"]) / 2
            s[f"{metric}_interval"] = "bootstrap (seeds x examples)"
        s[f"{metric}_terms_mean"] = res["mean"]
        if g == best:
            s["is_best"] = True
            s["tied_with_best"] = True
        elif "diff" in res:
            s.update(vs_best_diff=res["diff"], vs_best_lo=res["diff_lo"], vs_best_hi=res["diff_hi"],
                     vs_best_p=res["p"], vs_best_p_holm=res["p_holm"], vs_best_n_examples=res["n_examples"],
                     tied_with_best=res["tied"])
    first = next(iter(groups.values()))[0]
    result.update(how=first.how, exact=first.exact, score_metric=first.metric, metric=metric,
                  n_examples=len(first.keys), labels_tested=list(groups))
    return result


def bounded_t_rows(summary: list[dict], metric: str) -> None:
    """Rows without a bootstrap interval keep the t-interval over seeds, cut to the metric's range
    (and say so in ``{metric}_interval``); loss-like metrics keep the plain t-interval."""
    rng = metric_range(metric)
    for s in summary:
        if s.get(f"{metric}_interval"):
            continue
        if s.get(f"{metric}_lo") is None:
            s[f"{metric}_interval"] = ""
            continue
        if rng is None:
            s[f"{metric}_interval"] = "t over seeds"
            continue
        lo, hi = max(rng[0], s[f"{metric}_lo"]), min(rng[1], s[f"{metric}_hi"])
        clipped = (lo, hi) != (s[f"{metric}_lo"], s[f"{metric}_hi"])
        s[f"{metric}_lo"], s[f"{metric}_hi"] = lo, hi
        s[f"{metric}_interval"] = "t over seeds, cut to the metric's range" if clipped else "t over seeds"


def verdict(summary: list[dict], metric: str, result: dict | None, higher_is_better: bool = True) -> str:
    """One line: who is best, who is within the noise of it, who is worse and by how much."""
    if not summary:
        return ""
    fmt = "{:.3g}".format
    best = summary[0]
    if len(summary) == 1:
        return f"Only {best['label']} was run: nothing to compare."
    if result is None:
        return (f"{best['label']} has the best mean {metric} ({fmt(best[f'{metric}_mean'])}); no paired test "
                "(no per-example predictions for this metric), so no method is called better or worse.")
    g = result["groups"]
    tied = [s["label"] for s in summary[1:] if s.get("tied_with_best") is True]
    worse = [s for s in summary[1:] if s.get("tied_with_best") is False]
    untested = [s["label"] for s in summary[1:] if str(s["label"]) not in g]
    parts = [f"{best['label']} is best ({metric} {fmt(best[f'{metric}_mean'])})"]
    if tied:
        parts.append(f"{_names(tied)} {'is' if len(tied) == 1 else 'are'} within the noise of it")
    if worse:
        gaps = [abs(s["vs_best_diff"]) for s in worse]
        by = fmt(gaps[0]) if len(worse) == 1 else f"{fmt(min(gaps))} to {fmt(max(gaps))}"
        parts.append(f"{_names([s['label'] for s in worse])} {'is' if len(worse) == 1 else 'are'} worse by {by}")
    if untested:
        parts.append(f"{_names(untested)} not tested (no predictions)")
    tail = f" (paired two-level bootstrap, Holm-corrected at {result['alpha']:g})."
    return "; ".join(parts) + tail


def _names(labels: list) -> str:
    labels = [str(x) for x in labels]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def seed_warning(summary: list[dict]) -> str | None:
    fewest = min((int(s.get("seeds") or 0) for s in summary), default=0)
    if fewest >= 3:
        return None
    return (f"Warning: {'only 1 seed' if fewest == 1 else f'only {fewest} seeds'} for some methods. The intervals "
            "and tests cannot see how much a result moves from seed to seed (with 2 seeds the spread is one "
            "difference), so a gap here may be one lucky seed; run 3 or more (compare.seeds).")


BOOTSTRAP_NOTE = (
    "95% CI: two-level bootstrap (10,000 resamples: the seeds, then the eval examples, both with replacement; "
    "the metric recomputed on each resample), percentile interval, so it stays inside the metric's range; "
    "seed sd is the spread between seeds (sample std)."
)


__all__ = ["BOOTSTRAP_NOTE", "INTERVAL_NOTE", "Terms", "analyse", "compare_methods", "compare_to_best", "environment",
           "example_scores", "holm", "metric_range", "metric_terms", "paired_bootstrap", "pooled",
           "read_predictions", "t_interval", "two_level_replicates", "verdict"]


def compare_to_best(rows: list[dict], summary: list[dict], *, n_boot: int = 10000, metric: str | None = None) -> str | None:
    """Add ``vs_best_*`` (the paired two-level bootstrap of each label against the first summary row,
    Holm-corrected) to ``summary`` in place; returns how the per-example score is defined, or None when
    the runs saved no predictions. (``analyse`` returns everything; this is the older entry point.)"""
    metric = metric or next((k[: -len("_mean")] for k in summary[0] if k.endswith("_mean")), "accuracy") if summary else None
    result = analyse(rows, summary, metric, n_boot=n_boot) if metric else None
    return None if result is None else result["how"]


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
