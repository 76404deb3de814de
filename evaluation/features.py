"""Image views, feature extraction and the on-disk feature cache.

Images arrive as uint8 tensors (N, 3, S, S): the whole photo squashed to a square
(weather classes are whole scenes, so nothing is cropped away for evaluation).
``eval_view`` resizes the whole image; ``train_view`` draws a random resized crop,
flip and mild colour jitter. Both return uint8; ``normalise`` turns them into the
backbone's float input. ``cached_features`` computes the frozen backbone's pooled
features once per image and view and keeps them on disk, so every loss trains on
the same features and later runs skip decoding and extraction.

The cache is per image, not per list of images: an image's augmented views are drawn
from a generator seeded by (view seed, the image's sha256, view index), so its features
do not depend on which other images are extracted with it. Every protocol, fold, train
fraction and de-duplicated variant of a dataset then reads the same cached rows, and
only images never seen before are decoded and extracted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from evaluation.backbones import Backbone
from evaluation.images import file_sha256, load_images
from evaluation.files import WriteError, write_atomically

# Bump whenever eval_view/train_view/normalise or the drawing of views change what they
# produce: it is part of the cache key, so stale features are never reused.
TRANSFORM_VERSION = 2

# Weather scenes lose their meaning in small crops, hence the large minimum scale.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.2  # brightness, contrast and saturation factors drawn from [0.8, 1.2]

PRECISIONS = ("auto", "bf16", "fp32")
PARTS = ("pooled", "trunk")


# "1" or "0" overrides what native_bf16 detects on a CPU: the test suite uses it to run the
# code paths of the other kind of CPU (AVX2-only vs AVX-512-BF16/AMX) on the machine it has.
NATIVE_BF16_ENV = "LOSSBANK_NATIVE_BF16"


def native_bf16(device: str) -> bool:
    """Whether `device` computes in bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX).

    Elsewhere bf16 is emulated and much slower than fp32 (benchmarks/bench_extraction.py
    measures both on the machine at hand).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
        if forced in ("0", "1"):
            return forced == "1"
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: str) -> str:
    """ "auto" -> "bf16" where the device has native bf16, else "fp32"; others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(
            f"precision='bf16' on {device}, which has no native bf16: it is emulated and much slower than "
            f"fp32; precision='auto' picks fp32 here."
        )
    return precision


def _check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, Tensor) else ""
        raise TypeError(f"{what}: expected a uint8 tensor (N, 3, H, W), got {dtype} {shape}")


def normalise(images_uint8: Tensor, backbone: Backbone) -> Tensor:
    """uint8 (N, 3, H, W) -> float32 scaled to [0, 1] and normalised with the backbone's mean/std."""
    _check_images(images_uint8, "normalise")
    x = images_uint8.float().div_(255.0)
    mean = torch.tensor(backbone.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def eval_view(images_uint8: Tensor, size: int) -> Tensor:
    """Resize the whole image to size x size (antialiased); uint8 in, uint8 out."""
    _check_images(images_uint8, "eval_view")
    if tuple(images_uint8.shape[-2:]) == (size, size):
        return images_uint8
    import torchvision.transforms.v2.functional as TF  # here, not at the top: a fully cached run never pays its 1.5 s import

    return TF.resize(images_uint8, [size, size], antialias=True)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering CROP_SCALE of the area with aspect in CROP_RATIO."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * _uniform(generator, *CROP_SCALE)
        ratio = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    # Rarely no draw fits (only for very elongated images): take the whole image.
    return 0, 0, height, width


def train_view(images_uint8: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Random resized crop, horizontal flip and mild colour jitter per image; uint8 in, uint8 out.

    The same generator state gives the same views. Random numbers are drawn image by
    image in order, so the result does not depend on how the images are batched.
    """
    import torchvision.transforms.v2.functional as TF

    _check_images(images_uint8, "train_view")
    height, width = images_uint8.shape[-2:]
    out = torch.empty((len(images_uint8), 3, size, size), dtype=torch.uint8, device=images_uint8.device)
    for i, image in enumerate(images_uint8):
        top, left, h, w = _crop_box(height, width, generator)
        flip = torch.rand((), generator=generator).item() < 0.5
        brightness, contrast, saturation = (_uniform(generator, 1 - JITTER, 1 + JITTER) for _ in range(3))
        view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if flip:
            view = TF.horizontal_flip(view)
        view = TF.adjust_brightness(view, brightness)
        view = TF.adjust_contrast(view, contrast)
        out[i] = TF.adjust_saturation(view, saturation)
    return out


def view_generator(seed: int, image_key: str, view: int) -> torch.Generator:
    """The generator that draws view ``view`` of the image whose sha256 is ``image_key`` for view seed ``seed``."""
    digest = hashlib.sha256(f"{seed}/{image_key}/{view}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def extract(
    backbone: Backbone,
    images_uint8: Tensor,
    *,
    views: int = 1,
    augment: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    precision: str = "auto",
    progress: bool = True,
    desc: str = "",
    image_size: int | None = None,
    part: str = "pooled",
    image_keys: list[str] | None = None,
) -> Tensor:
    """Pooled features, float32 (views, N, num_features), of eval views or `views` augmented views.

    With ``image_keys`` (one per image, e.g. its sha256) each augmented view is drawn by
    ``view_generator(seed, key, view)``, so an image's views do not depend on the other
    images; without them one generator seeded by ``seed`` draws the views image by image.

    part "trunk" gives instead the output of the backbone's trunk (``Backbone.split``),
    float32 (views, N, C, H, W): what fine-tuning of the last stages starts from.

    precision "bf16" runs under bf16 autocast (about 3x faster than fp32 on CPUs with
    native bf16, the usual mixed precision on CUDA), "fp32" in float32, "auto" picks
    bf16 only where the device has native bf16. Both run channels_last: the same
    numbers (1e-6 apart), and about 1.6x faster than the default layout on the CPU.
    The model is put in eval mode for the extraction and its mode restored after.
    """
    _check_images(images_uint8, "extract")
    precision = resolve_precision(precision, device)
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    if views > 1 and not augment:
        raise ValueError(f"views={views} without augment would compute {views} identical copies; pass augment=True or views=1")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if image_keys is not None and len(image_keys) != len(images_uint8):
        raise ValueError(f"image_keys has {len(image_keys)} keys for {len(images_uint8)} images")
    size = image_size or backbone.input_size
    bf16 = precision == "bf16"
    device_type = torch.device(device).type
    memory_format = torch.channels_last
    model = backbone.model
    was_training = model.training
    model.eval()
    model.to(device=device, memory_format=memory_format)
    net = backbone.split()[0] if part == "trunk" else model

    n = len(images_uint8)
    out = torch.empty((views, n, backbone.num_features), dtype=torch.float32) if part == "pooled" else None
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=views * n, desc=desc or f"{backbone.name} features", unit="img", disable=not progress)
    try:
        with torch.inference_mode():
            for v in range(views):
                for start in range(0, n, batch_size):
                    batch = images_uint8[start : start + batch_size].to(device)
                    if augment and image_keys is not None:
                        batch = torch.cat([train_view(batch[j : j + 1], size, view_generator(seed, key, v))
                                           for j, key in enumerate(image_keys[start : start + len(batch)])])
                    else:
                        batch = train_view(batch, size, generator) if augment else eval_view(batch, size)
                    x = normalise(batch, backbone).contiguous(memory_format=memory_format)
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                        y = net(x)
                    if out is None:  # the trunk's output shape is known once it has run
                        out = torch.empty((views, n, *y.shape[1:]), dtype=torch.float32)
                    out[v, start : start + len(batch)] = y.float().cpu()
                    bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return out


@dataclass
class FeatureSet:
    features: Tensor  # (views, N, D) float32
    labels: Tensor  # (N,) int64
    paths: list[str]  # the N images used; undecodable ones are absent
    bad_files: list[str]
    cache_hit: bool
    seconds: dict[str, float] = field(default_factory=dict)  # {"decode", "extract", "load_cache"}
    precision: str = ""  # "bf16" or "fp32": what the features were computed in


def cache_key(
    backbone: Backbone,
    *,
    views: int,
    augment: bool,
    seed: int,
    image_size: int,
    decode_size: int,
    precision: str,
    part: str = "pooled",
) -> str:
    """sha256 of everything, apart from the image itself, that determines an image's cached features."""
    fields = {
        "backbone": backbone.name,
        "weights_hash": backbone.weights_hash,
        "views": views,
        "augment": augment,
        # Eval views are not random: every seed shares one cache entry per image.
        "seed": seed if augment else 0,
        "image_size": image_size,
        "decode_size": decode_size,
        "precision": precision,
        "part": part,
        "transform_version": TRANSFORM_VERSION,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _read_shard(path: Path, key: str, backbone: Backbone, views: int, part: str):
    """The shard at `path` (features memory-mapped, so only the rows used are read), or None (with a warning)."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        features, images = entry["features"], entry["images"]
        if entry["key"] != key:
            raise ValueError("its key does not match its folder")
        n = len(images)
        width = (backbone.num_features,) if part == "pooled" else tuple(features.shape[2:])
        if (features.dtype != torch.float32 or tuple(features.shape) != (views, n, *width)
                or (part == "trunk" and features.dim() != 5)):
            raise ValueError(f"features {tuple(features.shape)} do not fit {views} views of {n} images")
        return entry
    except Exception as exc:  # truncated writes, foreign files, older formats: all are just recomputed
        warnings.warn(f"feature cache file {path} is unusable ({type(exc).__name__}: {exc}); recomputing its images")
        return None


def _content_key(path) -> str:
    try:
        return file_sha256(path)
    except OSError:  # unreadable: load_images reports it; the key only has to be distinct
        return f"unreadable:{path}"


def cache_folder(cache_dir, backbone: Backbone, key: str, *, views: int, augment: bool, part: str) -> Path:
    """Where the shards of one cache key live: one folder per backbone, part, views and key."""
    stem = backbone.name if part == "pooled" else f"{backbone.name}-{part}"
    return Path(cache_dir) / f"{stem}_{'aug' if augment else 'eval'}{views}_{key[:16]}"


def cached_features(
    backbone: Backbone,
    splits,
    split: str,
    *,
    views: int,
    augment: bool,
    seed: int = 0,
    image_size: int = 224,
    decode_size: int = 256,
    precision: str = "auto",
    device: str = "cpu",
    cache_dir,
    progress: bool = True,
    part: str = "pooled",
    workers: int = 2,
) -> FeatureSet:
    """Features of `split` ("train" or "valid") of `splits`, read from the cache in `cache_dir` where it has them.

    The cache holds features per image (by its sha256) in shards: images it lacks are decoded,
    extracted and stored as one new shard; when it has every image nothing is decoded or run
    through the backbone (``cache_hit``). The precision used ("auto" resolved) is in the
    result's ``precision``. A cache that cannot be written (full disk, read-only folder) costs
    only the reuse: the features computed are returned all the same, with a warning.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    precision = resolve_precision(precision, device)  # the key names what actually ran
    key = cache_key(backbone, views=views, augment=augment, seed=seed, image_size=image_size,
                    decode_size=decode_size, precision=precision, part=part)
    folder = cache_folder(cache_dir, backbone, key, views=views, augment=augment, part=part)
    samples = splits.train if split == "train" else splits.valid
    image_keys = [s.sha256 or _content_key(s.path) for s in samples]
    seconds = {"decode": 0.0, "extract": 0.0, "load_cache": 0.0}

    start = time.perf_counter()
    found: dict[str, tuple[Tensor, int]] = {}  # image key -> (the shard's features, row)
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        entry = _read_shard(path, key, backbone, views, part)
        if entry is not None:
            found.update((k, (entry["features"], row)) for row, k in enumerate(entry["images"]))
    seconds["load_cache"] = time.perf_counter() - start if found else 0.0

    missing = sorted({k for k in image_keys if k not in found})
    bad_files: list[str] = []
    if missing:
        todo = [next(s for s, k in zip(samples, image_keys) if k == m) for m in missing]
        start = time.perf_counter()
        images, ok, failed = load_images(todo, decode_size, workers=workers, progress=progress)
        seconds["decode"] = time.perf_counter() - start
        decoded = set(ok)
        failed_keys = {k for i, k in enumerate(missing) if i not in decoded}
        bad_files = [str(s.path) for s, k in zip(samples, image_keys) if k in failed_keys]
        new_keys = [missing[i] for i in ok]
        start = time.perf_counter()
        new = extract(backbone, images, views=views, augment=augment, seed=seed, device=device, precision=precision,
                      progress=progress, desc=f"{splits.name}/{split} {folder.name.split('_')[0]}",
                      image_size=image_size, part=part, image_keys=new_keys)
        seconds["extract"] = time.perf_counter() - start
        found.update((k, (new, row)) for row, k in enumerate(new_keys))
        if new_keys:
            shard = folder / f"{hashlib.sha256(' '.join(new_keys).encode()).hexdigest()[:16]}.pt"
            entry = {"key": key, "images": new_keys, "features": new}
            try:
                write_atomically(shard, lambda tmp: torch.save(entry, tmp))
            except WriteError as exc:
                warnings.warn(f"the features are not cached: {exc}. This run uses them all the same; the next one "
                              f"computes them again")

    kept = [i for i, k in enumerate(image_keys) if k in found]
    features = torch.stack([found[image_keys[i]][0][:, found[image_keys[i]][1]] for i in kept], dim=1) if kept else \
        torch.empty((views, 0, backbone.num_features), dtype=torch.float32)
    return FeatureSet(
        features=features, labels=torch.tensor([samples[i].label for i in kept], dtype=torch.int64),
        paths=[str(samples[i].path) for i in kept], bad_files=bad_files, cache_hit=not missing,
        seconds=seconds, precision=precision,
    )
