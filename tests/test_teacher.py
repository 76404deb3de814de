"""Distillation from another backbone (--teacher-backbone): end to end on a tiny folder, and its bad input."""
from __future__ import annotations

import json

import pytest
import torch

from evaluation import records, run, train
from evaluation.config import RunConfig
from evaluation.distil_report import distil_section
from image_folders import write_image_folder

STUDENT = ["--backbone", "efficientnet_lite0", "--epochs", "2", "--views", "2", "--workers", "1", "--no-progress",
           "--precision", "fp32", "--seeds", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher") / "tiny"
    return write_image_folder(root, [(220, 40, 40), (40, 40, 220), (40, 200, 40)], per_class=5, train=3,
                              size=(40, 40), noise=30)


def _records(out):
    return {(r["backbone"], r["mode"], r["loss"]): r
            for r in (json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))
                      if p.parent.name != "datasets" and p.name != "grid.json" and "signature" in p.read_text())}


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_lite1_teaches_lite0_and_is_reused(folder, tmp_path, mode):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--data-dir", str(folder), *STUDENT, "--mode", mode, "--losses", "cross_entropy,distillation",
            "--teacher-backbone", "efficientnet_lite1", "--out", str(out), "--cache-dir", str(cache)]
    assert run.main(argv) == 0
    runs = _records(out)
    label = f"distillation-from-efficientnet_lite1-{mode}"
    teacher = runs[("efficientnet_lite1", mode, "cross_entropy")]
    student = runs[("efficientnet_lite0", mode, label)]
    assert ("efficientnet_lite0", mode, "cross_entropy") in runs
    assert ("efficientnet_lite0", mode, "distillation") not in runs  # no same-backbone distillation was asked for
    assert teacher["status"] == student["status"] == "ok"
    assert teacher["signature"]["image_size"] == 240 and student["signature"]["image_size"] == 224
    ident = student["signature"]["teacher_run"]
    assert ident == {"backbone": "efficientnet_lite1", "mode": mode, "image_size": 240,
                     "weights_hash": teacher["weights_hash"]}
    assert student["config"]["teacher_run"]["seed"] == 0
    assert records.model_path(out, teacher).exists()
    timing = json.loads((out / "timing.json").read_text())["sections"]
    assert "train:cross_entropy (teacher efficientnet_lite1)" in timing and "train:cross_entropy" in timing

    # The same command again trains nothing.
    files = [records.record_path(out, teacher), records.record_path(out, student)]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert run.main(argv) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # The RESULTS.md section renders from these records: the three models of the dataset, and a verdict.
    config = RunConfig(data_dir=folder, backbone="efficientnet_lite0", mode=mode,
                       losses=["cross_entropy", "distillation"], teacher_backbone="efficientnet_lite1")
    section = distil_section(records.load_runs(out), out, config)
    assert section[0] == f"## Distilling efficientnet_lite1 ({mode}) into efficientnet_lite0 ({mode})"
    rows = [line for line in section if line.startswith("| tiny |")]
    assert [r.split(" | ")[1] for r in rows] == ["efficientnet_lite0 cross-entropy", "efficientnet_lite0 distilled",
                                                 "efficientnet_lite1 teacher"]
    assert all(" | 1 | " in r for r in rows)  # one seed each
    # One seed cannot be tested, so the plain answer is no evidence either way.
    assert any(line.startswith("Does distillation help here? No: on tiny the difference is not significant")
               for line in section)

    # A different teacher is a different run, beside the first.
    if mode == "frozen":
        assert run.main([*argv, "--teacher-backbone", "efficientnet_lite0"]) == 0
        runs = _records(out)
        assert runs[("efficientnet_lite0", mode, "distillation-from-efficientnet_lite0-frozen")]["status"] == "ok"
        assert records.record_path(out, student).exists()


def _fails(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    message = capsys.readouterr().err.strip().splitlines()[-1] if exc.value.code in (2,) else str(exc.value)
    return message


def test_unknown_teacher_backbone_names_the_known_ones(folder, tmp_path, capsys):
    message = _fails(["--data-dir", str(folder), *STUDENT, "--losses", "distillation", "--teacher-backbone",
                      "resnet9000", "--out", str(tmp_path / "out")], capsys)
    assert "--teacher-backbone: unknown backbone 'resnet9000'" in message and "efficientnet_lite2" in message
    assert not (tmp_path / "out").exists()


def test_unfreeze_all_is_refused_with_the_reason(folder, tmp_path, capsys):
    message = _fails(["--data-dir", str(folder), *STUDENT, "--mode", "finetune", "--unfreeze", "all", "--losses",
                      "distillation", "--teacher-backbone", "efficientnet_lite1", "--out", str(tmp_path)], capsys)
    assert "--unfreeze last" in message


def _teacher_record(out, folder, tmp_path, **change):
    """Train the teacher alone (an ordinary cross-entropy run of Lite1), then alter its record."""
    argv = ["--data-dir", str(folder), *STUDENT, "--backbone", "efficientnet_lite1", "--losses", "cross_entropy",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run.main(argv) == 0
    path = next((out / "runs").rglob("efficientnet_lite1-frozen/cross_entropy/*.json"))
    rec = json.loads(path.read_text())
    rec.update(change)
    path.write_text(json.dumps(rec))
    return path


def test_an_ordinary_run_of_the_teacher_backbone_is_reused(folder, tmp_path):
    out = tmp_path / "out"
    teacher = _teacher_record(out, folder, tmp_path)
    stamp = teacher.stat().st_mtime_ns
    assert run.main(["--data-dir", str(folder), *STUDENT, "--losses", "distillation", "--teacher-backbone",
                     "efficientnet_lite1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert teacher.stat().st_mtime_ns == stamp  # trained again for its model (not saved by an ordinary run) only
    assert teacher.with_suffix(".pt").exists()
    student = next((out / "runs").rglob("distillation-from-efficientnet_lite1-frozen/*.json"))
    assert json.loads(student.read_text())["status"] == "ok"


@pytest.mark.parametrize("change, expected", [
    ({"status": "failed", "failure": "non-finite loss"}, "failed (non-finite loss)"),
    ({"classes": ["a", "b", "c"]}, "learnt the classes ['a', 'b', 'c']"),
])
def test_a_failed_or_foreign_teacher_stops_before_the_student_trains(folder, tmp_path, change, expected):
    out = tmp_path / "out"
    teacher = _teacher_record(out, folder, tmp_path, **change)
    with pytest.raises(SystemExit) as exc:
        run.main(["--data-dir", str(folder), *STUDENT, "--losses", "distillation", "--teacher-backbone",
                  "efficientnet_lite1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and expected in message and str(teacher) in message
    assert not list((out / "runs").rglob("distillation-from-*/*.json"))


def test_batches_carry_the_teacher_logits_of_their_own_views():
    """Frozen and fine-tuning batches pick the teacher's logits of the very view (and image) they train on."""
    views, n = 3, 10
    code = torch.arange(views * n, dtype=torch.float32).reshape(views, n)  # view v of image i is v * n + i
    features, logits = code[..., None].expand(views, n, 4), code[..., None].expand(views, n, 2)
    labels = torch.arange(n) % 2
    for x, y, t in train.feature_batches(features, labels, 4, seed=1, teacher_logits=logits)(0):
        assert torch.equal(x[:, 0], t[:, 0]) and len(y) == len(t)

    class Config:
        batch_size, device, image_size = 4, "cpu", 8
    trunk = code[..., None, None, None].expand(views, n, 1, 2, 2)
    ctx = run.distributed.SINGLE
    for x, y, t in train.finetune_batches(Config, ctx, None, trunk, labels, 1, train=True, cached=True,
                                          teacher_logits=logits)(0):
        assert torch.equal(x[:, 0, 0, 0], t[:, 0])


@pytest.mark.parametrize("extra, expected", [
    (["--losses", "cross_entropy", "--teacher-backbone", "efficientnet_lite1"], "add distillation to --losses"),
    (["--losses", "distillation", "--teacher-mode", "finetune"], "give it too"),
    (["--losses", "distillation", "--teacher-backbone", "efficientnet_lite1", "--teacher-image-size", "-3"],
     "--teacher-image-size must be at least 1"),
])
def test_teacher_settings_are_checked_with_one_line(folder, extra, expected, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--data-dir", str(folder), *extra])
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_teacher_settings_default_to_the_student_and_the_teacher_backbone(folder):
    config = run.parse_args(["--data-dir", str(folder), "--backbone", "efficientnet_lite0", "--mode", "finetune",
                             "--losses", "distillation", "--teacher-backbone", "efficientnet_lite2"])
    assert (config.image_size, config.decode_size) == (224, 256)
    assert (config.teacher_mode, config.teacher_image_size) == ("finetune", 260)
    teacher = config.teacher_config()
    assert (teacher.backbone, teacher.mode, teacher.image_size, teacher.decode_size) == (
        "efficientnet_lite2", "finetune", 260, 260)
    assert teacher.losses == ["cross_entropy"] and teacher.teacher_backbone is None
    assert config.distil_label == "distillation-from-efficientnet_lite2-finetune"
