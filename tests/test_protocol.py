"""The comparison protocols: repeated stratified K-fold CV and the archive split, the inner validation part,
views redrawn per seed, per-loss arguments and the equal-budget search."""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from evaluation import data, protocol, run
from evaluation.config import ConfigError, RunConfig, parse_loss_args
from image_folders import write_image_folder

DATA_ROOT = Path(os.environ.get("LOSSBANK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
TINY = ["--backbone", "efficientnet_lite0", "--epochs", "2", "--batch-size", "4", "--no-progress", "--precision", "fp32"]


@pytest.fixture(scope="module")
def covid():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return data.load_dataset("covid", data_root=DATA_ROOT)


def cv_units(splits, **settings):
    config = RunConfig(dataset="covid", protocol="cv", **settings).resolved()
    return run.dataset_units(config, splits)


def test_folds_are_stratified_disjoint_cover_every_image_and_keep_copies_together(covid):
    pool = covid.train + covid.valid
    labels = torch.tensor([s.label for s in pool])
    digests = [s.sha256 for s in pool]
    assert len(set(digests)) < len(digests)  # covid has byte-identical images, in train and test
    units = cv_units(covid, folds=5, repeats=2)
    assert [(u.seed, u.fold) for u in units] == [(r, f) for r in range(2) for f in range(5)]
    for repeat in range(2):
        tests = [u.test_rows for u in units if u.seed == repeat]
        everything = torch.cat(tests)
        assert sorted(everything.tolist()) == list(range(len(pool)))  # each image scored exactly once per repeat
        expected = torch.bincount(labels) / 5
        for rows in tests:
            assert (torch.bincount(labels[rows], minlength=3) - expected).abs().max() <= 3  # stratified
        fold_of = {int(i): k for k, rows in enumerate(tests) for i in rows}
        by_digest = {}
        for i, d in enumerate(digests):
            by_digest.setdefault(d, set()).add(fold_of[i])
        assert all(len(folds) == 1 for folds in by_digest.values())  # copies never on both sides
    for u in units:
        train, inner, test = set(u.train_rows.tolist()), set(u.inner_rows.tolist()), set(u.test_rows.tolist())
        assert not (train | inner) & test and not train & inner
        assert train | inner | test == set(range(len(pool)))
        assert 0.15 < len(inner) / (len(train) + len(inner)) < 0.25
        assert not {digests[i] for i in inner} & {digests[i] for i in train}  # copies on one side of the inner split
    # The same for every loss and every rerun; other folds for another repeat.
    again = cv_units(covid, folds=5, repeats=2)
    assert all(torch.equal(a.test_rows, b.test_rows) and torch.equal(a.inner_rows, b.inner_rows)
               for a, b in zip(units, again))
    assert not torch.equal(units[0].test_rows, units[5].test_rows)


def test_the_split_protocol_scores_on_the_archive_split_without_inner_part_by_default(covid):
    config = RunConfig(dataset="covid", seeds=[0, 3]).resolved()
    units = run.dataset_units(config, covid)
    assert [(u.seed, u.fold) for u in units] == [(0, None), (3, None)]
    assert all(len(u.inner_rows) == 0 and len(u.test_rows) == len(covid.valid) for u in units)
    held = run.dataset_units(RunConfig(dataset="covid", inner_valid=0.2).resolved(), covid)[0]
    assert len(held.inner_rows) > 0 and len(held.train_rows) + len(held.inner_rows) == len(covid.train)


def test_too_many_folds_for_the_data_is_named():
    labels = torch.tensor([0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="--folds 5: the largest class has only 3 images"):
        protocol.deal_folds(labels, [str(i) for i in range(5)], 5, 0)


@pytest.mark.parametrize("spec,message", [
    ("focal:gamma=2", "unknown loss 'focal'"),
    ("arcface:margn=0.3", "unknown argument 'margn'; arcface takes scale, margin"),
    ("l_softmax:margin=two", "margin must be int like its default 4; got 'two'"),
    ("arcface:margin=2", "margin must be in \\[0, π/2\\)"),
    ("am_softmax", "must be LOSS:NAME=VALUE"),
])
def test_bad_loss_args_are_one_line_before_any_work(spec, message, capsys, monkeypatch):
    monkeypatch.setattr(run.data, "load_dataset", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--dataset", "fruits", "--loss-args", spec])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1 and pytest.importorskip("re").search(message, err[-1])


def test_loss_args_reach_the_loss_and_are_part_of_a_runs_identity(tmp_path):
    assert parse_loss_args("am_softmax:margin=0.2,scale=16;arcface:margin=0.3") == {
        "am_softmax": {"margin": 0.2, "scale": 16.0}, "arcface": {"margin": 0.3}}
    root = write_image_folder(tmp_path / "tiny", [(220, 40, 40), (40, 40, 220)], per_class=6, train=4, prefix="c",
                              size=(40, 40), noise=30, seed=1)
    argv = ["--data-dir", str(root), *TINY, "--losses", "am_softmax,hinge", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    assert run.main([*argv, "--loss-args", "am_softmax:margin=0.2"]) == 0
    recs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").rglob("*.json")}
    assert recs["am_softmax"]["signature"]["loss_args"] == {"margin": 0.2} == recs["am_softmax"]["config"]["loss_args"]
    assert recs["hinge"]["signature"]["loss_args"] == {}
    with pytest.raises(SystemExit, match="loss_args .*'margin': 0.2.* there vs .*'margin': 0.3.* now"):
        run.main([*argv, "--loss-args", "am_softmax:margin=0.3"])


def test_cv_end_to_end_chooses_nothing_on_the_scored_images(tmp_path):
    root = write_image_folder(tmp_path / "three", [(210, 50, 40), (40, 60, 210), (60, 190, 60)], per_class=8, train=6)
    out = tmp_path / "out"
    argv = ["--data-dir", str(root), *TINY, "--losses", "cross_entropy,distillation", "--protocol", "cv",
            "--folds", "3", "--repeats", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run.main(argv) == 0
    recs = {str(p.relative_to(out / "runs")): json.loads(p.read_text()) for p in (out / "runs").rglob("*.json")}
    assert len(recs) == 2 * 3 * 2  # losses x folds x repeats
    scored = Counter()
    for rec in recs.values():
        assert rec["protocol"] == "cv" and rec["fold"] in (0, 1, 2) and rec["seed"] in (0, 1)
        assert rec["num_train"] + rec["num_inner"] + rec["num_valid"] == 24 and rec["num_inner"] > 0
        assert all("inner_loss" in row for row in rec["history"])
        assert sum(map(sum, rec["final"]["confusion"])) == rec["num_valid"]
        scored[(rec["loss"], rec["seed"])] += rec["num_valid"]
    assert set(scored.values()) == {24}  # each repeat scores every image once, for each loss
    folds = (out / "folds" / "three.csv").read_text().splitlines()
    assert folds[0] == "dataset,path,sha256,repeat,fold" and len(folds) == 1 + 24 * 2
    # Early stopping follows the inner part: a model whose inner loss stops improving stops, whatever valid says.
    from evaluation import train

    model = torch.nn.Linear(2, 2)
    inner_x, inner_y = torch.randn(8, 2), torch.randint(0, 2, (8,))

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, x, target=None, teacher=None):
            from lossbank import HeadOutput

            logits = self.lin(x)
            return HeadOutput(logits, torch.nn.functional.cross_entropy(logits, target) if target is not None else None)

    calls = {"inner": 0}

    def inner_batches():
        calls["inner"] += 1
        return [(inner_x, inner_y)]

    result = train.fit(Head(), model.parameters(), lambda e: [(inner_x, inner_y)], lambda: [(inner_x, inner_y)], 2,
                       epochs=4, lr=1e-3, weight_decay=0.0, patience=0, select_batches=inner_batches)
    assert calls["inner"] == 4 and all("inner_loss" in row for row in result.history)


def test_a_seed_redraws_the_augmented_views_it_trains_on(tmp_path):
    root = write_image_folder(tmp_path / "tiny", [(220, 40, 40), (40, 40, 220)], per_class=6, train=4, prefix="c",
                              size=(40, 40), noise=30, seed=1)
    cache = tmp_path / "cache"
    assert run.main(["--data-dir", str(root), *TINY, "--losses", "hinge", "--seeds", "0,1", "--views", "2",
                     "--out", str(tmp_path / "out"), "--cache-dir", str(cache)]) == 0
    augmented = sorted(cache.glob("efficientnet_lite0_aug2_*"))
    assert len(augmented) == 2  # one set of views per seed

    def views_by_image(folder):
        shards = [torch.load(p, weights_only=True) for p in folder.glob("*.pt")]
        return {k: s["features"][:, row] for s in shards for row, k in enumerate(s["images"])}

    first, second = (views_by_image(folder) for folder in augmented)
    assert first.keys() == second.keys() and len(first) > 0
    assert all(first[k].shape == second[k].shape and not torch.allclose(first[k], second[k]) for k in first)


def test_the_search_spends_the_same_trials_on_every_loss_and_resumes(tmp_path):
    root = write_image_folder(tmp_path / "tiny", [(220, 40, 40), (40, 40, 220)], per_class=10, train=8, prefix="c",
                              size=(40, 40), noise=30, seed=1)
    argv = ["--data-dir", str(root), *TINY, "--losses", "hinge,am_softmax", "--search", "3", "--inner-valid", "0.25",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert run.main(argv) == 0
    recs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").rglob("*.json")}
    for loss, params in (("hinge", {"lr", "margin"}), ("am_softmax", {"lr", "scale", "margin"})):
        chosen = recs[loss]["search"]
        assert chosen["trials"] == 3 and set(chosen["params"]) == params
        assert recs[loss]["config"]["lr"] == chosen["lr"] and 0 <= chosen["inner_top1"] <= 1
    import optuna

    storage = f"sqlite:///{(tmp_path / 'out' / 'search.db').resolve()}"
    studies = optuna.get_all_study_summaries(storage)
    assert sorted(s.n_trials for s in studies) == [3, 3]
    # A rerun finds the runs finished; a new loss gets its own three trials, the finished studies none.
    assert run.main([*argv[:argv.index("hinge,am_softmax")], "hinge,am_softmax,cosine",
                     *argv[argv.index("hinge,am_softmax") + 1:]]) == 0
    assert sorted(s.n_trials for s in optuna.get_all_study_summaries(storage)) == [3, 3, 3]
    with pytest.raises(ConfigError, match="--search scores its trials on the inner validation part"):
        RunConfig(dataset="fruits", search=2).resolved()


def test_a_crippled_loss_is_found_worse_and_a_twin_is_not(tmp_path):
    """Through the whole harness: under cv, a loss trained on shuffled labels is significantly worse than
    cross-entropy (corrected resampled t, Holm), and a registered copy of cross-entropy is not. The false-positive
    rate of the test itself over repeated draws is measured in tests/test_stats.py."""
    import pandas as pd
    from torch import nn

    from lossbank import register_loss
    from lossbank.registry import _REGISTRY

    @register_loss("test_twin", paper="Bridle 1990 (a copy)", input="logits", defaults_source="none")
    class Twin(nn.Module):
        def __init__(self, reduction: str = "mean"):
            super().__init__()

        def forward(self, logits, target):
            return nn.functional.cross_entropy(logits, target)

    @register_loss("test_shuffled", paper="Nobody, 'Shuffled labels', 2026", input="logits", defaults_source="none")
    class Shuffled(nn.Module):
        def __init__(self, reduction: str = "mean"):
            super().__init__()

        def forward(self, logits, target):
            return nn.functional.cross_entropy(logits, target[torch.randperm(len(target))])

    try:
        root = write_image_folder(tmp_path / "three", [(210, 50, 40), (40, 60, 210), (60, 190, 60)], per_class=12,
                                  train=9, noise=60)
        out = tmp_path / "out"
        assert run.main(["--data-dir", str(root), *TINY, "--epochs", "8", "--losses",
                         "cross_entropy,test_twin,test_shuffled", "--protocol", "cv", "--folds", "3", "--repeats", "3",
                         "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    finally:
        del _REGISTRY["test_twin"], _REGISTRY["test_shuffled"]
    comparison = pd.read_csv(out / "comparison.csv")
    vs = comparison[comparison["family"] == "vs baseline"].set_index("loss")
    assert vs.loc["test_shuffled", "mean_diff"] < -0.2 and vs.loc["test_shuffled", "p_holm"] < 0.05
    assert vs.loc["test_twin", "p_holm"] >= 0.05 and vs.loc["test_twin", "n"] == 9
    assert (vs["test"] == "corrected resampled t (Nadeau-Bengio)").all()
    # RESULTS.md states the verdict in words, from the same comparison.
    from evaluation import results

    path = tmp_path / "RESULTS.md"
    results.write_results_md(out, out / "plots", path, [], [])
    text = path.read_text()
    assert "## Which loss? (cross-validation)" in text
    assert "test_shuffled is worse than cross_entropy on three by −" in text


def test_shards_deal_out_the_folds_and_together_make_the_whole_grid(tmp_path):
    root = write_image_folder(tmp_path / "three", [(210, 50, 40), (40, 60, 210), (60, 190, 60)], per_class=8, train=6)
    common = ["--data-dir", str(root), *TINY, "--losses", "hinge,distillation", "--protocol", "cv", "--folds", "3",
              "--repeats", "1", "--cache-dir", str(tmp_path / "cache")]
    assert run.main([*common, "--out", str(tmp_path / "whole")]) == 0
    for shard in ("0/2", "1/2"):
        assert run.main([*common, "--out", str(tmp_path / "shared"), "--shard", shard]) == 0

    def histories(out):
        return {str(p.relative_to(out)): [{k: v for k, v in row.items() if k != "seconds"}
                                          for row in json.loads(p.read_text())["history"]]
                for p in (out / "runs").rglob("*.json")}

    whole, shared = histories(tmp_path / "whole"), histories(tmp_path / "shared")
    assert len(whole) == 2 * 3 and whole == shared
