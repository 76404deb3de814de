"""The statistics of the report: per-run records summarised over seeds.

``summarise`` makes the summary that every table and plot reads: one row per
(dataset, backbone, mode, loss, train fraction) with means, sample standard
deviations and 95 % t-intervals over the seeds. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from .records import dedupe, record_problem, refuse_mixed_data

SUMMARY_COLUMNS = [
    "dataset", "backbone", "mode", "loss", "train_fraction",
    "seeds", "failed",
    "top1_mean", "top1_std", "top1_ci95",
    "best_top1_mean", "best_top1_std",
    "top3_mean", "top3_std",
    "f1_mean", "f1_std",
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


def summarise(runs: list[dict]) -> pd.DataFrame:
    """One row per (dataset, backbone, mode, loss, train_fraction), columns ``SUMMARY_COLUMNS``.

    Means and sample standard deviations are over the seeds whose run finished
    ("ok"); ``failed`` counts runs that stopped on a non-finite loss. ``top1_*`` is
    the final valid top-1, ``best_top1_*`` the best epoch's. ``top1_ci95`` is the
    half-width of a 95 % t-interval for the mean (NaN with one seed). Rows come in
    order of first appearance of dataset, backbone, mode and loss, then by train
    fraction, largest first.
    """
    # Not at the top: report.py, where the record checks live for now, imports this module.

    bad = [(i, p) for i, r in enumerate(runs) if (p := record_problem(r))]
    if bad:
        i, problem = bad[0]
        where = runs[i].get("_file", f"record #{i}") if isinstance(runs[i], dict) else f"record #{i}"
        raise ValueError(f"summarise: run {where} is not a valid run record: {problem}")
    runs = dedupe(runs)
    if not runs:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    refuse_mixed_data(runs)

    orders = {f: _first_appearance(r[f] for r in runs) for f in ("dataset", "backbone", "mode", "loss")}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["dataset"], r["backbone"], r["mode"], r["loss"], round(float(r["train_fraction"]), 6))
        groups.setdefault(key, []).append(r)

    rows = []
    for key, members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        hashes = sorted({str(r["weights_hash"]) for r in members if r.get("weights_hash")})
        if len(hashes) > 1:
            warnings.warn(
                f"runs of {'/'.join(map(str, key[:4]))} train_fraction {key[4]:g} used different "
                f"backbone weights ({', '.join(hashes)}); their numbers are not comparable",
                stacklevel=2,
            )
        top1 = [as_float(r["final"]["valid_top1"]) for r in ok]
        best = [as_float(r.get("best_valid_top1")) for r in ok]
        top3 = [as_float(r["final"].get("valid_top3")) for r in ok]
        f1 = [as_float(r["final"].get("valid_macro_f1")) for r in ok]
        first = members[0]
        rows.append({
            "dataset": key[0], "backbone": key[1], "mode": key[2], "loss": key[3],
            "train_fraction": key[4],
            "seeds": len(ok), "failed": len(members) - len(ok),
            "top1_mean": mean(top1), "top1_std": sample_std(top1), "top1_ci95": ci95_half_width(top1),
            "best_top1_mean": mean(best), "best_top1_std": sample_std(best),
            "top3_mean": mean(top3), "top3_std": sample_std(top3),
            "f1_mean": mean(f1), "f1_std": sample_std(f1),
            "best_epoch_mean": mean([as_float(r.get("best_epoch")) for r in ok]),
            "epochs_mean": mean([float(len(r.get("history") or [])) for r in ok]),
            "train_seconds_mean": mean([as_float(r.get("train_seconds")) for r in ok]),
            "num_train": first.get("num_train"), "num_valid": first.get("num_valid"),
            "weights_hash": "+".join(hashes),
            "skipped_files": len(first.get("skipped_files") or []),
            "dropped": ", ".join(f"{k} {v}" for k, v in (first.get("dropped") or {}).items()),
        })
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    sort_keys = pd.DataFrame({
        f: df[f].map(orders[f]) for f in ("dataset", "backbone", "mode", "loss")
    })
    sort_keys["neg_fraction"] = -df["train_fraction"]
    order = sort_keys.sort_values(["dataset", "backbone", "mode", "neg_fraction", "loss"], kind="stable").index
    return df.loc[order].reset_index(drop=True)
