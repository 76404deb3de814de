"""The report's comparisons (issue 15): scores.csv, comparison.csv, ranks.csv, folds.csv, accuracy.tex, the
verdicts and marks of accuracy.md, and the comparison plots, on synthetic split and cv records."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from test_report import is_png, make_cv_run, make_run, write_runs

from evaluation import plots, report, significance, stats, tables

# Correct answers out of each fold's scored images, per (repeat, fold) unit of 5 folds x 2 repeats.
BASE = [51, 53, 50, 54, 52, 51, 53, 52, 50, 54]
BETTER = [b + d for b, d in zip(BASE, [3, 4, 3, 5, 4, 3, 4, 4, 3, 4])]  # am_softmax: about 6 points better
SAME = [b + d for b, d in zip(BASE, [1, -1, 0, 1, -1, 0, 1, -1, 0, 0])]  # hinge: no difference
BIG = [170, 174, 168, 176, 172, 171, 173, 170, 169, 175]  # weather: 200 images a fold


def cv_runs(dataset, per_loss, num_valid):
    return [make_cv_run(dataset, loss, u // 5, u % 5, correct[u], num_valid=num_valid)
            for loss, correct in per_loss.items() for u in range(10)]


def synthetic_runs():
    """covid (cv, 60 images a fold): am_softmax clearly better than cross_entropy, hinge the same; weather (cv,
    200 a fold): no difference; fruits (split, 3 seeds, records older than the protocol)."""
    runs = cv_runs("covid", {"cross_entropy": BASE, "am_softmax": BETTER, "hinge": SAME}, 60)
    runs += cv_runs("weather", {"cross_entropy": BIG, "am_softmax": [c + (u % 3) - 1 for u, c in enumerate(BIG)],
                                "hinge": [c + (1 if u % 2 else -1) for u, c in enumerate(BIG)]}, 200)
    runs += [make_run("fruits", loss, s, confusion=True) for loss in ("cross_entropy", "hinge") for s in range(3)]
    return runs


def write_folds(out):
    folds = out / "folds"
    folds.mkdir(parents=True)
    for dataset in ("covid", "weather"):
        rows = [f"{dataset},c{i}/img{i}.png,{i:064x},{r},{i % 5}" for r in range(2) for i in range(5)]
        (folds / f"{dataset}.csv").write_text("dataset,path,sha256,repeat,fold\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def cv_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    runs = synthetic_runs()
    write_runs(out, runs)
    write_folds(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = report.write_report(out)
    return out, runs, result


def test_summary_counts_units_and_corrects_the_cv_interval():
    summary = stats.summarise(synthetic_runs())
    assert list(summary.columns) == stats.SUMMARY_COLUMNS and stats.SUMMARY_COLUMNS[3] == "protocol"
    row = summary[(summary.dataset == "covid") & (summary.loss == "am_softmax")].iloc[0]
    top1 = np.array(BETTER) / 60
    assert row.protocol == "cv" and row.seeds == 10 and row.num_valid == 60 and row.num_train == 192
    # Nadeau-Bengio: n_test / n_train = 60 / (192 + 48)
    half = 2.2621571627409915 * math.sqrt((1 / 10 + 60 / 240) * top1.var(ddof=1))  # t_{0.975, 9}
    assert row.top1_mean == pytest.approx(top1.mean()) and row.top1_ci95 == pytest.approx(half)
    assert row.top1_ci95 > stats.ci95_half_width(top1)  # wider than the plain t-interval
    split = summary[summary.dataset == "fruits"]
    assert set(split.protocol) == {"split"} and (split.seeds == 3).all()


def test_scores_csv_is_one_row_per_finished_run(cv_report):
    out, runs, _ = cv_report
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == significance.SCORE_COLUMNS + ["train_fraction", "precision_at_1", "r_precision",
                                                                 "map_at_r"]
    assert scores.map_at_r.isna().all()  # records older than the retrieval metrics
    assert len(scores) == len(runs)
    cv = scores[scores.protocol == "cv"].set_index(["dataset", "loss", "repeat", "fold"]).sort_index()
    for rec in (r for r in runs if r.get("protocol") == "cv"):
        row = cv.loc[(rec["dataset"], rec["loss"], rec["seed"], rec["fold"])]
        assert row.top1 == rec["final"]["valid_top1"] and row.seed == rec["seed"]
        assert row.n_train == rec["num_train"] + rec["num_inner"] and row.n_test == rec["num_valid"]
    split = scores[scores.protocol == "split"]
    assert split.repeat.isna().all() and split.fold.isna().all() and sorted(set(split.seed)) == [0, 1, 2]
    assert (split.n_train == 240).all() and (split.n_test == 60).all()


def test_comparison_csv_is_significance_compare(cv_report):
    out, _, _ = cv_report
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison.columns) == significance.COMPARE_COLUMNS
    expected = significance.compare(pd.read_csv(out / "scores.csv"), "cross_entropy")
    assert len(comparison) == len(expected)
    assert np.allclose(comparison.p_holm, expected.p_holm, rtol=1e-5, equal_nan=True)
    # By hand: am_softmax - cross_entropy on covid, corrected resampled t with 60/240, Holm over 2 losses.
    vs = comparison[(comparison.family == "vs baseline") & (comparison.dataset == "covid")].set_index("loss")
    d = (np.array(BETTER) - np.array(BASE)) / 60
    am = significance.corrected_resampled_t(d, 60 / 240)
    hinge = significance.corrected_resampled_t((np.array(SAME) - np.array(BASE)) / 60, 60 / 240)
    assert vs.at["am_softmax", "mean_diff"] == pytest.approx(d.mean(), rel=1e-5)
    assert vs.at["am_softmax", "p_holm"] == pytest.approx(significance.holm([am["p_value"], hinge["p_value"]])[0],
                                                          rel=1e-5)
    assert vs.at["am_softmax", "p_holm"] < 0.05 <= vs.at["hinge", "p_holm"]


def test_ranks_and_folds_csv(cv_report):
    out, _, _ = cv_report
    ranks = pd.read_csv(out / "ranks.csv")
    assert list(ranks.columns) == significance.RANK_COLUMNS
    assert set(ranks.protocol) == {"cv"} and (ranks.n_datasets == 2).all()  # split has one dataset: not ranked
    avg = ranks[ranks.dataset == significance.AVERAGE].set_index("loss")
    # am_softmax: first on covid, last on weather (a tenth of an image below the others on average)
    assert avg.at["am_softmax", "rank"] == pytest.approx(2.0)
    folds = pd.read_csv(out / "folds.csv")
    assert list(folds.columns) == ["dataset", "path", "sha256", "repeat", "fold"]
    assert len(folds) == 20 and set(folds.dataset) == {"covid", "weather"}


def test_ranks_csv_is_only_its_header_with_one_dataset(tmp_path):
    write_runs(tmp_path, [make_run("fruits", loss, s) for loss in ("cross_entropy", "hinge") for s in range(2)])
    result = report.write_report(tmp_path)
    assert (tmp_path / "ranks.csv").read_text().strip() == ",".join(significance.RANK_COLUMNS)
    assert not (tmp_path / "folds.csv").exists()  # no OUT/folds: nothing to concatenate
    assert not any("critical_difference" in p.name for p in result["plots"])


def test_accuracy_md_verdicts_marks_and_warnings(cv_report):
    out, _, _ = cv_report
    covid = (out / "covid" / "accuracy.md").read_text()
    assert "## covid — backbone efficientnet_lite0, mode frozen, protocol cv" in covid
    assert "| loss | runs | final top-1 | 95 % CI | vs cross_entropy | top-3 | macro-F1 | train s |" in covid
    assert "best top-1" not in covid  # chosen on the scored fold: not shown under cv
    assert f"| am_softmax {tables.MARK} | 10 |" in covid and "| cross_entropy | 10 |" in covid
    assert "- am_softmax beats cross_entropy on covid by +6.2 points [" in covid and "p_holm < 0.001" in covid
    assert "No loss beats" not in covid and "hinge is worse" not in covid
    assert "⚠ one scored image per fold = 1.7 points: differences of one image are noise." in covid
    weather = (out / "weather" / "accuracy.md").read_text()
    assert "- No loss beats cross_entropy on weather at α = 0.05 (corrected resampled t, Holm)." in weather
    assert "⚠" not in weather and "(one = 0.5 points)" in weather
    fruits = (out / "fruits" / "accuracy.md").read_text()
    assert "best top-1 †" in fruits and "| seeds |" in fruits
    assert "- hinge is worse than cross_entropy on fruits by" in fruits  # 10.7 points on each of 3 seeds
    assert "training noise only" in fruits and "⚠ one valid image = 1.7 points" in fruits


def test_format_table_prints_the_comparison(cv_report):
    _, runs, result = cv_report
    text = tables.format_table(result["summary"], "covid", result["comparison"])
    assert text == (cv_report[0] / "covid" / "accuracy.md").read_text()
    plain = tables.format_table(result["summary"], "covid")  # without a comparison: no verdicts
    assert "vs cross_entropy" not in plain and "beats" not in plain and "95 % CI" in plain


def test_accuracy_tex(cv_report):
    out, _, _ = cv_report
    tex = (out / "covid" / "accuracy.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert rule in tex
    rows = [line for line in tex.splitlines() if line.split(" ")[0].split("$")[0] in
            (r"cross\_entropy", r"am\_softmax", "hinge")]
    assert len(rows) == 3
    am = next(line for line in rows if line.startswith(r"am\_softmax$^\bullet$"))
    assert r"$\mathbf{" in am and "$+6.2$ [" in am


def test_comparison_plots_are_drawn_listed_and_reused(cv_report, tmp_path, monkeypatch):
    out, runs, result = cv_report
    names = {p.name for p in result["plots"]}
    for name in ("covid_cv_differences.png", "covid_cv_confusion.png", "weather_cv_differences.png",
                 "fruits_differences.png", "fruits_confusion.png",
                 "all_datasets_efficientnet_lite0_frozen_cv_critical_difference.png"):
        assert name in names and is_png(out / "plots" / name), name
    assert not any("final_accuracy" in n for n in names)
    stamp = json.loads((out / "plots" / plots.PLOTS_STAMP).read_text())["by_out"]
    assert names == set(stamp[str(out.resolve())]["plots"])

    def refuse(*args, **kwargs):
        raise AssertionError("a plot was redrawn although no record changed")

    monkeypatch.setattr(plots.Figure, "savefig", refuse)
    again = report.write_report(out)
    assert {p.name for p in again["plots"]} == names
    with pytest.raises(AssertionError, match="redrawn"):  # another baseline changes what the plots show
        report.write_report(out, baseline="hinge")


def test_forest_plot_shows_differences_around_zero(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    runs = cv_runs("covid", {"cross_entropy": BASE, "am_softmax": BETTER, "hinge": SAME}, 60)
    from evaluation import comparison_plots

    comparison_plots.plot_differences(runs, stats.compare_runs(runs), "covid", tmp_path)
    ax, right = drawn[0].axes
    assert any(list(line.get_xdata()) == [0, 0] for line in ax.get_lines())  # the line at 0
    assert [t.get_text() for t in ax.get_yticklabels()][0].startswith("am_softmax")
    assert any(t.get_text().startswith("p_holm") for t in right.get_yticklabels())
    assert "one scored image = 1.7 points" in drawn[0].get_suptitle()
    assert ax.get_xlim()[1] > 100 * (np.array(BETTER) - np.array(BASE)).max() / 60


def test_no_baseline_and_a_single_seed_give_honest_verdicts():
    runs = [make_run("fruits", loss, 0) for loss in ("hinge", "l_softmax")]
    comparison = stats.compare_runs(runs)
    text = tables.format_table(stats.summarise(runs), "fruits", comparison)
    assert "the baseline cross_entropy has no finished run here" in text
    runs.append(make_run("fruits", "cross_entropy", 0))
    comparison = stats.compare_runs(runs)
    text = tables.format_table(stats.summarise(runs), "fruits", comparison)
    assert "fewer than two paired runs per loss, so no test" in text and "(n = 1: no test)" in text
    assert tables.MARK not in text  # nothing tested: no loss is marked as indistinguishable from the best


def test_cd_cliques():
    from evaluation.comparison_plots import _cliques

    assert _cliques(np.array([1.0, 1.5, 2.6, 3.0]), 1.0) == [(0, 1), (2, 3)]
    assert _cliques(np.array([1.0, 1.5, 2.0, 3.5]), 1.0) == [(0, 2)]
    assert _cliques(np.array([1.0, 2.5, 4.0]), 1.0) == []


def test_a_cv_run_without_its_sizes_is_refused():
    run = make_cv_run("covid", "hinge", 0, 0, 50)
    del run["num_train"]
    with pytest.raises(ValueError, match="needs num_train and num_valid"):
        stats.compare_runs([run])
