"""Each metric against values computed by hand (and seqeval's own scores for NER)."""

import math

import pytest

from tunelab.evaluation import metrics


def test_classification_metrics():
    y, p = [0, 1, 1, 0], [0, 1, 0, 0]
    assert metrics.accuracy(y, p) == 0.75
    # class 0: P=2/3 R=1 F=0.8; class 1: P=1 R=1/2 F=2/3 -> macro 11/15
    assert metrics.f1(y, p) == pytest.approx((0.8 + 2 / 3) / 2)
    # TP=1 TN=2 FP=0 FN=1: (1*2 - 0) / sqrt(1*2*3*2)
    assert metrics.matthews(y, p) == pytest.approx(2 / math.sqrt(12))


def test_entity_prf_hand_and_seqeval():
    from seqeval.metrics import f1_score, precision_score, recall_score

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    got = metrics.entity_prf(gold, pred)
    # gold {PER 0-1, LOC 3, ORG}, pred {PER 0-1, ORG 3, ORG}: tp 2 of 3 each way
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(f1_score(gold, pred))
    assert got["precision"] == pytest.approx(precision_score(gold, pred))
    assert got["recall"] == pytest.approx(recall_score(gold, pred))
    assert got["f1_PER"] == 1.0 and got["f1_LOC"] == 0.0 and got["f1_ORG"] == pytest.approx(2 / 3)
    # two hallucinated entities: precision 2/5, recall unchanged
    more = metrics.entity_prf(gold, pred, unplaced=2)
    assert more["precision"] == pytest.approx(2 / 5) and more["recall"] == pytest.approx(2 / 3)
    assert more["f1"] == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))


def test_entity_prf_length_mismatch_names_sentence():
    with pytest.raises(ValueError, match="sentence 0"):
        metrics.entity_prf([["O", "O"]], [["O"]])


def test_squad_normalisation_and_scores():
    assert metrics.squad_normalize("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert metrics.squad_normalize("An apple a day") == "apple day"
    assert metrics.squad_em("the Eiffel Tower.", ["Paris", "Eiffel Tower"]) == 1.0
    # "Eiffel" vs "Eiffel Tower": P=1 R=1/2 -> F1 2/3; vs "Paris": 0 -> max 2/3
    assert metrics.squad_f1("Eiffel", ["Paris", "the Eiffel Tower"]) == pytest.approx(2 / 3)
    got = metrics.squad_scores(["Eiffel", "Paris"], [["Eiffel Tower"], ["paris.", "France"]])
    assert got == pytest.approx({"exact_match": 0.5, "f1": (2 / 3 + 1) / 2})


def test_rouge_by_hand():
    got = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    # unigrams: 3 of 3 predicted match, 3 of 6 reference -> F = 2/3; bigrams 2/2 and 2/5 -> 4/7
    assert got["rouge1"] == pytest.approx(2 / 3)
    assert got["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert got["rougeL"] == pytest.approx(2 / 3)  # LCS = 3
    # stemming: "cats running" ~ "cat run"
    assert metrics.rouge(["cats running"], ["cat run"])["rouge1"] == pytest.approx(1.0)


def test_bleu_by_hand():
    pred, ref = "a b c d e f g h", "a b c d e f g x"
    # n-gram precisions 7/8, 6/7, 5/6, 4/5, equal lengths (BP = 1): geometric mean = (1/2) ** (1/4)
    assert metrics.bleu([pred], [ref]) == pytest.approx(100 * 0.5**0.25, abs=1e-6)
    assert metrics.bleu([], []) == 0.0


def test_perplexity_and_numbers():
    assert metrics.perplexity(-2 * math.log(4), 2) == pytest.approx(4.0)
    assert metrics.numbers_match(3.0005, 3.0) and not metrics.numbers_match(3.01, 3.0)
    assert not metrics.numbers_match(None, 1.0) and not metrics.numbers_match(float("inf"), 1.0)
