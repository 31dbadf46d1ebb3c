"""Task metrics: thin wrappers over the reference libraries, one function per metric.

Scales: every score is a fraction in [0, 1] (accuracy, F1, EM, ROUGE) except ``bleu``, which keeps
sacrebleu's customary 0-100 scale, and ``perplexity``.

- classification: ``accuracy``, ``f1`` and ``matthews`` (scikit-learn)
- NER: ``entity_prf`` entity-level precision / recall / F1 (seqeval's entity extraction)
- QA: ``squad_scores`` exact match / F1 with the official SQuAD v1.1 normalisation
- text: ``rouge`` (rouge-score, Porter stemming), ``bleu`` (sacrebleu corpus BLEU), ``perplexity``
- maths: ``numbers_match`` (LLM-Adapters tolerance, |pred - gold| <= 0.001)
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter

# ---- which way is better, and which metric picks the best checkpoint ----------------------------

# The one direction table: the training loop's best checkpoint and the report's tables both read it.
LOWER_IS_BETTER = {"eval_loss", "loss", "final_loss", "perplexity", "ppl", "wer", "cer", "ter"}
# Counts a task reports beside its scores: never a quality to select on.
NOT_SCORES = {"n", "without_reference", "tokens", "unplaced", "tied_predictions"}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (or of ``group.metric``) is better."""
    return metric.split(".")[-1] not in LOWER_IS_BETTER


def selection_metric(metrics: dict) -> str | None:
    """The metric that picks the best checkpoint: the task's primary metric (its first finite number that
    is a score, not a count such as ``n`` or ``without_reference``); ``eval_loss`` only when the task
    reports no score (e.g. generation without references); None when there is neither."""
    def finite(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    for k, v in metrics.items():
        if k not in NOT_SCORES and k != "eval_loss" and finite(v):
            return k
    return "eval_loss" if finite(metrics.get("eval_loss")) else None


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (None: nothing to beat) in the metric's direction."""
    return best is None or (value > best if higher_is_better(metric) else value < best)


# ---- classification ---------------------------------------------------------------------------


def accuracy(references: list, predictions: list) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(references, predictions)) if references else 0.0


def f1(references: list, predictions: list, average: str = "macro") -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(references, predictions, average=average, zero_division=0)) if references else 0.0


def matthews(references: list, predictions: list) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(references, predictions)) if references else 0.0


# ---- NER ----------------------------------------------------------------------------------------


def entities(tags) -> list[tuple[str, int, int]]:
    """seqeval's (type, first, last) chunks of an IOB tag sequence. Memoized: an NER evaluation asks for
    each sequence's chunks twice (the scores, the predictions file) and the gold ones again in every
    evaluation of the run; seqeval's chunking is Python per tag, ~10% of a MiniLM head's evaluation."""
    return list(_entities(tuple(tags)))


@functools.lru_cache(maxsize=2**15)
def _entities(tags: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    from seqeval.metrics.sequence_labeling import get_entities  # here: seqeval imports sklearn (seconds)

    return tuple(get_entities(list(tags)))


def entity_prf(gold: list[list[str]], pred: list[list[str]], *, unplaced: int = 0) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 over IOB tag sequences, plus F1 per entity type.

    Entities are seqeval's (type, start, end) chunks (conlleval rules), so with ``unplaced=0`` the
    numbers equal ``seqeval.metrics.{precision,recall,f1}_score``. ``unplaced`` counts predicted
    entities that could not be located in the sentence (generative NER naming text that is not
    there): they are false positives, so they lower precision.
    """
    if len(gold) != len(pred):
        raise ValueError(f"entity_prf: {len(gold)} gold sequences but {len(pred)} predicted")
    gold_set, pred_set = set(), set()
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"entity_prf: sentence {i} has {len(g)} gold tags but {len(p)} predicted")
        gold_set.update((i, *e) for e in entities(g))
        pred_set.update((i, *e) for e in entities(p))
    out = _prf(len(gold_set & pred_set), len(pred_set) + unplaced, len(gold_set))
    for etype in sorted({e[1] for e in gold_set}):
        g = {e for e in gold_set if e[1] == etype}
        p = {e for e in pred_set if e[1] == etype}
        out[f"f1_{etype}"] = _prf(len(g & p), len(p), len(g))["f1"]
    return out


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


# ---- SQuAD --------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """Official SQuAD v1.1 answer normalisation: lower case, drop punctuation, drop the articles
    a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_em(prediction: str, references: list[str]) -> float:
    norm = squad_normalize(prediction)
    return float(max((norm == squad_normalize(r) for r in references), default=False))


def squad_f1(prediction: str, references: list[str]) -> float:
    def one(ref: str) -> float:
        p, g = squad_normalize(prediction).split(), squad_normalize(ref).split()
        same = sum((Counter(p) & Counter(g)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(g)
        return 2 * precision * recall / (precision + recall)

    return max((one(r) for r in references), default=0.0)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean exact match and token F1, each the max over an example's reference answers."""
    n = len(predictions)
    if n != len(references):
        raise ValueError(f"squad_scores: {n} predictions but {len(references)} reference lists")
    em = sum(squad_em(p, r) for p, r in zip(predictions, references, strict=True))
    f = sum(squad_f1(p, r) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": em / n if n else 0.0, "f1": f / n if n else 0.0}


# ---- text generation ----------------------------------------------------------------------------


def rouge(predictions: list[str], references: list, types=("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measure per type (rouge-score with the Porter stemmer). An example's reference may be a
    list of references: its score is the best over them, per type (rouge-score's ``score_multi``, as the
    multi-reference summarization papers score)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        refs = [ref] if isinstance(ref, str) else list(ref)
        per = [scorer.score(r, pred) for r in refs]  # (target, prediction)
        for t in types:
            totals[t] += max(s[t].fmeasure for s in per)
    n = len(predictions)
    return {t: totals[t] / n if n else 0.0 for t in types}


def bleu(predictions: list[str], references: list) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100. An example's
    reference may be a list: BLEU then counts n-gram matches against all of them at once (multi-reference
    BLEU as Papineni et al. define it; examples with fewer references leave the other streams empty)."""
    import sacrebleu

    if not predictions:
        return 0.0
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)


def perplexity(sum_logprob: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per reference token."""
    return math.exp(-sum_logprob / n_tokens) if n_tokens else float("nan")


# ---- maths --------------------------------------------------------------------------------------


def pick_choice(scores: list[float]) -> tuple[int, bool]:
    """(index of the highest score, whether another choice has exactly that score). A tie means the scores
    could not tell the choices apart (low-precision logits round them together): the first is picked, and
    the caller counts it (``tied_predictions`` in the metrics) instead of hiding it."""
    best = max(range(len(scores)), key=scores.__getitem__)
    return best, sum(1 for s in scores if s == scores[best]) > 1


def numbers_match(prediction: float | None, gold: float, tol: float = 1e-3) -> bool:
    return prediction is not None and math.isfinite(prediction) and abs(prediction - gold) <= tol
