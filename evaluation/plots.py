"""The report's PNG plots: loss and accuracy curves and the fraction study; ``draw_plots`` draws them and
the comparison figures of ``comparison_plots`` (differences against the baseline, critical-difference
diagrams, confusion matrices).

Accuracies are percentages here. ``plot_name`` is the one place a plot's file name is made,
so that RESULTS.md (``evaluation.results``) links the files the report drew. A stamp file in
the plots folder (``PLOTS_STAMP``) records what each results folder's report drew, so that a
report with nothing new reuses the drawing and a changed one deletes its stale plots.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import significance
from . import stats as _stats
from .files import safe_name, write_text_atomically
from .records import protocol_of
from .stats import as_float
from .tables import plural

DPI = 120
PLOTS_STAMP = ".plots-stamp.json"


def _loss_colors(losses) -> dict:
    """The same colour for a loss in every figure. tab10 without its grey, which is
    kept for the context lines; then darker extras for long loss lists."""
    from matplotlib import colormaps
    tab10 = colormaps["tab10"].colors
    palette = [c for i, c in enumerate(tab10) if i != 7] + ["navy", "darkgoldenrod", "teal", "maroon", "olive"]
    palette += list(colormaps["tab20b"].colors)
    return {loss: palette[i % len(palette)] for i, loss in enumerate(losses)}


class Selection(NamedTuple):
    """The records or summary rows of one figure, and what names it."""
    items: list
    dataset: str
    backbone: str
    mode: str
    protocol: str
    fraction: float
    qualified: bool  # the dataset has several (backbone, mode) under this protocol: file names carry them

    def path(self, plots_dir, kind: str, fraction: float | None = -1.0) -> Path:
        plots_dir = Path(plots_dir)
        plots_dir.mkdir(parents=True, exist_ok=True)
        backbone, mode = (self.backbone, self.mode) if self.qualified else (None, None)
        return plots_dir / plot_name(self.dataset, kind, backbone, mode, self.fraction if fraction == -1.0 else fraction,
                                     self.protocol)

    @property
    def context(self) -> str:
        text = f"{self.dataset} — {self.backbone}, {self.mode}" + (", cv" if self.protocol == "cv" else "")
        return text + (f", {100 * self.fraction:g}% of train" if self.fraction != 1.0 else "")

    @property
    def unit(self) -> str:
        return "run" if self.protocol == "cv" else "seed"


def _select(items, dataset, backbone, mode, train_fraction, what, get, protocol=None) -> Selection:
    """Narrow records/rows to one (dataset, protocol, backbone, mode, train_fraction); ``protocol`` (and
    ``backbone``/``mode``) may be left out when the dataset has only one; the fraction defaults to the largest.
    ``get(item, field)`` reads a field ("protocol" included) of an item."""
    mine = [x for x in items if get(x, "dataset") == dataset]
    if not mine:
        known = ", ".join(map(str, dict.fromkeys(get(x, "dataset") for x in items))) or "none"
        raise ValueError(f"{what}: no runs for dataset {dataset!r} (datasets present: {known})")
    protocols = list(dict.fromkeys(get(x, "protocol") for x in mine))
    if protocol is None and len(protocols) > 1:
        raise ValueError(f"{what}: dataset {dataset!r} has runs under the protocols {protocols}; pass protocol=")
    protocol = protocols[0] if protocol is None else protocol
    mine = [x for x in mine if get(x, "protocol") == protocol]
    if not mine:
        raise ValueError(f"{what}: no runs for {dataset!r} under protocol {protocol!r}; present: {protocols}")
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
    return Selection(selected, dataset, backbone, mode, protocol, train_fraction, len(combos) > 1)


ALL_DATASETS = "all_datasets"  # the first part of the name of a figure over every dataset (a kind no dataset has)


def plot_name(dataset, kind, backbone=None, mode=None, fraction=None, protocol=None) -> str:
    """The file name of a plot: backbone and mode are in it when given (a dataset with several
    (backbone, mode) combinations), the protocol unless it is "split" (the names split runs always had),
    the train fraction when given and not 1. ``dataset`` None: a figure over every dataset."""
    name = ALL_DATASETS if dataset is None else safe_name(dataset)
    if backbone is not None or mode is not None:
        name += f"_{safe_name(backbone)}_{safe_name(mode)}"
    if protocol not in (None, "split"):
        name += f"_{safe_name(protocol)}"
    if fraction is not None and fraction != 1.0:
        name += f"_frac{fraction:g}"
    return f"{name}_{kind}.png"


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


def _seed_counts(runs, unit="seed") -> str:
    ok = sum(r["status"] == "ok" for r in runs)
    failed = len(runs) - ok
    return plural(ok, unit) + (f" + {failed} failed" if failed else "")


def unit_of(rec) -> str:
    """A run's unit in words: its seed, or its repeat and fold under cv."""
    return f"seed {rec['seed']}" if rec.get("fold") is None else f"repeat {rec['seed']} fold {rec['fold']}"


def _mark_failures(ax, failed_runs, field_for_y):
    """Draw what a failed run managed before its loss went non-finite, ending in a red x."""
    for r in failed_runs:
        hist = r.get("history") or []
        if hist:
            x = [h.get("epoch") for h in hist]
            y = [as_float(h.get(field_for_y)) for h in hist]
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
        notes.append(f"{unit_of(r)} failed at epoch {r.get('failed_epoch', '?')}: {why}")
    return "\n".join(notes)


def _grid_margins(fig, height_in: float, wspace: float) -> None:
    """Fixed margins for the panel grids: constrained layout took most of the report's time."""
    fig.subplots_adjust(left=0.06, right=0.94, bottom=0.5 / height_in, top=1 - 1.0 / height_in,
                        wspace=wspace, hspace=0.5)


def plot_loss_curves(runs: list[dict], dataset: str, plots_dir, backbone=None, mode=None,
                     train_fraction=None, protocol=None) -> Path:
    """One panel per loss (each with its own y axis): train and valid loss per epoch,
    mean over seeds with a min–max band; failed runs dotted red, ending in a red x.
    For L-Softmax, λ per epoch is drawn on a right-hand axis.

    `protocol`/`backbone`/`mode` are needed only when the dataset has several; `train_fraction`
    defaults to the largest present. Returns the PNG path.
    """
    sel = _select(runs, dataset, backbone, mode, train_fraction, "plot_loss_curves", _record_get, protocol)
    runs = sel.items
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
        ax.set_title(f"{loss} ({_seed_counts(mine, sel.unit)})", fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        # A loss that starts orders of magnitude above where it ends (margin losses,
        # or a run diverging before it failed) flattens everything else on a linear axis.
        ys = np.array([as_float(h.get(k)) for r in mine for h in (r.get("history") or [])
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
    return _save_panels(fig, f"{sel.context}: train/valid loss per epoch (mean over {plural(max_seeds, sel.unit)})"
                             f"\nband = min–max over {sel.unit}s; after early stopping, over the {sel.unit}s that "
                             f"reached the epoch", sel.path(plots_dir, "loss_curves"))


def _save_panels(fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=DPI)
    return path


def plot_accuracy_curves(runs: list[dict], dataset: str, plots_dir, backbone=None, mode=None,
                         train_fraction=None, protocol=None) -> Path:
    """Valid top-1 (%) per epoch: one panel per loss (shared y axis) with its mean over
    seeds and a min–max band, the other losses' means in grey behind it for
    comparison (ten overlapping bands on one axes are unreadable), failed runs
    dotted, ending in an x. Same selection rules as ``plot_loss_curves``."""
    sel = _select(runs, dataset, backbone, mode, train_fraction, "plot_accuracy_curves", _record_get, protocol)
    runs = sel.items
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
                ax.plot([h.get("epoch") for h in hist], [100 * as_float(h.get("valid_top1")) for h in hist],
                        color="black", linestyle=":", linewidth=1.2)
                ax.plot([hist[-1].get("epoch")], [100 * as_float(hist[-1].get("valid_top1"))],
                        marker="x", color="black", markersize=8, mew=2)
        if failed:
            ax.text(0.98, 0.03, _failure_note(failed), transform=ax.transAxes, fontsize=7.5,
                    color="black", va="bottom", ha="right",
                    bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
        ax.set_title(f"{loss} ({_seed_counts(mine, sel.unit)})", fontsize=11)
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=True, labelleft=True)
    for i, ax in enumerate(axes):
        if i >= len(losses):
            ax.set_visible(False)
        elif i % ncols == 0:
            ax.set_ylabel("valid top-1 (%)")
        if i < len(losses):
            ax.set_xlabel("epoch")
    return _save_panels(fig, f"{sel.context}: valid top-1 per epoch (mean over {plural(max_seeds, sel.unit)})"
                             f"\nband = min–max over {sel.unit}s; grey = the other losses' "
                             f"means; black dotted = failed run",
                        sel.path(plots_dir, "accuracy_curves"))


def _summary_get(row, field):
    return row[field]


def _record_get(rec, field):
    return protocol_of(rec) if field == "protocol" else rec[field]


def _failed_suffix(n: int) -> str:
    return "" if n == 0 else f" ({n} failed run{'s' if n > 1 else ''} left out)"


def plot_fraction_study(summary: pd.DataFrame, dataset: str, plots_dir, backbone=None,
                        mode=None, protocol=None) -> Path | None:
    """Final valid top-1 (%) vs train fraction, one line per loss with std error bars.
    None when the dataset (for this protocol, backbone and mode) has only one train fraction."""
    rows = [row for _, row in summary.iterrows()]
    # _select narrows to one fraction; only its protocol/backbone/mode choice is wanted here.
    sel = _select(rows, dataset, backbone, mode, None, "plot_fraction_study", _summary_get, protocol)
    part = summary[(summary["dataset"] == dataset) & (summary["backbone"] == sel.backbone)
                   & (summary["mode"] == sel.mode) & (summary["protocol"] == sel.protocol)]
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
    ax.set_title(f"{sel._replace(fraction=1.0).context}: final valid top-1 vs amount of training data\n"
                 f"(mean ± std over {sel.unit}s)", fontsize=12)
    path = sel.path(plots_dir, "fraction_study", fraction=None)
    fig.savefig(path, dpi=DPI)
    return path


def _plots_digest(runs: list[dict], comparison) -> str:
    """What the plots are drawn from: every run record, the baseline and alpha of the comparison, the code that
    draws them and the code of the summary and the tests they show."""
    from . import comparison_plots

    digest = hashlib.sha256()
    for source in (__file__, _stats.__file__, significance.__file__, comparison_plots.__file__):
        digest.update(Path(source).read_bytes())
    what = comparison and [comparison.baseline, comparison.alpha]
    digest.update(json.dumps([runs, what], sort_keys=True, default=str).encode())
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


def draw_plots(runs: list[dict], summary: pd.DataFrame, out_dir, plots_dir, comparison=None) -> list[Path]:
    """Every plot of every dataset of ``runs`` into ``plots_dir``; returns their paths.

    Per (dataset, backbone, mode, protocol): the loss and accuracy curves, the fraction study (with several
    fractions), and with ``comparison`` (``stats.compare_runs``) the figures of ``comparison_plots``: the
    differences against the baseline and the confusion matrices; then a critical-difference diagram per
    (backbone, mode, protocol) scored on two datasets or more.

    Drawing is most of the report's time: when nothing they are drawn from changed since
    ``out_dir``'s last drawing and its files are all there, they are reused as they are.
    """
    from . import comparison_plots  # it builds on this module's selections, names and colours

    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    digest = _plots_digest(runs, comparison)
    stamps = _read_stamps(plots_dir)
    stamped = stamps.get(str(out_dir.resolve()), {"digest": None, "plots": []})
    if stamped["digest"] == digest and all((plots_dir / name).is_file() for name in stamped["plots"]):
        return [plots_dir / name for name in stamped["plots"]]
    plots = []
    for dataset in dict.fromkeys(summary["dataset"]):
        ds_runs = [r for r in runs if r["dataset"] == dataset]
        ds_summary = summary[summary["dataset"] == dataset]
        for backbone, mode, protocol in dict.fromkeys(zip(ds_summary["backbone"], ds_summary["mode"],
                                                          ds_summary["protocol"])):
            kw = dict(backbone=backbone, mode=mode, protocol=protocol)
            plots.append(plot_loss_curves(ds_runs, dataset, plots_dir, **kw))
            plots.append(plot_accuracy_curves(ds_runs, dataset, plots_dir, **kw))
            if comparison is not None:
                plots += comparison_plots.dataset_plots(ds_runs, comparison, dataset, plots_dir, **kw)
            fraction_plot = plot_fraction_study(summary, dataset, plots_dir, **kw)
            if fraction_plot is not None:
                plots.append(fraction_plot)
    if comparison is not None:
        plots += comparison_plots.plot_critical_differences(comparison, plots_dir)
    _stamp_plots(plots_dir, out_dir, digest, plots, stamps)
    return plots
