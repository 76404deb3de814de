"""The report of a results folder: ``python -m evaluation.report --out DIR``.

Each finished training run leaves one JSON record somewhere under ``{out}/runs/``
(see ``load_runs`` for the fields used). The report merges whatever records are
there into ``summary.csv``, per-dataset ``accuracy.csv``/``accuracy.md``, a
combined table when there are several datasets (``tables``), PNG plots (``plots``),
and ``timing.md``; with a ``grid.json`` it also lists the requested runs that have
not finished.

Run it on a results folder at any time, e.g. while shards are still training:

    python -m evaluation.report --out results [--plots results/plots]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .plots import draw_plots
from .stats import summarise
from .tables import format_combined, format_table, format_timing, write_tables

# --------------------------------------------------------------------------
# Run records: loading and checking
# --------------------------------------------------------------------------

# A run is identified by these fields; a second record with the same identity
# (e.g. after merging shard folders) is a duplicate.
RUN_KEY_FIELDS = ("dataset", "backbone", "mode", "loss", "seed", "train_fraction")


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


def _describe_entry(e: dict) -> str:
    return (f"{e['dataset']} {e['backbone']} {e['mode']} {e['loss']} seed {e['seed']} "
            f"train_fraction {float(e['train_fraction']):g}")


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
    plots = draw_plots(runs, summary, out_dir, plots_dir)

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
