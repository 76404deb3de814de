"""Retrieval metrics (issue 16, point 3): the function against pytorch-metric-learning and by hand, the records,
tables and RESULTS.md section that carry them."""
import json
import math

import pandas as pd
import pytest
import torch
from image_folders import write_image_folder
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from evaluation import records, report, retrieval_report, run
from evaluation.metrics import RETRIEVAL_METRICS, retrieval_metrics

TINY = ["--backbone", "efficientnet_lite0", "--epochs", "2", "--batch-size", "4", "--no-progress", "--precision",
        "fp32", "--views", "1"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pytorch_metric_learning_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 6, generator=g)
    y = torch.randint(0, 10, (200,), generator=g)
    y[:3] = torch.tensor([50, 51, 52])  # classes of a single image: those queries are left out
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              device=torch.device("cpu"))
    ref = calc.get_accuracy(torch.nn.functional.normalize(x, dim=1), y)  # its default k-NN is L2: on unit vectors
    got = retrieval_metrics(x, y)
    assert got["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-12)
    assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-12)
    assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-12)


def test_hand_computed_example_and_ties():
    # Unit vectors at 0, 10, 25, 90, 100 and 200 degrees; classes a a b b a, and a lone c (left out as a query).
    angles = torch.tensor([0.0, 10.0, 25.0, 90.0, 100.0, 200.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], 1)
    y = torch.tensor([0, 0, 1, 1, 0, 2])
    got = retrieval_metrics(x, y)
    # Nearest first: q0: 1 2 ..., q1: 0 2 ..., q2: 1 ..., q3: 4 ..., q4: 3 2 ...; a-queries R = 2, b-queries R = 1.
    # q0 and q1: a hit, then a miss (P@1 1, R-precision 1/2, AP (1·1 + 0)/2); the other three miss at once.
    assert got["precision_at_1"] == pytest.approx(2 / 5)
    assert got["r_precision"] == pytest.approx((1 / 2 + 1 / 2) / 5)
    assert got["map_at_r"] == pytest.approx((1 / 2 + 1 / 2) / 5)
    # Equal similarities: the earlier image ranks first, whatever the order of the computation.
    tie = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert retrieval_metrics(tie, torch.tensor([0, 1, 0]))["precision_at_1"] == pytest.approx(0.5)


def test_scale_of_the_embeddings_does_not_matter_and_bad_input_is_named():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(80, 5, generator=g), torch.randint(0, 4, (80,), generator=g)
    scale = torch.rand(80, 1, generator=g) * 100 + 0.01
    assert retrieval_metrics(x * scale, y) == pytest.approx(retrieval_metrics(x, y))
    assert retrieval_metrics(x.double(), y) == pytest.approx(retrieval_metrics(x, y))
    assert all(math.isnan(v) for v in retrieval_metrics(x[:3], torch.tensor([0, 1, 2])).values())
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        retrieval_metrics(x, y[:5])
    with pytest.raises(ValueError, match="embeddings must be a 2-D float tensor"):
        retrieval_metrics(x[0], y)
    with pytest.raises(ValueError, match="NaN or infinite"):
        retrieval_metrics(torch.full((4, 2), math.nan), torch.tensor([0, 0, 1, 1]))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """Two losses, two seeds, on a tiny folder of three colours: records, tables and summary."""
    tmp = tmp_path_factory.mktemp("retrieval")
    root = write_image_folder(tmp / "tiny", [(220, 40, 40), (40, 220, 40), (40, 40, 220)], per_class=8, train=5,
                              prefix="c", size=(40, 40), noise=30, seed=2)
    out = tmp / "out"
    assert run.main(["--data-dir", str(root), *TINY, "--losses", "cross_entropy,am_softmax", "--seeds", "0,1",
                     "--out", str(out), "--cache-dir", str(tmp / "cache")]) == 0
    return out


def test_records_carry_the_final_retrieval_metrics(tiny_results):
    recs = [json.loads(p.read_text()) for p in sorted((tiny_results / "runs").rglob("*.json"))]
    assert len(recs) == 4
    for rec in recs:
        assert rec["record_version"] == records.RECORD_VERSION == 4
        for name in RETRIEVAL_METRICS:
            assert 0.0 <= rec["final"][f"valid_{name}"] <= 1.0, (rec["loss"], name)
        assert not any(f"valid_{name}" in row for row in rec["history"] for name in RETRIEVAL_METRICS)
        # 9 scored images, 3 per class: P@1 is a multiple of 1/9
        assert rec["final"]["valid_precision_at_1"] * 9 == pytest.approx(round(rec["final"]["valid_precision_at_1"] * 9))


def test_tables_have_the_retrieval_columns(tiny_results):
    summary = pd.read_csv(tiny_results / "summary.csv")
    assert {f"{m}_{s}" for m in RETRIEVAL_METRICS for s in ("mean", "std")} <= set(summary.columns)
    assert summary["map_at_r_mean"].between(0, 1).all()
    scores = pd.read_csv(tiny_results / "scores.csv")
    assert set(RETRIEVAL_METRICS) <= set(scores.columns) and scores["precision_at_1"].notna().all()
    md = (tiny_results / "tiny" / "accuracy.md").read_text()
    assert "| loss | P@1 | R-prec | MAP@R |" in md
    ce = summary[summary.loss == "cross_entropy"].iloc[0]
    assert f"| cross_entropy | {100 * ce.precision_at_1_mean:.1f} ± {100 * ce.precision_at_1_std:.1f} |" in md
    tex = (tiny_results / "tiny" / "accuracy.tex").read_text()
    assert r"P@1 (\%) & R-prec (\%) & MAP@R (\%)" in tex


def test_older_records_show_a_dash(tiny_results, tmp_path):
    old = [json.loads(p.read_text()) for p in sorted((tiny_results / "runs").rglob("*.json"))]
    for rec in old:
        rec["record_version"] = 3
        for name in RETRIEVAL_METRICS:
            rec["final"].pop(f"valid_{name}")
    folder = tmp_path / "runs"
    folder.mkdir()
    for i, rec in enumerate(old):
        (folder / f"{i}.json").write_text(json.dumps(rec))
    result = report.write_report(tmp_path)
    assert result["summary"]["map_at_r_mean"].isna().all()
    assert "P@1" not in (tmp_path / "tiny" / "accuracy.md").read_text()  # no retrieval table without metrics
    lines = retrieval_report.section(result["summary"], records.load_runs(tmp_path), datasets=("tiny",))
    assert any("No retrieval metrics in these run records" in line for line in lines)


def test_results_section_renders_from_a_tiny_results_folder(tiny_results):
    summary = pd.read_csv(tiny_results / "summary.csv")
    runs = records.load_runs(tiny_results)
    text = "\n".join(retrieval_report.section(summary, runs, datasets=("tiny",)))
    assert text.startswith("## Embeddings: retrieval metrics per loss")
    assert "### tiny — efficientnet_lite0, frozen, seeds on the archive split" in text
    assert "| loss | seeds | P@1 | R-prec | MAP@R | Δ P@1 | Δ R-prec | Δ MAP@R |" in text
    am = summary[summary.loss == "am_softmax"].iloc[0]
    row = next(line for line in text.splitlines() if line.startswith("| am_softmax | 2 |"))
    assert f"{100 * am.map_at_r_mean:.1f} ± " in row
    assert "| cross_entropy | 2 |" in text and "(baseline)" in text
    # The sentence answers the question for am_softmax, the one margin loss here, on MAP@R with its test.
    sentence = next(line for line in text.splitlines() if line.startswith("On tiny, "))
    assert "am_softmax (" in sentence and "paired t over seeds, Holm, α = 0.05" in sentence
    assert sentence.startswith(("On tiny, yes for", "On tiny, no:"))
    assert retrieval_report.margin_losses() == ["l_softmax", "am_softmax", "arcface"]
