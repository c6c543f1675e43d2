"""Metrics on hand-made cases (WA vs UA, F1s, confusion orientation, MOSEI conventions, tests)."""

import math

import numpy as np
import pytest

from sertool.metrics import classification_metrics, confusion_matrix, paired_tests, sentiment_metrics, summarize


def test_hand_made_three_classes():
    y_true = [0, 0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2]
    m = classification_metrics(y_true, y_pred, labels=["a", "b", "c"])
    assert m["WA"] == pytest.approx(5 / 7)
    assert m["UA"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["weighted_f1"] == pytest.approx((4 * 0.75 + 2 * 0.5 + 1 * 1.0) / 7)
    # row = true class, column = predicted class
    assert m["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_wa_and_ua_are_not_swapped():
    # 9 of class 0, 1 of class 1, a classifier that always says 0: WA 0.9 (overall), UA 0.5 (mean recall)
    m = classification_metrics([0] * 9 + [1], [0] * 10, n_classes=2)
    assert m["WA"] == pytest.approx(0.9)
    assert m["UA"] == pytest.approx(0.5)


def test_agrees_with_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, t, rng.integers(0, 5, 300))
    m = classification_metrics(t, p, n_classes=5)
    assert m["WA"] == pytest.approx(sk.accuracy_score(t, p))
    assert m["UA"] == pytest.approx(sk.balanced_accuracy_score(t, p))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(t, p, average="macro"))
    assert m["weighted_f1"] == pytest.approx(sk.f1_score(t, p, average="weighted"))
    assert np.array_equal(np.array(m["confusion"]), sk.confusion_matrix(t, p, labels=range(5)))


def test_absent_classes():
    # class 2 never occurs (true or predicted): not counted in UA or macro-F1; class 3 only predicted: F1 0 counts
    m = classification_metrics([0, 1, 0, 1], [0, 1, 3, 1], n_classes=4)
    assert m["UA"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 2)
    with pytest.raises(ValueError, match="no examples"):
        classification_metrics([], [], n_classes=2)


def test_sentiment_metrics_hand_made():
    t = [-3.0, -1.2, 0.0, 0.4, 2.6]
    p = [-2.6, 0.3, 0.2, -0.1, 3.5]
    m = sentiment_metrics(t, p)
    assert m["MAE"] == pytest.approx(np.mean([0.4, 1.5, 0.2, 0.5, 0.9]))
    assert m["corr"] == pytest.approx(np.corrcoef(t, p)[0, 1])
    assert m["acc7"] == pytest.approx(4 / 5)  # -3/-3, -1/0 wrong, 0/0, 0/-0, 3/3
    assert m["acc5"] == pytest.approx(4 / 5)
    assert m["acc2_has0"] == pytest.approx(3 / 5)  # >= 0: FFTTT vs FTTFT
    assert m["acc2_non0"] == pytest.approx(2 / 4)  # zero-score example removed; > 0: FFTT vs FTFT
    assert m["n_non0"] == 4
    sk = pytest.importorskip("sklearn.metrics")
    assert m["f1_has0"] == pytest.approx(sk.f1_score([0, 0, 1, 1, 1], [0, 1, 1, 0, 1], average="weighted"))
    assert m["f1_non0"] == pytest.approx(sk.f1_score([0, 0, 1, 1], [0, 1, 0, 1], average="weighted"))


def test_acc7_clips_before_rounding():
    m = sentiment_metrics([3.0, -3.0], [4.2, -5.0])
    assert m["acc7"] == 1.0 and m["acc5"] == 1.0


def test_summarize_and_paired_tests():
    s = summarize([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summarize([0.3])["std"] == 0.0
    stats = pytest.importorskip("scipy.stats")
    a = [0.61, 0.64, 0.58, 0.66, 0.63, 0.60]
    b = [0.59, 0.60, 0.57, 0.61, 0.60, 0.58]
    r = paired_tests(a, b)
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert r["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    same = paired_tests(a, a)
    assert same["p_ttest"] == 1.0 and same["p_wilcoxon"] == 1.0
    assert math.isnan(paired_tests([0.5], [0.4])["p_ttest"])
    with pytest.raises(ValueError, match="matched"):
        paired_tests([1, 2], [1])
