"""Image views, feature extraction and the on-disk feature cache.

Extraction and cache tests use a tiny convolutional backbone and a few synthetic
PNG files, so they exercise the real code paths in well under a second each.
"""

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluation import features
from evaluation.backbones import Backbone
from evaluation.data import DatasetSplits, Sample
from evaluation.features import (
    FeatureSet,
    cache_key,
    cached_features,
    eval_view,
    extract,
    normalise,
    train_view,
)


def tiny_backbone(name="tiny", weights_hash="w0") -> Backbone:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()
    return Backbone(name=name, model=model, num_features=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                    input_size=32, weights="none", weights_hash=weights_hash)


def random_images(n=5, size=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------- transforms

def test_normalise_uses_the_backbone_statistics():
    backbone = tiny_backbone()
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[1] = 255
    x = normalise(images, backbone)
    assert x.dtype == torch.float32 and x.shape == images.shape
    mean, std = torch.tensor(backbone.mean), torch.tensor(backbone.std)
    assert torch.allclose(x[0, :, 0, 0], -mean / std)
    assert torch.allclose(x[1, :, 0, 0], (1 - mean) / std)
    with pytest.raises(TypeError, match="uint8"):
        normalise(images.float(), backbone)


def test_eval_view_resizes_the_whole_image():
    images = random_images(3, 40)
    out = eval_view(images, 24)
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.uint8
    assert eval_view(images, 40) is images
    # A left/right split image stays split in the same place: nothing is cropped away.
    halves = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    halves[..., 20:] = 200
    resized = eval_view(halves, 20)
    assert resized[..., :9].max() == 0 and resized[..., 11:].min() == 200


def test_train_view_is_deterministic_for_a_seed():
    images = random_images(6, 48)
    a = train_view(images, 32, torch.Generator().manual_seed(1))
    b = train_view(images, 32, torch.Generator().manual_seed(1))
    c = train_view(images, 32, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Batching does not change the draws: two halves with one generator = one call.
    g = torch.Generator().manual_seed(1)
    assert torch.equal(torch.cat([train_view(images[:2], 32, g), train_view(images[2:], 32, g)]), a)


def test_train_view_jitter_is_mild_and_crops_vary():
    grey = torch.full((64, 3, 40, 40), 128, dtype=torch.uint8)
    out = train_view(grey, 32, torch.Generator().manual_seed(0)).float()
    # Flat image: crops and flips change nothing, brightness stays within +-20 %.
    assert out.std(dim=(1, 2, 3)).max() < 1
    assert out.min() >= 128 * 0.8 - 2 and out.max() <= 128 * 1.2 + 2  # uint8 rounding
    assert out.mean(dim=(1, 2, 3)).std() > 3  # but it does vary from view to view

    ramp = torch.arange(40, dtype=torch.uint8).mul(6).expand(64, 3, 40, 40).contiguous()
    out = train_view(ramp, 40, torch.Generator().manual_seed(0)).float()
    slope = out[:, 0, 20, -1] - out[:, 0, 20, 0]
    assert (slope < 0).any() and (slope > 0).any()  # some views flipped, some not
    assert len({round(s) for s in slope.abs().tolist()}) > 5  # crops of different widths


# ---------------------------------------------------------------- extraction

def test_extract_shapes_and_determinism():
    backbone = tiny_backbone()
    images = random_images(7, 40)
    fp32 = dict(progress=False, precision="fp32")  # numbers compared at float32 tolerance, whatever "auto" picks here
    out = extract(backbone, images, views=3, augment=True, seed=5, batch_size=3, **fp32)
    assert out.shape == (3, 7, 8) and out.dtype == torch.float32
    assert torch.equal(extract(backbone, images, views=3, augment=True, seed=5, batch_size=3, **fp32), out)
    # Other batches draw the same views; only the convolution's rounding may differ.
    again = extract(backbone, images, views=3, augment=True, seed=5, batch_size=4, **fp32)
    assert torch.allclose(out, again, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1])  # views differ
    other = extract(backbone, images, views=3, augment=True, seed=6, batch_size=3, **fp32)
    assert not torch.allclose(out, other)
    plain = extract(backbone, images, progress=False, precision="fp32")
    assert plain.shape == (1, 7, 8)
    with torch.no_grad():
        expected = backbone.model(normalise(eval_view(images, 32), backbone))
    assert torch.allclose(plain[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="augment"):
        extract(backbone, images, views=2, progress=False)
    with pytest.raises(ValueError, match="precision"):
        extract(backbone, images, precision="fp16", progress=False)


def test_extract_bf16_is_close_to_fp32_and_restores_the_model():
    backbone = tiny_backbone()
    backbone.model.train()
    images = random_images(8, 32)
    fp32 = extract(backbone, images, precision="fp32", progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no native bf16")
        bf16 = extract(backbone, images, precision="bf16", progress=False)
    assert backbone.model.training  # mode restored after eval-mode extraction
    relative = (fp32 - bf16).norm(dim=-1) / fp32.norm(dim=-1)
    assert relative.max() < 0.05 and relative.max() > 0  # really ran in lower precision


def test_auto_precision_picks_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(features, "native_bf16", lambda device: device == "cuda")
    assert features.resolve_precision("auto", "cpu") == "fp32"
    assert features.resolve_precision("auto", "cuda") == "bf16"
    assert features.resolve_precision("fp32", "cuda") == "fp32"
    with pytest.warns(UserWarning, match="no native bf16"):
        assert features.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        features.resolve_precision("fp16", "cpu")


def test_extract_empty_input():
    assert extract(tiny_backbone(), torch.zeros(0, 3, 32, 32, dtype=torch.uint8), progress=False).shape == (1, 0, 8)


# ---------------------------------------------------------------- cache

def write_png(path: Path, colour, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def splits(tmp_path) -> DatasetSplits:
    root = tmp_path / "data"
    colours = [(200, 40, 40), (40, 40, 200)]
    train = [Sample(write_png(root / "train" / f"c{c}_{i}.png", colours[c]), c) for c in (0, 1) for i in range(3)]
    valid = [Sample(write_png(root / "valid" / f"c{c}_{i}.png", colours[c]), c) for c in (0, 1) for i in range(2)]
    broken = root / "valid" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    valid.append(Sample(broken, 1))
    return DatasetSplits(name="toy set", classes=["red", "blue"], train=train, valid=valid, root=root, notes=[], dropped={})


def run(backbone, splits, cache_dir, split="train", **kw) -> FeatureSet:
    # float32 unless a test asks for bf16: "auto" would pick bf16 on CPUs that have it natively.
    options = dict(views=2, augment=True, seed=0, image_size=32, decode_size=40, precision="fp32")
    options.update(kw)
    if split == "valid":
        options.update(views=kw.get("views", 1), augment=kw.get("augment", False))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*could not be decoded.*")
        return cached_features(backbone, splits, split, cache_dir=cache_dir, progress=False, **options)


def cache_files(cache_dir) -> list:
    return sorted(Path(cache_dir).rglob("*.pt"))


def test_cache_miss_then_hit_without_decoding(splits, tmp_path, monkeypatch):
    backbone = tiny_backbone()
    first = run(backbone, splits, tmp_path / "cache")
    assert not first.cache_hit
    assert first.features.shape == (2, 6, 8) and first.features.dtype == torch.float32
    assert first.labels.tolist() == [0, 0, 0, 1, 1, 1] and first.labels.dtype == torch.int64
    assert first.paths == [str(s.path) for s in splits.train]
    assert first.seconds["decode"] > 0 and first.seconds["extract"] > 0 and first.seconds["load_cache"] == 0

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cache hit must not decode images")

    monkeypatch.setattr(features, "load_images", no_decoding)
    second = run(backbone, splits, tmp_path / "cache")
    assert second.cache_hit
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.labels, first.labels) and second.paths == first.paths
    assert second.seconds["decode"] == 0 and second.seconds["load_cache"] > 0
    files = list(Path(tmp_path / "cache").rglob("*"))
    assert [f.suffix for f in files if f.is_file()] == [".pt"]  # one shard, no temp files left behind


def test_an_image_has_the_same_features_whatever_images_come_with_it(splits, tmp_path, monkeypatch):
    """The cache is per image: a subset, a reordering or another split of the same files reads the same rows."""
    backbone = tiny_backbone()
    full = run(backbone, splits, tmp_path / "cache")
    subset = dataclasses.replace(splits, train=splits.train[::-1][:4])
    fresh = run(backbone, subset, tmp_path / "fresh-cache")  # extracted on their own, in another order
    torch.testing.assert_close(fresh.features, full.features[:, [5, 4, 3, 2]], rtol=0, atol=1e-5)
    decoded = []
    real = features.load_images
    monkeypatch.setattr(features, "load_images", lambda todo, *a, **k: (decoded.extend(todo), real(todo, *a, **k))[1])
    # The valid images are byte copies of train ones (same colour, same noise): their features are in the cache.
    copies = splits.valid[:2]
    new = [Sample(write_png(tmp_path / "data" / "new" / f"{i}.png", (90, 160 + i, 90)), 0) for i in range(2)]
    grown = dataclasses.replace(splits, train=splits.train + copies + new)
    more = run(backbone, grown, tmp_path / "cache")
    assert [s.path for s in decoded] == [s.path for s in new]  # only the images never seen before
    assert torch.equal(more.features[:, 6:8], full.features[:, :2])
    assert not more.cache_hit and torch.equal(more.features[:, :6], full.features)
    assert len(cache_files(tmp_path / "cache")) == 2  # the first shard and one with the two new images
    assert run(backbone, grown, tmp_path / "cache").cache_hit


def test_undecodable_images_are_left_out_and_listed(splits, tmp_path):
    result = run(tiny_backbone(), splits, tmp_path / "cache", split="valid")
    assert result.features.shape == (1, 4, 8)
    assert result.bad_files == [str(splits.valid[-1].path)]
    assert str(splits.valid[-1].path) not in result.paths and len(result.labels) == 4
    again = run(tiny_backbone(), splits, tmp_path / "cache", split="valid")  # tried again: it may have been fixed
    assert again.bad_files == result.bad_files and torch.equal(again.features, result.features)


def test_corrupt_cache_file_is_recomputed_with_a_warning(splits, tmp_path):
    backbone = tiny_backbone()
    first = run(backbone, splits, tmp_path / "cache")
    [path] = cache_files(tmp_path / "cache")
    path.write_bytes(path.read_bytes()[:100])  # a truncated write
    with pytest.warns(UserWarning, match="unusable.*recomputing"):
        second = cached_features(backbone, splits, "train", views=2, augment=True, image_size=32, decode_size=40,
                                 cache_dir=tmp_path / "cache", progress=False, precision="fp32")
    assert not second.cache_hit and torch.equal(second.features, first.features)
    assert run(backbone, splits, tmp_path / "cache").cache_hit  # the shard written again is good


def test_cache_file_with_wrong_contents_is_recomputed(splits, tmp_path):
    backbone = tiny_backbone()
    run(backbone, splits, tmp_path / "cache")
    [path] = cache_files(tmp_path / "cache")
    entry = torch.load(path, weights_only=True)
    entry["features"] = entry["features"][:, :1]  # one row short of its images
    torch.save(entry, path)
    with pytest.warns(UserWarning, match="do not fit"):
        again = cached_features(backbone, splits, "train", views=2, augment=True, image_size=32, decode_size=40,
                                cache_dir=tmp_path / "cache", progress=False, precision="fp32")
    assert not again.cache_hit and again.features.shape == (2, 6, 8)


def key_of(backbone, **kw):
    options = dict(views=2, augment=True, seed=0, image_size=224, decode_size=256, precision="bf16")
    options.update(kw)
    return cache_key(backbone, **options)


def test_cache_key_changes_with_everything_that_changes_features(monkeypatch):
    backbone = tiny_backbone()
    base = key_of(backbone)
    variants = {
        "backbone": key_of(tiny_backbone(name="other")),
        "weights": key_of(tiny_backbone(weights_hash="w1")),
        "views": key_of(backbone, views=3),
        "augment": key_of(backbone, augment=False),
        "seed": key_of(backbone, seed=1),
        "image_size": key_of(backbone, image_size=192),
        "decode_size": key_of(backbone, decode_size=320),
        "precision": key_of(backbone, precision="fp32"),
        "part": key_of(backbone, part="trunk"),
    }
    monkeypatch.setattr(features, "TRANSFORM_VERSION", features.TRANSFORM_VERSION + 1)
    variants["transform"] = key_of(backbone)
    assert len({base, *variants.values()}) == len(variants) + 1


def test_eval_views_share_one_cache_entry_across_seeds():
    backbone = tiny_backbone()
    assert key_of(backbone, augment=False, views=1, seed=0) == key_of(backbone, augment=False, views=1, seed=3)


def test_changed_seed_or_views_is_a_cache_miss(splits, tmp_path):
    backbone = tiny_backbone()
    base = run(backbone, splits, tmp_path / "cache")
    other_seed = run(backbone, splits, tmp_path / "cache", seed=1)
    more_views = run(backbone, splits, tmp_path / "cache", views=3)
    assert not other_seed.cache_hit and not more_views.cache_hit
    assert not torch.allclose(other_seed.features, base.features)
    assert more_views.features.shape == (3, 6, 8)
    assert len(cache_files(tmp_path / "cache")) == 3


def test_trunk_features_are_cached_apart_from_pooled_ones(splits, tmp_path):
    backbone = dataclasses.replace(tiny_backbone(), last_stages=("2", "3", "4"))  # trunk: conv + batch norm
    pooled = run(backbone, splits, tmp_path / "cache")
    trunk = run(backbone, splits, tmp_path / "cache", part="trunk")
    assert not trunk.cache_hit and trunk.features.shape == (2, 6, 8, 15, 15)
    # Same views, so the tail applied to the cached trunk gives the pooled features.
    _, tail = backbone.split()
    with torch.no_grad():
        torch.testing.assert_close(tail(trunk.features.flatten(0, 1)).view(2, 6, 8), pooled.features)
    again = run(backbone, splits, tmp_path / "cache", part="trunk")
    assert again.cache_hit and torch.equal(again.features, trunk.features)
    assert len(cache_files(tmp_path / "cache")) == 2
    with pytest.raises(ValueError, match="part must be one of"):
        extract(backbone, random_images(), part="head")


def test_cached_features_rejects_a_bad_split(splits, tmp_path):
    with pytest.raises(ValueError, match="'train' or 'valid'"):
        cached_features(tiny_backbone(), splits, "test", views=1, augment=False, cache_dir=tmp_path, progress=False)


def test_native_bf16_detection_can_be_forced_for_the_other_kind_of_cpu(monkeypatch):
    """LOSSBANK_NATIVE_BF16 lets one machine run the suite as an AVX2-only CPU (0) or a bf16 one (1)."""
    monkeypatch.setenv(features.NATIVE_BF16_ENV, "0")
    assert features.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setenv(features.NATIVE_BF16_ENV, "1")
    assert features.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.delenv(features.NATIVE_BF16_ENV)
    detected = torch.cpu._is_avx512_bf16_supported() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert features.native_bf16("cpu") == detected


def test_cached_bf16_trunk_and_pooled_features_agree_to_bf16_precision(splits, tmp_path):
    """The bf16 path on purpose, whatever this CPU has: tiny inputs, so cheap even where bf16 is emulated."""
    backbone = dataclasses.replace(tiny_backbone(), last_stages=("2", "3", "4"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no native bf16")
        pooled = run(backbone, splits, tmp_path / "cache", precision="bf16")
        trunk = run(backbone, splits, tmp_path / "cache", part="trunk", precision="bf16")
    assert pooled.precision == trunk.precision == "bf16"
    fp32 = run(backbone, splits, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 3  # bf16 features never stand in for fp32 ones
    _, tail = backbone.split()
    with torch.no_grad():
        from_trunk = tail(trunk.features.flatten(0, 1)).view(2, 6, 8)
    # bf16 keeps 8 bits of mantissa: agreement to about 1 %, not float32's 1e-6.
    for bf16 in (pooled.features, from_trunk):
        relative = (bf16 - fp32.features).norm(dim=-1) / fp32.features.norm(dim=-1)
        assert 0 < relative.max() < 0.05


def test_a_cache_that_cannot_be_written_keeps_the_features(splits, tmp_path, monkeypatch):
    backbone = tiny_backbone()
    expected = run(backbone, splits, tmp_path / "good").features

    def disk_full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2112 vs 2006")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.warns(UserWarning, match=r"features are not cached: cannot write .*tiny_aug2_.*unexpected pos"):
        result = run(backbone, splits, tmp_path / "full")
    assert torch.equal(result.features, expected) and not result.cache_hit
    assert [f for f in (tmp_path / "full").rglob("*") if f.is_file()] == []  # no half-written or temporary file


def test_cache_files_are_as_readable_as_any_new_file(splits, tmp_path):
    previous = os.umask(0o022)
    try:
        run(tiny_backbone(), splits, tmp_path / "cache")
    finally:
        os.umask(previous)
    [path] = cache_files(tmp_path / "cache")
    assert path.stat().st_mode & 0o777 == 0o644  # a shared cache is readable by the others who use it


def test_workers_reach_the_decoding_of_cached_features(splits, tmp_path, monkeypatch):
    seen = []
    real = features.load_images

    def spy(samples, size, workers=2, progress=True):
        seen.append(workers)
        return real(samples, size, workers=workers, progress=progress)

    monkeypatch.setattr(features, "load_images", spy)
    run(tiny_backbone(), splits, tmp_path / "cache", workers=1)
    assert seen == [1]
