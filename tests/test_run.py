"""End-to-end tests of ``python -m evaluation.run`` on the real fruits data (few epochs).

One feature cache is shared by the module, so EfficientNet-Lite0 runs over fruits once.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from evaluation import backbones, features, run, train
from evaluation import records as record_files
from image_folders import write_image_folder
from lossbank import register_loss
from lossbank.registry import _REGISTRY

DATA_ROOT = Path(os.environ.get("LOSSBANK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets")

# fp32 pinned: these tests compare numbers between runs, and "auto" picks bf16 on CPUs that have it natively.
# test_finetune_mode_trains_the_last_stages runs the bf16 path on purpose.
FAST = ["--backbone", "efficientnet_lite0", "--epochs", "3", "--views", "1", "--no-progress", "--precision", "fp32"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(autouse=True)
def data_root(monkeypatch):
    monkeypatch.setenv("LOSSBANK_DATA", str(DATA_ROOT))


def records(out: Path) -> dict[str, dict]:
    return {p.parent.name + "/" + p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))}


def test_end_to_end_on_fruits_then_resume(tmp_path, cache_dir, capsys):
    out = tmp_path / "results"
    argv = ["--dataset", "fruits", *FAST, "--losses", "am_softmax,distillation,l1", "--out", str(out),
            "--cache-dir", str(cache_dir)]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# python -m evaluation.run --dataset fruits")
    assert "fruits efficientnet_lite0 frozen am_softmax seed 0 frac 1: valid top-1" in printed
    assert "| am_softmax" in printed or "am_softmax" in printed.split("timing")[0]
    got = records(out)
    assert set(got) == {"am_softmax/seed0-frac1", "distillation/seed0-frac1", "l1/seed0-frac1"}
    for rec in got.values():
        assert rec["status"] == "ok"
        assert rec["dataset"] == "fruits" and rec["backbone"] == "efficientnet_lite0" and rec["weights_hash"]
        assert rec["num_train"] == 240 and rec["num_valid"] == 60
        assert len(rec["history"]) == 3
        assert set(rec["history"][0]) >= {"train_loss", "valid_loss", "train_top1", "valid_top1", "valid_top3",
                                          "valid_macro_f1", "lambda"}
        # Frozen ImageNet features separate fruits well after even 3 epochs.
        assert rec["final"]["valid_top1"] > 0.7
    # The teacher (cross-entropy) was trained for distillation but not reported as a run of its own.
    assert (out / "runs/fruits/efficientnet_lite0-frozen/cross_entropy/seed0-frac1.pt").exists()
    assert not (out / "runs/fruits/efficientnet_lite0-frozen/cross_entropy/seed0-frac1.json").exists()
    for name in ("fruits/accuracy.csv", "fruits/accuracy.md", "summary.csv", "timing.json", "grid.json"):
        assert (out / name).is_file(), name
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    # no cross_entropy run here: no differences against the baseline to draw; the confusion matrices are there
    assert {"fruits_loss_curves.png", "fruits_accuracy_curves.png", "fruits_confusion.png"} <= set(pngs)
    timing = json.loads((out / "timing.json").read_text())["sections"]
    assert any(k.startswith("train:") for k in timing)

    # Rerunning the same command trains nothing and keeps every finished run as it was.
    before = {k: v["history"] for k, v in got.items()}
    assert run.main(argv) == 0
    timing = json.loads((out / "timing.json").read_text())["sections"]
    assert not any(k.startswith("train:") for k in timing), timing
    assert {k: v["history"] for k, v in records(out).items()} == before

    # Other settings in the same folder are refused rather than mixed in.
    with pytest.raises(SystemExit, match="other settings.*epochs 3 there vs 4 now"):
        run.main([*argv, "--epochs", "4"])


def test_same_seed_same_history_on_cpu(tmp_path, cache_dir):
    histories = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert run.main(["--dataset", "fruits", *FAST, "--losses", "arcface", "--seeds", "3", "--out", str(out),
                         "--cache-dir", str(cache_dir)]) == 0
        histories.append([{k: v for k, v in row.items() if k != "seconds"} for row in records(out)["arcface/seed3-frac1"]["history"]])
    assert histories[0] == histories[1]


def test_train_fraction_is_stratified_and_seeded(tmp_path, cache_dir):
    out = tmp_path / "out"
    assert run.main(["--dataset", "fruits", *FAST, "--losses", "cross_entropy", "--train-fraction", "0.25",
                     "--seeds", "0,1", "--out", str(out), "--cache-dir", str(cache_dir)]) == 0
    recs = records(out)
    counts = recs["cross_entropy/seed0-frac0.25"]["train_class_counts"]
    assert counts == [round(0.25 * n) for n in (75, 73, 20, 72)]
    labels = torch.arange(4).repeat_interleave(torch.tensor([75, 73, 20, 72]))
    assert train.stratified_subset(labels, 0.25, 0).tolist() != train.stratified_subset(labels, 0.25, 1).tolist()
    assert train.stratified_subset(labels, 0.25, 0).tolist() == train.stratified_subset(labels, 0.25, 0).tolist()


@pytest.fixture
def nan_loss():
    """A registered loss that turns NaN in its second epoch (fruits: 8 batches an epoch)."""

    @register_loss("test_nan", paper="Nobody, 'Test', 2026", input="logits", defaults_source="none")
    class TurnsNaN(nn.Module):
        def __init__(self, reduction: str = "mean"):
            super().__init__()
            self.calls = 0

        def forward(self, logits, target):
            self.calls += self.training
            value = nn.functional.cross_entropy(logits, target)
            return value * float("nan") if self.calls > 10 else value

    yield "test_nan"
    del _REGISTRY["test_nan"]


def test_nan_loss_is_recorded_as_failed_and_the_run_goes_on(tmp_path, cache_dir, nan_loss, capsys):
    out = tmp_path / "out"
    assert run.main(["--dataset", "fruits", *FAST, "--losses", f"{nan_loss},hinge", "--out", str(out),
                     "--cache-dir", str(cache_dir)]) == 0
    recs = records(out)
    failed = recs[f"{nan_loss}/seed0-frac1"]
    assert failed["status"] == "failed" and failed["failed_epoch"] == 2
    assert "nan" in failed["failure"] and len(failed["history"]) == 1
    assert recs["hinge/seed0-frac1"]["status"] == "ok"
    assert "FAILED in epoch 2" in capsys.readouterr().out


def test_users_own_folder(tmp_path, cache_dir, capsys):
    root = write_image_folder(tmp_path / "mine", [(200, 30, 30), (30, 200, 30), (30, 30, 200)], per_class=10, train=7,
                              valid="val", size=(48, 64))
    (root / "train" / "class1" / "broken.jpg").write_bytes(b"")  # undecodable: skipped, counted, never fatal
    out = tmp_path / "out"
    assert run.main(["--data-dir", str(root), *FAST, "--losses", "cross_entropy", "--out", str(out),
                     "--cache-dir", str(cache_dir)]) == 0
    assert "warning: mine: 1 of 31 image files cannot be decoded" in capsys.readouterr().err
    rec = records(out)["cross_entropy/seed0-frac1"]
    assert rec["dataset"] == "mine" and rec["num_train"] == 21 and rec["num_valid"] == 9
    assert rec["classes"] == ["class0", "class1", "class2"]
    assert [Path(p).name for p in rec["skipped_files"]] == ["broken.jpg"]
    assert "1 undecodable image files skipped" in (out / "mine" / "accuracy.md").read_text()


def test_finetune_mode_trains_the_last_stages(tmp_path):
    root = write_image_folder(tmp_path / "tiny", [(220, 40, 40), (40, 40, 220)], per_class=6, train=4, prefix="c",
                              size=(40, 40), noise=30, seed=1)
    out = tmp_path / "out"
    # bf16 on purpose, whatever this CPU has: trunk features and the training step under bf16 autocast.
    # Where bf16 is emulated this is slow, but the set is tiny.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no native bf16")
        assert run.main(["--data-dir", str(root), "--backbone", "efficientnet_lite0", "--mode", "finetune",
                         "--epochs", "2", "--batch-size", "4", "--losses", "am_softmax,distillation", "--precision", "bf16",
                         "--no-progress", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    recs = records(out)
    for name in ("am_softmax/seed0-frac1", "distillation/seed0-frac1"):
        assert recs[name]["status"] == "ok" and recs[name]["mode"] == "finetune"
        assert recs[name]["signature"]["precision"] == "bf16"
        assert len(recs[name]["history"]) == 2 and recs[name]["num_train"] == 8
        assert recs[name]["signature"]["unfreeze"] == "last"
    # The teacher of a finetuned distillation run is the finetuned tail of the backbone and the head,
    # saved beside its run; the frozen trunk is in the cache, as the trunk's outputs.
    teacher = torch.load(out / "runs/tiny/efficientnet_lite0-finetune/cross_entropy/seed0-frac1.pt", weights_only=True)
    tail = backbones.create_backbone("efficientnet_lite0").split()[1]
    assert {f"backbone.{k}" for k in tail.state_dict()} <= set(teacher) and "head.weight" in teacher
    # per image: the augmented train views of seed 0 (5 views, the default) and the eval views
    assert sorted(p.name.split("_")[:3] for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [
        ["efficientnet", "lite0-trunk", "aug5"], ["efficientnet", "lite0-trunk", "eval1"]]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "fruits", "--losses", "focal"], "unknown loss focal; known losses: l1, l2"),
        (["--dataset", "fruits", "--backbone", "vgg16"], "unknown backbone 'vgg16'"),
        (["--dataset", "fruits", "--train-fraction", "1.5"], "--train-fraction must be in (0, 1]"),
        (["--dataset", "fruits", "--train-fraction", "0"], "--train-fraction must be in (0, 1]"),
        (["--dataset", "fruits", "--seeds", "a"], "--seeds must be a comma-separated list of ints"),
        (["--dataset", "fruits", "--epochs", "0"], "--epochs must be at least 1"),
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--dataset", "fruits", "--weights", "/nonexistent.pth"], "--weights: no file at /nonexistent.pth"),
        ([], "give one of --dataset or --data-dir"),
        (["--dataset", "fruits", "--device", "gpu"], "--device 'gpu': use auto (CUDA when available), cpu, cuda"),
        (["--dataset", "fruits", "--lr", "1e38"], "--lr must be a positive number up to 10; got 1e+38"),
        (["--dataset", "fruits", "--train-fraction", "0.5,0.5000001"], "--train-fraction 0.5 and 0.5000001 are the same run"),
    ],
)
def test_bad_arguments_fail_before_any_work(args, message, capsys, monkeypatch):
    monkeypatch.setattr(run.data, "load_dataset", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exit_info:
        run.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_offline_torchvision_backbone_fails_at_once_with_advice(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(run.data, "load_dataset", lambda *a, **k: pytest.fail("work started"))
    assert run.main(["--dataset", "fruits", "--backbone", "resnet50", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "resnet50" in err and "--weights" in err and "efficientnet_lite0" in err
    assert str(backbones.torchvision_cache_file("resnet50").name) in err


def test_cli_help_shows_examples():
    out = subprocess.run([sys.executable, "-m", "evaluation.run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "examples:" in out and "--train-fraction" in out and "--drop-duplicates" in out


def test_paths_with_a_tilde_are_expanded():
    args = run.parse_args(["--dataset", "fruits", "--out", "~/lossbank-results"])
    assert args.out == Path.home() / "lossbank-results"
    assert args.plots == Path.home() / "lossbank-results" / "plots"
    assert args.cache_dir.is_absolute() and "~" not in str(args.cache_dir)


def test_results_md_is_generated_from_the_runs(tmp_path, cache_dir):
    from evaluation import results

    out, plots = tmp_path / "results", tmp_path / "plots"
    assert run.main(["--dataset", "fruits", *FAST, "--losses", "cross_entropy,hinge", "--seeds", "0,1",
                     "--train-fraction", "1.0,0.5", "--out", str(out), "--plots", str(plots),
                     "--cache-dir", str(cache_dir)]) == 0
    path = tmp_path / "RESULTS.md"
    ledger = [{"runs_before": 0, "cache_entries_before": 0, "seconds": 120, "finished": True}]
    results.write_results_md(out, plots, path, [["--dataset", "fruits"]], ledger)
    text = path.read_text()
    summary = __import__("pandas").read_csv(out / "summary.csv")
    ce = summary[(summary["loss"] == "cross_entropy") & (summary["train_fraction"] == 1.0)].iloc[0]
    verdict = "yes" if 100 * ce.top1_mean >= 92 else "**no**"
    assert f"| cross_entropy | frozen | 2 | {100 * ce.top1_mean:.1f} ± {100 * ce.top1_std:.1f}" in text
    assert f"| 92 % | {verdict} |" in text
    assert f"| cross_entropy | fruits | 92 % | {100 * ce.top1_mean:.1f} ± {100 * ce.top1_std:.1f} (2) | – | {verdict} (frozen) |" in text
    assert "| hinge | frozen |" in text and "### fruits" in text and "took 2 min" in text
    assert "- **frozen**: " in text and "slowest to converge: " in text
    assert "Fewer seeds than the grid asks for" in text and "No fine-tuning runs yet for fruits" in text
    assert "No cross-validated runs yet" in text
    assert "python -m evaluation.run --dataset fruits" in text


def test_two_shards_in_parallel_cover_the_grid_like_one_run(tmp_path, cache_dir):
    grid = ["--dataset", "fruits", *FAST, "--losses", "cross_entropy,distillation", "--seeds", "0,1",
            "--cache-dir", str(cache_dir)]
    whole = tmp_path / "whole"
    assert run.main([*grid, "--out", str(whole)]) == 0
    run.main([*grid, "--out", str(tmp_path / "warm")])  # features for both shards come from the cache
    shared = tmp_path / "shared"
    env = {**os.environ, "LOSSBANK_DATA": str(DATA_ROOT)}
    jobs = [subprocess.Popen([sys.executable, "-m", "evaluation.run", *grid, "--out", str(shared), "--shard", f"{i}/2"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    # Each shard trained one seed, both losses of it (the distillation teacher with them).
    for i, (out, _) in enumerate(outputs):
        trained = {line.split(" seed ")[1].split(" ")[0] for line in out.splitlines() if ": valid top-1" in line}
        assert trained == {str(i)}, out
    merged = subprocess.run([sys.executable, "-m", "evaluation.report", "--out", str(shared)], env=env,
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    strip = lambda recs: {k: [{f: v for f, v in row.items() if f != "seconds"} for row in r["history"]]  # noqa: E731
                          for k, r in recs.items()}
    assert strip(records(shared)) == strip(records(whole))
    columns = ["loss", "seeds", "top1_mean", "top1_std", "top3_mean", "f1_mean"]
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_csv(shared / "summary.csv")[columns], pd.read_csv(whole / "summary.csv")[columns])


def test_bad_shard_fails_before_any_work(capsys):
    with pytest.raises(SystemExit):
        run.main(["--dataset", "fruits", "--shard", "2/2"])
    assert "--shard must be I/N with 0 <= I < N" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 13: data identity, user errors, timing

TINY = ["--backbone", "efficientnet_lite0", "--epochs", "2", "--batch-size", "4", "--no-progress", "--precision", "fp32"]


def tiny_folder(root: Path, colours=((220, 40, 40), (40, 40, 220)), prefix="c", seed=1) -> Path:
    return write_image_folder(root, list(colours), per_class=6, train=4, prefix=prefix, size=(40, 40), noise=30, seed=seed)


def test_runs_on_other_data_are_never_mixed(tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    a = tiny_folder(tmp_path / "A" / "images")
    b = tiny_folder(tmp_path / "B" / "images", prefix="other", seed=2)
    assert run.main(["--data-dir", str(a), *TINY, "--losses", "cross_entropy", *cache]) == 0
    # Another folder of the same name, with other classes: refused, not reused beside a new loss's run.
    with pytest.raises(SystemExit, match=r"runs of images made on other data .*the classes were \['c0', 'c1'\], "
                                         r"now \['other0', 'other1'\]"):
        run.main(["--data-dir", str(b), *TINY, "--losses", "cross_entropy,hinge", *cache])
    # The same folder with one valid image replaced and three added: refused, naming the files.
    (a / "valid" / "c0" / "4.png").write_bytes((a / "train" / "c0" / "0.png").read_bytes())
    for i in range(3):
        (a / "valid" / "c1" / f"new{i}.png").write_bytes((a / "train" / "c1" / f"{i}.png").read_bytes())
    with pytest.raises(SystemExit, match=r"in the valid split 3 added \(valid/c1/new0.png, valid/c1/new1.png, "
                                         r"valid/c1/new2.png\); 1 changed \(valid/c0/4.png\)"):
        run.main(["--data-dir", str(a), *TINY, "--losses", "cross_entropy,hinge", *cache])
    assert [p.parent.name for p in (tmp_path / "out" / "runs").rglob("*.json")] == ["cross_entropy"]
    # Touching files changes nothing: the identity is their contents.
    for f in a.rglob("*.png"):
        os.utime(f)
    (a / "valid" / "c0" / "4.png").write_bytes((tmp_path / "B" / "images" / "valid" / "other0" / "4.png").read_bytes())
    for i in range(3):
        (a / "valid" / "c1" / f"new{i}.png").unlink()
    capsys.readouterr()
    # not the original bytes for 4.png: still refused
    with pytest.raises(SystemExit, match=r"1 changed \(valid/c0/4.png\)"):
        run.main(["--data-dir", str(a), *TINY, "--losses", "hinge", *cache])


def test_named_datasets_are_keyed_by_their_files_too(tmp_path):
    """A named dataset's copy that changed is refused like a folder of one's own (here: a partial copy)."""
    partial = tmp_path / "data" / "fruits"
    shutil.copytree(DATA_ROOT / "fruits", partial)
    out = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--data-root", str(tmp_path / "data")]
    assert run.main(["--dataset", "fruits", *FAST, "--losses", "hinge", "--epochs", "1", *out]) == 0
    (partial / "test_zip" / "test" / "apple_77.jpg").unlink()
    with pytest.raises(SystemExit, match=r"runs of fruits made on other data.*in the valid split 1 removed "
                                         r"\(test_zip/test/apple_77.jpg\)"):
        run.main(["--dataset", "fruits", *FAST, "--losses", "hinge", "--epochs", "1", *out])


def test_the_default_out_folder_is_ignored_by_git_and_not_results():
    default = run.parse_args(["--dataset", "fruits"]).out
    assert default == Path("out") and default != Path("results")
    repo = Path(__file__).resolve().parents[1]
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{default}/summary.csv"], cwd=repo)
    tracked = subprocess.run(["git", "ls-files", str(default)], cwd=repo, capture_output=True, text=True).stdout
    assert ignored.returncode == 0 and tracked == ""


def test_an_unusable_dataset_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    root = tiny_folder(tmp_path / "novalid")
    for f in (root / "valid").rglob("*.png"):
        f.write_bytes(b"")
    monkeypatch.setattr(features, "cached_features", lambda *a, **k: pytest.fail("features were extracted"))
    assert run.main(["--data-dir", str(root), *TINY, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("error: novalid") and "NOT USABLE: no decodable valid images at all" in err[-2] or \
        any("NOT USABLE: no decodable valid images at all" in line for line in err)
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out" / "runs").exists()


def _weights(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"not a torch file")
    elif kind == "wrong_dict":
        torch.save({"a": torch.zeros(3)}, path)
    else:
        torch.save([torch.zeros(3)], path)
    return path


@pytest.mark.parametrize("case,message", [
    ("weights garbage", "Cannot read weights file .*garbage.pt for backbone 'efficientnet_lite0': it is not a PyTorch "
                        "weights file .*Give a file written by torch.save"),
    ("weights wrong_dict", "wrong_dict.pt: 1 tensors, but the model has 294"),
    ("weights list", "list.pt for backbone 'efficientnet_lite0' holds a list, not a state_dict"),
    ("--out is a file", "--out .*afile is a file, not a folder"),
    ("--plots is a file", "--plots .*afile is a file, not a folder"),
    ("--cache-dir is a file", "--cache-dir .*afile is a file, not a folder"),
    ("--out full or read-only", "--out .*out cannot be written to \\(No space left on device\\)"),
])
def test_user_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, case, message):
    root = tiny_folder(tmp_path / "tiny")
    (tmp_path / "afile").write_text("")
    argv = ["--data-dir", str(root), *TINY, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    if case.startswith("weights"):
        argv += ["--weights", str(_weights(tmp_path, case.split()[1])), "--cache-dir", str(tmp_path / "cache")]
        monkeypatch.setattr(backbones, "HASH_MEMO", tmp_path / "memo.json")
    elif case == "--out full or read-only":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(run.tempfile, "TemporaryFile", full)
    else:
        argv += [case.split()[0], str(tmp_path / "afile")]
    monkeypatch.setattr(features, "cached_features", lambda *a, **k: pytest.fail("work started"))
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert "partial download in the torch cache" not in err[0]  # the user's own file, not a download


@pytest.mark.parametrize("content", ["null", "[]", "{\"dataset\": 1}"])
def test_a_run_record_that_is_not_one_is_named(tmp_path, content):
    root = tiny_folder(tmp_path / "tiny")
    argv = ["--data-dir", str(root), *TINY, "--losses", "hinge", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    assert run.main(argv) == 0
    [record] = (tmp_path / "out" / "runs").rglob("*.json")
    record.write_text(content)
    with pytest.raises(SystemExit, match=f"{record} is not a run record .*delete it to have the run redone"):
        run.main(argv)


def test_an_unusable_teacher_model_is_trained_again(tmp_path):
    root = tiny_folder(tmp_path / "tiny")
    argv = ["--data-dir", str(root), *TINY, "--losses", "hinge,distillation", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    assert run.main(argv) == 0
    runs = tmp_path / "out" / "runs" / "tiny" / "efficientnet_lite0-frozen"
    teacher = runs / "cross_entropy" / "seed0-frac1.pt"
    first = records(tmp_path / "out")["distillation/seed0-frac1"]["history"]
    teacher.write_bytes(teacher.read_bytes()[:100])  # truncated
    (runs / "distillation" / "seed0-frac1.json").unlink()
    with pytest.warns(UserWarning, match=f"the saved teacher model {teacher} is unusable .*training the teacher again"):
        assert run.main(argv) == 0
    again = records(tmp_path / "out")["distillation/seed0-frac1"]
    assert again["status"] == "ok"
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(again["history"]) == strip(first)  # the same teacher, retrained
    torch.load(teacher, weights_only=True)  # and saved whole


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    root = tiny_folder(tmp_path / "tiny")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_dataset", interrupted)
    assert run.main(["--data-dir", str(root), *TINY, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted: the finished runs are saved in {tmp_path / 'out'}; the same command resumes"]


def test_a_full_disk_while_saving_a_run_names_the_file_and_keeps_what_finished(tmp_path, capsys, monkeypatch):
    root = tiny_folder(tmp_path / "tiny")
    argv = ["--data-dir", str(root), *TINY, "--losses", "hinge,cross_entropy", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    real = record_files.write_json_atomically

    def full_after_first(obj, path):
        if "cross_entropy" in str(path):
            def no_space(tmp):
                tmp.write_text("{")
                raise OSError(errno.ENOSPC, "No space left on device")
            return record_files.write_atomically(path, no_space)
        return real(obj, path)

    monkeypatch.setattr(record_files, "write_json_atomically", full_after_first)
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"error: cannot write .*cross_entropy/seed0-frac1.json \(No space left on device\)", err[-1]), err
    assert [p.name for p in (tmp_path / "out" / "runs").rglob("*.json")] == ["seed0-frac1.json"]  # hinge's
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_timing_sections_do_not_overlap(tmp_path):
    root = tiny_folder(tmp_path / "tiny")
    assert run.main(["--data-dir", str(root), *TINY, "--losses", "hinge,cross_entropy", "--out", str(tmp_path / "out"),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    timing = json.loads((tmp_path / "out" / "timing.json").read_text())
    sections = timing["sections"]
    assert sum(sections.values()) <= timing["total"] + 1e-6  # shares sum to at most 100 %
    # the first loss is charged its training only, not the extraction that ran before it
    assert sections["train:hinge"] < sections["load+extract:tiny"]


def test_without_the_eval_extra_the_harness_says_what_to_install():
    hide = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'tqdm' else real(name, *a); "
            "sys.argv = ['-m']; import evaluation")
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: the lossbank harness (evaluation) needs the 'eval' extra, and tqdm is not "
                                   "installed: pip install 'lossbank[eval]' (from a checkout: pip install "
                                   "--no-build-isolation -e '.[eval]')")


def test_a_config_file_runs_like_its_flags_and_each_out_keeps_the_resolved_config(tmp_path, capsys):
    root = tiny_folder(tmp_path / "tiny")
    file = tmp_path / "quick.yaml"
    file.write_text(f"data-dir: {root}\nbackbone: efficientnet_lite0\nlosses: [hinge, cross_entropy]\nepochs: 2\n"
                    f"batch_size: 4\nprecision: fp32\nno_progress: true\ncache_dir: {tmp_path / 'cache'}\n")
    out = tmp_path / "out"
    assert run.main(["--config", str(file), "--seeds", "1", "--out", str(out)]) == 0  # flags override the file
    recs = records(out)
    assert set(recs) == {"hinge/seed1-frac1", "cross_entropy/seed1-frac1"}
    assert all(len(r["history"]) == 2 and r["signature"]["batch_size"] == 4 for r in recs.values())
    kept = out / "runs" / "tiny" / "efficientnet_lite0-frozen" / "config.yaml"
    saved = yaml.safe_load(kept.read_text())
    assert saved["seeds"] == [1] and saved["epochs"] == 2 and saved["losses"] == ["hinge", "cross_entropy"]
    assert saved["precision"] == "fp32" and saved["device"] == "cpu"  # resolved, as it ran
    # the kept file reruns the command: everything is finished, nothing trains
    capsys.readouterr()
    assert run.main(["--config", str(kept)]) == 0
    assert ": valid top-1" not in capsys.readouterr().out
    with flag_error() as err:
        run.main(["--config", str(tmp_path / "missing.yaml")])
    assert "--config " in err() and "missing.yaml: cannot read it" in err()


@contextlib.contextmanager
def flag_error():
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer), pytest.raises(SystemExit) as exc:
        yield buffer.getvalue
    assert exc.value.code == 2
