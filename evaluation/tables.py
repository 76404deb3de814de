"""Markdown and CSV tables of the summary (``stats.summarise``) and of the harness's timing.

Accuracies stay fractions in [0, 1] in the CSV files and become percentages in the
markdown tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .files import safe_name


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


def format_combined(summary: pd.DataFrame) -> tuple[str, pd.DataFrame]:
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
        ds_dir = out_dir / safe_name(ds)
        ds_dir.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = ds_dir / "accuracy.csv", ds_dir / "accuracy.md"
        summary[summary["dataset"] == ds].to_csv(csv_path, index=False, float_format="%.6g")
        md_path.write_text(format_table(summary, ds), encoding="utf-8")
        written += [csv_path, md_path]
    if len(datasets) > 1:
        md, table = format_combined(summary)
        md_path, csv_path = out_dir / "accuracy_all.md", out_dir / "accuracy_all.csv"
        md_path.write_text(md, encoding="utf-8")
        table.to_csv(csv_path, index=False, float_format="%.6g")
        written += [md_path, csv_path]
    return written


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
