"""The report of a results folder: ``python -m evaluation.report --out DIR``.

Each finished training run leaves one JSON record somewhere under ``{out}/runs/``
(``evaluation.records`` describes them). The report merges whatever records are
there into ``summary.csv``, per-dataset ``accuracy.csv``/``accuracy.md``/``accuracy.tex``, a
combined table when there are several datasets (``tables``), the paired comparisons of the
losses against a baseline (``scores.csv``, ``comparison.csv``, ``ranks.csv``, ``folds.csv``;
``stats.compare_runs``), PNG plots (``plots``, ``comparison_plots``), and ``timing.md``; with a
``grid.json`` it also lists the requested runs that have not finished.

Run it on a results folder at any time, e.g. while shards are still training:

    python -m evaluation.report --out results [--plots results/plots] [--baseline cross_entropy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .plots import draw_plots
from .records import RUN_KEY_FIELDS, load_runs, run_key
from .stats import compare_runs, summarise
from .tables import format_combined, format_table, format_timing, write_tables

# --------------------------------------------------------------------------
# The report: grid and timing files, everything together
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
    done = {run_key(r) for r in runs}
    missing = []
    for i, entry in enumerate(grid):
        lacking = [k for k in RUN_KEY_FIELDS if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise ValueError(f"{where} entry #{i} lacks {', '.join(lacking)}: {entry!r}; every entry needs "
                             f"{', '.join(RUN_KEY_FIELDS)}")
        try:
            key = run_key(entry)
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


def _describe_entry(e: dict) -> str:
    return (f"{e['dataset']} {e['backbone']} {e['mode']} {e['loss']} seed {e['seed']} "
            f"train_fraction {float(e['train_fraction']):g}")


def write_report(out_dir, plots_dir=None, timing: dict | None = None, grid: list[dict] | None = None,
                 baseline: str = "cross_entropy", alpha: float = 0.05) -> dict:
    """Summary, comparisons, tables and plots for every dataset with finished runs under ``out_dir/runs``.

    ``baseline`` is the loss every other is compared with (paired tests at ``alpha``, Holm).
    ``grid`` (or ``out_dir/grid.json`` when not given) lists requested runs; those
    without a record are returned as ``missing``. ``timing`` (or ``out_dir/timing.json``)
    gets a ``report`` section with this function's own seconds and is written to
    ``timing.json`` and ``timing.md``. Returns ``{"tables", "plots", "missing",
    "summary", "comparison", "timing"}`` (``comparison``: ``stats.Comparison``, for
    ``tables.format_table``). Raises ``FileNotFoundError`` when there are no runs.
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
    comparison = compare_runs(runs, baseline, alpha)
    tables = write_tables(summary, out_dir, comparison)
    plots = draw_plots(runs, summary, out_dir, plots_dir, comparison)

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
    return {"tables": tables, "plots": plots, "missing": missing, "summary": summary, "comparison": comparison,
            "timing": timing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.report",
        description="Merge the finished runs under OUT/runs into tables (OUT/summary.csv, "
                    "OUT/<dataset>/accuracy.md, ...) and plots, and list runs of OUT/grid.json "
                    "that have not finished.")
    parser.add_argument("--out", default="out", help="results folder holding runs/ (default: out, as evaluation.run)")
    parser.add_argument("--plots", default=None, help="where to put the PNGs (default: OUT/plots)")
    parser.add_argument("--baseline", default="cross_entropy",
                        help="the loss every other is compared with (paired tests; default: cross_entropy)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: --out {out} is not a folder; pass the results folder that holds runs/", file=sys.stderr)
        return 1
    try:
        result = write_report(out, plots_dir=args.plots, baseline=args.baseline)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    summary = result["summary"]
    datasets = list(dict.fromkeys(summary["dataset"]))
    for ds in datasets:
        print(format_table(summary, ds, result["comparison"]))
    if len(datasets) > 1:
        print(format_combined(summary)[0])
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
