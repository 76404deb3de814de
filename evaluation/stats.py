"""The statistics of the report: per-run records summarised over their units, and the comparisons of losses.

``summarise`` makes the summary that every table and plot reads: one row per
(dataset, backbone, mode, protocol, loss, train fraction) with means, sample standard
deviations and 95 % intervals over the units (seeds under split, folds × repeats under cv).
``compare_runs`` turns the records into the per-run scores that ``significance`` tests and
bundles its paired comparisons, best marks and ranks (``Comparison``). Accuracies are
fractions in [0, 1].
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from . import significance
from .metrics import RETRIEVAL_METRICS
from .records import dedupe, describe_key, protocol_of, record_problem, refuse_mixed_data, run_key

SUMMARY_COLUMNS = [
    "dataset", "backbone", "mode", "protocol", "loss", "train_fraction",
    "seeds", "failed",
    "top1_mean", "top1_std", "top1_ci95",
    "best_top1_mean", "best_top1_std",
    "top3_mean", "top3_std",
    "f1_mean", "f1_std",
    "precision_at_1_mean", "precision_at_1_std", "r_precision_mean", "r_precision_std", "map_at_r_mean", "map_at_r_std",
    "best_epoch_mean", "epochs_mean", "train_seconds_mean",
    "num_train", "num_valid", "weights_hash", "skipped_files", "dropped",
]


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (for 95 % intervals)."""
    if df < 1:  # scipy answers NaN, which would pass silently into the tables
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(student_t.ppf(0.975, df))


def _finite(values) -> list:
    return [v for v in values if v is not None and np.isfinite(v)]


def mean(values) -> float:
    """Mean of the finite values; NaN when there are none."""
    values = _finite(values)
    return float(np.mean(values)) if values else math.nan


def sample_std(values) -> float:
    """Sample standard deviation (ddof=1) of the finite values; NaN with fewer than two."""
    values = _finite(values)
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def ci95_half_width(values) -> float:
    """Half-width of the 95 % t-interval for the mean of the finite values; NaN with fewer than two."""
    values = _finite(values)
    if len(values) < 2:
        return math.nan
    return t_quantile_975(len(values) - 1) * sample_std(values) / math.sqrt(len(values))


def _first_appearance(values) -> dict:
    order: dict = {}
    for v in values:
        order.setdefault(v, len(order))
    return order


def as_float(x) -> float:
    """A record's number, None (not measured) as NaN."""
    return math.nan if x is None else float(x)


def n_train_of(rec: dict) -> float:
    """The images of a run's training set: those it learnt from and those it held out inside it to choose the
    epoch (``num_inner``, absent in older records: 0). The n_train of Nadeau and Bengio's n_test/n_train."""
    return as_float(rec.get("num_train")) + float(rec.get("num_inner") or 0)


def test_train_ratio(runs: list[dict]) -> float:
    """n_test / n_train averaged over ``runs`` (as ``significance.compare`` averages it over paired units)."""
    ratios = [as_float(r.get("num_valid")) / n_train_of(r) for r in runs if n_train_of(r) > 0]
    return mean(ratios)


def top1_ci95(top1, runs: list[dict], protocol: str) -> float:
    """Half-width of the 95 % interval of the mean top-1: the t-interval over seeds under split; under cv the
    Nadeau-Bengio corrected one (``significance.corrected_resampled_t`` on the scores, whose interval is
    mean ± t·sqrt((1/n + n_test/n_train)·s²)): folds share training images, so the plain one is too narrow."""
    if protocol != "cv":
        return ci95_half_width(top1)
    values, ratio = _finite(top1), test_train_ratio(runs)
    if len(values) < 2 or not np.isfinite(ratio):
        return math.nan
    res = significance.corrected_resampled_t(values, ratio)
    return res["ci_high"] - res["mean_diff"]


def _min_count(runs: list[dict], field: str):
    counts = [r[field] for r in runs if isinstance(r.get(field), (int, float))]
    return min(counts) if counts else None


def summarise(runs: list[dict]) -> pd.DataFrame:
    """One row per (dataset, backbone, mode, protocol, loss, train_fraction), columns ``SUMMARY_COLUMNS``.

    ``protocol`` is "split" for records older than it. Means and sample standard deviations
    are over the units whose run finished ("ok"): seeds under split, (repeat, fold) units under
    cv (``seeds`` counts them); ``failed`` counts runs that stopped on a non-finite loss.
    ``top1_*`` is the final valid top-1, ``best_top1_*`` the best epoch's (chosen on the scored
    images). ``top1_ci95`` is the half-width of a 95 % interval for the mean (``top1_ci95``:
    plain t under split, Nadeau-Bengio corrected under cv; NaN with one unit). ``num_train``
    and ``num_valid`` are the smallest over the runs (they differ between folds by a few
    images). ``precision_at_1_*``, ``r_precision_*`` and ``map_at_r_*`` are the final model's retrieval
    metrics (``metrics.retrieval_metrics``) over the runs that have them: NaN for records older than them
    (version 4). Rows come in order of first appearance of dataset, backbone, mode, protocol and
    loss, then by train fraction, largest first.
    """
    bad = [(i, p) for i, r in enumerate(runs) if (p := record_problem(r))]
    if bad:
        i, problem = bad[0]
        where = runs[i].get("_file", f"record #{i}") if isinstance(runs[i], dict) else f"record #{i}"
        raise ValueError(f"summarise: run {where} is not a valid run record: {problem}")
    runs = dedupe(runs)
    if not runs:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    refuse_mixed_data(runs)

    fields = ("dataset", "backbone", "mode", "protocol", "loss")
    keyed = [({**{f: r[f] for f in ("dataset", "backbone", "mode", "loss")}, "protocol": protocol_of(r)}, r)
             for r in runs]
    orders = {f: _first_appearance(k[f] for k, _ in keyed) for f in fields}
    groups: dict[tuple, list[dict]] = {}
    for k, r in keyed:
        groups.setdefault((*(k[f] for f in fields), round(float(r["train_fraction"]), 6)), []).append(r)

    rows = []
    for key, members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        hashes = sorted({str(r["weights_hash"]) for r in members if r.get("weights_hash")})
        if len(hashes) > 1:
            warnings.warn(
                f"runs of {'/'.join(map(str, key[:5]))} train_fraction {key[5]:g} used different "
                f"backbone weights ({', '.join(hashes)}); their numbers are not comparable",
                stacklevel=2,
            )
        top1 = [as_float(r["final"]["valid_top1"]) for r in ok]
        best = [as_float(r.get("best_valid_top1")) for r in ok]
        top3 = [as_float(r["final"].get("valid_top3")) for r in ok]
        f1 = [as_float(r["final"].get("valid_macro_f1")) for r in ok]
        retrieval = {name: [as_float(r["final"].get(f"valid_{name}")) for r in ok] for name in RETRIEVAL_METRICS}
        first = members[0]
        rows.append({
            **dict(zip(fields, key)), "train_fraction": key[5],
            "seeds": len(ok), "failed": len(members) - len(ok),
            "top1_mean": mean(top1), "top1_std": sample_std(top1), "top1_ci95": top1_ci95(top1, ok, key[3]),
            "best_top1_mean": mean(best), "best_top1_std": sample_std(best),
            "top3_mean": mean(top3), "top3_std": sample_std(top3),
            "f1_mean": mean(f1), "f1_std": sample_std(f1),
            **{f"{name}_{what}": stat(values) for name, values in retrieval.items()
               for what, stat in (("mean", mean), ("std", sample_std))},
            "best_epoch_mean": mean([as_float(r.get("best_epoch")) for r in ok]),
            "epochs_mean": mean([float(len(r.get("history") or [])) for r in ok]),
            "train_seconds_mean": mean([as_float(r.get("train_seconds")) for r in ok]),
            "num_train": _min_count(members, "num_train"), "num_valid": _min_count(members, "num_valid"),
            "weights_hash": "+".join(hashes),
            "skipped_files": len(first.get("skipped_files") or []),
            "dropped": ", ".join(f"{k} {v}" for k, v in (first.get("dropped") or {}).items()),
        })
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    sort_keys = pd.DataFrame({f: df[f].map(orders[f]) for f in fields})
    sort_keys["neg_fraction"] = -df["train_fraction"]
    order = sort_keys.sort_values(["dataset", "backbone", "mode", "protocol", "neg_fraction", "loss"],
                                  kind="stable").index
    return df.loc[order].reset_index(drop=True)


# ---------------------------------------------------------------- comparisons of losses
class Comparison(NamedTuple):
    """What the report says about differences between losses; every number comes from ``significance``.

    ``scores``: one row per finished run compared (``significance.SCORE_COLUMNS`` + train_fraction);
    ``pairs``: ``significance.compare(scores, baseline, alpha)``; ``best``: its
    ``best_and_indistinguishable``; ``ranks``: ``significance.ranks`` over the (backbone, mode,
    protocol) groups scored on at least two datasets (empty, with its columns, when none is).
    """
    baseline: str
    alpha: float
    scores: pd.DataFrame
    pairs: pd.DataFrame
    best: dict
    ranks: pd.DataFrame


# top1 is what significance tests; the retrieval metrics (NaN where a record has none) are tested the same way by
# putting one of them in top1's place (evaluation.retrieval_report).
SCORE_COLUMNS = significance.SCORE_COLUMNS + ["train_fraction", *RETRIEVAL_METRICS]


def in_group(df: pd.DataFrame, key: tuple) -> pd.DataFrame:
    """The rows of ``df`` (scores, comparisons) of one (dataset, backbone, mode, protocol) ``key``."""
    return df[(df["dataset"] == key[0]) & (df["backbone"] == key[1]) & (df["mode"] == key[2])
              & (df["protocol"] == key[3])]


def resolution(n_test) -> str:
    """How many points of accuracy one scored image is worth, e.g. "1.7 points"."""
    return f"{100 / float(n_test):.2g} points" if n_test else "? points"


def scores_of(runs: list[dict]) -> pd.DataFrame:
    """The per-run scores the paired tests take (columns ``SCORE_COLUMNS``), one row per finished ("ok") run
    at the largest train fraction of its (dataset, backbone, mode, protocol): the comparison is made on all
    the data, the other fractions are the fraction study's.

    Under split a unit is a seed: ``repeat`` and ``fold`` are empty. Under cv a unit is (repeat, fold), and
    ``seed`` is the repeat too (the record's seed: repeat r seeds its folds, views and initialisation).
    ``top1`` and the retrieval metrics are fractions; ``n_train`` counts the whole training set of the run (``n_train_of``), ``n_test``
    the images it was scored on.
    """
    largest: dict[tuple, float] = {}
    for r in runs:  # failed runs count here, so that every figure of a group shows the same fraction
        key = (r["dataset"], r["backbone"], r["mode"], protocol_of(r))
        largest[key] = max(largest.get(key, 0.0), round(float(r["train_fraction"]), 6))
    rows = []
    for r in runs:
        key = (r["dataset"], r["backbone"], r["mode"], protocol_of(r))
        if r["status"] != "ok" or round(float(r["train_fraction"]), 6) != largest[key]:
            continue
        cv = key[3] == "cv"
        n_train = n_train_of(r)
        if cv and not (n_train > 0 and isinstance(r.get("num_valid"), int) and r["num_valid"] > 0):
            raise ValueError(f"run {r.get('_file', describe_key(run_key(r)))}: a cv run needs num_train and "
                             f"num_valid (the corrected test uses their ratio)")
        rows.append(dict(zip(significance.GROUP, key), loss=r["loss"], repeat=r["seed"] if cv else None,
                         fold=r.get("fold") if cv else None, seed=r["seed"], top1=float(r["final"]["valid_top1"]),
                         n_train=int(n_train) if np.isfinite(n_train) else None, n_test=r.get("num_valid"),
                         train_fraction=largest[key],
                         **{name: as_float(r["final"].get(f"valid_{name}")) for name in RETRIEVAL_METRICS}))
    df = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    for column in ("repeat", "fold", "seed", "n_train", "n_test"):  # integers, empty where there is none
        df[column] = df[column].astype("Int64")
    return df


def compare_runs(runs: list[dict], baseline: str = "cross_entropy", alpha: float = 0.05) -> Comparison:
    """Every comparison of the report, on the records ``summarise`` accepts (see ``Comparison``)."""
    scores = scores_of(dedupe(runs))
    pairs = significance.compare(scores, baseline, alpha)
    best = significance.best_and_indistinguishable(scores, pairs, alpha)
    datasets = scores.groupby(["backbone", "mode", "protocol"], sort=False)["dataset"].transform("nunique")
    ranks = significance.ranks(scores[datasets >= 2], alpha)
    return Comparison(baseline, alpha, scores, pairs, best, ranks)
