"""The comparison figures of the report: the paired differences against the baseline, the critical-difference
diagram of the losses' ranks over datasets, and the confusion matrices.

Every number on them comes from ``stats.compare_runs`` (that is, ``significance``) or from the run records;
the selection of the records, the file names (``plots.plot_name``), the colours and the resolution are those
of ``plots``, whose ``draw_plots`` draws these with the other figures and lists them in its stamp.
Accuracies are percentages here.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plots import DPI, _loss_colors, _record_get, _select, plot_name
from .significance import AVERAGE
from .stats import in_group, resolution
from .tables import plural

TEST_LABEL = {"cv": "corrected resampled t (Nadeau–Bengio)", "split": "paired t over seeds (training noise only)"}


def dataset_plots(runs: list[dict], comparison, dataset: str, plots_dir, backbone=None, mode=None,
                  protocol=None) -> list[Path]:
    """The comparison figures of one (dataset, backbone, mode, protocol) that have something to show."""
    kw = dict(backbone=backbone, mode=mode, protocol=protocol)
    drawn = [plot_differences(runs, comparison, dataset, plots_dir, **kw), plot_confusion(runs, dataset, plots_dir, **kw)]
    return [path for path in drawn if path is not None]


def _p(p) -> str:
    if not np.isfinite(p):
        return "no test"
    return "p_holm < 0.001" if p < 0.001 else f"p_holm = {p:.2g}"


def plot_differences(runs: list[dict], comparison, dataset: str, plots_dir, backbone=None, mode=None,
                     protocol=None) -> Path | None:
    """A forest plot of the paired differences against the baseline (points of top-1): per loss its mean
    difference with the 95 % interval of its test (corrected resampled t under cv, paired t over seeds under
    split) and the Holm-adjusted p beside it, every unit's own difference as a grey dot, a line at 0. The loss
    names carry their mean top-1; the title says what one scored image is worth. At the largest train
    fraction, as the comparison. None when the baseline or every other loss has no finished run there."""
    sel = _select(runs, dataset, backbone, mode, None, "plot_differences", _record_get, protocol)
    key, baseline = (dataset, sel.backbone, sel.mode, sel.protocol), comparison.baseline
    pairs = in_group(comparison.pairs, key)
    vs = pairs[pairs["family"] == "vs baseline"]
    if vs.empty:
        return None
    scores = in_group(comparison.scores, key)
    units = ["repeat", "fold"] if sel.protocol == "cv" else ["seed"]
    table = scores.pivot_table(index=units, columns="loss", values="top1", aggfunc="mean")
    means = 100 * scores.groupby("loss")["top1"].mean()
    colors = _loss_colors(list(dict.fromkeys(comparison.scores["loss"])))
    losses = list(vs["loss"])
    fig = Figure(figsize=(9, 2.0 + 0.6 * len(losses)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    xs = [0.0]
    for i, r in enumerate(vs.itertuples(index=False)):
        y = len(losses) - 1 - i  # the first loss on top
        dots = (100 * (table[r.loss] - table[baseline])).dropna().to_numpy(dtype=float)
        lift = np.linspace(0.14, 0.30, len(dots)) if len(dots) > 1 else np.full(len(dots), 0.2)  # above the bar
        ax.scatter(dots, y + lift, s=12, color="dimgrey", alpha=0.55, linewidths=0, zorder=2)
        m, low, high = 100 * r.mean_diff, 100 * r.ci_low, 100 * r.ci_high
        err = [[m - low], [high - m]] if np.isfinite(low) and np.isfinite(high) else None
        ax.errorbar([m], [y], xerr=err, fmt="D", color=colors[r.loss], markersize=7, capsize=5, elinewidth=1.8,
                    zorder=3)
        xs += [v for v in (m, low, high, *dots) if np.isfinite(v)]
    ax.axvline(0, color="black", linewidth=1.0, zorder=1)
    span = max(1.0, max(xs) - min(xs))
    ax.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.08 * span)
    ax.set_ylim(-0.7, len(losses) - 0.3)
    positions = list(range(len(losses) - 1, -1, -1))
    ax.set_yticks(positions, [f"{loss}  ({means.get(loss, math.nan):.1f} %)" for loss in losses])
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(positions, [_p(p) if np.isfinite(p) else f"n = {n}: no test"
                                 for p, n in zip(vs["p_holm"], vs["n"])])
    ax.set_xlabel(f"top-1 of the loss minus top-1 of {baseline} (points)")
    ax.grid(axis="x", alpha=0.3)
    n_test = scores["n_test"].dropna()
    n = int(vs["n"].max())
    title = (f"{sel.context}: paired differences against {baseline} ({means.get(baseline, math.nan):.1f} %)\n"
             f"mean and 95 % interval, {TEST_LABEL[sel.protocol]}\n"
             f"p Holm-adjusted over {plural(len(losses), 'comparison')}; grey = single {sel.unit}s (n = {n})")
    if len(n_test):
        title += f"; one scored image = {resolution(n_test.min())}"
    fig.suptitle(title, fontsize=10.5)  # centred on the figure, not the axes, which the p-values offset
    path = sel.path(plots_dir, "differences")
    fig.savefig(path, dpi=DPI)
    return path


def _cliques(ranks: np.ndarray, cd: float) -> list[tuple[int, int]]:
    """(first, last) indices of the maximal runs of losses, sorted by average rank, whose ranks lie within the
    critical difference of each other: the groups Demšar's diagram joins with a bar."""
    out = []
    for i in range(len(ranks)):
        j = max(j for j in range(i, len(ranks)) if ranks[j] - ranks[i] <= cd)
        if j > i and not (out and out[-1][1] >= j):
            out.append((i, j))
    return out


def plot_critical_differences(comparison, plots_dir) -> list[Path]:
    """One critical-difference diagram (Demšar, JMLR 7, 2006) per (backbone, mode, protocol) ranked over two
    datasets or more (``comparison.ranks``): the losses' average ranks on an axis (1 = best), the Nemenyi
    critical difference as a bar, and the losses whose ranks lie within it of each other joined by a thick line.
    The title gives N and the Friedman and Iman–Davenport p."""
    ranks = comparison.ranks
    colors = _loss_colors(list(dict.fromkeys(comparison.scores["loss"])))
    paths = []
    for (backbone, mode, protocol), group in ranks.groupby(["backbone", "mode", "protocol"], sort=False):
        avg = group[group["dataset"] == AVERAGE].sort_values("rank", kind="stable")
        cd = float(avg["cd"].iloc[0]) if len(avg) else math.nan
        if len(avg) < 2 or not np.isfinite(cd):
            continue
        paths.append(_cd_diagram(avg, cd, (backbone, mode, protocol), colors, comparison.alpha, Path(plots_dir)))
    return paths


def _cd_diagram(avg: pd.DataFrame, cd: float, key: tuple, colors: dict, alpha: float, plots_dir: Path) -> Path:
    backbone, mode, protocol = key
    names, r = list(avg["loss"]), avg["rank"].to_numpy(dtype=float)
    k, half = len(names), math.ceil(len(names) / 2)
    cliques = _cliques(r, cd)
    step, first = 0.32, -(0.3 + 0.12 * len(cliques))  # label rows below the clique bars
    row = avg.iloc[0]
    fr = "—" if not np.isfinite(row.friedman_p) else f"{row.friedman_p:.2g}"
    fid = "—" if not np.isfinite(row.iman_davenport_p) else f"{row.iman_davenport_p:.2g}"
    title = [f"{backbone}, {mode}, {protocol}: average rank of each loss over N = {int(row.n_datasets)} datasets "
             f"(1 = best)", f"Friedman p = {fr}, Iman–Davenport p = {fid}; Nemenyi CD at α = {alpha:g}: losses "
             f"joined by a bar are not significantly different"]
    title += textwrap.wrap(row.note, 110) if isinstance(row.note, str) else []
    data_height = 1.2 - first + step * (half + 0.5)  # from the CD label down to the last label row
    height = 0.25 * len(title) + 0.3 + 0.75 * data_height
    fig = Figure(figsize=(10, height), dpi=DPI)
    fig.suptitle("\n".join(title), fontsize=10, y=1 - 0.08 / height, va="top")
    ax = fig.add_axes((0.01, 0.1 / height, 0.98, 0.75 * data_height / height))
    ax.axis("off")
    width = k - 1
    ax.set_xlim(1 - 0.6 * width, max(k, 1 + cd) + 0.6 * width)
    ax.set_ylim(first - step * (half + 0.5), 1.1)
    ax.hlines(0, 1, k, color="black", linewidth=1.2)
    for t in range(1, k + 1):
        ax.vlines(t, 0, 0.12, color="black", linewidth=1)
        ax.text(t, 0.17, str(t), ha="center", va="bottom", fontsize=9)
    ax.hlines(0.75, 1, 1 + cd, color="black", linewidth=2)
    ax.vlines([1, 1 + cd], 0.68, 0.82, color="black", linewidth=1.5)
    ax.text(1 + cd / 2, 0.88, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for level, (i, j) in enumerate(cliques):
        y = -0.12 - 0.12 * level
        ax.hlines(y, r[i] - 0.04, r[j] + 0.04, color="black", linewidth=4)
    for i, (name, rank) in enumerate(zip(names, r)):
        left = i < half
        row = i if left else k - 1 - i
        y = first - step * row
        edge = 1 - 0.1 * width if left else k + 0.1 * width
        ax.plot([rank, rank, edge], [0, y, y], color=colors.get(name, "black"), linewidth=1.2)
        ax.plot([rank], [0], "o", color=colors.get(name, "black"), markersize=5)
        ax.text(edge + (-0.03 if left else 0.03) * width, y, f"{name} ({rank:.2f})", fontsize=9.5,
                ha="right" if left else "left", va="center")
    path = plots_dir / plot_name(None, "critical_difference", backbone, mode, protocol=protocol)
    plots_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_confusion(runs: list[dict], dataset: str, plots_dir, backbone=None, mode=None, protocol=None,
                   train_fraction=None) -> Path | None:
    """One panel per loss: its confusion matrix (rows = true class) summed over its finished units, each row
    divided by the class's images, with each class's recall written on the diagonal (and confusions of 10 % or
    more off it, up to 15 classes). At the largest train fraction unless told; None when no run has a matrix."""
    sel = _select(runs, dataset, backbone, mode, train_fraction, "plot_confusion", _record_get, protocol)
    sums: dict[str, np.ndarray] = {}
    units: dict[str, int] = {}
    classes = None
    for r in sel.items:
        matrix = (r.get("final") or {}).get("confusion") if r["status"] == "ok" else None
        a = np.asarray(matrix if matrix is not None else [], dtype=float)
        if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape != sums.get(r["loss"], a).shape:
            continue
        sums[r["loss"]] = sums.get(r["loss"], 0) + a
        units[r["loss"]] = units.get(r["loss"], 0) + 1
        classes = classes or (list(r["classes"]) if len(r.get("classes") or []) == len(a) else None)
    if not sums:
        return None
    k = len(next(iter(sums.values())))
    labels = classes or [str(i) for i in range(k)]
    losses = list(sums)
    ncols = min(4, len(losses))
    nrows = math.ceil(len(losses) / ncols)
    side = max(2.4, 0.28 * k + 1.4)  # inches of one square panel; around it, room for class names and titles
    left, right, top, bottom, gap_w, gap_h = 1.2, 1.3, 1.2, 1.1, 1.3, 1.6
    width = left + right + ncols * side + (ncols - 1) * gap_w
    height = top + bottom + nrows * side + (nrows - 1) * gap_h
    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap_w / side, hspace=gap_h / side)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    image = None
    for ax, loss in zip(axes, losses):
        counts = sums[loss]
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for i in range(k):
            for j in range(k):
                if i == j or (k <= 15 and share[i, j] >= 0.10):
                    ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center",
                            fontsize=9 if i == j else 7.5, fontweight="bold" if i == j else "normal",
                            color="white" if share[i, j] > 0.6 else ("black" if i == j else "crimson"))
        shown = k <= 30
        ax.set_xticks(range(k), labels if shown else [], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels if shown else [], fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{loss}\n{int(counts.sum())} scored images over {plural(units[loss], sel.unit)}", fontsize=10)
    for ax in axes[len(losses):]:
        ax.set_visible(False)
    bar = fig.add_axes((1 - (right - 0.3) / width, bottom / height, 0.15 / width, 1 - (top + bottom) / height))
    fig.colorbar(image, cax=bar, label="share of the true class's images")
    fig.suptitle(f"{sel.context}: confusion matrices summed over {sel.unit}s, rows normalised\n"
                 f"diagonal = recall of each class (%); off it, in red, confusions of 10 % or more", fontsize=11)
    path = sel.path(plots_dir, "confusion")
    fig.savefig(path, dpi=DPI)
    return path
