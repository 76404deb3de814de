"""Regenerate RESULTS.md, results/summary.csv and plots/ from scratch: ``python -m evaluation.results``.

It runs the grid of ``evaluation.run`` commands below (resumable: finished runs are
skipped, so a killed regeneration continues where it stopped), then writes RESULTS.md
from ``results/summary.csv``: every number in it comes from those runs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .files import write_text_atomically

HEARTBEAT_SECONDS = 60  # how stale the ledger of a sitting killed by SIGKILL can be

if TYPE_CHECKING:  # config imports torch and the harness; results.py's own command loads them only when it runs
    from .config import RunConfig

# The grid: one RunConfig file per evaluation.run command, run in name order. Its settings also
# feed the prose of RESULTS.md (backbone, seeds, epochs, layer width, views), so they live only there.
GRID = Path(__file__).resolve().parent.parent / "configs" / "results"


def grid_configs() -> list[tuple[Path, "RunConfig"]]:
    from .config import RunConfig

    return [(path, RunConfig.load(path)) for path in sorted(GRID.glob("*.yaml"))]


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# The published comparison (ResNet-50, ImageNet weights, one run each), valid top-1 in %.
PUBLISHED = {
    "cosine": {"weather": 98, "fruits": 88, "covid": 91},
    "cross_entropy": {"weather": 97, "fruits": 92, "covid": 94},
    "am_softmax": {"weather": 97, "fruits": 90, "covid": 89},
}


def grid_commands(out: Path, plots: Path) -> list[list[str]]:
    return [["--config", _shown(path), "--out", str(out), "--plots", str(plots)] for path, _ in grid_configs()]


def _main_config():
    """The grid's first configuration on the archive split, for the facts RESULTS.md states."""
    from .config import EPOCHS

    config = next(c for _, c in grid_configs() if c.protocol == "split")
    return config, {mode: EPOCHS[mode] if config.epochs is None else config.epochs for mode in EPOCHS}


def _pct(mean, std=None, ci=None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{100 * mean:.1f}"
    if std is not None and not math.isnan(std):
        text += f" ± {100 * std:.1f}"
    if ci is not None and not math.isnan(ci):
        text += f" [{100 * (mean - ci):.1f}, {100 * (mean + ci):.1f}]"
    return text


def _curve_reading(runs: list[dict], dataset: str, mode: str, loss: str) -> dict:
    """Seed means read off the full-data histories of one (dataset, mode, loss).

    rise: how far the valid loss ended above its lowest epoch, relative to that lowest value
    (over-fitting shows as a valid loss that turns up while the train loss keeps falling);
    ratio: valid / train loss at the last epoch; epochs: the first epoch whose valid top-1
    came within 1 point of the run's best.
    """
    rises, ratios, epochs = [], [], []
    for r in runs:
        if (r["dataset"], r["mode"], r["loss"]) != (dataset, mode, loss) or r["train_fraction"] != 1.0 \
                or r["status"] != "ok" or not r["history"]:
            continue
        valid = [h["valid_loss"] for h in r["history"]]
        last = r["history"][-1]
        rises.append((valid[-1] - min(valid)) / abs(min(valid)) if min(valid) else 0.0)
        ratios.append(last["valid_loss"] / last["train_loss"] if last["train_loss"] else math.nan)
        best = max(h["valid_top1"] for h in r["history"])
        epochs.append(next(h["epoch"] for h in r["history"] if h["valid_top1"] >= best - 0.01))
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return {"rise": mean(rises), "ratio": mean(ratios), "epochs": mean(epochs)}


def _plot(plots: Path, dataset: str, mode: str, kind: str) -> str:
    """The plot's file name: qualified by backbone and mode once a dataset has runs in both modes."""
    from .plots import plot_name

    qualified = plot_name(dataset, kind, _main_config()[0].backbone, mode)
    return qualified if (plots / qualified).exists() else plot_name(dataset, kind)


MODES = ("frozen", "finetune")
OVERFIT_RISE = 0.10  # a valid loss ending 10 % above its lowest epoch counts as over-fitting


def _count_records(out: Path) -> int:
    return sum(1 for _ in (out / "runs").glob("**/*.json")) if (out / "runs").is_dir() else 0


def regeneration_time(ledger: list[dict]) -> str:
    """What results/regeneration_log.json says about the time to regenerate everything."""
    if (not ledger or ledger[0]["runs_before"] != 0 or not ledger[-1]["finished"]
            or any(e["seconds"] is None for e in ledger)):
        return ("No regeneration from an empty results/ has been timed to its end yet (`python -m evaluation.results` "
                "logs each sitting in results/regeneration_log.json).")
    minutes = sum(e["seconds"] for e in ledger) / 60
    cache = "an empty" if ledger[0]["cache_entries_before"] == 0 else "a warm"
    return (f"Regenerating everything from an empty results/ and {cache} feature cache took {minutes:.0f} min here "
            f"(wall time of {len(ledger)} sitting{'s' if len(ledger) > 1 else ''} of `python -m evaluation.results` "
            f"on the project's 2-core CPU, results/regeneration_log.json).")


def _shortfalls(cells: list, runs: list[dict]) -> list[str]:
    """Where the better mode stays below the published value: what was tried, and how far off it is."""
    from .tables import plural

    lines = ["### Where we fall short", "",
             "Tried for each of these cells: the frozen backbone and fine-tuning its last two stages (both in the "
             "table above), every seed of each. For scale, the best single seed, and what picking each seed's best "
             "epoch on the valid set itself would give (more optimistic still than our numbers, which are the last "
             "epoch's, with the stopping epoch decided on the valid loss):", ""]
    for loss, dataset, value, row in cells:
        mine = [r for r in runs if r["dataset"] == dataset and r["loss"] == loss and r["mode"] == row["mode"]
                and float(r["train_fraction"]) == 1.0 and r["status"] == "ok"]
        if not mine:
            continue
        best_epoch = [100 * r["best_valid_top1"] for r in mine]
        n_valid = int(mine[0]["num_valid"])
        gap = (value / 100 - row.top1_mean) * n_valid
        lines.append(
            f"- **{loss} on {dataset}** (published {value} %, one run): {row['mode']} {_pct(row.top1_mean)} % over "
            f"{plural(int(row.seeds), 'seed')}; best seed {max(100 * r['final']['valid_top1'] for r in mine):.1f} %; best "
            f"epoch per seed, chosen on valid, {sum(best_epoch) / len(best_epoch):.1f} %. The valid set has "
            f"{n_valid} images (one is {100 / n_valid:.2f} points): the mean is {gap:.1f} images short.")
    return lines + [""]


def _verdicts(summary, runs: list[dict], plots: Path) -> list[str]:
    """The cross-validated answer to "which loss?": per dataset and mode, every loss's mean with its corrected
    interval and its paired difference to cross-entropy, the verdict in words; then the ranks across datasets."""
    from . import stats, tables
    from .metrics import RETRIEVAL_METRICS
    from .plots import plot_name

    cv_runs = [r for r in runs if r.get("protocol") == "cv"]
    if not cv_runs:
        return ["## Which loss? (cross-validation)", "", "No cross-validated runs yet: `python -m evaluation.results` "
                "runs them first (configs/results/1-cv-frozen.yaml).", ""]
    comparison = stats.compare_runs(cv_runs, "cross_entropy")
    cv = summary[summary["protocol"] == "cv"] if "protocol" in summary else summary.iloc[0:0]
    configs = [c for _, c in grid_configs() if c.protocol == "cv"]
    folds = ", ".join(sorted({f"{c.mode}: {c.folds} folds × {tables.plural(c.repeats, 'repeat')}" for c in configs}))
    lines = ["## Which loss? (cross-validation)", "",
             f"The verdicts: each dataset's labelled images pooled and dealt into stratified folds ({folds}; "
             f"byte-identical images in one fold), the same folds for every loss. Each run chooses its epoch on a "
             f"held-out part of its training folds and is scored on the fold it never saw. Means ± std over the runs, "
             f"95 % intervals and paired differences to cross_entropy by the Nadeau–Bengio corrected resampled t-test "
             f"(Holm-adjusted over the losses; ● = not significantly worse than the best loss). The files behind "
             f"every test: results/scores.csv, results/comparison.csv, results/folds.csv.", ""]
    # The retrieval metrics have their own section (retrieval_report), with their paired tests.
    cv = cv.drop(columns=[c for c in cv.columns if c.startswith(RETRIEVAL_METRICS)])
    for i, dataset in enumerate(dict.fromkeys(cv["dataset"])):
        table = tables.format_table(cv, dataset, comparison).splitlines()
        body = table[table.index("") + 1:]
        if i:  # the legend paragraph once, above the first dataset's tables
            body = body[body.index("") + 1:]
        lines += ["#" + line if line.startswith("#") else line for line in body] + [""]
    for backbone, mode in dict.fromkeys(zip(cv["backbone"], cv["mode"])):
        ranks = comparison.ranks[(comparison.ranks["backbone"] == backbone) & (comparison.ranks["mode"] == mode)]
        average = ranks[ranks["dataset"] == "(average)"].sort_values("rank")
        if average.empty:
            continue
        r0 = average.iloc[0]
        lines += [f"### Across the datasets — {mode}", "",
                  f"Average rank over {int(r0.n_datasets)} datasets (1 = best): "
                  + ", ".join(f"{row.loss} {row['rank']:.2f}" for _, row in average.iterrows())
                  + f". Friedman χ² p = {r0.friedman_p:.3g}, Iman–Davenport p = {r0.iman_davenport_p:.3g}; Nemenyi "
                  f"critical difference {r0.cd:.2f} ranks at α = 0.05. With three datasets these tests have little "
                  f"power: losses closer than the critical difference cannot be told apart.", "",
                  f"![critical differences, {mode}](plots/{plot_name(None, 'critical_difference', backbone, mode, protocol='cv')})", ""]
    return lines


def write_results_md(out: Path, plots: Path, path: Path, commands: list[list[str]], ledger: list[dict]) -> None:
    import pandas as pd

    from . import records, retrieval_report
    from .config import DISTIL_FROM
    from .distil_report import distil_section

    summary = pd.read_csv(out / "summary.csv")
    runs = records.load_runs(out)
    lines = ["# Results", "",
             "Generated by `python -m evaluation.results` from `results/summary.csv` (do not edit by hand). "
             "The runs behind it:", "", "```"]
    lines += ["python -m evaluation.run " + " ".join(c) for c in commands]
    lines += ["```", ""]
    lines += [regeneration_time(ledger), ""]
    spent = {}
    for r in runs:
        n, total = spent.get(r["mode"], (0, 0.0))
        spent[r["mode"]] = (n + 1, total + float(r.get("train_seconds") or 0.0))
    lines += ["Training time in the run records (`train_seconds`, feature extraction not included): "
              + "; ".join(f"{mode} {n} runs, {total / 60:.0f} min" for mode, (n, total) in spent.items()) + ".", ""]
    config, epochs = _main_config()
    # The sections below are the main backbone's losses; other backbones' runs (the distillation study's
    # teacher) and the runs distilled from them have their own section at the end.
    others = [r for r in runs if r["backbone"] != config.backbone or r["loss"].startswith(DISTIL_FROM)]
    runs = [r for r in runs if r["backbone"] == config.backbone and not r["loss"].startswith(DISTIL_FROM)]
    summary = summary[(summary["backbone"] == config.backbone) & ~summary["loss"].str.startswith(DISTIL_FROM)]
    lines += [f"Backbone **{config.backbone}** (ImageNet weights, offline) in two modes: **frozen** (the head, after a "
              f"{config.hidden}-wide MLP layer, trains on cached pooled features of {config.views} augmented views per "
              f"image, {epochs['frozen']} epochs) and **finetune** (`--unfreeze last`: the backbone's last two stages "
              f"train too, {epochs['finetune']} epochs, on cached outputs of the frozen trunk for the same "
              f"{config.views} views; batch norm keeps its ImageNet statistics). Top-1, top-3 and "
              f"macro-F1 are the valid values at the end of training, in %, as mean ± sample std over the seeds "
              f"(the seeds column) and [95 % t-interval]. The published numbers are one run of a fine-tuned "
              f"ResNet-50. On the archive split (the published comparison's recipe: every section after the "
              f"retrieval metrics) a run stops once its valid loss has not fallen for {config.patience} epochs, a "
              f"choice made on the images it is scored on: those numbers are mildly optimistic. The cross-validated "
              f"verdicts choose on a held-out part of the training folds instead.", ""]
    lines += _verdicts(summary, runs, plots)
    lines += retrieval_report.section(summary, runs)
    if "protocol" in summary:  # the published comparison is on the archive split
        summary = summary[summary["protocol"] == "split"]
        runs = [r for r in runs if records.protocol_of(r) == "split"]
    full = summary[summary["train_fraction"] == 1.0]

    def cell(dataset, mode, loss):
        row = full[(full["dataset"] == dataset) & (full["mode"] == mode) & (full["loss"] == loss)]
        return row.iloc[0] if len(row) else None

    lines += ["## Against the published comparison", "",
              "The goal counts the better of the two modes per cell.", "",
              "| loss | dataset | published | frozen | finetune | better mode ≥ published |",
              "|---|---|---:|---:|---:|:---:|"]
    reached = total = 0
    shortfalls = []
    for loss, published in PUBLISHED.items():
        for dataset, value in published.items():
            frozen, tuned = cell(dataset, "frozen", loss), cell(dataset, "finetune", loss)
            present = [r for r in (frozen, tuned) if r is not None]
            if not present:
                continue
            best = max(present, key=lambda r: r.top1_mean)
            ok = 100 * best.top1_mean >= value
            reached, total = reached + ok, total + 1
            if not ok:
                shortfalls.append((loss, dataset, value, best))
            fmt = lambda r: "–" if r is None else f"{_pct(r.top1_mean, r.top1_std)} ({int(r.seeds)})"  # noqa: E731
            lines.append(f"| {loss} | {dataset} | {value} % | {fmt(frozen)} | {fmt(tuned)} | "
                         f"{'yes' if ok else '**no**'} ({best['mode']}) |")
    lines += ["", f"{reached} of {total} cells reach the published value (seeds in brackets).", ""]
    if shortfalls:
        lines += _shortfalls(shortfalls, runs)

    for dataset in ("weather", "fruits", "covid"):
        part = full[full["dataset"] == dataset]
        if part.empty:
            continue
        modes = [m for m in MODES if m in set(part["mode"])]
        lines += [f"## {dataset} — {config.backbone}, {' and '.join(modes)}", "",
                  "| loss | mode | seeds | top-1 | top-3 | macro-F1 | published top-1 | ≥ published |",
                  "|---|---|---:|---:|---:|---:|---:|:---:|"]
        for loss in dict.fromkeys(part["loss"]):
            for mode in modes:
                row = cell(dataset, mode, loss)
                if row is None:
                    continue
                published = PUBLISHED.get(row.loss, {}).get(dataset)
                verdict = "–" if published is None else ("yes" if 100 * row.top1_mean >= published else "**no**")
                lines.append(f"| {row.loss} | {mode} | {int(row.seeds)} | {_pct(row.top1_mean, row.top1_std, row.top1_ci95)} | "
                             f"{_pct(row.top3_mean, row.top3_std)} | {_pct(row.f1_mean, row.f1_std)} | "
                             f"{'–' if published is None else f'{published} %'} | {verdict} |")
        lines.append("")
        for mode in modes:
            lines += [f"![{dataset} loss curves, {mode}](plots/{_plot(plots, dataset, mode, 'loss_curves')})", ""]
        lines += ["Reading the curves (computed from the runs, means over seeds): how far the valid loss ended "
                  "above its lowest epoch (over-fitting: the valid loss turns up while the train loss keeps "
                  "falling), valid / train loss at the last epoch, and the first epoch at which valid top-1 came "
                  "within 1 point of its best (convergence).", "",
                  "| loss | mode | valid loss above its minimum at the end | valid / train loss at the end | "
                  "epochs to within 1 point of best |", "|---|---|---:|---:|---:|"]
        readings = {}
        for loss in dict.fromkeys(part["loss"]):
            for mode in modes:
                if cell(dataset, mode, loss) is None:
                    continue
                r = readings[loss, mode] = _curve_reading(runs, dataset, mode, loss)
                lines.append(f"| {loss} | {mode} | {100 * r['rise']:.0f} % | {r['ratio']:.2f} | {r['epochs']:.1f} |")
        lines.append("")
        for mode in modes:
            mine = {loss: r for (loss, m), r in readings.items() if m == mode}
            over = [f"{loss} (+{100 * r['rise']:.0f} %)" for loss, r in sorted(mine.items(), key=lambda kv: -kv[1]["rise"])
                    if r["rise"] >= OVERFIT_RISE]
            above = [loss for loss, r in mine.items() if r["ratio"] > 1]
            slow = sorted(mine.items(), key=lambda kv: -kv[1]["epochs"])[:2]
            lines.append(
                f"- **{mode}**: "
                + (f"over-fitting (valid loss ended ≥ {100 * OVERFIT_RISE:.0f} % above its minimum): {', '.join(over)}; "
                   if over else f"no loss's valid loss ended {100 * OVERFIT_RISE:.0f} % above its minimum; ")
                + (f"valid loss above train loss at the end: {', '.join(above)}; " if above
                   else "valid loss at or below train loss at the end for every loss; ")
                + "slowest to converge: " + ", ".join(f"{loss} ({r['epochs']:.1f} epochs)" for loss, r in slow) + ".")
        if any(loss == "l_softmax" for loss, _ in readings):
            lines.append("- L-Softmax's loss itself changes while it trains: λ anneals from 1000 towards 0, which "
                         "hardens the margin, so its valid loss rises for that reason too, not only from over-fitting.")
        lines.append("")

    lines += ["## Limited data: valid top-1 against the fraction of train used", "",
              f"Frozen mode. Stratified, seeded subsamples of train (the valid set is whole); mean ± std over "
              f"{len(config.seeds)} seeds.", ""]
    fractions = sorted(summary["train_fraction"].unique(), reverse=True)
    frozen = summary[summary["mode"] == "frozen"]
    for dataset in ("weather", "fruits", "covid"):
        part = frozen[frozen["dataset"] == dataset]
        if part.empty:
            continue
        lines += [f"### {dataset}", "", "| loss | " + " | ".join(f"{f:g}" for f in fractions) + " |",
                  "|---|" + "---:|" * len(fractions)]
        for loss in dict.fromkeys(part["loss"]):
            cells = []
            for f in fractions:
                row = part[(part["loss"] == loss) & (part["train_fraction"] == f)]
                cells.append(_pct(row.top1_mean.iloc[0], row.top1_std.iloc[0]) if len(row) else "–")
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
        lines += ["", f"![{dataset} fraction study](plots/{_plot(plots, dataset, 'frozen', 'fraction_study')})", ""]

    frozen_full = full[full["mode"] == "frozen"]
    removed = {d: next((x for x in full[full["dataset"] == f"{d}-dedup"]["dropped"] if isinstance(x, str) and x), "")
               for d in ("covid", "weather")}
    lines += ["## Leakage and duplicates", "",
              "Frozen mode. `--drop-duplicates` removes byte-identical train images and valid images identical to "
              "a train image. Removed (from the run records): " + "; ".join(f"{d}: {r}" for d, r in removed.items() if r) + ".",
              "", "| dataset | loss | published split | duplicates dropped |", "|---|---|---:|---:|"]
    for dataset in ("covid", "weather"):
        for loss in dict.fromkeys(frozen_full[frozen_full["dataset"] == dataset]["loss"]):
            a = frozen_full[(frozen_full["dataset"] == dataset) & (frozen_full["loss"] == loss)]
            b = frozen_full[(frozen_full["dataset"] == f"{dataset}-dedup") & (frozen_full["loss"] == loss)]
            lines.append(f"| {dataset} | {loss} | {_pct(a.top1_mean.iloc[0], a.top1_std.iloc[0])} | "
                         f"{_pct(b.top1_mean.iloc[0], b.top1_std.iloc[0]) if len(b) else '–'} |")
    backbones_json = out / "backbones.json"
    if backbones_json.exists():
        lines += ["", "## Backbones on fruits (cross-entropy, frozen, 5 seeds)", "",
                  "From `LOSSBANK_DATA=../shared/datasets python benchmarks/bench_backbones.py` (writes "
                  "results/backbones.json). Torchvision's ImageNet weights cannot be downloaded here, so those "
                  "backbones ran from random initialisation and are marked so: their accuracy says nothing "
                  "about them pretrained. Latency is per image at batch 1 on this 2-core CPU (float32, "
                  "channels_last, median of 30); cold start is a fresh process to its first prediction, and peak RSS "
                  "that process's; the last row is the same process without a network (imports only), so most of "
                  "the memory is torch itself.", "",
                  "| backbone | weights | top-1 (%) | top-3 (%) | params (M) | size (MB) | latency (ms) | "
                  "cold start (s) | peak RSS (MB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in json.loads(backbones_json.read_text()):
            if r["top1_mean"] is None:  # the imports-only baseline
                lines.append(f"| {r['backbone']} | | | | | | | {r['cold_start_s']:.1f} | {r['peak_rss_mb']:.0f} |")
                continue
            weights = "ImageNet" if r["weights"] == "imagenet" else "**random init**"
            lines.append(f"| {r['backbone']} | {weights} | {_pct(r['top1_mean'], r['top1_std'])} | "
                         f"{_pct(r['top3_mean'])} | {r['params_m']:.1f} | {r['size_mb']:.1f} | "
                         f"{r['latency_ms']:.1f} | {r['cold_start_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    for distil in [c for _, c in grid_configs() if c.teacher_backbone is not None]:
        lines += [""] + distil_section(runs + others, out, distil)
    groups: dict[tuple, list[str]] = {}
    wanted = {c.mode: len(c.seeds) for _, c in grid_configs() if c.protocol == "split" and c.teacher_backbone is None}
    for r in full.itertuples(index=False):
        if r.seeds < wanted.get(r.mode, len(config.seeds)):
            groups.setdefault((r.dataset, r.mode, int(r.seeds)), []).append(r.loss)
    short = [f"{d} {m}: {len(losses)} losses ({n})" if len(losses) > 3 else f"{d} {m}: {', '.join(losses)} ({n})"
             for (d, m, n), losses in groups.items()]
    tuned = set(full[full["mode"] == "finetune"]["dataset"])
    untuned = [d for d in ("weather", "fruits", "covid") if d in set(full["dataset"]) and d not in tuned]
    if short or untuned:
        lines += ["", "## Not finished yet", ""]
        if untuned:
            lines.append(f"- No fine-tuning runs yet for {', '.join(untuned)}.")
        if short:
            lines.append(f"- Fewer seeds than the grid asks for (finished seeds in brackets): {'; '.join(short)}. "
                         f"Rerunning `python -m evaluation.results` resumes the grid.")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.results", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"), help="runs and tables (default results/)")
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="figures (default plots/)")
    parser.add_argument("--results-md", type=Path, default=Path("RESULTS.md"))
    parser.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md from the finished runs")
    args = parser.parse_args(argv)
    from . import run

    commands = grid_commands(args.out, args.plots)
    ledger_path = args.out / "regeneration_log.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else []
    if not args.report_only:
        # Each sitting is logged: their sum, from an empty results/ on, is the time a regeneration takes,
        # however often it was resumed. The entry is rewritten every minute, so a sitting killed too hard
        # to log its end (SIGKILL, a machine going away) still counts to within a minute.
        before = _count_records(args.out)
        cache_dir = grid_configs()[0][1].cache_dir.expanduser()
        entry = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs_before": before,
                 "cache_entries_before": len(list(cache_dir.rglob("*.pt"))) if cache_dir.is_dir() else 0}
        if before == 0:
            ledger = []  # an empty results/: a new regeneration starts
        start, code, finished = time.perf_counter(), 0, False
        lock, stop = threading.Lock(), threading.Event()

        def log(**fields) -> None:
            with lock:
                entry.update(seconds=round(time.perf_counter() - start), **fields)
                write_text_atomically(ledger_path, json.dumps(ledger + [entry], indent=1) + "\n")

        def heartbeat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                log(finished=False)

        log(finished=False)
        threading.Thread(target=heartbeat, daemon=True).start()
        try:
            for command in commands:
                code = run.main(command)
                if code:
                    break
            finished = code == 0
        finally:
            stop.set()
            log(runs_after=_count_records(args.out), finished=finished)
        if code:
            return code
        ledger.append(entry)
    write_results_md(args.out, args.plots, args.results_md, commands, ledger)
    print(f"wrote {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
