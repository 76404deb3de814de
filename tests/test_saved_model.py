"""Saved models (``--save-model``, evaluation/saved_model.py), decoding image bytes, and ``python -m evaluation.predict``.

Tiny synthetic folders and EfficientNet-Lite0 (offline weights), a couple of epochs each.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from evaluation import images, predict, records, run, saved_model, train
from evaluation.config import RunConfig
from evaluation.images import ImageDecodeError, decode_image_bytes, load_images
from evaluation.saved_model import ModelFileError, load_model
from image_folders import write_image_folder

TINY = ["--backbone", "efficientnet_lite0", "--epochs", "2", "--batch-size", "4", "--no-progress", "--precision",
        "fp32", "--workers", "1"]


def tiny_folder(root: Path) -> Path:
    return write_image_folder(root, [(220, 40, 40), (40, 40, 220), (40, 200, 40)], per_class=6, train=4, prefix="c",
                              size=(40, 40), noise=30, seed=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


def key(loss: str, mode: str = "frozen") -> dict:
    return {"dataset": "tiny", "backbone": "efficientnet_lite0", "mode": mode, "protocol": "split", "loss": loss,
            "seed": 0, "fold": None, "train_fraction": 1.0}


def train_and_capture(monkeypatch, argv) -> torch.Tensor:
    """Run the command; return the logits of the last evaluation it made: its run's final valid predictions."""
    seen = []
    real = train.topk_accuracy

    def spy(logits, target, k):
        seen.append(logits.clone())
        return real(logits, target, k)

    monkeypatch.setattr(train, "topk_accuracy", spy)
    assert run.main(argv) == 0
    monkeypatch.setattr(train, "topk_accuracy", real)
    return seen[-1]


@pytest.mark.parametrize("mode, loss", [("frozen", "am_softmax"), ("finetune", "cross_entropy")])
def test_a_saved_model_reproduces_the_runs_valid_predictions(tmp_path, cache_dir, monkeypatch, mode, loss):
    root = tiny_folder(tmp_path / "tiny")
    out = tmp_path / "out"
    logits = train_and_capture(monkeypatch, ["--data-dir", str(root), *TINY, "--mode", mode, "--losses", loss,
                                             "--out", str(out), "--cache-dir", str(cache_dir), "--save-model"])
    path = records.saved_model_path(out, key(loss, mode))
    record = json.loads(records.record_path(out, key(loss, mode)).read_text())
    assert path.is_file() and record["status"] == "ok"

    # Only plain data inside: it loads with weights_only=True, and says what it is.
    contents = torch.load(path, weights_only=True)
    assert (contents["format"], contents["version"]) == ("lossbank-model", 1)
    assert contents["backbone"] == {"name": "efficientnet_lite0", "weights": "imagenet",
                                    "weights_hash": record["weights_hash"]}
    assert contents["classes"] == record["classes"] == ["c0", "c1", "c2"]
    assert contents["loss"]["name"] == loss and contents["precision"] == "fp32"
    trained = {k.split(".")[0] for k in contents["state_dict"]}
    assert ("backbone" in trained) == (mode == "finetune")  # frozen: the backbone comes from its package
    if mode == "finetune":  # only the last stages travel, not the trunk
        assert all(not k.startswith("backbone.") or k.split(".")[1] in "01234" for k in contents["state_dict"])
        assert len([k for k in contents["state_dict"] if k.startswith("backbone.")]) < 200

    model = load_model(path)
    assert model.classes == record["classes"] and model.decode_size == 256 and model.image_size == 224
    assert model.metadata["run"]["loss"] == loss and len(model.metadata["model_hash"]) == 64
    valid = sorted((root / "valid").rglob("*.png"), key=lambda p: (p.parent.name, int(p.stem)))
    decoded, kept, failed = load_images([type("S", (), {"path": p})() for p in valid], 256, workers=1, progress=False)
    assert not failed
    probabilities = model.predict(decoded)
    assert torch.equal(probabilities.argmax(1), logits.argmax(1))
    # The same predictions; probabilities to rounding, as the run scored with the target at hand (a margin loss's
    # fused logits-and-loss kernel) where a saved model has none.
    torch.testing.assert_close(probabilities, logits.softmax(1), rtol=0, atol=1e-6)
    target = torch.tensor([int(p.parent.name[1:]) for p in valid])
    assert (probabilities.argmax(1) == target).float().mean().item() == pytest.approx(record["final"]["valid_top1"])

    # One pass gives both; the embedding is Classifier.embed's (normalised for a margin loss).
    probs, embedding = model.predict_and_embed(decoded)
    assert torch.equal(probs, probabilities) and torch.equal(embedding, model.embed(decoded))
    norms = embedding.norm(dim=1)
    if loss == "am_softmax":
        torch.testing.assert_close(norms, torch.ones_like(norms))
    # Bytes decode exactly as the harness decodes the file.
    assert torch.equal(model.decode(valid[0].read_bytes(), valid[0].name), decoded[0])


def test_save_model_is_not_part_of_a_runs_identity_and_a_missing_model_is_trained_again(tmp_path, cache_dir, capsys):
    root = tiny_folder(tmp_path / "tiny")
    out = tmp_path / "out"
    argv = ["--data-dir", str(root), *TINY, "--losses", "hinge", "--out", str(out), "--cache-dir", str(cache_dir)]
    config = run.parse_args(argv)
    saving = run.parse_args([*argv, "--save-model"])
    assert config.save_model is False and saving.save_model is True
    splits = type("Splits", (), {"identity": lambda self: {"classes": ["a"]}})()
    assert records.signature(config, "h", splits, "hinge") == records.signature(saving, "h", splits, "hinge")

    assert run.main(argv) == 0  # without --save-model: no model
    model_file = records.saved_model_path(out, key("hinge"))
    assert records.record_path(out, key("hinge")).is_file() and not model_file.exists()
    capsys.readouterr()
    assert run.main(argv) == 0  # finished: nothing trains
    assert "tiny efficientnet_lite0 frozen hinge" not in capsys.readouterr().out
    assert run.main([*argv, "--save-model"]) == 0  # the same runs, now wanting their model: retrained
    assert "tiny efficientnet_lite0 frozen hinge seed 0 frac 1: valid top-1" in capsys.readouterr().out
    assert load_model(model_file).metadata["run"]["loss"] == "hinge"
    assert run.main([*argv, "--save-model"]) == 0  # model there: nothing trains
    assert "tiny efficientnet_lite0 frozen hinge" not in capsys.readouterr().out


def test_bad_model_files_are_refused_in_one_line(tmp_path, cache_dir):
    with pytest.raises(ModelFileError, match=r"cannot read model .*nothing.pt .*--save-model"):
        load_model(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match=r"garbage.pt is not a lossbank model"):
        load_model(garbage)
    state = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2)}, state)
    with pytest.raises(ModelFileError, match=r"state.pt is not a lossbank model \(no format"):
        load_model(state)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "lossbank-model", "version": 1, "x": Path("/")}, pickled)  # not plain data
    with pytest.raises(ModelFileError, match=r"pickled.pt is not a lossbank model: it does not load"):
        load_model(pickled)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "lossbank-model", "version": 2}, newer)
    with pytest.raises(ModelFileError, match=r"newer.pt is a lossbank model of format version 2, newer .*upgrade"):
        load_model(newer)
    unknown = tmp_path / "unknown.pt"
    torch.save({"format": "lossbank-model", "version": 1,
                "backbone": {"name": "vit_huge", "weights": "imagenet", "weights_hash": "0"}}, unknown)
    with pytest.raises(ModelFileError, match=r"unknown.pt needs backbone 'vit_huge'.*upgrade lossbank"):
        load_model(unknown)
    other_weights = tmp_path / "other.pt"
    torch.save({"format": "lossbank-model", "version": 1,
                "backbone": {"name": "efficientnet_lite0", "weights": "imagenet", "weights_hash": "0123"}}, other_weights)
    with pytest.raises(ModelFileError, match=r"hash 0123, but those here hash to .*install the version of the package"):
        load_model(other_weights)


def png_bytes(mode: str, size=(30, 20), fmt="PNG", **save) -> bytes:
    buffer = io.BytesIO()
    colour = {"L": 128, "RGBA": (255, 0, 0, 0), "P": 3, "RGB": (10, 200, 30)}[mode]
    Image.new(mode, size, colour).save(buffer, fmt, **save)
    return buffer.getvalue()


def test_image_bytes_decode_as_the_harness_decodes_their_files(tmp_path):
    cases = {
        "png_named.jpg": png_bytes("RGB"),
        "grey.png": png_bytes("L"),
        "transparent.png": png_bytes("RGBA"),
        "palette.gif": png_bytes("P", fmt="GIF"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        got = decode_image_bytes(data, size=32, name=name)
        assert got.dtype == torch.uint8 and got.shape == (3, 32, 32)
        assert torch.equal(got, torch.from_numpy(images.decode_square(tmp_path / name, 32).copy())), name
    assert decode_image_bytes(cases["transparent.png"], size=8, name="t").unique().tolist() == [255]  # on white
    grey = decode_image_bytes(cases["grey.png"], size=8, name="g")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])

    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    first = decode_image_bytes(buffer.getvalue(), size=16, name="anim.gif")
    assert first[0].float().mean() > 200 and first[2].float().mean() < 50  # the first frame: red

    jpeg = png_bytes("RGB", size=(64, 64), fmt="JPEG")
    with pytest.raises(ImageDecodeError, match=r"(?i)cannot decode image cut.jpg: .*truncated"):
        decode_image_bytes(jpeg[: len(jpeg) // 2], size=16, name="cut.jpg")
    with pytest.raises(ImageDecodeError, match=r"cannot decode image empty.png: it is empty"):
        decode_image_bytes(b"", size=16, name="empty.png")
    with pytest.raises(ImageDecodeError, match=r"cannot decode image notes.txt: UnidentifiedImageError") as err:
        decode_image_bytes(b"hello, world", size=16, name="notes.txt")
    assert "BytesIO" not in str(err.value)  # the upload's name, not PIL's stream object
    big = png_bytes("RGB", size=(300, 200))
    with pytest.raises(ImageDecodeError, match=r"big.png: it is 300x200 pixels, more than the 50000 allowed"):
        decode_image_bytes(big, 50_000, size=16, name="big.png")
    # Refused from the header, before the pixels are decoded: a cut-off file says "too large", not "truncated".
    with pytest.raises(ImageDecodeError, match=r"big.png: it is 300x200 pixels, more than"):
        decode_image_bytes(big[:80], 50_000, size=16, name="big.png")
    assert decode_image_bytes(big, 60_000, size=16, name="big.png").shape == (3, 16, 16)


def test_predict_classifies_a_folder_and_lists_what_it_skipped(tmp_path, cache_dir, capsys):
    root = tiny_folder(tmp_path / "tiny")
    out = tmp_path / "out"
    assert run.main(["--data-dir", str(root), *TINY, "--losses", "cross_entropy", "--out", str(out),
                     "--cache-dir", str(cache_dir), "--save-model"]) == 0
    model_file = records.saved_model_path(out, key("cross_entropy"))
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for i, p in enumerate(sorted((root / "valid" / "c1").glob("*.png"))):
        (photos / f"{i}.png").write_bytes(p.read_bytes())
    (photos / "more" / "red.jpg").write_bytes((root / "valid" / "c0" / "4.png").read_bytes())  # a PNG named .jpg
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    capsys.readouterr()
    csv_path = tmp_path / "predictions.csv"
    assert predict.main(["--model", str(model_file), str(photos), "--out", str(csv_path), "--batch-size", "2"]) == 0
    printed = capsys.readouterr()
    rows = list(csv.DictReader(csv_path.open()))
    assert [Path(r["file"]).name for r in rows] == ["0.png", "1.png", "red.jpg"]
    assert list(rows[0]) == ["file", "class_1", "probability_1", "class_2", "probability_2", "class_3",
                             "probability_3"]
    model = load_model(model_file)
    decoded = torch.stack([model.decode(Path(r["file"]).read_bytes(), r["file"]) for r in rows])
    expected = model.predict(decoded)
    for row, probs in zip(rows, expected):
        order = probs.argsort(descending=True).tolist()
        assert [row[f"class_{j}"] for j in (1, 2, 3)] == [model.classes[i] for i in order]
        assert [float(row[f"probability_{j}"]) for j in (1, 2, 3)] == pytest.approx(probs[order].tolist(), abs=1e-6)
    assert [r["class_1"] for r in rows] == ["c1", "c1", "c0"]
    assert "0.png\tc1 " in printed.out
    assert "skipped 2 file(s):" in printed.err
    assert f"{photos / 'broken.jpg'}: " in printed.err and f"{photos / 'notes.txt'}: not an image" in printed.err
    assert "3 image(s) classified" in printed.err

    assert predict.main(["--model", str(model_file), str(photos / "notes.txt")]) == 1  # nothing classified
    assert predict.main(["--model", str(tmp_path / "missing.pt"), str(photos)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot read model")
