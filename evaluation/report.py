"""Tables and plots from finished run records.

Each finished training run leaves one JSON record somewhere under ``{out}/runs/``
(see ``load_runs`` for the fields used). This module merges whatever records are
there into ``summary.csv``, per-dataset ``accuracy.csv``/``accuracy.md``, a
combined table when there are several datasets, PNG plots, and ``timing.md``;
with a ``grid.json`` it also lists the requested runs that have not finished.

Run it on a results folder at any time, e.g. while shards are still training:

    python -m evaluation.report --out results [--plots results/plots]

Accuracies stay fractions in [0, 1] in the CSV files and become percentages in
the markdown tables and the plots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .files import write_text_atomically

# A run is identified by these fields; a second record with the same identity
# (e.g. after merging shard folders) is a duplicate.
RUN_KEY_FIELDS = ("dataset", "backbone", "mode", "loss", "seed", "train_fraction")

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

DPI = 120


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

def _record_problem(rec) -> str | None:
    """Why `rec` cannot be used as a run record, or None when it can."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    missing = [k for k in (*RUN_KEY_FIELDS, "status") if k not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if rec["status"] not in ("ok", "failed"):
        return f"status must be 'ok' or 'failed', got {rec['status']!r}"
    try:
        float(rec["train_fraction"])
    except (TypeError, ValueError):
        return f"train_fraction must be a number, got {rec['train_fraction']!r}"
    if isinstance(rec["seed"], bool) or not isinstance(rec["seed"], int):
        return f"seed must be an integer, got {rec['seed']!r}"
    if rec["status"] == "ok":
        final = rec.get("final")
        if not isinstance(final, dict) or "valid_top1" not in final:
            return "an 'ok' run needs final.valid_top1"
        top1 = final["valid_top1"]
        # Percentages written by mistake would silently scale every table by 100.
        if not isinstance(top1, (int, float)) or not 0.0 <= top1 <= 1.0:
            return f"final.valid_top1 must be a fraction in [0, 1], got {top1!r}"
    if not isinstance(rec.get("history", []), list):
        return "history must be a list of per-epoch dicts"
    return None


def _run_key(rec) -> tuple:
    return (rec["dataset"], rec["backbone"], rec["mode"], rec["loss"],
            int(rec["seed"]), round(float(rec["train_fraction"]), 6))


def _describe_key(key) -> str:
    dataset, backbone, mode, loss, seed, frac = key
    return f"{dataset}/{backbone}/{mode}/{loss} seed {seed} train_fraction {frac:g}"


def _dedupe(runs: list[dict]) -> list[dict]:
    """One record per run identity: an 'ok' record beats a 'failed' one, else the first wins."""
    kept: dict[tuple, int] = {}
    for i, rec in enumerate(runs):
        key = _run_key(rec)
        if key not in kept:
            kept[key] = i
            continue
        j = kept[key]
        keep, drop = (i, j) if (rec["status"] == "ok" and runs[j]["status"] != "ok") else (j, i)
        where = [runs[k].get("_file", f"record #{k}") for k in (keep, drop)]
        warnings.warn(
            f"duplicate run record for {_describe_key(key)}: keeping {where[0]} "
            f"({runs[keep]['status']}), ignoring {where[1]} ({runs[drop]['status']})",
            stacklevel=3,
        )
        kept[key] = keep
    # Keep the original order so that "order of first appearance" means something.
    chosen = set(kept.values())
    return [r for i, r in enumerate(runs) if i in chosen]


def load_runs(out_dir) -> list[dict]:
    """Every usable run record under ``out_dir/runs`` (searched recursively for ``*.json``).

    Unreadable or malformed files are skipped with a warning naming them; duplicate
    runs (same dataset, backbone, mode, loss, seed, train_fraction) are reduced to
    one with a warning. Each record gets a ``_file`` key with the path it came from.
    Records come in lossbank registry order of their loss (losses the registry does
    not know go last), then in sorted path order, so tables list losses the way the
    harness ran them whatever the file names are.
    """
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        return []
    runs = []
    for path in sorted(runs_dir.rglob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable run record {path}: {exc}", stacklevel=2)
            continue
        problem = _record_problem(rec)
        if problem:
            warnings.warn(f"skipping run record {path}: {problem}", stacklevel=2)
            continue
        rec["_file"] = str(path)
        runs.append(rec)
    rank = _registry_rank()
    runs.sort(key=lambda r: rank.get(r["loss"], len(rank)))  # stable: path order within a loss
    return _dedupe(runs)


def _registry_rank() -> dict[str, int]:
    """Position of each registered loss; empty when lossbank cannot be imported
    (the report then still works, in file order)."""
    try:
        from lossbank import list_losses
    except ImportError:
        return {}
    return {name: i for i, name in enumerate(list_losses())}


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

def _t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (Abramowitz & Stegun 26.7.3/26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (for 95 % intervals).

    Computed here so the harness does not need scipy.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = 0.0, 1000.0  # t_{0.975, 1} = 12.7, so 1000 always brackets it
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided_cdf(mid, df) < 0.95:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return 0.5 * (lo + hi)


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _std(values) -> float:
    """Sample standard deviation (ddof=1); NaN with fewer than two values."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _ci95(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if len(values) < 2:
        return math.nan
    return t_quantile_975(len(values) - 1) * _std(values) / math.sqrt(len(values))


def _data_of(rec: dict):
    signature = rec.get("signature")
    return signature.get("data") if isinstance(signature, dict) else None


def _refuse_mixed_data(runs: list[dict]) -> None:
    """Runs of one dataset name made on different data (other classes or files) must never share a table."""
    first: dict[str, dict] = {}
    for rec in runs:
        seen = first.setdefault(rec["dataset"], rec)
        if _data_of(seen) != _data_of(rec):
            where = [r.get("_file", f"a record of {r['loss']} seed {r['seed']}") for r in (seen, rec)]
            describe = [json.dumps(_data_of(r)) if _data_of(r) else "no record of its data (older lossbank)"
                        for r in (seen, rec)]
            raise ValueError(
                f"runs of {rec['dataset']!r} were made on different data and cannot be summarised together: "
                f"{where[0]} ({describe[0]}) and {where[1]} ({describe[1]}); keep each dataset version in its own "
                f"results folder")


def _first_appearance(values) -> dict:
    order: dict = {}
    for v in values:
        order.setdefault(v, len(order))
    return order


def _as_float(x) -> float:
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
    bad = [(i, p) for i, r in enumerate(runs) if (p := _record_problem(r))]
    if bad:
        i, problem = bad[0]
        where = runs[i].get("_file", f"record #{i}") if isinstance(runs[i], dict) else f"record #{i}"
        raise ValueError(f"summarise: run {where} is not a valid run record: {problem}")
    runs = _dedupe(runs)
    if not runs:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    _refuse_mixed_data(runs)

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
        top1 = [_as_float(r["final"]["valid_top1"]) for r in ok]
        best = [_as_float(r.get("best_valid_top1")) for r in ok]
        top3 = [_as_float(r["final"].get("valid_top3")) for r in ok]
        f1 = [_as_float(r["final"].get("valid_macro_f1")) for r in ok]
        first = members[0]
        rows.append({
            "dataset": key[0], "backbone": key[1], "mode": key[2], "loss": key[3],
            "train_fraction": key[4],
            "seeds": len(ok), "failed": len(members) - len(ok),
            "top1_mean": _mean(top1), "top1_std": _std(top1), "top1_ci95": _ci95(top1),
            "best_top1_mean": _mean(best), "best_top1_std": _std(best),
            "top3_mean": _mean(top3), "top3_std": _std(top3),
            "f1_mean": _mean(f1), "f1_std": _std(f1),
            "best_epoch_mean": _mean([_as_float(r.get("best_epoch")) for r in ok]),
            "epochs_mean": _mean([float(len(r.get("history") or [])) for r in ok]),
            "train_seconds_mean": _mean([_as_float(r.get("train_seconds")) for r in ok]),
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


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

def _pct(mean, std=math.nan, digits=1) -> str:
    if mean is None or not np.isfinite(mean):
        return "—"
    text = f"{100 * mean:.{digits}f}"
    if std is not None and np.isfinite(std):
        text += f" ± {100 * std:.{digits}f}"
    return text


def _num(x, digits=1) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _epoch(x) -> str:
    """An epoch, or a mean of epochs over seeds: "7" when whole, "7.5" when not."""
    if x is None or not np.isfinite(x):
        return "—"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _seeds_cell(row) -> str:
    return f"{row.seeds}" + (f" (+{row.failed} failed)" if row.failed else "")


def _md_table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _combos(df: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(df["backbone"], df["mode"])))


def format_table(summary: pd.DataFrame, dataset: str) -> str:
    """The markdown accuracy table for one dataset: one section per (backbone, mode),
    one row per loss (and per train fraction when there are several)."""
    sub = summary[summary["dataset"] == dataset]
    if sub.empty:
        known = ", ".join(map(str, dict.fromkeys(summary["dataset"]))) or "none"
        raise ValueError(f"format_table: no runs for dataset {dataset!r} (datasets in the summary: {known})")
    several_fractions = sub["train_fraction"].nunique() > 1
    lines = [f"# {dataset}: validation accuracy per loss", "",
             "Mean ± sample std over seeds; accuracies and macro-F1 in %. "
             "'final' is the model at the end of training, 'best' the best epoch's valid top-1.", ""]
    for backbone, mode in _combos(sub):
        part = sub[(sub["backbone"] == backbone) & (sub["mode"] == mode)]
        hashes = ", ".join(h for h in dict.fromkeys(part["weights_hash"]) if h)
        valid = part["num_valid"].dropna()
        heading = f"## {dataset} — backbone {backbone}, mode {mode}"
        details = []
        if len(valid):
            details.append(f"valid images: {int(valid.iloc[0])}")
        if hashes:
            details.append(f"weights {hashes}")
        skipped = int(part["skipped_files"].fillna(0).max()) if "skipped_files" in part else 0
        if skipped:
            details.append(f"{skipped} undecodable image files skipped")
        dropped = [d for d in dict.fromkeys(part["dropped"]) if isinstance(d, str) and d] if "dropped" in part else []
        if dropped:
            details.append(f"--drop-duplicates removed: {dropped[0]}")
        if details:
            details[0] = details[0][0].upper() + details[0][1:]
        lines += [heading, ""] + ([", ".join(details) + ".", ""] if details else [])
        header = ["loss"] + (["train fraction"] if several_fractions else []) + [
            "seeds", "final top-1", "best top-1", "best epoch", "top-3", "macro-F1", "train s"]
        align = ["l"] + (["r"] if several_fractions else []) + ["r"] * 7
        rows = []
        for row in part.itertuples(index=False):
            rows.append([str(row.loss)] + ([f"{row.train_fraction:g}"] if several_fractions else []) + [
                _seeds_cell(row), _pct(row.top1_mean, row.top1_std),
                _pct(row.best_top1_mean, row.best_top1_std), _epoch(row.best_epoch_mean),
                _pct(row.top3_mean, row.top3_std), _pct(row.f1_mean, row.f1_std),
                _num(row.train_seconds_mean)])
        lines += _md_table(header, rows, align) + [""]
    return "\n".join(lines)


def _format_combined(summary: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Rows losses, columns datasets, final valid top-1; one section per (backbone, mode, fraction)."""
    datasets = list(dict.fromkeys(summary["dataset"]))
    lines = ["# Final valid top-1 (%) per loss and dataset", "",
             "Mean ± sample std over seeds.", ""]
    csv_rows = []
    sections = list(dict.fromkeys(zip(summary["backbone"], summary["mode"], summary["train_fraction"])))
    sections.sort(key=lambda s: -s[2])
    losses = list(dict.fromkeys(summary["loss"]))
    for backbone, mode, frac in sections:
        part = summary[(summary["backbone"] == backbone) & (summary["mode"] == mode)
                       & (summary["train_fraction"] == frac)]
        lines += [f"## backbone {backbone}, mode {mode}, train fraction {frac:g}", ""]
        rows = []
        for loss in losses:
            cells = part[part["loss"] == loss]
            if cells.empty:
                continue
            row_md, row_csv = [str(loss)], {"backbone": backbone, "mode": mode, "train_fraction": frac, "loss": loss}
            for ds in datasets:
                cell = cells[cells["dataset"] == ds]
                if cell.empty:
                    row_md.append("—")
                    row_csv.update({f"{ds}_top1_mean": math.nan, f"{ds}_top1_std": math.nan, f"{ds}_seeds": 0})
                    continue
                c = cell.iloc[0]
                text = _pct(c.top1_mean, c.top1_std)
                if c.failed:
                    text += f" ({c.failed} failed)"
                row_md.append(text)
                row_csv.update({f"{ds}_top1_mean": c.top1_mean, f"{ds}_top1_std": c.top1_std,
                                f"{ds}_seeds": c.seeds})
            rows.append(row_md)
            csv_rows.append(row_csv)
        lines += _md_table(["loss"] + datasets, rows, ["l"] + ["r"] * len(datasets)) + [""]
    return "\n".join(lines), pd.DataFrame(csv_rows)


def _safe(name) -> str:
    return re.sub(r"[^\w.+-]+", "_", str(name))


def write_tables(summary: pd.DataFrame, out_dir) -> list[Path]:
    """Write ``summary.csv``, ``<dataset>/accuracy.csv|md`` and, with several datasets,
    ``accuracy_all.csv|md`` under ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    path = out_dir / "summary.csv"
    summary.to_csv(path, index=False, float_format="%.6g")
    written.append(path)
    datasets = list(dict.fromkeys(summary["dataset"]))
    for ds in datasets:
        ds_dir = out_dir / _safe(ds)
        ds_dir.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = ds_dir / "accuracy.csv", ds_dir / "accuracy.md"
        summary[summary["dataset"] == ds].to_csv(csv_path, index=False, float_format="%.6g")
        md_path.write_text(format_table(summary, ds), encoding="utf-8")
        written += [csv_path, md_path]
    if len(datasets) > 1:
        md, table = _format_combined(summary)
        md_path, csv_path = out_dir / "accuracy_all.md", out_dir / "accuracy_all.csv"
        md_path.write_text(md, encoding="utf-8")
        table.to_csv(csv_path, index=False, float_format="%.6g")
        written += [md_path, csv_path]
    return written


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------

def _loss_colors(losses) -> dict:
    """The same colour for a loss in every figure. tab10 without its grey, which is
    kept for the context lines; then darker extras for long loss lists."""
    from matplotlib import colormaps
    tab10 = colormaps["tab10"].colors
    palette = [c for i, c in enumerate(tab10) if i != 7] + ["navy", "darkgoldenrod", "teal", "maroon", "olive"]
    palette += list(colormaps["tab20b"].colors)
    return {loss: palette[i % len(palette)] for i, loss in enumerate(losses)}


def _select(items, dataset, backbone, mode, train_fraction, what, get):
    """Narrow records/rows to one (dataset, backbone, mode, train_fraction).

    Returns (selected, backbone, mode, fraction, qualified) where `qualified` says
    whether the dataset has several (backbone, mode) combinations, so file names
    must carry them.
    """
    mine = [x for x in items if get(x, "dataset") == dataset]
    if not mine:
        known = ", ".join(map(str, dict.fromkeys(get(x, "dataset") for x in items))) or "none"
        raise ValueError(f"{what}: no runs for dataset {dataset!r} (datasets present: {known})")
    combos = list(dict.fromkeys((get(x, "backbone"), get(x, "mode")) for x in mine))
    if backbone is None or mode is None:
        candidates = [c for c in combos if (backbone is None or c[0] == backbone)
                      and (mode is None or c[1] == mode)]
        if len(candidates) != 1:
            raise ValueError(
                f"{what}: dataset {dataset!r} has runs for (backbone, mode) {combos}; "
                f"pass backbone= and mode= to choose one")
        backbone, mode = candidates[0]
    mine = [x for x in mine if get(x, "backbone") == backbone and get(x, "mode") == mode]
    if not mine:
        raise ValueError(f"{what}: no runs for {dataset!r} with backbone {backbone!r}, mode {mode!r}; "
                         f"present: {combos}")
    fractions = sorted({round(float(get(x, "train_fraction")), 6) for x in mine}, reverse=True)
    if train_fraction is None:
        train_fraction = fractions[0]
    train_fraction = round(float(train_fraction), 6)
    selected = [x for x in mine if round(float(get(x, "train_fraction")), 6) == train_fraction]
    if not selected:
        raise ValueError(f"{what}: no runs for {dataset!r}/{backbone}/{mode} with train_fraction "
                         f"{train_fraction:g}; present: {fractions}")
    return selected, backbone, mode, train_fraction, len(combos) > 1


def _plot_path(plots_dir, dataset, backbone, mode, fraction, qualified, kind) -> Path:
    name = _safe(dataset)
    if qualified:
        name += f"_{_safe(backbone)}_{_safe(mode)}"
    if fraction is not None and fraction != 1.0:
        name += f"_frac{fraction:g}"
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    return plots_dir / f"{name}_{kind}.png"


def _context(dataset, backbone, mode, fraction) -> str:
    text = f"{dataset} — {backbone}, {mode}"
    if fraction != 1.0:
        text += f", {100 * fraction:g}% of train"
    return text


def _per_epoch(runs: list[dict], field: str) -> pd.DataFrame:
    """Per epoch: mean/min/max/count of `field` over the runs that reached that epoch."""
    rows = [(h.get("epoch"), h.get(field)) for r in runs for h in (r.get("history") or [])]
    df = pd.DataFrame(rows, columns=["epoch", "value"]).dropna()
    df = df[np.isfinite(df["value"].astype(float))]
    if df.empty:
        return pd.DataFrame(columns=["mean", "min", "max", "count"])
    return df.groupby("epoch")["value"].agg(["mean", "min", "max", "count"]).sort_index()


def _band(ax, stats: pd.DataFrame, color, label, scale=1.0):
    if stats.empty:
        return
    x = stats.index.to_numpy(dtype=float)
    ax.plot(x, scale * stats["mean"], color=color, linewidth=1.8, label=label)
    ax.fill_between(x, scale * stats["min"], scale * stats["max"], color=color, alpha=0.18, linewidth=0)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _seed_counts(runs) -> str:
    ok = sum(r["status"] == "ok" for r in runs)
    failed = len(runs) - ok
    return _plural(ok, "seed") + (f" + {failed} failed" if failed else "")


def _mark_failures(ax, failed_runs, field_for_y):
    """Draw what a failed run managed before its loss went non-finite, ending in a red x."""
    for r in failed_runs:
        hist = r.get("history") or []
        if hist:
            x = [h.get("epoch") for h in hist]
            y = [_as_float(h.get(field_for_y)) for h in hist]
            ax.plot(x, y, color="crimson", linewidth=0.8, linestyle=":", alpha=0.8)
        fe = r.get("failed_epoch")
        if fe is not None:
            ax.axvline(fe, color="crimson", linestyle="--", linewidth=0.9, alpha=0.7)
            ax.plot([fe], [0], marker="x", color="crimson", markersize=9, mew=2,
                    transform=ax.get_xaxis_transform(), clip_on=False)


def _failure_note(failed_runs) -> str:
    notes = []
    for r in failed_runs:
        why = str(r.get("failure") or "non-finite loss")
        why = why if len(why) <= 28 else why[:27] + "…"
        notes.append(f"seed {r['seed']} failed at epoch {r.get('failed_epoch', '?')}: {why}")
    return "\n".join(notes)


def _grid_margins(fig, height_in: float, wspace: float) -> None:
    """Fixed margins for the panel grids: constrained layout took most of the report's time."""
    fig.subplots_adjust(left=0.06, right=0.94, bottom=0.5 / height_in, top=1 - 1.0 / height_in,
                        wspace=wspace, hspace=0.5)


def plot_loss_curves(runs: list[dict], dataset: str, plots_dir, backbone=None, mode=None,
                     train_fraction=None) -> Path:
    """One panel per loss (each with its own y axis): train and valid loss per epoch,
    mean over seeds with a min–max band; failed runs dotted red, ending in a red x.
    For L-Softmax, λ per epoch is drawn on a right-hand axis.

    `backbone`/`mode` are needed only when the dataset has several; `train_fraction`
    defaults to the largest present. Returns the PNG path.
    """
    runs, backbone, mode, frac, qualified = _select(
        runs, dataset, backbone, mode, train_fraction, "plot_loss_curves", lambda r, f: r[f])
    losses = list(dict.fromkeys(r["loss"] for r in runs))
    ncols = min(4, len(losses))
    nrows = math.ceil(len(losses) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows + 0.9), dpi=DPI)
    _grid_margins(fig, 3.6 * nrows + 0.9, wspace=0.42)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    max_seeds = 0
    for ax, loss in zip(axes, losses):
        mine = [r for r in runs if r["loss"] == loss]
        ok = [r for r in mine if r["status"] == "ok"]
        failed = [r for r in mine if r["status"] == "failed"]
        max_seeds = max(max_seeds, len(ok))
        _band(ax, _per_epoch(ok, "train_loss"), "tab:blue", "train")
        _band(ax, _per_epoch(ok, "valid_loss"), "tab:orange", "valid")
        _mark_failures(ax, failed, "valid_loss")
        if not ok:
            ax.text(0.5, 0.5, "no finished run", transform=ax.transAxes, ha="center", color="crimson")
        lam = _per_epoch(ok or failed, "lambda")
        handles, labels = ax.get_legend_handles_labels()
        if not lam.empty:
            ax2 = ax.twinx()
            ax2.plot(lam.index, lam["mean"], color="grey", linestyle="--", linewidth=1.2, label="λ (right axis)")
            ax2.set_ylabel("λ", color="grey")
            ax2.tick_params(axis="y", colors="grey")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if failed:
            from matplotlib.lines import Line2D
            handles.append(Line2D([], [], color="crimson", linestyle=":", marker="x"))
            labels.append("failed run (valid)")
            ax.text(0.02, 0.02, _failure_note(failed), transform=ax.transAxes, fontsize=7.5,
                    color="crimson", va="bottom", ha="left",
                    bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
        ax.set_title(f"{loss} ({_seed_counts(mine)})", fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        # A loss that starts orders of magnitude above where it ends (margin losses,
        # or a run diverging before it failed) flattens everything else on a linear axis.
        ys = np.array([_as_float(h.get(k)) for r in mine for h in (r.get("history") or [])
                       for k in ("train_loss", "valid_loss")])
        ys = ys[np.isfinite(ys)]
        if len(ys) and ys.min() > 0 and ys.max() / ys.min() > 100:
            ax.set_yscale("log")
            ax.set_ylabel("loss (log scale)")
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles, labels, fontsize=8, loc="upper right")
    for ax in axes[len(losses):]:
        ax.set_visible(False)
    fig.suptitle(f"{_context(dataset, backbone, mode, frac)}: train/valid loss per epoch "
                 f"(mean over {_plural(max_seeds, 'seed')})\n"
                 f"band = min–max over seeds; after early stopping, over the seeds that reached the epoch",
                 fontsize=12)
    path = _plot_path(plots_dir, dataset, backbone, mode, frac, qualified, "loss_curves")
    fig.savefig(path, dpi=DPI)
    return path


def plot_accuracy_curves(runs: list[dict], dataset: str, plots_dir, backbone=None, mode=None,
                         train_fraction=None) -> Path:
    """Valid top-1 (%) per epoch: one panel per loss (shared y axis) with its mean over
    seeds and a min–max band, the other losses' means in grey behind it for
    comparison (ten overlapping bands on one axes are unreadable), failed runs
    dotted, ending in an x. Same selection rules as ``plot_loss_curves``."""
    runs, backbone, mode, frac, qualified = _select(
        runs, dataset, backbone, mode, train_fraction, "plot_accuracy_curves", lambda r, f: r[f])
    losses = list(dict.fromkeys(r["loss"] for r in runs))
    colors = _loss_colors(losses)
    stats = {loss: _per_epoch([r for r in runs if r["loss"] == loss and r["status"] == "ok"], "valid_top1")
             for loss in losses}
    ncols = min(4, len(losses))
    nrows = math.ceil(len(losses) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.4 * nrows + 0.9), dpi=DPI)
    _grid_margins(fig, 3.4 * nrows + 0.9, wspace=0.25)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    max_seeds = 0
    for ax, loss in zip(axes, losses):
        mine = [r for r in runs if r["loss"] == loss]
        failed = [r for r in mine if r["status"] == "failed"]
        max_seeds = max(max_seeds, len(mine) - len(failed))
        for other in losses:
            if other != loss and not stats[other].empty:
                ax.plot(stats[other].index, 100 * stats[other]["mean"], color="grey", linewidth=0.8, alpha=0.45)
        if stats[loss].empty:
            ax.text(0.5, 0.5, "no finished run", transform=ax.transAxes, ha="center", color="black")
        _band(ax, stats[loss], colors[loss], loss, scale=100.0)
        for r in failed:
            hist = r.get("history") or []
            if hist:
                ax.plot([h.get("epoch") for h in hist], [100 * _as_float(h.get("valid_top1")) for h in hist],
                        color="black", linestyle=":", linewidth=1.2)
                ax.plot([hist[-1].get("epoch")], [100 * _as_float(hist[-1].get("valid_top1"))],
                        marker="x", color="black", markersize=8, mew=2)
        if failed:
            ax.text(0.98, 0.03, _failure_note(failed), transform=ax.transAxes, fontsize=7.5,
                    color="black", va="bottom", ha="right",
                    bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
        ax.set_title(f"{loss} ({_seed_counts(mine)})", fontsize=11)
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=True, labelleft=True)
    for i, ax in enumerate(axes):
        if i >= len(losses):
            ax.set_visible(False)
        elif i % ncols == 0:
            ax.set_ylabel("valid top-1 (%)")
        if i < len(losses):
            ax.set_xlabel("epoch")
    fig.suptitle(f"{_context(dataset, backbone, mode, frac)}: valid top-1 per epoch "
                 f"(mean over {_plural(max_seeds, 'seed')})\n"
                 f"band = min–max over seeds; grey = the other losses' means; black dotted = failed run",
                 fontsize=12)
    path = _plot_path(plots_dir, dataset, backbone, mode, frac, qualified, "accuracy_curves")
    fig.savefig(path, dpi=DPI)
    return path


def _summary_get(row, field):
    return row[field]


def plot_final_accuracy(summary: pd.DataFrame, dataset: str, plots_dir, backbone=None, mode=None,
                        train_fraction=None, runs: list[dict] | None = None) -> Path:
    """Final valid top-1 (%) per loss in summary (registry) order: every seed as a dot (from ``runs``), the mean
    as a bar-free marker with its 95 % t-interval, on an axis zoomed to the values so that 95 and 98 look apart.
    The title says what one valid image is worth, the resolution of every number on it."""
    rows = [row for _, row in summary.iterrows()]
    rows, backbone, mode, frac, qualified = _select(
        rows, dataset, backbone, mode, train_fraction, "plot_final_accuracy", _summary_get)
    part = pd.DataFrame(rows)
    losses = list(part["loss"])
    colors = _loss_colors(list(dict.fromkeys(summary["loss"])))
    seeds_of = {loss: [100 * _as_float(r["final"]["valid_top1"]) for r in runs or []
                       if r["status"] == "ok" and r["dataset"] == dataset and r["backbone"] == backbone
                       and r["mode"] == mode and r["loss"] == loss
                       and round(float(r["train_fraction"]), 6) == frac] for loss in losses}
    fig = Figure(figsize=(max(6.5, 0.9 * len(losses) + 2.5), 5.4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(losses))
    means = 100 * part["top1_mean"].to_numpy(dtype=float)
    cis = 100 * part["top1_ci95"].to_numpy(dtype=float)
    for xi, (loss, m, ci, row) in enumerate(zip(losses, means, cis, part.itertuples(index=False))):
        dots = seeds_of[loss]
        if dots:
            jitter = np.linspace(-0.12, 0.12, len(dots)) if len(dots) > 1 else [0.0]
            ax.scatter(xi + np.asarray(jitter), dots, s=14, color="dimgrey", alpha=0.7, zorder=2, linewidths=0)
        if np.isfinite(m):
            ax.errorbar([xi + 0.25], [m], yerr=[[ci], [ci]] if np.isfinite(ci) else None, fmt="D",
                        color=colors[loss], markersize=7, capsize=5, elinewidth=1.6, zorder=3)
            text = f"{m:.1f}" + (f"\n±{ci:.1f}" if np.isfinite(ci) else "")
        else:
            text = f"all {_plural(row.failed, 'run')}\nfailed"
        if row.failed and np.isfinite(m):
            text += f"\n({row.failed} failed)"
        ax.annotate(text, (xi + 0.25, m if np.isfinite(m) else np.nan), xytext=(8, 0), textcoords="offset points",
                    fontsize=8, va="center")
    values = [v for loss in losses for v in seeds_of[loss]]
    values += [v for m, ci in zip(means, cis) for v in ((m - ci, m + ci) if np.isfinite(ci) else (m,)) if np.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 100.0)
    pad = max(1.0, 0.15 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad) + 0.5)
    ax.set_xticks(x, losses, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(losses) - 0.1)
    ax.set_ylabel("final valid top-1 accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    seeds = int(part["seeds"].max()) if len(part) else 0
    n_valid = part["num_valid"].dropna()
    resolution = f"; one valid image = {100 / float(n_valid.iloc[0]):.1f} points" if len(n_valid) and n_valid.iloc[0] else ""
    spread = (f"seeds (dots), mean with 95 % interval over {_plural(seeds, 'seed')}" if seeds > 1
              else "one seed, so no interval")
    ax.set_title(f"{_context(dataset, backbone, mode, frac)}:\nfinal valid top-1 per loss: {spread}{resolution}",
                 fontsize=11)
    path = _plot_path(plots_dir, dataset, backbone, mode, frac, qualified, "final_accuracy")
    fig.savefig(path, dpi=DPI)
    return path


def _failed_suffix(n: int) -> str:
    return "" if n == 0 else f" ({n} failed run{'s' if n > 1 else ''} left out)"


def plot_fraction_study(summary: pd.DataFrame, dataset: str, plots_dir, backbone=None,
                        mode=None) -> Path | None:
    """Final valid top-1 (%) vs train fraction, one line per loss with std error bars.
    None when the dataset (for this backbone and mode) has only one train fraction."""
    rows = [row for _, row in summary.iterrows()]
    # _select narrows to one fraction; only its backbone/mode choice is wanted here.
    _, backbone, mode, _, qualified = _select(
        rows, dataset, backbone, mode, None, "plot_fraction_study", _summary_get)
    part = summary[(summary["dataset"] == dataset) & (summary["backbone"] == backbone)
                   & (summary["mode"] == mode)]
    fractions = sorted(part["train_fraction"].unique())
    if len(fractions) < 2:
        return None
    losses = list(dict.fromkeys(part["loss"]))
    colors = _loss_colors(list(dict.fromkeys(summary["loss"])))
    fig = Figure(figsize=(10, 5.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for i, loss in enumerate(losses):
        mine = part[part["loss"] == loss].sort_values("train_fraction")
        # Nudge losses apart horizontally (log axis: multiplicative) so error bars don't overlap.
        nudge = 1.0 + 0.025 * (i - (len(losses) - 1) / 2)
        ax.errorbar(mine["train_fraction"] * nudge, 100 * mine["top1_mean"],
                    yerr=100 * mine["top1_std"].fillna(0.0), color=colors[loss], marker="o",
                    markersize=5, capsize=3, linewidth=1.5,
                    label=loss + _failed_suffix(int(mine["failed"].sum())))
    ax.set_xscale("log")
    counts = part.groupby("train_fraction")["num_train"].first()
    labels = []
    for f in fractions:
        n = counts.get(f)
        labels.append(f"{100 * f:g}%" + (f"\n({int(n)} img)" if n is not None and pd.notna(n) else ""))
    ax.set_xticks(fractions, labels)
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training set used")
    ax.set_ylabel("final valid top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(f"{dataset} — {backbone}, {mode}: final valid top-1 vs amount of training data\n"
                 f"(mean ± std over seeds)", fontsize=12)
    path = _plot_path(plots_dir, dataset, backbone, mode, None, qualified, "fraction_study")
    fig.savefig(path, dpi=DPI)
    return path


# --------------------------------------------------------------------------
# Grid, timing, everything together
# --------------------------------------------------------------------------

def _load_json_if_present(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}; fix or delete the file") from exc


def missing_runs(runs: list[dict], grid: list[dict], where: str = "grid") -> list[dict]:
    """The grid entries with no run record (ok or failed: a failed run has finished)."""
    if not isinstance(grid, list):
        raise ValueError(f"{where} must be a JSON list of run descriptions, got {type(grid).__name__}")
    done = {_run_key(r) for r in runs}
    missing = []
    for i, entry in enumerate(grid):
        lacking = [k for k in RUN_KEY_FIELDS if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise ValueError(f"{where} entry #{i} lacks {', '.join(lacking)}: {entry!r}; every entry needs "
                             f"{', '.join(RUN_KEY_FIELDS)}")
        try:
            key = _run_key(entry)
        except (TypeError, ValueError):
            raise ValueError(f"{where} entry #{i}: seed must be an integer and train_fraction a number, "
                             f"got {entry!r}") from None
        if key not in done:
            missing.append(entry)
    return missing


def _check_timing(timing, where: str) -> dict:
    if not isinstance(timing, dict) or not isinstance(timing.get("sections"), dict):
        raise ValueError(f"{where} must look like {{\"sections\": {{name: seconds}}, \"total\": seconds}}")
    for name, secs in timing["sections"].items():
        if not isinstance(secs, (int, float)):
            raise ValueError(f"{where}: section {name!r} has {secs!r}, expected seconds as a number")
    return timing


def format_timing(timing: dict) -> str:
    """Markdown table of the timing sections with their share of the total."""
    sections = timing["sections"]
    total = float(timing.get("total") or sum(sections.values()))
    rows = [[name, f"{secs:.1f}", f"{100 * secs / total:.0f}%" if total > 0 else "—"]
            for name, secs in sections.items()]
    rest = total - sum(sections.values())
    if rest > 0.05:
        rows.append(["(outside the sections)", f"{rest:.1f}", f"{100 * rest / total:.0f}%"])
    rows.append(["**total**", f"**{total:.1f}**", "100%"])
    return "\n".join(["# Timing", ""] + _md_table(["section", "seconds", "share"], rows, ["l", "r", "r"])) + "\n"


def _describe_entry(e: dict) -> str:
    return (f"{e['dataset']} {e['backbone']} {e['mode']} {e['loss']} seed {e['seed']} "
            f"train_fraction {float(e['train_fraction']):g}")


PLOTS_STAMP = ".plots-stamp.json"


def _plots_digest(runs: list[dict]) -> str:
    """What the plots are drawn from: every run record and this file's own code."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps(runs, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _read_stamps(plots_dir: Path) -> dict[str, dict]:
    """{results folder: {"digest", "plots"}} of the drawings made into ``plots_dir``; {} if none is readable.

    Plots are listed by name, not path: they live directly in ``plots_dir``, and the stamp may have been
    written from another working directory. A plots folder can be shared by several results folders, so
    each keeps its own entry.
    """
    try:
        stamps = json.loads((plots_dir / PLOTS_STAMP).read_text())["by_out"]
        return {str(out): {"digest": entry.get("digest"), "plots": [Path(str(p)).name for p in entry["plots"]]}
                for out, entry in stamps.items() if isinstance(entry, dict) and isinstance(entry.get("plots"), list)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _stamp_plots(plots_dir: Path, out_dir: Path, digest: str, plots: list[Path], stamps: dict[str, dict]) -> None:
    """Record what ``out_dir``'s report drew, and delete what its last drawing made that this one no longer does.

    A dataset's plots get backbone and mode in their names once it has runs in a second mode, so the
    unqualified ones of the first mode would otherwise stay behind, stale, beside them. Only names this
    results folder drew before, and no other results folder's drawing lists, are deleted: anything else
    in the folder is not ours.
    """
    mine = str(Path(out_dir).resolve())
    drawn = {Path(p).name for p in plots}
    others = {name for out, entry in stamps.items() if out != mine for name in entry["plots"]}
    for name in set(stamps.get(mine, {}).get("plots", [])) - drawn - others:
        if name.endswith(".png"):
            (plots_dir / name).unlink(missing_ok=True)
    stamps = {**stamps, mine: {"digest": digest, "plots": sorted(drawn)}}
    write_text_atomically(plots_dir / PLOTS_STAMP, json.dumps({"by_out": stamps}, indent=1))


def write_report(out_dir, plots_dir=None, timing: dict | None = None, grid: list[dict] | None = None) -> dict:
    """Summary, tables and plots for every dataset with finished runs under ``out_dir/runs``.

    ``grid`` (or ``out_dir/grid.json`` when not given) lists requested runs; those
    without a record are returned as ``missing``. ``timing`` (or ``out_dir/timing.json``)
    gets a ``report`` section with this function's own seconds and is written to
    ``timing.json`` and ``timing.md``. Returns ``{"tables", "plots", "missing",
    "summary", "timing"}``. Raises ``FileNotFoundError`` when there are no runs.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    plots_dir = Path(plots_dir) if plots_dir is not None else out_dir / "plots"
    grid_where, timing_where = "grid argument", "timing argument"
    if grid is None:
        grid, grid_where = _load_json_if_present(out_dir / "grid.json"), str(out_dir / "grid.json")
    if timing is None:
        timing, timing_where = _load_json_if_present(out_dir / "timing.json"), str(out_dir / "timing.json")
    if timing is not None:
        timing = _check_timing(timing, timing_where)

    runs = load_runs(out_dir)
    if not runs:
        raise FileNotFoundError(
            f"no run records under {out_dir / 'runs'}: train first (python -m evaluation.run ...) "
            f"or point --out at a results folder that has a runs/ subfolder")
    missing = missing_runs(runs, grid, grid_where) if grid is not None else []

    summary = summarise(runs)
    tables = write_tables(summary, out_dir)
    # Drawing is most of the report's time: a rerun that finished no new run reuses the last drawing.
    digest = _plots_digest(runs)
    stamps = _read_stamps(plots_dir)
    stamped = stamps.get(str(out_dir.resolve()), {"digest": None, "plots": []})
    redraw = stamped["digest"] != digest or not all((plots_dir / name).is_file() for name in stamped["plots"])
    plots = [] if redraw else [plots_dir / name for name in stamped["plots"]]
    for dataset in dict.fromkeys(summary["dataset"]) if redraw else ():
        ds_runs = [r for r in runs if r["dataset"] == dataset]
        for backbone, mode in _combos(summary[summary["dataset"] == dataset]):
            kw = dict(backbone=backbone, mode=mode)
            plots.append(plot_loss_curves(ds_runs, dataset, plots_dir, **kw))
            plots.append(plot_accuracy_curves(ds_runs, dataset, plots_dir, **kw))
            plots.append(plot_final_accuracy(summary, dataset, plots_dir, runs=ds_runs, **kw))
            fraction_plot = plot_fraction_study(summary, dataset, plots_dir, **kw)
            if fraction_plot is not None:
                plots.append(fraction_plot)
    if redraw:
        _stamp_plots(plots_dir, out_dir, digest, plots, stamps)

    if timing is not None:
        sections = dict(timing["sections"])
        previous = float(sections.pop("report", 0.0))
        sections["report"] = time.perf_counter() - started
        total = float(timing.get("total") or sum(timing["sections"].values()))
        timing = {**timing, "sections": sections, "total": total - previous + sections["report"]}
        timing_json, timing_md = out_dir / "timing.json", out_dir / "timing.md"
        timing_json.write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")
        timing_md.write_text(format_timing(timing), encoding="utf-8")
        tables += [timing_md, timing_json]
    return {"tables": tables, "plots": plots, "missing": missing, "summary": summary, "timing": timing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.report",
        description="Merge the finished runs under OUT/runs into tables (OUT/summary.csv, "
                    "OUT/<dataset>/accuracy.md, ...) and plots, and list runs of OUT/grid.json "
                    "that have not finished.")
    parser.add_argument("--out", default="out", help="results folder holding runs/ (default: out, as evaluation.run)")
    parser.add_argument("--plots", default=None, help="where to put the PNGs (default: OUT/plots)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: --out {out} is not a folder; pass the results folder that holds runs/", file=sys.stderr)
        return 1
    try:
        result = write_report(out, plots_dir=args.plots)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    summary = result["summary"]
    datasets = list(dict.fromkeys(summary["dataset"]))
    for ds in datasets:
        print(format_table(summary, ds))
    if len(datasets) > 1:
        print(_format_combined(summary)[0])
    if result["timing"] is not None:
        print(format_timing(result["timing"]))
    missing = result["missing"]
    if missing:
        print(f"{len(missing)} run(s) of {out / 'grid.json'} not finished yet:")
        for entry in missing[:50]:
            print(f"  {_describe_entry(entry)}")
        if len(missing) > 50:
            print(f"  ... and {len(missing) - 50} more")
    elif (out / "grid.json").is_file():
        print(f"All runs of {out / 'grid.json'} are finished.")
    print("Tables written:")
    for p in result["tables"]:
        print(f"  {p}")
    print("Plots written:")
    for p in result["plots"]:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
