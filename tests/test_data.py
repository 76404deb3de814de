"""Tests for the dataset modules of evaluation/ (data, folders, images, audit): the manifest,
the loaders, users' folders, decoding and the audit.

The real datasets are read from ../shared/datasets (or $LOSSBANK_DATA); the odd
image files are made here.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from evaluation.audit import audit, main
from evaluation.data import DATASETS, Sample, load_dataset, load_manifest, resolve_data_root
from evaluation.folders import DatasetError, stratified_split
from evaluation.images import ImageDataset, ImageDecodeError, decode_image, load_images

# Our copy lacks 4 weather images; the tests that care about that warning record it.
pytestmark = pytest.mark.filterwarnings("ignore:weather. 4 of 1125 images are missing:UserWarning")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LOSSBANK_DATA") or REPO.parent / "shared" / "datasets")

WEATHER_ODD = {  # file -> what is odd about it (from ../shared/datasets/README.md)
    "cloudy131.jpg": "PNG named .jpg", "rain26.jpg": "PNG named .jpg",
    "rain136.jpg": "PNG named .jpg", "rain195.jpg": "PNG named .jpg",
    "sunrise184.jpg": "PNG named .jpg", "shine127.jpg": "RGBA",
    "shine131.jpg": "GIF named .jpg", "rain141.jpg": "animated, 3 frames",
    "cloudy66.jpg": "greyscale", "cloudy71.jpg": "greyscale",
}
WEATHER_MISSING = {"rain137.jpg", "sunrise7.jpg", "sunrise16.jpg", "sunrise23.jpg"}
COVID_LEAKED = {"COVID-00003b.jpg", "COVID-00012.jpg", "COVID-00022.jpg", "COVID-00033.jpg",
                "COVID-00037.jpg", "radiopaedia-2019-novel-coronavirus-infected-pneumonia.jpg"}


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "weather").is_dir():
        pytest.fail(f"the real datasets are not at {DATA}: CI must provide ../shared/datasets "
                    f"(or set LOSSBANK_DATA to a folder holding weather/, fruits/, covid/)")
    return DATA


def counts(ds):
    return {split: dict(sorted(Counter(ds.classes[s.label] for s in getattr(ds, split)).items()))
            for split in ("train", "valid")}


def sha256_groups(dataset_dir: Path) -> dict[str, list[str]]:
    """{digest: [file names]} from the SHA256SUMS shipped with the shared copy."""
    groups = defaultdict(list)
    for line in (dataset_dir / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        groups[digest].append(rel[2:] if rel.startswith("./") else rel)
    return groups


# ---------------------------------------------------------------------------
# Manifest and real data

def test_manifest_counts_agree_with_its_file_lists():
    manifest = load_manifest()
    assert set(manifest) >= set(DATASETS)
    for name in DATASETS:
        spec = manifest[name]
        assert list(spec["classes"]) == sorted(spec["classes"]), name
        assert all(c == c.lower() and " " not in c for c in spec["classes"]), name
        raw = list(spec["classes"].values())
        if "all" in spec["files"]:
            valid = stratified_split(spec["files"]["all"], spec["split"]["valid_fraction"],
                                     spec["split"]["seed"], spec["split"]["keep_together"])
            per_split = {"valid": {r: len(valid[r]) for r in raw},
                         "train": {r: len(spec["files"]["all"][r]) - len(valid[r]) for r in raw}}
        else:
            per_split = {s: {r: len(spec["files"][s][r]) for r in raw} for s in ("train", "valid")}
        for split in ("train", "valid"):
            assert [per_split[split][r] for r in raw] == list(spec["counts"][split].values()), (name, split)


@pytest.mark.parametrize("name, expected", [
    ("fruits", {"train": {"apple": 75, "banana": 73, "mixed": 20, "orange": 72},
                "valid": {"apple": 19, "banana": 18, "mixed": 5, "orange": 18}}),
    ("covid", {"train": {"covid": 111, "normal": 70, "viral_pneumonia": 70},
               "valid": {"covid": 26, "normal": 20, "viral_pneumonia": 20}}),
    # Full archive: 240/60, 172/43, 202/51, 285/72; our copy lacks rain137 and
    # sunrise7/16/23, which this split puts in train.
    ("weather", {"train": {"cloudy": 240, "rain": 171, "shine": 202, "sunrise": 282},
                 "valid": {"cloudy": 60, "rain": 43, "shine": 51, "sunrise": 72}}),
])
def test_real_counts_per_class_and_split(data_root, name, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(name, data_root=data_root)
    assert counts(ds) == expected
    assert ds.root == data_root.absolute() / name
    assert all(s.path.is_absolute() and s.path.is_file() for s in ds.train + ds.valid)
    messages = [str(w.message) for w in caught]
    if name == "weather":
        assert any("4 of 1125 images are missing" in m for m in messages), messages
        assert any("4 of 1125" in n for n in ds.notes)
    else:
        assert messages == [] and ds.notes == []


def test_weather_split_is_stratified_deterministic_and_pinned(data_root):
    manifest = load_manifest()["weather"]
    files = manifest["files"]["all"]
    for seed in (0, 1, 7):
        valid = stratified_split(files, 0.2, seed, manifest["split"]["keep_together"])
        # ceil(0.2 n) per class: the published comparison's 226 of 1125.
        assert {c: len(v) for c, v in valid.items()} == {"cloudy": 60, "rain": 43, "shine": 51, "sunrise": 72}
    first = load_dataset("weather", data_root=data_root)
    again = load_dataset("weather", data_root=data_root)
    assert first.train == again.train and first.valid == again.valid
    # Pinned: the rule hashes names with sha256 only, so this must hold on every
    # machine; a change here silently changes every weather result.
    valid_names = sorted(s.path.name for s in first.valid)
    assert hashlib.sha256("\n".join(valid_names).encode()).hexdigest() == \
        "ae4ac523edaffb4148b0ee148b0961eac1fd85f8b7c2703649ecbdf8daa173fc"
    other = load_dataset("weather", data_root=data_root, split_seed=1)
    assert {s.path.name for s in other.valid} != set(valid_names)
    assert sorted(s.path.name for s in other.train + other.valid) == \
        sorted(s.path.name for s in first.train + first.valid)


def test_weather_split_does_not_depend_on_which_files_are_present(data_root, tmp_path):
    full = load_dataset("weather", data_root=data_root)
    side = {s.path.name: split for split in ("train", "valid") for s in getattr(full, split)}
    # A copy with 40 more files gone (44 of 1125 missing: under the 10% limit).
    gone = set(sorted(side)[::28][:40])
    folder = tmp_path / "weather" / "dataset2"
    folder.mkdir(parents=True)
    for name in side:
        if name not in gone:
            (folder / name).symlink_to(data_root / "weather" / "dataset2" / name)
    with pytest.warns(UserWarning, match="44 of 1125 images are missing"):
        partial = load_dataset("weather", data_root=tmp_path)
    got = {s.path.name: split for split in ("train", "valid") for s in getattr(partial, split)}
    assert len(got) == 1121 - 40
    assert all(side[n] == split for n, split in got.items())


def test_byte_identical_weather_images_stay_on_one_side(data_root):
    ds = load_dataset("weather", data_root=data_root)
    side = {s.path.name: split for split in ("train", "valid") for s in getattr(ds, split)}
    groups = [g for g in sha256_groups(data_root / "weather").values() if len(g) > 1]
    assert len(groups) == 24
    for group in groups:
        assert len({side[Path(rel).name] for rel in group}) == 1, group


def test_drop_duplicates_on_real_data(data_root):
    covid = load_dataset("covid", data_root=data_root, drop_duplicates=True)
    assert covid.dropped == {"train_duplicates": 3, "valid_duplicates": 1, "leaked_valid": 6}
    assert not COVID_LEAKED & {s.path.name for s in covid.valid if s.path.parent.name == "Covid"}
    assert len(covid.train) == 251 - 3 and len(covid.valid) == 66 - 7
    assert any("6 valid images identical to a train image" in n for n in covid.notes)

    with pytest.warns(UserWarning):
        weather = load_dataset("weather", data_root=data_root, drop_duplicates=True)
    # 24 groups hold 25 redundant copies; the split keeps groups together, so none leak.
    assert weather.dropped["leaked_valid"] == 0
    assert weather.dropped["train_duplicates"] + weather.dropped["valid_duplicates"] == 25
    digest_of = {Path(rel).name: d for d, rels in sha256_groups(data_root / "weather").items() for rel in rels}
    kept = [digest_of[s.path.name] for s in weather.train + weather.valid]
    assert len(kept) == len(set(kept)) == 1121 - 25


@pytest.fixture(scope="module")
def weather_images(data_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the partial-copy warning is tested above
        ds = load_dataset("weather", data_root=data_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = ImageDataset(ds.train + ds.valid, 32)
    return ds, images, caught


def test_every_weather_image_decodes(weather_images, data_root):
    ds, images, caught = weather_images
    assert caught == [] and images.failed == []
    assert len(images) == 1121 and images.images.shape == (1121, 3, 32, 32)
    assert images.images.dtype == torch.uint8
    for name, what in WEATHER_ODD.items():
        path = data_root / "weather" / "dataset2" / name
        im = decode_image(path)
        assert im.mode == "RGB", (name, what)
        with Image.open(path) as raw:
            assert im.size == raw.size
            reference = raw.convert("RGB")
        # None of these has transparent pixels or rotation, so a plain conversion
        # of the first frame is the right answer for every one of them.
        assert np.array_equal(np.asarray(im), np.asarray(reference)), (name, what)
    grey = np.asarray(decode_image(data_root / "weather" / "dataset2" / "cloudy66.jpg"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_every_split_gives_tensor_label_pairs(weather_images, data_root):
    _, weather, _ = weather_images
    image, label = weather[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and isinstance(label, int)
    for name in ("fruits", "covid"):
        ds = load_dataset(name, data_root=data_root)
        for split in ("train", "valid"):
            samples = getattr(ds, split)
            pairs = ImageDataset(samples, 24, progress=False)
            assert len(pairs) == len(samples) and pairs.failed == []
            loader = torch.utils.data.DataLoader(pairs, batch_size=64)
            labels = torch.cat([y for _, y in loader])
            assert labels.tolist() == [s.label for s in samples]
            x, _ = next(iter(loader))
            assert x.shape[1:] == (3, 24, 24)


@pytest.fixture(scope="module")
def verify_all_output(data_root):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["verify", "all", "--data-root", str(data_root)])
    return rc, buffer.getvalue()


def test_verify_all_reports_the_known_quirks(verify_all_output):
    rc, text = verify_all_output
    assert rc == 0
    weather, fruits, covid = (text.split(f"== {n}: ")[1].split("\n== ")[0] for n in DATASETS)
    assert "images: 1121 of 1125 expected (4 missing" in weather
    assert all(f"dataset2/{n}" in weather.split("missing (4):")[1].split("unexpected")[0]
               for n in WEATHER_MISSING)
    odd_section = weather.split("not plain RGB")[1].split("cannot be decoded")[0]
    assert odd_section.startswith(" (all decode to RGB) (10):")
    assert all(f"dataset2/{n}:" in odd_section for n in WEATHER_ODD)
    assert "groups of byte-identical images (24, 25 redundant copies)" in weather
    assert "dataset2/rain28.jpg [train, rain] = dataset2/rain29.jpg [train, rain] = " \
           "dataset2/rain96.jpg [train, rain]" in weather
    assert "(leakage) (0)" in weather and "verdict: USABLE (4 images missing)" in weather

    assert "images: 300 of 300 expected" in fruits and "verdict: USABLE" in fruits
    assert "not plain RGB (all decode to RGB) (0)" in fruits

    leakage = covid.split("(leakage) (6):")[1].split("--drop-duplicates")[0]
    assert all(f"test/Covid/{n}" in leakage for n in COVID_LEAKED)
    assert "train/Covid/069.jpg" in leakage
    assert "not plain RGB (all decode to RGB) (42)" in covid
    assert "would remove 3 duplicate train images, 1 duplicate valid images and 6 leaked" in covid
    assert "  covid              111 of 111       26 of 26" in covid


# ---------------------------------------------------------------------------
# Finding data, and errors

def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LOSSBANK_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("LOSSBANK_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "lossbank" / "datasets"


def test_missing_and_incomplete_datasets_give_clear_errors(tmp_path, capsys):
    with pytest.raises(DatasetError) as err:
        load_dataset("weather", data_root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "weather") in message
    assert "https://data.mendeley.com/datasets/4drtyfjtfy/1" in message
    assert "weather/dataset2/<class><n>.jpg" in message

    (tmp_path / "covid" / "Covid19-dataset" / "train" / "Covid").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"incomplete: the folder .*Covid19-dataset/test is missing"):
        load_dataset("covid", data_root=tmp_path)
    (tmp_path / "covid" / "Covid19-dataset" / "test").mkdir()
    with pytest.raises(DatasetError, match=r"no train images of class 'normal'.*317 of 317 images are missing"):
        load_dataset("covid", data_root=tmp_path)

    assert main(["verify", "covid", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "covid: NOT USABLE" in out.out and "kaggle.com/datasets/pranavraikokte" in out.out
    assert "not usable: covid" in out.err

    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", data_root=tmp_path)
    with pytest.raises(DatasetError, match="exactly one"):
        load_dataset()
    with pytest.raises(DatasetError, match="exactly one"):
        load_dataset("weather", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# Odd files made here

def save_jpeg(path, size=(64, 48), seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", **kwargs)
    return path


def png16(path, array):
    """A 16-bit PNG written by hand: Pillow cannot write 16-bit colour PNGs."""
    h, w, c = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def odd_files(tmp_path):
    f = {}
    good = save_jpeg(tmp_path / "good.jpg", seed=1)
    f["truncated"] = tmp_path / "truncated.jpg"
    f["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    f["empty"] = tmp_path / "empty.jpg"
    f["empty"].write_bytes(b"")
    f["text"] = tmp_path / "notes.jpg"
    f["text"].write_text("this is not an image\n")

    f["cmyk"] = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(f["cmyk"], "JPEG", quality=95)  # red
    f["grey16"] = tmp_path / "grey16.png"
    Image.fromarray(np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)).save(f["grey16"])
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32896, 0
    f["rgb16"] = png16(tmp_path / "rgb16.png", rgb16)
    f["animated"] = tmp_path / "animated.jpg"  # a GIF under a .jpg name, like rain141.jpg
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(f["animated"], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    f["rotated"] = tmp_path / "rotated.jpg"
    left_black = np.zeros((20, 40, 3), np.uint8)
    left_black[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(left_black).save(f["rotated"], "JPEG", exif=exif, quality=95)
    f["rgba"] = tmp_path / "rgba.png"
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (0, 0, 255, 255)  # top half opaque blue, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(f["rgba"])
    f["palette"] = tmp_path / "palette.gif"
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0, 0, 0] * 254)
    pal.save(f["palette"], transparency=0)
    f["png_as_jpg"] = tmp_path / "png_as.jpg"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(f["png_as_jpg"], "PNG")
    f["greyscale"] = tmp_path / "grey.jpg"
    Image.new("L", (8, 8), 77).save(f["greyscale"], "JPEG", quality=100)
    return f


@pytest.mark.parametrize("kind, reason", [("truncated", "OSError"), ("empty", "empty"),
                                          ("text", "not a format PIL recognises")])
def test_undecodable_files_raise_naming_the_file(odd_files, kind, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(odd_files[kind])
    assert str(odd_files[kind]) in str(err.value) and reason in str(err.value)
    assert isinstance(err.value, DatasetError)


def test_odd_but_valid_files_decode_to_rgb(odd_files):
    def pixels(kind):
        im = decode_image(odd_files[kind])
        assert im.mode == "RGB", kind
        return np.asarray(im).astype(int)

    assert np.abs(pixels("cmyk") - (255, 0, 0)).max() <= 8
    grey16 = pixels("grey16")
    expected = np.rint(np.arange(0, 65536, 256).reshape(16, 16) / 257)
    assert np.abs(grey16[..., 0] - expected).max() <= 1 and (grey16[..., 0] == grey16[..., 2]).all()
    assert (pixels("rgb16") == (255, 128, 0)).all()
    assert (pixels("animated") == (255, 0, 0)).all()  # the first frame
    rotated = pixels("rotated")
    assert rotated.shape == (40, 20, 3)
    assert rotated[:15].max() < 30 and rotated[25:].min() > 225  # the black left side is now on top
    rgba = pixels("rgba")
    assert (rgba[:4] == (0, 0, 255)).all() and (rgba[4:] == 255).all()  # flattened onto white
    palette = pixels("palette")
    assert (palette == (0, 200, 0)).all()
    assert (pixels("png_as_jpg") == (10, 20, 30)).all()
    assert (np.abs(pixels("greyscale") - 77) <= 1).all()


def test_reduced_decoding_keeps_the_shorter_side_at_least_size(tmp_path, monkeypatch):
    draft_calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        draft_calls.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    jpeg = save_jpeg(tmp_path / "big.jpg", size=(2000, 1100))
    png = tmp_path / "big.png"
    Image.new("RGB", (1100, 2000), (1, 2, 3)).save(png)
    for path, full in ((jpeg, (2000, 1100)), (png, (1100, 2000))):
        for size in (256, 300, 549, 550):
            w, h = decode_image(path, size).size
            assert min(w, h) >= size, (path.name, size)
            assert w / h == pytest.approx(full[0] / full[1], rel=0.01)
            assert min(w, h) < 2 * size or size * 2 > min(full)  # reduced as far as allowed
        assert decode_image(path, 4000).size == full  # never enlarged
    small = save_jpeg(tmp_path / "small.jpg", size=(100, 80))
    assert decode_image(small, 256).size == (100, 80)
    # The JPEG was decoded at reduced scale, not decoded in full and shrunk.
    assert (256, 256) in draft_calls


def test_data_root_pointing_at_the_dataset_itself_gets_a_hint(data_root):
    with pytest.raises(DatasetError, match=r"looks like the weather folder.*the data root is the folder that holds weather/"):
        load_dataset("weather", data_root=data_root / "weather")


def test_load_images_skips_bad_files_with_one_warning(odd_files, tmp_path):
    order = ["good", "truncated", "cmyk", "empty", "animated", "text", "rotated", "grey16"]
    odd_files["good"] = tmp_path / "good.jpg"
    samples = [Sample(odd_files[k], label) for label, k in enumerate(order)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, kept, failed = load_images(samples, 16, workers=2, progress=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "3 of 8 image files could not be decoded" in message
    assert all(str(odd_files[k]) in message for k in ("truncated", "empty", "text"))
    assert kept == [0, 2, 4, 6, 7]
    assert failed == [odd_files[k] for k in ("truncated", "empty", "text")]
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    assert (images[2].permute(1, 2, 0) == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial, kept_serial, _ = load_images(samples, 16, workers=1, progress=False)
    assert kept_serial == kept and torch.equal(serial, images)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pairs = ImageDataset(samples, 16)
    assert len(pairs) == 5 and pairs.failed == failed
    assert [pairs[i][1] for i in range(5)] == [0, 2, 4, 6, 7]


# ---------------------------------------------------------------------------
# A user's own folder

def make_user_folder(root: Path, layout: dict[str, int], seed=0):
    """{relative class folder: number of images} -> distinct small JPEGs."""
    for i, (folder, n) in enumerate(layout.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            save_jpeg(root / folder / f"img{j}.jpg", size=(12, 10), seed=1000 * seed + 100 * i + j)
    return root


@pytest.mark.parametrize("valid_name", ["valid", "val", "test"])
def test_user_folder_with_train_and_valid(tmp_path, valid_name):
    root = make_user_folder(tmp_path / "pets", {"train/Cats": 5, "train/Big Dogs": 4,
                                                f"{valid_name}/Cats": 2, f"{valid_name}/Big Dogs": 3})
    (root / "train" / "Cats" / "readme.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="readme.txt"):
        ds = load_dataset(data_dir=root)
    assert ds.name == "pets" and ds.classes == ["big_dogs", "cats"]
    assert counts(ds) == {"train": {"big_dogs": 4, "cats": 5}, "valid": {"big_dogs": 3, "cats": 2}}
    assert all(valid_name in s.path.parts for s in ds.valid)


def test_user_folder_of_class_folders_gets_a_seeded_split(tmp_path):
    root = make_user_folder(tmp_path / "shapes", {"circle": 10, "square": 7, "triangle": 1})
    with pytest.warns(UserWarning, match="no validation images for class\\(es\\) triangle"):
        ds = load_dataset(data_dir=root)
    assert counts(ds) == {"train": {"circle": 8, "square": 5, "triangle": 1},
                          "valid": {"circle": 2, "square": 2}}
    assert any("no validation images for class(es) triangle" in n for n in ds.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_dataset(data_dir=root)
        seeds = {frozenset(s.path for s in load_dataset(data_dir=root, split_seed=k).valid) for k in range(4)}
    assert again.train == ds.train and again.valid == ds.valid
    assert len(seeds) > 1


def test_user_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset(data_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no class folders with images.*train/<class>"):
        load_dataset(data_dir=tmp_path / "empty")
    make_user_folder(tmp_path / "half", {"train/a": 2, "train/b": 2})
    with pytest.raises(DatasetError, match="has train/ but not its partner"):
        load_dataset(data_dir=tmp_path / "half")
    make_user_folder(tmp_path / "clash", {"Red Car": 2, "red_car": 2})
    with pytest.raises(DatasetError, match="all mean class 'red_car'"):
        load_dataset(data_dir=tmp_path / "clash")
    make_user_folder(tmp_path / "validonly", {"train/a": 2, "train/b": 2, "valid/a": 1, "valid/c": 1})
    with pytest.raises(DatasetError, match="class\\(es\\) c have no training images"):
        load_dataset(data_dir=tmp_path / "validonly")


def test_user_folder_duplicates_leakage_and_audit(tmp_path):
    root = make_user_folder(tmp_path / "mine", {"train/a": 4, "train/b": 4, "valid/a": 2, "valid/b": 2})
    copy = (root / "train" / "a" / "img0.jpg").read_bytes()
    (root / "valid" / "a" / "leaked.jpg").write_bytes(copy)
    (root / "train" / "b" / "twin.jpg").write_bytes((root / "train" / "b" / "img1.jpg").read_bytes())
    (root / "valid" / "b" / "broken.jpg").write_text("nope")
    with pytest.warns(UserWarning, match="broken.jpg"):
        ds = load_dataset(data_dir=root, drop_duplicates=True)
    assert ds.dropped == {"train_duplicates": 1, "valid_duplicates": 0, "leaked_valid": 1}
    assert "leaked.jpg" not in {s.path.name for s in ds.valid}
    # The undecodable file is left out when the dataset is loaded, as verify says it will be.
    assert len(ds.train) == 8 and len(ds.valid) == 4
    assert [Path(p).name for p in ds.skipped] == ["broken.jpg"]

    report, usable = audit(data_dir=root)
    assert usable
    assert "images in both train and valid (leakage) (1):" in report
    assert "valid/a/leaked.jpg [valid, a]" in report
    assert "cannot be decoded (skipped when training) (1):" in report and "broken.jpg" in report
    assert "verdict: USABLE (1 undecodable images skipped)" in report

    # The command line, as a user runs it.
    run = subprocess.run([sys.executable, "-m", "evaluation.data", "verify", "--data-dir", str(root)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "== mine:" in run.stdout and "(leakage) (1)" in run.stdout
    (tmp_path / "nothing").mkdir()
    assert main(["verify", "--data-dir", str(tmp_path / "nothing")]) == 1


def test_fingerprint_is_cheap_stable_and_tracks_contents(tmp_path, monkeypatch):
    root = make_user_folder(tmp_path / "fp", {"a": 5, "b": 5})
    memo = tmp_path / "checks.json"
    ds = load_dataset(data_dir=root, memo=memo)
    fp = ds.fingerprint()
    assert fp == load_dataset(data_dir=root).fingerprint() and len(fp) == 64

    def no_reading(*args, **kwargs):
        raise AssertionError("must not read images")

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", no_reading)
        m.setattr(io, "open", no_reading)
        m.setattr(Image, "open", no_reading)
        assert ds.fingerprint() == fp  # hashes are taken once, by load_dataset
    with monkeypatch.context() as m:
        m.setattr("evaluation.images.file_sha256", no_reading)  # what check_files hashes with
        m.setattr("evaluation.data.file_sha256", no_reading)  # and DatasetSplits, for a sample without one
        m.setattr(Image, "open", no_reading)
        assert load_dataset(data_dir=root, memo=memo).fingerprint() == fp  # and remembered in the memo
    # A touched file (a fresh copy or unpack) has the same bytes: same data. New bytes: other data.
    os.utime(ds.train[0].path, ns=(1, 1))
    assert load_dataset(data_dir=root, memo=memo).fingerprint() == fp
    save_jpeg(ds.train[0].path, size=(12, 10), seed=999)
    changed = load_dataset(data_dir=root, memo=memo)
    assert changed.fingerprint() != fp
    assert changed.identity()["train"] != ds.identity()["train"] and changed.identity()["valid"] == ds.identity()["valid"]
    assert load_dataset(data_dir=root, split_seed=3).fingerprint() != load_dataset(data_dir=root).fingerprint()


# ---------------------------------------------------------------------------
# One rule for verify and the harness (issue 13, point 4), and class names

def test_dangling_symlink_is_left_out_alike_by_verify_and_load(tmp_path):
    root = make_user_folder(tmp_path / "links", {"train/a": 3, "train/b": 3, "valid/a": 2, "valid/b": 2})
    (root / "train" / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    report, usable = audit(data_dir=root)
    assert usable and "gone.jpg: it is a broken symbolic link" in report
    with pytest.warns(UserWarning, match="gone.jpg: it is a broken symbolic link"):
        ds = load_dataset(data_dir=root)
    assert [Path(p).name for p in ds.skipped] == ["gone.jpg"] and len(ds.train) == 6
    assert len(ds.fingerprint()) == 64  # once a FileNotFoundError


@pytest.mark.parametrize("how", ["empty class folders", "0-byte files"])
def test_no_decodable_valid_image_is_unusable_for_verify_and_load(tmp_path, how):
    root = make_user_folder(tmp_path / "novalid", {"train/a": 3, "train/b": 3, "valid/a": 2, "valid/b": 2})
    for f in (root / "valid").rglob("*.jpg"):
        if how == "0-byte files":
            f.write_bytes(b"")
        else:
            f.unlink()
    report, usable = audit(data_dir=root)
    assert not usable and "no decodable valid images at all" in report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="(?s)NOT USABLE: no decodable valid images at all.*verify --data-dir"):
            load_dataset(data_dir=root)


def test_class_without_decodable_train_image_is_refused_by_load_as_by_verify(tmp_path):
    root = make_user_folder(tmp_path / "notrain", {"train/a": 3, "train/b": 2, "valid/a": 2, "valid/b": 2})
    for f in (root / "train" / "b").iterdir():
        f.write_bytes(b"")
    report, usable = audit(data_dir=root)
    assert not usable and "verdict: NOT USABLE: no decodable train images of class 'b'" in report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match=r"(?s)NOT USABLE: no decodable train images of class 'b'.*img0.jpg"):
            load_dataset(data_dir=root)


def test_an_archive_root_of_split_folders_is_not_taken_for_classes(tmp_path):
    # fruits as its archive unpacks: train_zip/train/*.jpg and test_zip/test/*.jpg
    root = make_user_folder(tmp_path / "archive", {"train_zip/train": 4, "test_zip/test": 2})
    with pytest.raises(DatasetError, match=r"folders test_zip, train_zip look like dataset splits, not classes"):
        load_dataset(data_dir=root)
    assert "look like dataset splits" in audit(data_dir=root)[0]
    # with the expected layout one level down, the error names that folder
    make_user_folder(root, {"Covid19-dataset/train/x": 3, "Covid19-dataset/train/y": 3,
                            "Covid19-dataset/test/x": 1, "Covid19-dataset/test/y": 1})
    with pytest.raises(DatasetError, match=r"pass --data-dir .*archive/Covid19-dataset"):
        load_dataset(data_dir=root)


def test_class_names_in_any_script_and_spelt_differently_across_splits(tmp_path):
    root = make_user_folder(tmp_path / "food", {"train/crème brûlée": 3, "train/яблоко": 3, "train/Apple": 3,
                                                "valid/Crème Brûlée": 1, "valid/яблоко": 1, "valid/apple": 1})
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset(data_dir=root)
    notes = {str(w.message).split(": ", 1)[1] for w in caught}
    assert notes == {"class 'apple' is spelt 'Apple' and 'apple' in train/ and valid/: taken as one class",
                     "class 'crème_brûlée' is spelt 'Crème Brûlée' and 'crème brûlée' in train/ and valid/: "
                     "taken as one class"}
    assert ds.classes == ["apple", "crème_brûlée", "яблоко"]
    assert counts(ds) == {"train": {"apple": 3, "crème_brûlée": 3, "яблоко": 3},
                          "valid": {"apple": 1, "crème_brûlée": 1, "яблоко": 1}}
    clash = make_user_folder(tmp_path / "clash2", {"train/apple": 2, "train/Apple": 2, "train/pear": 2,
                                                   "valid/apple": 1, "valid/pear": 1})
    with pytest.raises(DatasetError, match=r"class folders 'train/Apple', 'train/apple' all mean class 'apple'"):
        load_dataset(data_dir=clash)


def test_valid_and_test_both_present_says_which_is_used(tmp_path):
    root = make_user_folder(tmp_path / "both", {"train/a": 3, "train/b": 3, "val/a": 1, "val/b": 1,
                                                "test/a": 1, "test/b": 1})
    with pytest.warns(UserWarning, match=r"using val/ as the validation split, test/ is not used"):
        ds = load_dataset(data_dir=root)
    assert all("val" in s.path.parts for s in ds.valid)


@pytest.mark.parametrize("workers", [1, 2])
def test_decompression_bomb_warning_names_the_file(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x10 = 120 pixels: over it, under twice it
    paths = [save_jpeg(tmp_path / f"big{i}.jpg", size=(12, 10), seed=i) for i in range(4)]
    with pytest.warns(Image.DecompressionBombWarning) as caught:
        images, kept, failed = load_images([Sample(p, 0) for p in paths], 8, workers=workers, progress=False)
    assert kept == [0, 1, 2, 3]
    assert {str(p) for p in paths} <= {str(w.message).split(": ")[0] for w in caught}
