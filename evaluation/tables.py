"""Markdown, CSV and LaTeX tables of the summary (``stats.summarise``), of the comparisons of the losses
(``stats.compare_runs``: the verdicts in words, scores.csv, comparison.csv, ranks.csv, folds.csv,
accuracy.tex) and of the harness's timing.

Accuracies stay fractions in [0, 1] in the CSV files and become percentages (differences:
points) in the markdown and LaTeX tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .files import safe_name, write_text_atomically
from .metrics import RETRIEVAL_METRICS
from .stats import in_group, resolution

# The retrieval metrics' column names in the tables (evaluation.metrics.retrieval_metrics).
RETRIEVAL_HEADERS = {"precision_at_1": "P@1", "r_precision": "R-prec", "map_at_r": "MAP@R"}
RETRIEVAL_LEGEND = ("Retrieval on the final model's embeddings of the scored images, each image querying the others "
                    "by cosine similarity (Musgrave et al. 2020; in %, mean ± std): P@1 = nearest neighbour of its "
                    "class, R-prec = share of its class among its R nearest (R = other images of its class), "
                    "MAP@R = mean average precision over those R.")


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


def _combos(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys(zip(df["backbone"], df["mode"], df["protocol"])))


def _has_retrieval(df: pd.DataFrame) -> bool:
    """Whether any row has a retrieval metric (records before version 4 have none: no table for them)."""
    columns = [f"{name}_mean" for name in RETRIEVAL_METRICS if f"{name}_mean" in df]
    return bool(columns) and bool(np.isfinite(df[columns].to_numpy(dtype=float)).any())


def _retrieval_table(part: pd.DataFrame, several_fractions: bool) -> list[str]:
    """The small table under an accuracy table: each loss's retrieval metrics ("—" where a run has none)."""
    header = ["loss"] + (["train fraction"] if several_fractions else []) + list(RETRIEVAL_HEADERS.values())
    rows = [[str(row.loss)] + ([f"{row.train_fraction:g}"] if several_fractions else [])
            + [_pct(getattr(row, f"{name}_mean", math.nan), getattr(row, f"{name}_std", math.nan))
               for name in RETRIEVAL_METRICS]
            for row in part.itertuples(index=False)]
    return [RETRIEVAL_LEGEND, ""] + _md_table(header, rows, ["l"] + ["r"] * (len(header) - 1)) + [""]


# ---------------------------------------------------------------- the comparison in words
MARK = "●"
TEST_NAME = {"cv": "corrected resampled t", "split": "paired t over seeds"}


def plural(n: int, word: str) -> str:
    """"1 seed", "3 seeds"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _points(x, sign=False) -> str:
    """A difference of fractions in points, with a true minus sign."""
    if x is None or not np.isfinite(x):
        return "—"
    return f"{100 * x:{'+' if sign else ''}.1f}".replace("-", "−")


def _interval(low, high, sign=False) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "—"
    return f"[{_points(low, sign)}, {_points(high, sign)}]"


def _p(p) -> str:
    if p is None or not np.isfinite(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def _p_is(p) -> str:
    """" = 0.013" or " < 0.001", to follow the p's name."""
    return (" " if p < 0.001 else " = ") + _p(p)


def _vs_baseline(comparison, key) -> pd.DataFrame:
    """The "vs baseline" rows of one (dataset, backbone, mode, protocol), indexed by loss."""
    pairs = in_group(comparison.pairs, key)
    return pairs[pairs["family"] == "vs baseline"].set_index("loss")


def _best(comparison, key):
    """``significance.Best`` of a group, or None when no pair of its losses could be tested (one run each):
    every loss would be "indistinguishable", which says nothing."""
    if comparison is None or pd.to_numeric(in_group(comparison.pairs, key)["p_holm"]).isna().all():
        return None
    return comparison.best.get(key)


def _accuracy_interval(row) -> tuple[float, float]:
    """The 95 % interval of a summary row's mean top-1, within [0, 1] (the t-interval itself can leave it)."""
    low, high = row.top1_mean - row.top1_ci95, row.top1_mean + row.top1_ci95
    return (max(0.0, low), min(1.0, high)) if np.isfinite(row.top1_ci95) else (math.nan, math.nan)


def _vs_cell(loss: str, vs: pd.DataFrame, baseline: str) -> str:
    if loss == baseline:
        return "(baseline)"
    if loss not in vs.index:
        return "—"
    r = vs.loc[loss]
    if not np.isfinite(r.p_holm):
        return f"{_points(r.mean_diff, sign=True)} (n = {int(r.n)}: no test)"
    return f"{_points(r.mean_diff, sign=True)} {_interval(r.ci_low, r.ci_high, sign=True)} p{_p_is(r.p_holm)}"


def verdicts(comparison, key: tuple, n_test=None) -> list[str]:
    """Plain-language verdicts of one (dataset, backbone, mode, protocol) against the baseline at the comparison's
    alpha: a line per loss that beats it or is worse than it (Holm-adjusted p of the "vs baseline" family), a
    "No loss beats" line when none beats it; then a warning when one scored image is worth more than a point."""
    dataset, protocol, baseline, alpha = key[0], key[3], comparison.baseline, comparison.alpha
    vs = _vs_baseline(comparison, key)
    test = f"{TEST_NAME[protocol]}, Holm"
    lines = []
    if baseline not in set(in_group(comparison.scores, key)["loss"]):
        lines.append(f"No verdict on {dataset}: the baseline {baseline} has no finished run here to compare with.")
    elif vs.empty:
        lines.append(f"No verdict on {dataset}: only the baseline {baseline} has finished runs here.")
    elif not np.isfinite(vs["p_holm"]).any():
        lines.append(f"No verdict on {dataset}: fewer than two paired runs per loss, so no test "
                     f"({'train more seeds, or ' if protocol == 'split' else ''}use --protocol cv).")
    else:
        significant = vs[vs["p_holm"] < alpha]
        for loss, r in significant.iterrows():
            verb = "beats" if r.mean_diff > 0 else "is worse than"
            lines.append(f"{loss} {verb} {baseline} on {dataset} by {_points(r.mean_diff, sign=True)} points "
                         f"{_interval(r.ci_low, r.ci_high, sign=True)} (n = {int(r.n)}, p{_p_is(r.p_value)}, "
                         f"p_holm{_p_is(r.p_holm)}; {test}).")
        if not (significant["mean_diff"] > 0).any():
            lines.append(f"No loss beats {baseline} on {dataset} at α = {alpha:g} ({test}).")
        if protocol == "split":
            lines.append("Seeds on one split measure training noise only, not the sampling of the valid images: "
                         "--protocol cv is the protocol for verdicts.")
    if n_test is not None and np.isfinite(n_test) and 0 < n_test < 100:
        what = "scored image per fold" if protocol == "cv" else "valid image"
        lines.append(f"⚠ one {what} = {resolution(n_test)}: differences of one image are noise.")
    return ["- " + line for line in lines]


def format_table(summary: pd.DataFrame, dataset: str, comparison=None) -> str:
    """The markdown accuracy table for one dataset: one section per (backbone, mode, protocol), one row per loss
    (and per train fraction when there are several).

    With ``comparison`` (``stats.compare_runs``) the rows of the compared fraction (the largest) get the paired
    difference against the baseline ("vs <baseline>", Holm-adjusted p) and the mark of the losses
    indistinguishable from the best, and each section ends with its verdicts (``verdicts``). The best epoch's
    top-1 and the epoch itself are shown under split only, marked as chosen on the scored images (optimistic):
    under cv the epoch is chosen on the inner split, and a best epoch picked on the scored fold would undo that.
    Under each section whose runs have retrieval metrics (records of version 4 on) a small table gives them.
    """
    sub = summary[summary["dataset"] == dataset]
    if sub.empty:
        known = ", ".join(map(str, dict.fromkeys(summary["dataset"]))) or "none"
        raise ValueError(f"format_table: no runs for dataset {dataset!r} (datasets in the summary: {known})")
    several_fractions = sub["train_fraction"].nunique() > 1
    lines = [f"# {dataset}: validation accuracy per loss", "",
             "Accuracies and macro-F1 in %: mean ± sample std over the units (seeds under split, repeat × fold "
             "under cv); '95 % CI' is the interval of the mean (t over seeds; Nadeau–Bengio corrected under cv). "
             "'final' is the model at the end of training.", ""]
    for backbone, mode, protocol in _combos(sub):
        part = sub[(sub["backbone"] == backbone) & (sub["mode"] == mode) & (sub["protocol"] == protocol)]
        key, cv = (dataset, backbone, mode, protocol), protocol == "cv"
        compared = part["train_fraction"].max()
        n_test = part.loc[part["train_fraction"] == compared, "num_valid"].dropna().min()
        hashes = ", ".join(h for h in dict.fromkeys(part["weights_hash"]) if h)
        heading = f"## {dataset} — backbone {backbone}, mode {mode}" + (", protocol cv (repeated K-fold)" if cv else "")
        details = []
        if np.isfinite(n_test):
            details.append(f"{'scored images per fold: ≥ ' if cv else 'valid images: '}{int(n_test)} "
                           f"(one = {resolution(n_test)})")
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
        vs = _vs_baseline(comparison, key) if comparison is not None else None
        best = _best(comparison, key)
        header = (["loss"] + (["train fraction"] if several_fractions else [])
                  + ["runs" if cv else "seeds", "final top-1", "95 % CI"]
                  + ([f"vs {comparison.baseline}"] if vs is not None else []) + ["top-3", "macro-F1"]
                  + ([] if cv else ["best top-1 †", "best epoch †"]) + ["train s"])
        rows = []
        for row in part.itertuples(index=False):
            at_compared = row.train_fraction == compared
            marked = best is not None and at_compared and row.loss in best.indistinguishable
            ci = _interval(*_accuracy_interval(row))
            rows.append([str(row.loss) + (f" {MARK}" if marked else "")]
                        + ([f"{row.train_fraction:g}"] if several_fractions else [])
                        + [_seeds_cell(row), _pct(row.top1_mean, row.top1_std), ci]
                        + ([_vs_cell(row.loss, vs, comparison.baseline) if at_compared else "—"]
                           if vs is not None else [])
                        + [_pct(row.top3_mean, row.top3_std), _pct(row.f1_mean, row.f1_std)]
                        + ([] if cv else [_pct(row.best_top1_mean, row.best_top1_std), _epoch(row.best_epoch_mean)])
                        + [_num(row.train_seconds_mean)])
        lines += _md_table(header, rows, ["l"] + ["r"] * (len(header) - 1)) + [""]
        legend = [] if cv else ["† the best epoch, chosen on the scored images themselves: optimistic, for scale."]
        if comparison is not None:
            legend.insert(0, f"vs {comparison.baseline}: mean paired difference in points [95 % interval] and its "
                             f"Holm-adjusted p ({TEST_NAME[protocol]}, over the losses compared with "
                             f"{comparison.baseline}).")
            if best is not None:
                legend.insert(0, f"{MARK} not significantly worse than the best loss, {best.best} "
                                 f"(all pairs, Holm, α = {comparison.alpha:g}).")
            lines += [" ".join(legend), ""] + verdicts(comparison, key, n_test) + [""]
        elif legend:
            lines += legend + [""]
        if _has_retrieval(part):
            lines += _retrieval_table(part, several_fractions)
    return "\n".join(lines)


def format_combined(summary: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Rows losses, columns datasets, final valid top-1; one section per (backbone, mode, protocol, fraction)."""
    datasets = list(dict.fromkeys(summary["dataset"]))
    lines = ["# Final valid top-1 (%) per loss and dataset", "",
             "Mean ± sample std over the units (seeds under split, repeat × fold under cv).", ""]
    csv_rows = []
    sections = list(dict.fromkeys(zip(summary["backbone"], summary["mode"], summary["protocol"],
                                      summary["train_fraction"])))
    sections.sort(key=lambda s: -s[3])
    losses = list(dict.fromkeys(summary["loss"]))
    for backbone, mode, protocol, frac in sections:
        part = summary[(summary["backbone"] == backbone) & (summary["mode"] == mode)
                       & (summary["protocol"] == protocol) & (summary["train_fraction"] == frac)]
        lines += [f"## backbone {backbone}, mode {mode}, train fraction {frac:g}"
                  + (", protocol cv" if protocol == "cv" else ""), ""]
        rows = []
        for loss in losses:
            cells = part[part["loss"] == loss]
            if cells.empty:
                continue
            row_md, row_csv = [str(loss)], {"backbone": backbone, "mode": mode, "protocol": protocol,
                                            "train_fraction": frac, "loss": loss}
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
                row_csv.update({f"{ds}_{name}_mean": c[f"{name}_mean"] for name in RETRIEVAL_METRICS})
            rows.append(row_md)
            csv_rows.append(row_csv)
        lines += _md_table(["loss"] + datasets, rows, ["l"] + ["r"] * len(datasets)) + [""]
        if _has_retrieval(part):
            lines += [f"Retrieval on the final model's embeddings, {' / '.join(RETRIEVAL_HEADERS.values())} (%, "
                      f"means; each dataset's accuracy.md has them with their spread):", ""]
            rows = []
            for loss in losses:
                cells = part[part["loss"] == loss]
                if cells.empty:
                    continue
                means = {ds: cells[cells["dataset"] == ds] for ds in datasets}
                rows.append([str(loss)] + ["—" if cell.empty else
                                           " / ".join(_pct(cell.iloc[0][f"{name}_mean"]) for name in RETRIEVAL_METRICS)
                                           for cell in means.values()])
            lines += _md_table(["loss"] + datasets, rows, ["l"] + ["r"] * len(datasets)) + [""]
    return "\n".join(lines), pd.DataFrame(csv_rows)


def write_tables(summary: pd.DataFrame, out_dir, comparison=None) -> list[Path]:
    """Write ``summary.csv``, ``<dataset>/accuracy.csv|md`` and, with several datasets,
    ``accuracy_all.csv|md`` under ``out_dir``, and with ``comparison`` (``stats.compare_runs``) what
    ``write_comparison`` writes; return the paths written."""
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
        md_path.write_text(format_table(summary, ds, comparison), encoding="utf-8")
        written += [csv_path, md_path]
    if len(datasets) > 1:
        md, table = format_combined(summary)
        md_path, csv_path = out_dir / "accuracy_all.md", out_dir / "accuracy_all.csv"
        md_path.write_text(md, encoding="utf-8")
        table.to_csv(csv_path, index=False, float_format="%.6g")
        written += [md_path, csv_path]
    if comparison is not None:
        written += write_comparison(summary, comparison, out_dir)
    return written


FOLDS_HEADER = "dataset,path,sha256,repeat,fold"


def _concatenated_folds(folder: Path) -> str | None:
    """OUT/folds/*.csv (written by the run command under cv) as one CSV, or None when there is none."""
    parts = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not parts:
        return None
    lines = [FOLDS_HEADER]
    for path in parts:
        head, _, body = path.read_text(encoding="utf-8").partition("\n")
        if head.strip() != FOLDS_HEADER:
            raise ValueError(f"{path} does not start with the header {FOLDS_HEADER!r}; it is not a folds file")
        lines += [line for line in body.splitlines() if line]
    return "\n".join(lines) + "\n"


def write_comparison(summary: pd.DataFrame, comparison, out_dir) -> list[Path]:
    """The comparison's files under ``out_dir``: ``scores.csv`` (``comparison.scores``: one row per finished run
    compared, the input of ``significance.compare``), ``comparison.csv`` (its paired comparisons),
    ``ranks.csv`` (the header alone when no (backbone, mode, protocol) has two datasets), ``folds.csv`` (the
    concatenated ``OUT/folds/*.csv``, when there are any) and ``<dataset>/accuracy.tex``."""
    out_dir = Path(out_dir)
    files = {"scores.csv": comparison.scores.to_csv(index=False),
             "comparison.csv": comparison.pairs.to_csv(index=False, float_format="%.6g"),
             "ranks.csv": comparison.ranks.to_csv(index=False, float_format="%.6g")}
    folds = _concatenated_folds(out_dir / "folds")
    if folds is not None:
        files["folds.csv"] = folds
    for ds in dict.fromkeys(summary["dataset"]):
        files[f"{safe_name(ds)}/accuracy.tex"] = format_latex(summary, ds, comparison)
    for name, text in files.items():
        write_text_atomically(out_dir / name, text)
    return [out_dir / name for name in files]


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text) -> str:
    return "".join(_TEX.get(c, c) for c in str(text))


def _tex_points(x, sign=False) -> str:
    return "---" if x is None or not np.isfinite(x) else f"${100 * x:{'+' if sign else ''}.1f}$"


def format_latex(summary: pd.DataFrame, dataset: str, comparison) -> str:
    """A booktabs table of one dataset for a write-up to \\input: per (backbone, mode, protocol) a row per loss
    at the compared (largest) train fraction with its mean top-1 and 95 % interval, the paired difference
    against the baseline with its interval and Holm p, $^\\bullet$ on the losses not significantly
    worse than the best, and the mean retrieval metrics (P@1, R-prec, MAP@R)."""
    sub = summary[summary["dataset"] == dataset]
    baseline = _tex(comparison.baseline)
    lines = [f"% {_tex(dataset)}: final top-1 per loss, written by python -m evaluation.report; needs "
             r"\usepackage{booktabs}", r"\begin{tabular}{lrrrrrr}", r"\toprule",
             rf"Loss & Top-1 (\%) [95\,\% CI] & $\Delta$ vs {baseline} (points) [95\,\% CI] & $p_\mathrm{{Holm}}$ & "
             + " & ".join(_tex(h) + r" (\%)" for h in RETRIEVAL_HEADERS.values()) + r" \\"]
    tests = []
    for backbone, mode, protocol in _combos(sub):
        key = (dataset, backbone, mode, protocol)
        part = sub[(sub["backbone"] == backbone) & (sub["mode"] == mode) & (sub["protocol"] == protocol)]
        part = part[part["train_fraction"] == part["train_fraction"].max()]
        vs, best = _vs_baseline(comparison, key), _best(comparison, key)
        tests.append(TEST_NAME[protocol])
        fraction = part["train_fraction"].iloc[0]
        label = f"{backbone}, {mode}, {'repeated K-fold CV' if protocol == 'cv' else 'seeds on one split'}"
        label += f", {100 * fraction:g}% of train" if fraction != 1.0 else ""
        lines += [r"\midrule", rf"\multicolumn{{7}}{{l}}{{\emph{{{_tex(label)}}}}} \\"]
        for row in part.itertuples(index=False):
            name = _tex(row.loss) + (r"$^\bullet$" if best is not None and row.loss in best.indistinguishable else "")
            mean = _tex_points(row.top1_mean)
            if best is not None and row.loss == best.best:
                mean = rf"$\mathbf{{{mean.strip('$')}}}$"
            low, high = _accuracy_interval(row)
            ci = f"[{_tex_points(low)}, {_tex_points(high)}]" if np.isfinite(row.top1_ci95) else ""
            if row.loss in vs.index:
                r = vs.loc[row.loss]
                diff = _tex_points(r.mean_diff, sign=True) + (
                    f" [{_tex_points(r.ci_low, sign=True)}, {_tex_points(r.ci_high, sign=True)}]"
                    if np.isfinite(r.ci_low) else "")
                p = _p(r.p_holm).replace("< ", "$<$\\,").replace("—", "---")
            else:
                diff, p = ("baseline" if row.loss == comparison.baseline else "---"), "---"
            retrieval = " & ".join(_tex_points(getattr(row, f"{m}_mean", math.nan)) for m in RETRIEVAL_METRICS)
            lines.append(f"{name} & {mean} {ci} & {diff} & {p} & {retrieval} \\\\")
    lines += [r"\bottomrule",
              rf"\multicolumn{{7}}{{l}}{{\footnotesize Bold: best mean; $^\bullet$: not significantly worse than "
              rf"the best (Holm, $\alpha = {comparison.alpha:g}$); tests: {_tex(', '.join(dict.fromkeys(tests)))}; "
              rf"P@1, R-prec, MAP@R: retrieval on the final embeddings (means; --- where not measured).}} \\",
              r"\end{tabular}", ""]
    return "\n".join(lines)


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
