"""Fine-tuning across processes with torchrun (gloo on CPU): same history as one process, and resumable.

The end-to-end tests launch real ``torchrun`` jobs of 2 processes on a tiny image folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evaluation.distributed import Context, batch_indices
from image_folders import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the batch layout
@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (9, 4, 2), (13, 6, 3), (7, 8, 4), (5, 4, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_processes_share_out_exactly_the_single_process_batches(n, batch, world, shuffle):
    single = [rows for _, rows in batch_indices(n, batch, Context(), shuffle=shuffle, seed=3, epoch=2)]
    per_rank = [list(batch_indices(n, batch, Context(rank=r, world=world), shuffle=shuffle, seed=3, epoch=2))
                for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(single)
    for k, rows in enumerate(single):
        # What every process is told is the global batch...
        assert all(torch.equal(per_rank[r][k][1], rows) for r in range(world))
        # ...and their local rows, interleaved as gather_rows does and cut at the batch, are exactly it.
        local = torch.stack([per_rank[r][k][0] for r in range(world)], 1).flatten()
        assert torch.equal(local[:len(rows)], rows)
        assert len({len(per_rank[r][k][0]) for r in range(world)}) == 1  # equal shares: padded, never ragged
    assert sorted(torch.cat(single).tolist()) == list(range(n))
    other_epoch = [rows for _, rows in batch_indices(n, batch, Context(), shuffle=shuffle, seed=3, epoch=3)]
    assert torch.equal(torch.cat(other_epoch), torch.cat(single)) != (shuffle and n > 1)


def test_batch_size_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        next(batch_indices(10, 5, Context(rank=0, world=2), shuffle=False, seed=0, epoch=0))


# ---------------------------------------------------------------- torchrun end to end
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("tiny-images"), [(210, 50, 40), (40, 60, 210), (60, 190, 60)],
                              per_class=7, train=5)


def command(folder: Path, out: Path, cache: Path, *extra: str, processes: int = 0) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes else [sys.executable])
    # 15 train images in global batches of 4: the last batch is ragged and padded across 2 processes.
    return [*launcher, "-m", "evaluation.run", "--data-dir", str(folder), "--backbone", "efficientnet_lite0",
            "--mode", "finetune", "--image-size", "64", "--decode-size", "64", "--batch-size", "4", "--views", "2",
            "--workers", "1", "--no-progress", "--out", str(out), "--cache-dir", str(cache), *extra]


def launch(cmd, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def histories(out: Path) -> dict[str, list[dict]]:
    return {p.parent.name: json.loads(p.read_text())["history"] for p in (out / "runs").rglob("*.json")}


def test_two_gloo_processes_give_the_single_process_history(tiny_folder, tmp_path):
    # Distillation (teacher logits on every process), a margin loss, and dropout in the MLP. In float64:
    # float32 sums in another order differ by 1e-7, which AdamW blows up to 1e-4 within a few steps on
    # gradients that are mostly cancellation (cosine loss at lr 1e-2); in float64 the same code agrees to 1e-12.
    losses = ["--losses", "am_softmax,distillation,cosine", "--epochs", "3", "--dropout", "0.3", "--precision", "fp64"]
    single = launch(command(tiny_folder, tmp_path / "one", tmp_path / "cache-one", *losses))
    assert single.returncode == 0, single.stderr[-3000:]
    two = launch(command(tiny_folder, tmp_path / "two", tmp_path / "cache-two", *losses, processes=2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes (gloo)" in two.stdout
    assert two.stdout.count("# python -m evaluation.run") == 1  # only rank 0 speaks...

    one, both = histories(tmp_path / "one"), histories(tmp_path / "two")
    assert set(one) == set(both) == {"am_softmax", "distillation", "cosine"}
    for loss in one:
        assert len(one[loss]) == len(both[loss]) == 3
        for a, b in zip(one[loss], both[loss]):
            for metric in ("train_loss", "train_top1", "valid_loss", "valid_top1", "valid_top3", "valid_macro_f1"):
                assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-5), (loss, a["epoch"], metric)
    # ...and writes: one set of records, one cache, one teacher.
    assert sorted(p.name for p in (tmp_path / "cache-two").iterdir()) == sorted(
        p.name for p in (tmp_path / "cache-one").iterdir())
    assert not list((tmp_path / "two").rglob("*.tmp"))


def test_fine_tuning_every_stage_on_augmented_images_also_matches(tiny_folder, tmp_path):
    # --unfreeze all trains on images, each augmented with a generator of its own (seed, epoch, image).
    args = ["--losses", "am_softmax", "--epochs", "2", "--unfreeze", "all", "--precision", "fp64"]
    single = launch(command(tiny_folder, tmp_path / "one", tmp_path / "cache", *args))
    two = launch(command(tiny_folder, tmp_path / "two", tmp_path / "cache", *args, processes=2))
    assert single.returncode == 0 and two.returncode == 0, (single.stderr + two.stderr)[-3000:]
    one, both = histories(tmp_path / "one")["am_softmax"], histories(tmp_path / "two")["am_softmax"]
    for a, b in zip(one, both, strict=True):
        for metric in ("train_loss", "valid_loss", "valid_top1"):
            assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-5), (a["epoch"], metric)


def test_a_killed_process_leaves_finished_runs_and_the_rerun_resumes(tiny_folder, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    # cross_entropy trains first (it is distillation's teacher): the rerun reloads it, on every process.
    args = ["--losses", "cross_entropy,distillation,l2", "--epochs", "12"]
    job = subprocess.Popen(command(tiny_folder, out, cache, *args, processes=2), cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((out / "runs").rglob("*.json")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    records = list((out / "runs").rglob("*.json"))
    assert len(records) == 1, job.communicate()[0][-3000:]
    first = records[0]
    finished = first.read_text()
    # Kill rank 1 in the middle of the second run: torchrun then stops the whole job.
    workers = [pid for pid in _children(job.pid) if b"evaluation.run" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    rank1 = next(pid for pid in workers if _env(pid).get("RANK") == "1")
    os.kill(rank1, signal.SIGKILL)
    log = job.communicate(timeout=120)[0]
    assert job.returncode != 0, log[-3000:]
    done = {p.parent.name for p in (out / "runs").rglob("*.json")}
    assert first.parent.name in done and len(done) < 3, log[-3000:]
    assert first.read_text() == finished
    for record in (out / "runs").rglob("*.json"):  # never a torn record: they are written by rename
        assert json.loads(record.read_text())["status"] == "ok"

    rerun = launch(command(tiny_folder, out, cache, *args, processes=2))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p.parent.name for p in (out / "runs").rglob("*.json")} == {"cross_entropy", "distillation", "l2"}
    assert first.read_text() == finished  # resumed: the finished run was not trained again
    trained = [line for line in rerun.stdout.splitlines() if "frac 1: valid top-1" in line]
    assert len(trained) == 3 - len(done)


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (torchrun -> workers), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


def _env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_cross_validation_folds_across_processes_match_one_process(tiny_folder, tmp_path):
    # --protocol cv: every (repeat, fold) run is one fine-tuning run across the processes, with its inner
    # validation part choosing the epoch, and the records are those of one process.
    args = ["--losses", "am_softmax", "--epochs", "2", "--precision", "fp64", "--protocol", "cv", "--folds", "2",
            "--repeats", "1"]
    single = launch(command(tiny_folder, tmp_path / "one", tmp_path / "cache", *args))
    two = launch(command(tiny_folder, tmp_path / "two", tmp_path / "cache", *args, processes=2))
    assert single.returncode == 0 and two.returncode == 0, (single.stderr + two.stderr)[-3000:]

    def by_fold(out):
        return {p.name: json.loads(p.read_text()) for p in (out / "runs").rglob("*.json")}

    one, both = by_fold(tmp_path / "one"), by_fold(tmp_path / "two")
    assert set(one) == set(both) == {"repeat0-fold0-frac1.json", "repeat0-fold1-frac1.json"}
    for name in one:
        assert one[name]["num_inner"] > 0 and "inner_loss" in one[name]["history"][0]
        for a, b in zip(one[name]["history"], both[name]["history"], strict=True):
            for metric in ("train_loss", "valid_loss", "valid_top1", "inner_loss"):
                assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-5), (name, a["epoch"], metric)
    [folds_one], [folds_two] = (list((tmp_path / name / "folds").glob("*.csv")) for name in ("one", "two"))
    assert folds_one.read_text() == folds_two.read_text()


def test_a_teacher_from_another_backbone_gives_two_processes_the_single_process_history(tiny_folder, tmp_path):
    # Lite1 teaches: its cross-entropy run trains first across the processes, then every process computes
    # its logits for the same views, and the student's batches carry the global batch's rows of them.
    args = ["--losses", "distillation", "--teacher-backbone", "efficientnet_lite1", "--teacher-image-size", "64",
            "--epochs", "2", "--precision", "fp64"]
    single = launch(command(tiny_folder, tmp_path / "one", tmp_path / "cache-one", *args))
    assert single.returncode == 0, single.stderr[-3000:]
    two = launch(command(tiny_folder, tmp_path / "two", tmp_path / "cache-two", *args, processes=2))
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = histories(tmp_path / "one"), histories(tmp_path / "two")
    assert set(one) == set(both) == {"cross_entropy", "distillation-from-efficientnet_lite1-finetune"}
    for run_name in one:
        for a, b in zip(one[run_name], both[run_name], strict=True):
            for metric in ("train_loss", "valid_loss", "valid_top1"):
                assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-5), (run_name, a["epoch"], metric)
