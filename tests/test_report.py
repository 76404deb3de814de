"""Tests of the report (evaluation/report.py, stats.py, tables.py, plots.py) on synthetic run records."""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from evaluation import plots, records, report, stats, tables
from lossbank import list_losses

REPO = Path(__file__).resolve().parents[1]

LOSSES = ["hinge", "cross_entropy", "l_softmax", "arcface"]  # lossbank registry order
BASE_TOP1 = {"cross_entropy": 0.90, "l_softmax": 0.88, "arcface": 0.86, "hinge": 0.80}
SIZES = {"fruits": (240, 60, ["apple", "banana", "mixed", "orange"]),
         "weather": (899, 226, ["cloudy", "rain", "shine", "sunrise"])}


def final_top1(dataset, loss, seed, fraction):
    """Deterministic 'measured' accuracy, so tests can recompute the expected stats by hand."""
    shift = 0.02 if dataset == "weather" else 0.0
    return round(BASE_TOP1[loss] + shift - 0.15 * (1 - fraction) + 0.013 * seed * (1 + LOSSES.index(loss)), 6)


def confusion_for(top1, num_valid, k=4):
    """A k-class confusion matrix (rows true, columns predicted) of num_valid images, round(top1 * num_valid) right."""
    m = [[0] * k for _ in range(k)]
    for i in range(num_valid):
        m[i % k][i % k] += 1
    for i in range(num_valid - round(top1 * num_valid)):  # each mistake: one image of a class taken for the next
        m[i % k][i % k] -= 1
        m[i % k][(i + 1) % k] += 1
    return m


def make_run(dataset, loss, seed, fraction=1.0, mode="frozen", status="ok", failed_epoch=None, confusion=False):
    # Early stopping: seeds stop after different numbers of epochs.
    epochs = 8 + 2 * seed if status == "ok" else failed_epoch - 1
    top1 = final_top1(dataset, loss, seed, fraction)
    scale = {"cross_entropy": 1.0, "l_softmax": 6.0, "arcface": 20.0, "hinge": 0.5}[loss]
    history = []
    for e in range(1, epochs + 1):
        progress = e / (8 + 2 * seed)
        history.append({
            "epoch": e,
            "train_loss": scale * (1.5 - 1.2 * progress) + 0.01 * seed,
            "valid_loss": scale * (1.6 - 1.0 * progress) + 0.02 * seed,
            "train_top1": min(1.0, 0.5 + 0.5 * progress),
            "valid_top1": round(0.4 + (top1 - 0.4) * progress, 6),
            "valid_top3": min(1.0, 0.8 + 0.2 * progress),
            "valid_macro_f1": round(0.35 + (top1 - 0.4) * progress, 6),
            "lambda": (100.0 / (1 + 0.5 * e)) if loss == "l_softmax" else None,
            "seconds": 0.2,
        })
    num_train, num_valid, classes = SIZES[dataset]
    best_epoch = max(1, epochs - 1)
    rec = {
        "dataset": dataset, "backbone": "efficientnet_lite0", "weights_hash": "3f9a1c0d2b7e4a11",
        "mode": mode, "loss": loss, "seed": seed, "train_fraction": fraction, "status": status,
        "failed_epoch": failed_epoch, "failure": "valid_loss is nan" if status == "failed" else None,
        "classes": classes, "num_train": round(num_train * fraction), "num_valid": num_valid,
        "history": history, "best_epoch": best_epoch,
        "best_valid_top1": round(top1 + 0.01, 6) if status == "ok" else None,
        "final": ({"valid_top1": top1, "valid_top3": 1.0 - 0.01 * seed,
                   "valid_macro_f1": round(top1 - 0.05, 6), "valid_loss": 0.3 * scale}
                  if status == "ok" else None),
        "train_seconds": 3.0 + seed, "config": {"lr": 0.01, "epochs": 30, "batch_size": 64},
        "command": "python -m evaluation.run ...",
    }
    if confusion and status == "ok":  # records older than issue 15 have none
        rec["final"]["confusion"] = confusion_for(top1, num_valid, len(classes))
    return rec


def make_cv_run(dataset, loss, repeat, fold, correct, num_valid=60, num_train=192, num_inner=48, mode="frozen",
                status="ok"):
    """A run of --protocol cv: repeat `repeat`, fold `fold`, `correct` of its `num_valid` scored images right."""
    rec = make_run("fruits", "hinge", repeat, mode=mode, status=status, failed_epoch=None if status == "ok" else 3)
    top1 = correct / num_valid
    rec.update(dataset=dataset, loss=loss, protocol="cv", fold=fold, num_train=num_train, num_inner=num_inner,
               num_valid=num_valid)
    if status == "ok":
        rec["final"] = {"valid_top1": top1, "valid_top3": 1.0, "valid_macro_f1": top1 - 0.02, "valid_loss": 0.4,
                        "confusion": confusion_for(top1, num_valid)}
        rec["best_valid_top1"] = top1
    return rec

def all_runs():
    runs = []
    for dataset in ("fruits", "weather"):
        for fraction in (1.0, 0.25):
            for loss in LOSSES:
                for seed in range(3):
                    if (dataset, loss, seed, fraction) == ("fruits", "arcface", 2, 1.0):
                        runs.append(make_run(dataset, loss, seed, fraction, status="failed", failed_epoch=4))
                    else:
                        runs.append(make_run(dataset, loss, seed, fraction))
    return runs


def write_runs(out_dir, runs):
    for i, rec in enumerate(runs):
        d = out_dir / "runs" / f"shard{i % 3}" / rec["dataset"]
        d.mkdir(parents=True, exist_ok=True)
        fold = f"_cv{rec['fold']}" if rec.get("fold") is not None else ""
        name = f"{rec['loss']}_s{rec['seed']}_f{rec['train_fraction']}_{rec['mode']}{fold}.json"
        (d / name).write_text(json.dumps(rec))


def row(summary, dataset, loss, fraction=1.0, mode="frozen"):
    sel = summary[(summary.dataset == dataset) & (summary.loss == loss)
                  & (summary.train_fraction == fraction) & (summary["mode"] == mode)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """One report over the whole synthetic grid, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("results")
    runs = all_runs()
    write_runs(out, runs)
    grid = [{k: r[k] for k in records.RUN_KEY_FIELDS} for r in runs]
    grid.append({"dataset": "covid", "backbone": "efficientnet_lite0", "mode": "frozen",
                 "loss": "hinge", "seed": 0, "train_fraction": 1.0})
    (out / "grid.json").write_text(json.dumps(grid))
    timing = {"sections": {"load+extract": 12.0, "train:cross_entropy": 1.5}, "total": 14.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean set of records must not warn
        result = report.write_report(out, timing=timing)
    return out, result


# ---------------------------------------------------------------- statistics

def test_t_quantile_matches_tables():
    # Published two-sided 95 % critical values of Student's t.
    for df, expected in [(1, 12.706204736174704), (2, 4.302652729749464), (3, 3.182446305284263),
                         (10, 2.2281388519649385), (30, 2.0422724563012373)]:
        assert stats.t_quantile_975(df) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile_975(0)


def test_summary_numbers_match_hand_computation():
    summary = stats.summarise(all_runs())
    assert list(summary.columns[:6]) == ["dataset", "backbone", "mode", "protocol", "loss", "train_fraction"]
    assert set(summary.protocol) == {"split"}  # records without a protocol are split runs
    # 2 datasets x 2 fractions x 4 losses
    assert len(summary) == 16

    r = row(summary, "fruits", "l_softmax")
    top1 = [final_top1("fruits", "l_softmax", s, 1.0) for s in range(3)]
    assert r.seeds == 3 and r.failed == 0
    assert r.top1_mean == pytest.approx(statistics.mean(top1))
    assert r.top1_std == pytest.approx(statistics.stdev(top1))
    assert r.top1_ci95 == pytest.approx(4.302652729749464 * statistics.stdev(top1) / math.sqrt(3))
    assert r.best_top1_mean == pytest.approx(statistics.mean(t + 0.01 for t in top1))
    assert r.top3_mean == pytest.approx(statistics.mean([1.0, 0.99, 0.98]))
    assert r.f1_mean == pytest.approx(statistics.mean(t - 0.05 for t in top1))
    assert r.best_epoch_mean == pytest.approx(statistics.mean([7, 9, 11]))
    assert r.epochs_mean == pytest.approx(statistics.mean([8, 10, 12]))
    assert r.train_seconds_mean == pytest.approx(4.0)
    assert r.weights_hash == "3f9a1c0d2b7e4a11"
    assert r.num_train == 240 and r.num_valid == 60

    # The failed run counts as failed and is left out of the means; 2 seeds -> t with 1 df.
    r = row(summary, "fruits", "arcface")
    top1 = [final_top1("fruits", "arcface", s, 1.0) for s in range(2)]
    assert (r.seeds, r.failed) == (2, 1)
    assert r.top1_mean == pytest.approx(statistics.mean(top1))
    assert r.top1_ci95 == pytest.approx(12.706204736174704 * statistics.stdev(top1) / math.sqrt(2))

    r = row(summary, "weather", "hinge", 0.25)
    assert r.top1_mean == pytest.approx(statistics.mean(final_top1("weather", "hinge", s, 0.25) for s in range(3)))


def test_summary_order_and_single_seed():
    runs = [make_run("fruits", loss, 0) for loss in ["hinge", "cross_entropy", "arcface"]]
    runs += [make_run("fruits", "hinge", 0, fraction=0.5)]
    summary = stats.summarise(runs)
    # losses in order of first appearance, full data before reduced data
    assert list(summary.loss) == ["hinge", "cross_entropy", "arcface", "hinge"]
    assert list(summary.train_fraction) == [1.0, 1.0, 1.0, 0.5]
    assert summary.seeds.tolist() == [1, 1, 1, 1]
    assert summary.top1_std.isna().all() and summary.top1_ci95.isna().all()


def test_all_seeds_failed_gives_nan_not_error():
    runs = [make_run("fruits", "arcface", s, status="failed", failed_epoch=3) for s in range(2)]
    runs.append(make_run("fruits", "cross_entropy", 0))
    summary = stats.summarise(runs)
    r = row(summary, "fruits", "arcface")
    assert (r.seeds, r.failed) == (0, 2) and math.isnan(r.top1_mean)
    assert "| arcface | 0 (+2 failed) | — |" in tables.format_table(summary, "fruits")


def test_summarise_rejects_non_records():
    with pytest.raises(ValueError, match="record #1.*missing field"):
        stats.summarise([make_run("fruits", "hinge", 0), {"dataset": "fruits"}])


# ---------------------------------------------------------------- loading

def test_load_runs_skips_bad_files_and_dedupes(tmp_path):
    runs = [make_run("fruits", "hinge", s) for s in range(2)]
    write_runs(tmp_path, runs)
    bad = tmp_path / "runs" / "broken.json"
    bad.write_text("{not json")
    percent = make_run("fruits", "hinge", 5)
    percent["final"]["valid_top1"] = 93.0  # percentages instead of fractions
    (tmp_path / "runs" / "percent.json").write_text(json.dumps(percent))
    partial = tmp_path / "runs" / "deep" / "er" / "partial.json"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"dataset": "fruits", "loss": "hinge"}))
    # The same run twice (merged shards): once failed, once ok -> the ok one is kept.
    dup_failed = make_run("fruits", "hinge", 0, status="failed", failed_epoch=2)
    (tmp_path / "runs" / "a_dup.json").write_text(json.dumps(dup_failed))

    with pytest.warns(UserWarning) as caught:
        loaded = records.load_runs(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("broken.json" in m and "unreadable" in m for m in messages)
    assert any("percent.json" in m and "[0, 1]" in m for m in messages)
    assert any("partial.json" in m and "missing field" in m for m in messages)
    assert any("duplicate" in m and "a_dup.json" in m and "seed 0" in m for m in messages)
    assert sorted(r["seed"] for r in loaded) == [0, 1]
    assert all(r["status"] == "ok" for r in loaded)
    assert all(Path(r["_file"]).is_file() for r in loaded)


def test_identical_duplicates_in_memory_are_counted_once():
    runs = [make_run("fruits", "hinge", s) for s in range(3)]
    with pytest.warns(UserWarning, match="duplicate run record.*seed 1"):
        summary = stats.summarise(runs + [make_run("fruits", "hinge", 1)])
    assert row(summary, "fruits", "hinge").seeds == 3


def test_load_runs_without_runs_folder(tmp_path):
    assert records.load_runs(tmp_path) == []


# ---------------------------------------------------------------- tables

def test_tables(full_report):
    out, result = full_report
    for ds in ("fruits", "weather"):
        csv = pd.read_csv(out / ds / "accuracy.csv")
        assert len(csv) == 8  # 4 losses x 2 fractions
        # registry order although the file names sort arcface first
        assert LOSSES == [name for name in list_losses() if name in LOSSES]
        assert list(csv.loss[:4]) == LOSSES
        assert {"top1_mean", "top1_std", "top1_ci95", "best_top1_mean", "top3_mean", "f1_mean",
                "best_epoch_mean", "train_seconds_mean"} <= set(csv.columns)
        assert csv.top1_mean.between(0, 1).all()  # fractions in CSV
        md = (out / ds / "accuracy.md").read_text()
        assert f"## {ds} — backbone efficientnet_lite0, mode frozen" in md
        assert "| loss | train fraction | seeds | final top-1 |" in md
        table_rows = [line for line in md.splitlines() if line.startswith("| ") and "loss |" not in line]
        assert len(table_rows) == 8

    fruits_md = (out / "fruits" / "accuracy.md").read_text()
    top1 = [final_top1("fruits", "cross_entropy", s, 1.0) for s in range(3)]
    expected = f"{100 * statistics.mean(top1):.1f} ± {100 * statistics.stdev(top1):.1f}"
    assert f"| cross_entropy {tables.MARK} | 1 | 3 | {expected} | [" in fruits_md  # then its 95 % interval
    assert f"| arcface {tables.MARK} | 1 | 2 (+1 failed) |" in fruits_md

    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 16
    assert list(summary.columns) == stats.SUMMARY_COLUMNS

    combined = (out / "accuracy_all.md").read_text()
    assert "| loss | fruits | weather |" in combined
    assert "## backbone efficientnet_lite0, mode frozen, train fraction 1" in combined
    assert "## backbone efficientnet_lite0, mode frozen, train fraction 0.25" in combined
    assert f"| cross_entropy | {expected} |" in combined
    all_csv = pd.read_csv(out / "accuracy_all.csv")
    assert len(all_csv) == 8 and {"fruits_top1_mean", "weather_top1_std"} <= set(all_csv.columns)
    assert all(Path(p).is_file() for p in result["tables"])


def test_single_dataset_has_no_combined_table(tmp_path):
    summary = stats.summarise([make_run("fruits", "hinge", s) for s in range(2)])
    written = tables.write_tables(summary, tmp_path)
    assert not (tmp_path / "accuracy_all.md").exists()
    assert {p.name for p in written} == {"summary.csv", "accuracy.csv", "accuracy.md"}
    md = tables.format_table(summary, "fruits")
    assert "train fraction" not in md  # only one fraction: no column for it
    with pytest.raises(ValueError, match="no runs for dataset 'covid'.*fruits"):
        tables.format_table(summary, "covid")


def test_several_modes_get_own_sections_and_plot_files(tmp_path):
    runs = [make_run("fruits", loss, s, mode=m) for m in ("frozen", "finetune")
            for loss in ("cross_entropy", "hinge") for s in range(2)]
    write_runs(tmp_path, runs)
    result = report.write_report(tmp_path)
    md = (tmp_path / "fruits" / "accuracy.md").read_text()
    assert "mode frozen" in md and "mode finetune" in md
    names = {p.name for p in result["plots"]}
    assert "fruits_efficientnet_lite0_frozen_loss_curves.png" in names
    assert "fruits_efficientnet_lite0_finetune_differences.png" in names
    from evaluation import results

    # RESULTS.md links the plots by the names the report gave them.
    assert results._plot(tmp_path / "plots", "fruits", "finetune", "loss_curves") in names
    with pytest.raises(ValueError, match="pass backbone= and mode="):
        plots.plot_loss_curves(runs, "fruits", tmp_path / "p")


def test_plots_of_a_first_mode_are_replaced_not_left_stale(tmp_path):
    """The one-command regeneration runs frozen first, then finetune: the frozen-only plot names must go."""
    plots_dir = tmp_path / "plots"
    plots_dir.mkdir()
    (plots_dir / "mine.png").write_bytes(b"not drawn by the report")
    frozen = [make_run("fruits", loss, s) for loss in ("cross_entropy", "hinge") for s in range(2)]
    write_runs(tmp_path, frozen)
    first = {p.name for p in report.write_report(tmp_path, plots_dir)["plots"]}
    assert "fruits_loss_curves.png" in first and (plots_dir / "fruits_loss_curves.png").exists()
    write_runs(tmp_path, frozen + [make_run("fruits", "hinge", s, mode="finetune") for s in range(2)])
    second = {p.name for p in report.write_report(tmp_path, plots_dir)["plots"]}
    assert "fruits_efficientnet_lite0_finetune_loss_curves.png" in second
    on_disk = {p.name for p in plots_dir.glob("*.png")}
    assert on_disk == second | {"mine.png"}
    assert not first & on_disk


# ---------------------------------------------------------------- plots, grid, timing

def is_png(path):
    path = Path(path)
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_written(full_report):
    out, result = full_report
    names = {Path(p).name for p in result["plots"]}
    for ds in ("fruits", "weather"):
        for kind in ("loss_curves", "accuracy_curves", "differences", "fraction_study"):
            assert f"{ds}_{kind}.png" in names
    # and one critical-difference diagram over both datasets; no confusion matrices: the records predate them
    assert "all_datasets_efficientnet_lite0_frozen_critical_difference.png" in names
    assert len(result["plots"]) == 9
    from evaluation import results

    assert results._plot(out / "plots", "weather", "frozen", "fraction_study") in names
    assert all(is_png(p) and Path(p).parent == out / "plots" for p in result["plots"])


def test_fraction_study_needs_two_fractions(tmp_path):
    from evaluation import comparison_plots

    runs = [make_run("fruits", loss, s) for loss in ("hinge", "cross_entropy") for s in range(2)]
    assert plots.plot_fraction_study(stats.summarise(runs), "fruits", tmp_path) is None
    path = comparison_plots.plot_differences(runs, stats.compare_runs(runs), "fruits", tmp_path)
    assert is_png(path) and path.name == "fruits_differences.png"


def test_curves_handle_run_failing_in_first_epoch(tmp_path):
    runs = [make_run("fruits", "arcface", 0, status="failed", failed_epoch=1),
            make_run("fruits", "cross_entropy", 0)]
    assert runs[0]["history"] == []
    assert is_png(plots.plot_loss_curves(runs, "fruits", tmp_path))
    assert is_png(plots.plot_accuracy_curves(runs, "fruits", tmp_path))
    from evaluation import comparison_plots

    # every arcface run failed: no difference to draw against cross_entropy
    assert comparison_plots.plot_differences(runs, stats.compare_runs(runs), "fruits", tmp_path) is None


def test_missing_runs_from_grid(full_report):
    _, result = full_report
    assert result["missing"] == [{"dataset": "covid", "backbone": "efficientnet_lite0", "mode": "frozen",
                                  "loss": "hinge", "seed": 0, "train_fraction": 1.0}]


def test_bad_grid_entry_is_named():
    with pytest.raises(ValueError, match="grid.json entry #1 lacks backbone, .*seed"):
        report.missing_runs([make_run("fruits", "hinge", 0)],
                            [{k: 1 for k in records.RUN_KEY_FIELDS}, {"dataset": "fruits"}], "grid.json")


def test_timing(full_report):
    out, result = full_report
    sections = result["timing"]["sections"]
    assert sections["load+extract"] == 12.0 and sections["report"] > 0
    assert result["timing"]["total"] == pytest.approx(14.0 + sections["report"])
    assert json.loads((out / "timing.json").read_text()) == result["timing"]
    md = (out / "timing.md").read_text()
    assert "| load+extract | 12.0 |" in md and "| report |" in md
    assert "| (outside the sections) | 0.5 |" in md


def test_bad_timing_is_rejected(tmp_path):
    write_runs(tmp_path, [make_run("fruits", "hinge", 0)])
    with pytest.raises(ValueError, match="timing argument"):
        report.write_report(tmp_path, timing={"load": 3})


# ---------------------------------------------------------------- CLI

def test_cli_error_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main(["--bogus"])
    assert exc.value.code == 2 and "--bogus" in capsys.readouterr().err
    assert report.main(["--out", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert report.main(["--out", str(tmp_path)]) == 1
    assert "no run records under" in capsys.readouterr().err
    write_runs(tmp_path, [make_run("fruits", "hinge", 0)])
    (tmp_path / "grid.json").write_text("[{")
    assert report.main(["--out", str(tmp_path)]) == 1
    assert "grid.json" in capsys.readouterr().err


def test_cli_as_module(tmp_path):
    write_runs(tmp_path, [make_run("fruits", loss, s) for loss in ("cross_entropy", "hinge") for s in range(2)])
    grid = [{"dataset": "fruits", "backbone": "efficientnet_lite0", "mode": "frozen", "loss": "hinge",
             "seed": 7, "train_fraction": 1.0}]
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    plots_dir = tmp_path / "pictures"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "evaluation.report", "--out", str(tmp_path),
                           "--plots", str(plots_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "# fruits: validation accuracy per loss" in proc.stdout
    assert f"| cross_entropy {tables.MARK} | 2 |" in proc.stdout
    assert "- hinge is worse than cross_entropy on fruits by" in proc.stdout
    assert "1 run(s) of" in proc.stdout and "fruits efficientnet_lite0 frozen hinge seed 7" in proc.stdout
    assert is_png(plots_dir / "fruits_loss_curves.png")
    assert (tmp_path / "summary.csv").is_file() and str(tmp_path / "summary.csv") in proc.stdout


def test_regeneration_sittings_are_logged_and_summed(tmp_path, monkeypatch):
    """A killed `python -m evaluation.results` is logged too, and the resumed total counts every sitting."""
    from evaluation import results, run

    commands = results.grid_commands(tmp_path, tmp_path)
    n = len(commands)  # 1-cv-frozen ... 7-distil
    assert [c[0] for c in commands] == ["--config"] * 7 and "1-cv-frozen.yaml" in commands[0][1]

    out = tmp_path / "results"
    written = {}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the grid's feature cache: ~/.cache/lossbank/features
    cache = tmp_path / "home" / ".cache" / "lossbank" / "features"
    monkeypatch.setattr(results, "write_results_md", lambda *a: written.update(ledger=a[-1]))
    calls = []

    def fake_run(command):  # one record per command; the second sitting is killed in its second command
        calls.append(command)
        if len(calls) == n + 2:
            raise KeyboardInterrupt
        path = out / "runs" / f"r{len(calls)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return 0

    monkeypatch.setattr(run, "main", fake_run)
    assert results.main(["--out", str(out), "--results-md", str(tmp_path / "R.md")]) == 0
    first = json.loads((out / "regeneration_log.json").read_text())
    assert [(e["runs_before"], e["runs_after"], e["finished"]) for e in first] == [(0, n, True)]
    assert "Regenerating everything from an empty results/ and an empty feature cache took 0 min" in \
        results.regeneration_time(first)

    # A regeneration that starts from an empty results/ again forgets the old log; kill it half-way.
    shard = cache / "efficientnet_lite0_aug5_0123456789abcdef"  # the cache keeps its shards in one folder per key
    shard.mkdir(parents=True)
    (shard / "x.pt").write_text("")
    for f in (out / "runs").iterdir():
        f.unlink()
    with pytest.raises(KeyboardInterrupt):
        results.main(["--out", str(out), "--results-md", str(tmp_path / "R.md")])
    killed = json.loads((out / "regeneration_log.json").read_text())
    assert [(e["runs_before"], e["runs_after"], e["finished"]) for e in killed] == [(0, 1, False)]
    assert results.regeneration_time(killed).startswith("No regeneration from an empty results/ has been timed")

    calls.append(None)  # the resumed sitting runs every command without being killed
    assert results.main(["--out", str(out), "--results-md", str(tmp_path / "R.md")]) == 0
    resumed = json.loads((out / "regeneration_log.json").read_text())
    assert [(e["runs_before"], e["finished"]) for e in resumed] == [(0, False), (1, True)]
    assert written["ledger"] == resumed
    assert "a warm feature cache" in results.regeneration_time(resumed)
    assert "2 sittings" in results.regeneration_time(resumed)


def test_a_sitting_killed_without_warning_has_its_time_in_the_ledger(tmp_path, monkeypatch):
    """SIGKILL skips every `finally`: the ledger, rewritten while the grid runs, still holds the sitting's time."""
    import time
    from evaluation import results, run

    out = tmp_path / "results"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(results, "HEARTBEAT_SECONDS", 0.05)
    seen = []

    def fake_run(command):  # what a reader sees while the second command runs: a SIGKILL would leave just that
        if seen:
            return 0
        time.sleep(1.1)
        seen.append(json.loads((out / "regeneration_log.json").read_text()))
        return 0

    monkeypatch.setattr(run, "main", fake_run)
    monkeypatch.setattr(results, "write_results_md", lambda *a: None)
    assert results.main(["--out", str(out), "--results-md", str(tmp_path / "R.md")]) == 0
    [entry] = seen[0]
    assert entry["finished"] is False and entry["seconds"] >= 1
    assert results.regeneration_time(seen[0]).startswith("No regeneration from an empty results/ has been timed")


def test_regeneration_with_an_unlogged_sitting_is_not_timed():
    from evaluation import results

    ledger = [{"runs_before": 0, "cache_entries_before": 0, "seconds": None, "finished": False},
              {"runs_before": 3, "cache_entries_before": 2, "seconds": 60, "finished": True}]
    assert results.regeneration_time(ledger).startswith("No regeneration")
    ledger[0]["seconds"] = 120
    assert "took 3 min here (wall time of 2 sittings" in results.regeneration_time(ledger)


def test_results_md_names_the_short_cells(full_report, tmp_path):
    """RESULTS.md from the synthetic grid: weather cross-entropy (frozen, 3 seeds) is below the published 97 %."""
    from evaluation import results

    out, _ = full_report
    path = tmp_path / "RESULTS.md"
    results.write_results_md(out, out / "plots", path, results.grid_commands(out, out / "plots"), [])
    text = path.read_text()
    top1 = [final_top1("weather", "cross_entropy", s, 1.0) for s in range(3)]
    mean = statistics.mean(top1)
    assert f"| cross_entropy | weather | 97 % | {100 * mean:.1f} ± {100 * statistics.stdev(top1):.1f} (3) | – | **no** (frozen) |" in text
    assert (f"- **cross_entropy on weather** (published 97 %, one run): frozen {100 * mean:.1f} % over 3 seeds; "
            f"best seed {100 * max(top1):.1f} %; best epoch per seed, chosen on valid, {100 * mean + 1:.1f} %. "
            f"The valid set has 226 images (one is 0.44 points): the mean is {(0.97 - mean) * 226:.1f} images short.") in text
    assert "No regeneration from an empty results/ has been timed" in text


# ---------------------------------------------------------------- issue 13: shared plots, readable plots, data

def test_a_plots_folder_shared_by_two_results_folders_keeps_both_drawings(tmp_path):
    plots_dir = tmp_path / "plots"
    write_runs(tmp_path / "a", [make_run("fruits", "hinge", s) for s in range(2)])
    write_runs(tmp_path / "b", [make_run("weather", "hinge", s) for s in range(2)])
    drawn_a = {p.name for p in report.write_report(tmp_path / "a", plots_dir)["plots"]}
    drawn_b = {p.name for p in report.write_report(tmp_path / "b", plots_dir)["plots"]}
    assert drawn_a and drawn_b and not drawn_a & drawn_b
    assert {p.name for p in plots_dir.glob("*.png")} == drawn_a | drawn_b  # b's report deleted none of a's plots
    # a's own stale plots still go: a second mode renames its plots
    shutil.rmtree(tmp_path / "a" / "runs")
    write_runs(tmp_path / "a", [make_run("fruits", "hinge", s, mode=m) for s in range(2) for m in ("frozen", "finetune")])
    again_a = {p.name for p in report.write_report(tmp_path / "a", plots_dir)["plots"]}
    assert {p.name for p in plots_dir.glob("*.png")} == again_a | drawn_b


def test_differences_plot_shows_each_seed_and_the_resolution(tmp_path, monkeypatch):
    """The plot of paired differences replaces the final-accuracy plot: every seed's difference is a dot."""
    from evaluation import comparison_plots

    drawn = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    runs = [make_run("fruits", loss, s) for loss in ("hinge", "cross_entropy", "arcface") for s in range(3)]
    comparison_plots.plot_differences(runs, stats.compare_runs(runs), "fruits", tmp_path)
    ax = drawn[0].axes[0]
    low, high = ax.get_xlim()
    diffs = [100 * (final_top1("fruits", loss, s, 1.0) - final_top1("fruits", "cross_entropy", s, 1.0))
             for loss in ("hinge", "arcface") for s in range(3)]
    assert low < min(diffs) and max(diffs) < high < 10  # zoomed to the differences, 0 included
    from matplotlib.collections import PathCollection

    dots = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
    assert dots == len(diffs)  # every seed drawn, so one seed is visible as one point
    title = drawn[0].get_suptitle()  # on the figure, so the p-value column does not push it off-centre
    assert "one scored image = 1.7 points" in title and "training noise only" in title


def test_whole_epochs_print_as_integers(tmp_path):
    md = tables.format_table(stats.summarise([make_run("fruits", "hinge", 0)]), "fruits")
    assert "| hinge | 1 | 80.0 | — | 100.0 | 75.0 | 81.0 | 7 |" in md  # best epoch 7, not "7.0"
    two = tables.format_table(stats.summarise([make_run("fruits", "hinge", s) for s in (0, 1)]), "fruits")
    assert "| 8 |" in two  # best epochs 7 and 9: mean 8
    three = tables.format_table(stats.summarise([make_run("fruits", "hinge", s) for s in (0, 1, 2)]), "fruits").splitlines()
    assert any("| 9 |" in line for line in three)


def test_runs_of_one_dataset_made_on_other_data_are_refused_together(tmp_path):
    old, new = make_run("fruits", "hinge", 0), make_run("fruits", "cross_entropy", 0)
    old["signature"] = {"data": {"classes": ["a", "b"], "train": {"images": 8, "sha256": "1"}, "valid": {"images": 9, "sha256": "2"}}}
    new["signature"] = {"data": {"classes": ["a", "b"], "train": {"images": 8, "sha256": "1"}, "valid": {"images": 12, "sha256": "3"}}}
    write_runs(tmp_path, [old, new])
    with pytest.raises(ValueError, match=r'runs of .fruits. were made on different data.*"images": 9.*"images": 12'):
        report.write_report(tmp_path)
    assert report.main(["--out", str(tmp_path)]) == 1
