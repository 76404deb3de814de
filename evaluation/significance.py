"""Significance of loss comparisons: paired tests, Holm, Friedman and Nemenyi.

The formulas follow the project's design note on statistics (shared/design/statistics.md),
which cites its sources; each function names the one it implements. Every distribution
comes from ``scipy.stats``. All functions are pure: arrays or DataFrames in, numbers or
DataFrames out, no files. Accuracies are fractions in [0, 1].

This module lives beside ``stats.py`` (summaries over seeds) rather than inside it so
that the summaries stay short and these tests import nothing of the run records.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as sps

GROUP = ["dataset", "backbone", "mode", "protocol"]
SCORE_COLUMNS = GROUP + ["loss", "repeat", "fold", "seed", "top1", "n_train", "n_test"]
COMPARE_COLUMNS = GROUP + [
    "family", "loss", "baseline", "n", "mean_diff", "ci_low", "ci_high",
    "p_value", "p_holm", "p_wilcoxon", "test",
]
RANK_COLUMNS = [
    "backbone", "mode", "protocol", "dataset", "loss", "mean_top1", "rank",
    "n_datasets", "friedman_chi2", "friedman_p", "iman_davenport_F", "iman_davenport_p",
    "cd", "alpha", "note",
]
CORRECTED_T = "corrected resampled t (Nadeau-Bengio)"
SEED_T = "paired t over seeds on one fixed split (training noise only)"
AVERAGE = "(average)"
# Accuracies are multiples of 1/n_test; differences that are equal on paper can differ in
# the last bits once computed, and must still count as ties (_ROUND, for the ranks of the
# Wilcoxon test) or as no variation at all (_TINY, for s² = 0 in the t-tests).
_ROUND = 12
_TINY = 1e-12


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _differences(diffs) -> np.ndarray:
    d = np.asarray(diffs, dtype=float).ravel()
    if not np.all(np.isfinite(d)):  # silently dropping a failed run would change n
        raise ValueError("differences must be finite; leave out the unpaired or failed runs first")
    return d


def _t_on_differences(diffs, ratio: float, alpha: float, test: str) -> dict:
    _check_alpha(alpha)
    d = _differences(diffs)
    n = len(d)
    out = {"n": n, "mean_diff": float(d.mean()) if n else math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "t": math.nan, "df": n - 1 if n else 0, "p_value": math.nan,
           "test": test, "note": ""}
    if n < 2:
        out["note"] = "fewer than two paired differences: no variance, no test"
        return out
    mean = out["mean_diff"]
    if np.ptp(d) <= _TINY:
        # s² = 0: the t statistic would be 0/0 or ±inf.
        out.update(ci_low=mean, ci_high=mean)
        if abs(mean) <= _TINY:
            out.update(mean_diff=0.0, ci_low=0.0, ci_high=0.0, t=0.0, p_value=1.0,
                       note="every difference is 0 (s² = 0): p = 1 reported, no evidence either way")
        else:
            out.update(t=math.copysign(math.inf, mean), p_value=0.0,
                       note="every difference is the same non-zero value (s² = 0): t is infinite, "
                            "p = 0 and a zero-width interval reported; the splits show no "
                            "variation to judge it by, so read it with care")
        return out
    se = math.sqrt((1.0 / n + ratio) * float(np.var(d, ddof=1)))
    t = mean / se
    half = float(sps.t.ppf(1 - alpha / 2, n - 1)) * se
    out.update(ci_low=mean - half, ci_high=mean + half, t=t,
               p_value=float(2 * sps.t.sf(abs(t), n - 1)))
    return out


def corrected_resampled_t(diffs, test_train_ratio: float, alpha: float = 0.05) -> dict:
    """Corrected resampled t-test for paired differences from repeated K-fold CV.

    Nadeau & Bengio, "Inference for the Generalization Error", Machine Learning 52 (2003);
    Bouckaert & Frank, "Evaluating the Replicability of Significance Tests for Comparing
    Learning Algorithms", PAKDD 2004. With n differences, mean d̄ and s² (ddof = 1):
    t = d̄ / sqrt((1/n + n_test/n_train)·s²), df = n − 1, p = 2·t_sf(|t|, df), and the
    (1 − alpha) interval d̄ ± t_{1−alpha/2, n−1}·sqrt((1/n + n_test/n_train)·s²).
    ``test_train_ratio`` = 0 gives the plain paired t-test.

    Returns ``n, mean_diff, ci_low, ci_high, t, df, p_value, test, note``. When s² = 0
    (differences equal up to 1e-12): d̄ = 0 gives t = 0, p = 1 and a note; d̄ ≠ 0 gives
    t = ±inf, p = 0, a zero-width interval at d̄ and a note. Fewer than two differences:
    NaN statistics and a note. Non-finite differences raise ``ValueError``.
    """
    ratio = float(test_train_ratio)
    if not (math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"test_train_ratio must be a finite number >= 0, got {test_train_ratio}")
    return _t_on_differences(diffs, ratio, alpha, CORRECTED_T)


def paired_t_over_seeds(diffs, alpha: float = 0.05) -> dict:
    """Paired t-test over seeds trained on one fixed split (df = seeds − 1).

    Student's paired t ("Seeds on one fixed split" in the design note): the seeds share
    the test set, so this measures training noise only and says nothing about the test
    set's sampling error; repeated CV (``corrected_resampled_t``) is the protocol for
    verdicts. Same keys and edge cases as ``corrected_resampled_t`` with ratio 0.
    """
    return _t_on_differences(diffs, 0.0, alpha, SEED_T)


def wilcoxon_p(diffs) -> float:
    """Two-sided p of the Wilcoxon signed-rank test, ``scipy.stats.wilcoxon(d)`` with its defaults.

    Wilcoxon, "Individual Comparisons by Ranking Methods", Biometrics Bulletin 1 (1945);
    a check that does not assume normality, never a verdict on its own. Zero differences
    are discarded (``zero_method="wilcox"``, Wilcoxon's own rule); tied differences get
    average ranks, and with ties or zeros scipy computes the p by exhaustive permutation
    for up to 13 differences and by the tie-corrected normal approximation beyond.
    Differences are rounded to 12 decimals first so that equal accuracy gaps tie.
    NaN when there are fewer than two differences or every difference is 0.
    """
    d = np.round(_differences(diffs), _ROUND)
    if len(d) < 2 or not np.any(d):
        return math.nan
    return float(sps.wilcoxon(d).pvalue)


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment, in the input order.

    Holm, "A Simple Sequentially Rejective Multiple Test Procedure", Scandinavian Journal
    of Statistics 6 (1979). With the m raw p sorted ascending p_(1) ≤ … ≤ p_(m), the
    adjusted p_(i) = max over j ≤ i of min(1, (m − j + 1)·p_(j)). NaN entries stay NaN and
    do not count in m.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(len(p), math.nan)
    idx = np.flatnonzero(finite)
    m = len(idx)
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
        out[order] = np.maximum.accumulate(scaled)
    return [float(x) for x in out]


def friedman(table: pd.DataFrame) -> dict:
    """Friedman test of k losses over N datasets, with Iman–Davenport's F.

    Demšar, "Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7
    (2006). ``table``: rows datasets, columns losses, values mean accuracy (higher is
    better), no NaN. Losses are ranked within each dataset (1 = best, ties averaged).
    ``chi2``/``chi2_p`` are ``scipy.stats.friedmanchisquare`` (which corrects for ties);
    ``iman_davenport_F`` = (N − 1)·χ² / (N(k − 1) − χ²) on F(k − 1, (k − 1)(N − 1)), the
    less conservative form Demšar recommends — the one to read (``form`` says so).
    k < 3 (scipy refuses) or N < 2: NaN statistics with a ``note``. Every dataset ranking
    the losses alike makes F infinite (p = 0); every dataset tying all losses gives
    χ² = F = 0, p = 1; both with a note. N ≤ 3 adds a note on the lack of power.
    """
    if table.isna().to_numpy().any():
        raise ValueError("friedman: the table must have a score for every (dataset, loss)")
    n, k = table.shape
    out = {"average_ranks": table.rank(axis=1, ascending=False, method="average").mean(axis=0),
           "n_datasets": n, "k": k, "chi2": math.nan, "chi2_p": math.nan,
           "iman_davenport_F": math.nan, "iman_davenport_p": math.nan,
           "form": "Iman-Davenport F (Demšar 2006); chi2 is scipy's tie-corrected Friedman statistic",
           "note": ""}
    notes = []
    if k < 3:
        notes.append(f"only {k} losses: the Friedman test needs at least 3 (compare pairs instead)")
    if n < 2:
        notes.append(f"only {n} dataset(s): the Friedman test needs at least 2")
    elif n <= 3:
        notes.append(f"only {n} datasets: the Friedman test has little power; add datasets")
    if k >= 3 and n >= 2:
        values = table.to_numpy(dtype=float)
        if np.all(values == values[:, :1]):
            chi2, p, f, fp = 0.0, 1.0, 0.0, 1.0
            notes.append("every dataset ties all losses: no differences to test")
        else:
            res = sps.friedmanchisquare(*values.T)
            chi2, p = float(res.statistic), float(res.pvalue)
            denom = n * (k - 1) - chi2
            if denom <= 1e-12 * n * (k - 1):
                f, fp = math.inf, 0.0
                notes.append("every dataset ranks the losses the same way: Iman-Davenport F is infinite")
            else:
                f = (n - 1) * chi2 / denom
                fp = float(sps.f.sf(f, k - 1, (k - 1) * (n - 1)))
        out.update(chi2=chi2, chi2_p=p, iman_davenport_F=f, iman_davenport_p=fp)
    out["note"] = "; ".join(notes)
    return out


def nemenyi_cd(k: int, n_datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks for k losses over N datasets.

    Demšar (JMLR 7, 2006): CD = q_α·sqrt(k(k + 1)/(6N)) with
    q_α = studentized_range.ppf(1 − α, k, ∞)/√2 (scipy accepts df = ∞). Two losses differ
    when their average ranks differ by more than CD.
    """
    _check_alpha(alpha)
    if k < 2 or n_datasets < 1:
        raise ValueError(f"nemenyi_cd needs k >= 2 and n_datasets >= 1, got k={k}, N={n_datasets}")
    q = float(sps.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6 * n_datasets))


def _check_scores(scores: pd.DataFrame) -> None:
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"scores lacks the columns {missing}")
    top1 = pd.to_numeric(scores["top1"], errors="raise")
    if (top1 > 1).any() or (top1 < 0).any():  # percentages would make every difference 100× too large
        raise ValueError("top1 must be a fraction in [0, 1]")
    bad = set(scores["protocol"]) - {"cv", "split"}
    if bad:
        raise ValueError(f"unknown protocol(s) {sorted(map(str, bad))}: expected 'cv' or 'split'")


def _groups(scores: pd.DataFrame, keys: list[str]):
    """(key tuple, rows) in order of first appearance, so that outputs follow the input."""
    for key, rows in scores.groupby(keys, sort=False, dropna=False):
        yield key, rows


def _runs_by_unit(rows: pd.DataFrame, protocol: str, where: str) -> dict:
    """unit → (top1, n_train, n_test) for one loss's finite runs."""
    fields = ["repeat", "fold"] if protocol == "cv" else ["seed"]
    if rows[fields].isna().to_numpy().any():
        raise ValueError(f"{where}: protocol {protocol!r} needs {' and '.join(fields)} on every run")
    # 3 and 3.0 (a column that also holds NaN turns float) are the same fold.
    units = [tuple(int(v) if isinstance(v, (int, float, np.number)) and float(v).is_integer() else v
                   for v in u) for u in rows[fields].itertuples(index=False)]
    if len(set(units)) != len(units):  # one unit twice would be counted twice
        raise ValueError(f"{where}: more than one run per {'/'.join(fields)}")
    out = {}
    for u, top1, n_train, n_test in zip(units, rows["top1"], rows["n_train"], rows["n_test"]):
        if pd.notna(top1):  # a failed run leaves its unit out of the pairs
            out[u] = (float(top1), n_train, n_test)
    return out


def _pair(a: dict, b: dict, protocol: str, alpha: float, where: str) -> dict:
    units = [u for u in a if u in b]
    d = [a[u][0] - b[u][0] for u in units]
    if protocol == "split":
        res = paired_t_over_seeds(d, alpha)
    else:
        if any((a[u][1], a[u][2]) != (b[u][1], b[u][2]) for u in units):
            raise ValueError(f"{where}: paired runs of a fold must share its n_train and n_test")
        sizes = [(float(a[u][2]), float(a[u][1])) for u in units]
        if any(not (tr > 0 and te > 0) for te, tr in sizes):
            raise ValueError(f"{where}: cv runs need positive n_train and n_test")
        ratio = float(np.mean([te / tr for te, tr in sizes])) if sizes else 0.0
        res = corrected_resampled_t(d, ratio, alpha)
    res["p_wilcoxon"] = wilcoxon_p(d)
    return res


def compare(scores: pd.DataFrame, baseline: str = "cross_entropy", alpha: float = 0.05) -> pd.DataFrame:
    """Paired comparisons of the losses within each (dataset, backbone, mode, protocol).

    ``scores``: one row per run, columns ``SCORE_COLUMNS`` (top1 a fraction; NaN for a
    failed run, whose unit then drops out of that loss's pairs). Protocol "cv": units are
    (repeat, fold) and the test is ``corrected_resampled_t`` with n_test/n_train averaged
    over the paired units; "split": units are seeds and the test is
    ``paired_t_over_seeds``. Only units present for both losses count (``n``).

    Two families per group, each Holm-adjusted on its own (``p_holm``; Holm 1979):
    "vs baseline" (each other loss minus ``baseline``; absent when the baseline has no
    runs in the group) and "all pairs" (each unordered pair once, the loss earlier in the
    input in ``loss``). ``mean_diff`` = loss − baseline as a fraction; ``p_wilcoxon`` is
    the raw Wilcoxon check. Rows: groups and losses in order of first appearance,
    "vs baseline" before "all pairs". Columns ``COMPARE_COLUMNS``. The tests' notes
    (s² = 0, n < 2) are not columns: they show as p = 1 or 0 with ci_low == ci_high, or NaN.
    """
    _check_alpha(alpha)
    _check_scores(scores)
    rows = []
    for key, group in _groups(scores, GROUP):
        where, protocol = "/".join(map(str, key)), key[3]
        runs = {loss: _runs_by_unit(r, protocol, f"{where}/{loss}")
                for loss, r in group.groupby("loss", sort=False)}
        losses = list(runs)
        families = []
        if baseline in runs:
            families.append(("vs baseline", [(l, baseline) for l in losses if l != baseline]))
        families.append(("all pairs", [(a, b) for i, a in enumerate(losses) for b in losses[i + 1:]]))
        for family, pairs in families:
            results = [_pair(runs[a], runs[b], protocol, alpha, f"{where}: {a} vs {b}") for a, b in pairs]
            adjusted = holm([r["p_value"] for r in results])
            for (a, b), r, p_holm in zip(pairs, results, adjusted):
                rows.append(dict(zip(GROUP, key), family=family, loss=a, baseline=b, n=r["n"],
                                 mean_diff=r["mean_diff"], ci_low=r["ci_low"], ci_high=r["ci_high"],
                                 p_value=r["p_value"], p_holm=p_holm, p_wilcoxon=r["p_wilcoxon"],
                                 test=r["test"]))
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


class Best(NamedTuple):
    """The best loss of a group and the losses not significantly worse than it (itself included)."""
    best: str
    indistinguishable: frozenset


def best_and_indistinguishable(scores: pd.DataFrame, comparison: pd.DataFrame,
                               alpha: float = 0.05) -> dict:
    """{(dataset, backbone, mode, protocol): Best(best, indistinguishable)} — a table's bold mark.

    ``best`` has the highest mean top1 over its finished runs (a tie goes to the loss
    first in the input). A loss is significantly worse than it when their "all pairs" row
    of ``comparison`` (from ``compare``) has p_holm < alpha and a mean difference in the
    best loss's favour; every other loss of the group, including one with no such row or
    a NaN p, is in ``indistinguishable``.
    """
    _check_alpha(alpha)
    _check_scores(scores)
    pairs = comparison[comparison["family"] == "all pairs"]
    out = {}
    for key, group in _groups(scores, GROUP):
        means = group.groupby("loss", sort=False)["top1"].mean().dropna()
        if means.empty:
            continue
        best = str(means.idxmax())
        rows = pairs[(pairs[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)]
        worse = set()
        for r in rows.itertuples(index=False):
            if r.p_holm < alpha and best in (r.loss, r.baseline):
                other, best_minus_other = ((r.baseline, r.mean_diff) if r.loss == best
                                           else (r.loss, -r.mean_diff))
                if best_minus_other > 0:
                    worse.add(other)
        out[key] = Best(best, frozenset(str(l) for l in means.index if l not in worse))
    return out


def ranks(scores: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Ranks of the losses over the datasets of each (backbone, mode, protocol), Demšar (2006).

    Mean top1 per (dataset, loss) over finished runs, ranked within each dataset
    (1 = best, ties averaged); then one row per loss with ``dataset == "(average)"``
    holding its average rank (and its mean of the dataset means). Every row of a group
    carries ``n_datasets``, the ``friedman`` statistics, the Nemenyi ``cd`` at ``alpha``
    (NaN with fewer than two losses) and a ``note``. Only losses with a score on every
    dataset of the group take part; the note names any left out. Columns ``RANK_COLUMNS``.
    """
    _check_alpha(alpha)
    _check_scores(scores)
    rows = []
    for key, group in _groups(scores, ["backbone", "mode", "protocol"]):
        table = (group.groupby(["dataset", "loss"], sort=False)["top1"].mean().unstack("loss")
                 .reindex(index=list(dict.fromkeys(group["dataset"])),
                          columns=list(dict.fromkeys(group["loss"]))))
        complete = table.notna().all(axis=0)
        notes = []
        if not complete.all():
            left = ", ".join(map(str, table.columns[~complete]))
            notes.append(f"left out (not scored on every dataset): {left}")
        table = table.loc[:, complete]
        if table.shape[1] == 0:
            continue
        fr = friedman(table)
        if fr["note"]:
            notes.append(fr["note"])
        k, n = table.shape[1], table.shape[0]
        common = dict(zip(["backbone", "mode", "protocol"], key), n_datasets=n,
                      friedman_chi2=fr["chi2"], friedman_p=fr["chi2_p"],
                      iman_davenport_F=fr["iman_davenport_F"], iman_davenport_p=fr["iman_davenport_p"],
                      cd=nemenyi_cd(k, n, alpha) if k >= 2 else math.nan, alpha=alpha,
                      note="; ".join(notes))
        ranked = table.rank(axis=1, ascending=False, method="average")
        for dataset in table.index:
            for loss in table.columns:
                rows.append(dict(common, dataset=dataset, loss=loss,
                                 mean_top1=float(table.at[dataset, loss]),
                                 rank=float(ranked.at[dataset, loss])))
        for loss in table.columns:
            rows.append(dict(common, dataset=AVERAGE, loss=loss, mean_top1=float(table[loss].mean()),
                             rank=float(fr["average_ranks"][loss])))
    return pd.DataFrame(rows, columns=RANK_COLUMNS)
