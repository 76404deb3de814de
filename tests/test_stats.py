"""Tests of the comparison statistics (evaluation/significance.py) on small fixed inputs and simulations."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from evaluation import significance as sig

# The running example: five paired differences, K = 5 folds so n_test/n_train = 1/4.
D = [0.02, 0.01, 0.03, 0.00, 0.02]
# mean = 0.08 / 5 = 0.016; deviations 0.004, -0.006, 0.014, -0.016, 0.004;
# squares sum to (16 + 36 + 196 + 256 + 16)e-6 = 520e-6, so s² = 520e-6 / 4 = 1.3e-4.
MEAN, S2 = 0.016, 1.3e-4


def test_corrected_resampled_t_by_hand():
    r = sig.corrected_resampled_t(D, 1 / 4)
    se = math.sqrt((1 / 5 + 1 / 4) * S2)  # sqrt(0.45 · 1.3e-4) = sqrt(5.85e-5) = 0.0076485
    assert r["n"] == 5 and r["df"] == 4
    assert r["mean_diff"] == pytest.approx(MEAN)
    assert r["t"] == pytest.approx(MEAN / se) and r["t"] == pytest.approx(2.0919, abs=1e-4)
    assert r["p_value"] == pytest.approx(2 * sps.t.sf(MEAN / se, 4))
    assert r["p_value"] == pytest.approx(0.1046, abs=1e-4)  # 2·P(t_4 > 2.0919)
    half = 2.776445 * se  # t_{0.975, 4} = 2.776445
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((MEAN - half, MEAN + half), abs=1e-7)
    assert r["test"] == "corrected resampled t (Nadeau-Bengio)" and r["note"] == ""


def test_corrected_t_with_ratio_zero_is_scipys_paired_t():
    a = np.array([0.91, 0.88, 0.93, 0.87, 0.90])
    b = a - np.array(D)
    r = sig.corrected_resampled_t(a - b, 0.0)
    ref = sps.ttest_rel(a, b)
    assert r["t"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    assert r["t"] == pytest.approx(MEAN / math.sqrt(S2 / 5))  # 0.016 / 0.0050990 = 3.1379
    # The correction only widens: same mean, larger p.
    assert sig.corrected_resampled_t(a - b, 0.25)["p_value"] > ref.pvalue


def test_paired_t_over_seeds_is_the_plain_paired_t_labelled_as_training_noise():
    r = sig.paired_t_over_seeds(D)
    ref = sps.ttest_1samp(D, 0.0)
    assert r["t"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    assert set(r) >= {"n", "mean_diff", "ci_low", "ci_high", "t", "df", "p_value", "test"}
    assert "seeds" in r["test"] and "training noise" in r["test"]


def test_t_tests_without_variance_do_not_divide_by_zero():
    zero = sig.corrected_resampled_t([0.0, 0.0, 0.0], 0.25)
    assert zero["p_value"] == 1.0 and zero["t"] == 0.0 and zero["note"]
    assert zero["ci_low"] == zero["ci_high"] == 0.0
    # 0.93 - 0.91 and 0.92 - 0.90 differ in the last bits; still "no variation".
    same = sig.corrected_resampled_t([0.93 - 0.91, 0.92 - 0.90, 0.02], 0.25)
    assert same["p_value"] == 0.0 and same["t"] == math.inf and same["note"]
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.02)
    one = sig.paired_t_over_seeds([0.01])
    assert one["n"] == 1 and math.isnan(one["p_value"]) and one["note"]
    with pytest.raises(ValueError):
        sig.corrected_resampled_t([0.01, math.nan], 0.25)
    with pytest.raises(ValueError):
        sig.corrected_resampled_t(D, -0.1)


def test_wilcoxon_by_hand_and_against_scipy():
    # The zero is discarded, leaving 0.02, 0.01, 0.03, 0.02: ranks 2.5, 1, 4, 2.5, all
    # positive, so W- = 0. Of the 2^4 = 16 sign patterns, only "all +" and "all -" are as
    # extreme: p = 2/16.
    assert sig.wilcoxon_p(D) == pytest.approx(0.125)
    d = [0.03, -0.01, 0.02, 0.05, 0.04, -0.02, 0.06, 0.01]
    assert sig.wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d).pvalue)
    assert math.isnan(sig.wilcoxon_p([0.0, 0.0, 0.0]))
    assert math.isnan(sig.wilcoxon_p([0.01]))


def test_holm_textbook_example():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max
    # 0.02, 0.03, 0.06, 0.06; back in input order:
    assert sig.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN stays NaN and m = 2: 0.01·2 = 0.02, 0.04·1 → max(0.02, 0.04).
    out = sig.holm([0.01, math.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert sig.holm([0.6, 0.7]) == [1.0, 1.0]  # 1.2 and 0.7 capped at 1, then monotone
    assert sig.holm([]) == []


FRIEDMAN_TABLE = pd.DataFrame(
    {"a": [0.90, 0.88, 0.70, 0.95], "b": [0.85, 0.86, 0.75, 0.90], "c": [0.80, 0.87, 0.60, 0.85]},
    index=["d1", "d2", "d3", "d4"])


def test_friedman_by_hand():
    # Ranks per dataset (1 = best): d1 1 2 3, d2 1 3 2, d3 2 1 3, d4 1 2 3.
    r = sig.friedman(FRIEDMAN_TABLE)
    assert list(r["average_ranks"]) == [1.25, 2.0, 2.75]
    # χ² = 12N/(k(k+1)) [Σ R² − k(k+1)²/4] = 48/12 · (1.5625 + 4 + 7.5625 − 12) = 4.5
    assert r["chi2"] == pytest.approx(4.5) and r["chi2_p"] == pytest.approx(math.exp(-2.25))
    # F_F = (N−1)χ² / (N(k−1) − χ²) = 3·4.5 / (8 − 4.5) = 27/7 on F(2, 6), whose
    # survival function is (1 + 2x/6)^-3 = (16/7)^-3.
    assert r["iman_davenport_F"] == pytest.approx(27 / 7)
    assert r["iman_davenport_p"] == pytest.approx((7 / 16) ** 3)
    assert (r["n_datasets"], r["k"]) == (4, 3) and "Iman-Davenport" in r["form"]


def test_friedman_with_ties_is_scipys_and_edge_cases_are_notes():
    t = pd.DataFrame({"a": [0.9, 0.8, 0.7, 0.9], "b": [0.9, 0.7, 0.6, 0.8], "c": [0.8, 0.8, 0.5, 0.7]})
    assert sig.friedman(t)["chi2"] == pytest.approx(sps.friedmanchisquare(t.a, t.b, t.c).statistic)
    assert list(sig.friedman(t)["average_ranks"]) == [1.25, 2.125, 2.625]
    two = sig.friedman(FRIEDMAN_TABLE[["a", "b"]])
    assert math.isnan(two["chi2"]) and math.isnan(two["iman_davenport_p"]) and "at least 3" in two["note"]
    small = sig.friedman(FRIEDMAN_TABLE.iloc[:2])
    assert np.isfinite(small["chi2"]) and "little power" in small["note"]
    alike = sig.friedman(FRIEDMAN_TABLE.iloc[[0, 3]])  # both rank a > b > c
    assert alike["iman_davenport_F"] == math.inf and alike["iman_davenport_p"] == 0.0
    ties = sig.friedman(pd.DataFrame({"a": [0.5, 0.6], "b": [0.5, 0.6], "c": [0.5, 0.6]}))
    assert ties["chi2_p"] == 1.0 and ties["iman_davenport_p"] == 1.0 and ties["note"]


def test_nemenyi_against_demsars_table():
    # Demšar (2006), table 5(a): q_0.05 for k = 2..10. He divided a three-decimal table of
    # the studentized range by √2, so k = 3 and 7 sit 0.0007 off the exact value; the
    # undivided q agrees with the usual three-decimal table exactly.
    table = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    studentized = [2.772, 3.314, 3.633, 3.858, 4.030, 4.170, 4.286, 4.387, 4.474]
    for k, q, q_range in zip(range(2, 11), table, studentized):
        got = sig.nemenyi_cd(k, 1) / math.sqrt(k * (k + 1) / 6)
        assert got == pytest.approx(q, abs=1e-3)
        assert round(got * math.sqrt(2), 3) == q_range
    # Demšar's worked example: k = 4, N = 14 → CD = 2.569·sqrt(20/84) = 1.25.
    assert sig.nemenyi_cd(4, 14) == pytest.approx(2.569 * math.sqrt(20 / 84), abs=1e-3)


def cv_rows(dataset, loss, top1s, n_train=400, n_test=100, folds=5, protocol="cv"):
    rows = []
    for i, top1 in enumerate(top1s):
        unit = ({"repeat": i // folds, "fold": i % folds, "seed": i // folds} if protocol == "cv"
                else {"repeat": None, "fold": None, "seed": i})
        rows.append({"dataset": dataset, "backbone": "bb", "mode": "frozen", "protocol": protocol,
                     "loss": loss, **unit, "top1": top1, "n_train": n_train, "n_test": n_test})
    return rows


def fixed_scores():
    base = [0.90, 0.88, 0.92, 0.87, 0.91]
    rows = (cv_rows("fruits", "arcface", [b + d for b, d in zip(base, D)])
            + cv_rows("fruits", "cross_entropy", base)
            + cv_rows("fruits", "hinge", [b - 0.05 + 0.01 * (i % 2) for i, b in enumerate(base)]))
    return pd.DataFrame(rows)


def test_compare_families_pairs_and_holm():
    out = sig.compare(fixed_scores())
    assert list(out.columns) == sig.COMPARE_COLUMNS
    vs = out[out.family == "vs baseline"]
    assert list(zip(vs.loss, vs.baseline)) == [("arcface", "cross_entropy"), ("hinge", "cross_entropy")]
    arc = vs.iloc[0]
    ref = sig.corrected_resampled_t(D, 100 / 400)
    assert arc.n == 5 and arc.mean_diff == pytest.approx(MEAN) and arc.p_value == pytest.approx(ref["p_value"])
    assert arc.p_wilcoxon == pytest.approx(0.125) and arc.test == sig.CORRECTED_T
    assert list(vs.p_holm) == pytest.approx(sig.holm(list(vs.p_value)))
    pairs = out[out.family == "all pairs"]  # input order: arcface, cross_entropy, hinge
    assert list(zip(pairs.loss, pairs.baseline)) == [
        ("arcface", "cross_entropy"), ("arcface", "hinge"), ("cross_entropy", "hinge")]
    assert list(pairs.p_holm) == pytest.approx(sig.holm(list(pairs.p_value)))
    assert list(out.family) == ["vs baseline"] * 2 + ["all pairs"] * 3


def test_compare_pairs_by_unit_and_handles_a_missing_baseline():
    scores = fixed_scores()
    scores.loc[(scores.loss == "arcface") & (scores.fold == 4), "top1"] = math.nan  # a failed run
    scores = scores[~((scores.loss == "cross_entropy") & (scores.fold == 0))]  # a missing run
    out = sig.compare(scores)
    arc = out[(out.family == "vs baseline") & (out.loss == "arcface")].iloc[0]
    assert arc.n == 3 and arc.mean_diff == pytest.approx(np.mean(D[1:4]))
    no_base = sig.compare(fixed_scores(), baseline="focal")
    assert set(no_base.family) == {"all pairs"} and len(no_base) == 3


def test_compare_split_protocol_is_the_paired_t_over_seeds():
    a, b = [0.90, 0.91, 0.89, 0.93], [0.88, 0.90, 0.89, 0.90]
    scores = pd.DataFrame(cv_rows("weather", "arcface", a, protocol="split")
                          + cv_rows("weather", "cross_entropy", b, protocol="split"))
    row = sig.compare(scores).iloc[0]
    assert row.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue) and row.test == sig.SEED_T
    with pytest.raises(ValueError, match="fraction"):
        sig.compare(scores.assign(top1=scores.top1 * 100))


def simulate(seed, shifts, draws, folds=5, repeats=2):
    """Repeated K-fold CV scores: a fold-difficulty effect shared by every loss (sd 0.03),
    a per-loss 'training luck' shared by all of that loss's folds (sd 0.005: training sets
    overlap, so a loss's folds are correlated, ρ = 0.2 between differences = n_test/(n_train +
    n_test) for K = 5) and per-run noise (sd 0.01). One dataset per draw."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(draws):
        fold_effect = rng.normal(0, 0.03, folds * repeats)
        for loss, shift in shifts.items():
            top1 = 0.85 + shift + fold_effect + rng.normal(0, 0.005) + rng.normal(0, 0.01, folds * repeats)
            rows += cv_rows(f"draw{i}", loss, top1, folds=folds)
    return pd.DataFrame(rows)


def test_compare_detects_a_worse_loss_and_best_mark():
    scores = simulate(0, {"cross_entropy": 0.0, "twin": 0.0, "worse": -0.05}, draws=1)
    out = sig.compare(scores)
    vs = out[out.family == "vs baseline"].set_index("loss")
    assert vs.at["worse", "p_holm"] < 0.05 and vs.at["worse", "mean_diff"] < 0
    assert vs.at["twin", "p_holm"] >= 0.05
    (key, mark), = sig.best_and_indistinguishable(scores, out).items()
    assert key == ("draw0", "bb", "frozen", "cv")
    assert mark.best in {"cross_entropy", "twin"} and mark.indistinguishable == {"cross_entropy", "twin"}


def test_false_positive_rate_and_power_over_200_draws():
    """200 seeded draws of K = 5 × R = 2 CV (``simulate``), measured by this test:
    two identical losses → the corrected resampled t rejects at α = 0.05 in 0.050 of draws
    (10/200), where the plain paired t would in 0.230 (46/200); a loss 5 points worse is
    found (p_holm < 0.05) in 200/200 draws."""
    null = sig.compare(simulate(1, {"cross_entropy": 0.0, "twin": 0.0}, draws=200))
    null = null[null.family == "vs baseline"]
    fpr = float((null.p_holm < 0.05).mean())
    naive = simulate(1, {"cross_entropy": 0.0, "twin": 0.0}, draws=200)
    piv = naive.pivot_table(index=["dataset", "repeat", "fold"], columns="loss", values="top1")
    naive_p = [sps.ttest_rel(g.twin, g.cross_entropy).pvalue for _, g in piv.groupby(level=0)]
    naive_fpr = float(np.mean(np.array(naive_p) < 0.05))
    assert len(null) == 200 and fpr <= 0.10 and naive_fpr > fpr
    alt = sig.compare(simulate(2, {"cross_entropy": 0.0, "worse": -0.05}, draws=200))
    power = float((alt[alt.family == "vs baseline"].p_holm < 0.05).mean())
    assert power >= 0.9
    print(f"false-positive rate {fpr:.3f} (plain paired t {naive_fpr:.3f}), power {power:.3f}")


def test_ranks_average_rows_friedman_columns_and_left_out_losses():
    rows = []
    for dataset in FRIEDMAN_TABLE.index:
        for loss in FRIEDMAN_TABLE.columns:
            v = FRIEDMAN_TABLE.at[dataset, loss]
            rows += cv_rows(dataset, loss, [v - 0.01, v + 0.01])
    rows += cv_rows("d1", "focal", [0.99, 0.99])  # scored on one dataset only
    out = sig.ranks(pd.DataFrame(rows))
    assert list(out.columns) == sig.RANK_COLUMNS and "focal" not in set(out.loss)
    assert out.note.str.contains("left out").all() and out.note.str.contains("focal").all()
    avg = out[out.dataset == sig.AVERAGE].set_index("loss")
    assert list(avg["rank"]) == [1.25, 2.0, 2.75]
    d2 = out[out.dataset == "d2"].set_index("loss")
    assert list(d2["rank"]) == [1.0, 3.0, 2.0] and d2.at["a", "mean_top1"] == pytest.approx(0.88)
    fr = sig.friedman(FRIEDMAN_TABLE)
    assert len(out) == 4 * 3 + 3 and (out.n_datasets == 4).all() and (out.alpha == 0.05).all()
    assert list(out.friedman_chi2) == pytest.approx([fr["chi2"]] * 15)
    assert list(out.iman_davenport_p) == pytest.approx([fr["iman_davenport_p"]] * 15)
    assert list(out.cd) == pytest.approx([sig.nemenyi_cd(3, 4)] * 15)
