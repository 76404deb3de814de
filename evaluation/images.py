"""Reading image files: decoding any of them to RGB, checking a dataset's files once (content
hash and whether they decode, remembered between runs), and decoding a whole split into one
uint8 tensor with worker processes.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import mmap
import multiprocessing
import os
import pathlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from .files import write_text_atomically
from .folders import DatasetError


class ImageDecodeError(DatasetError):
    """One image file cannot be decoded; the message names the file."""


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than allowed (refused from its header); a server answers it 413, not 400."""


# ---------------------------------------------------------------------------
# Decoding

def _flatten_alpha(im: Image.Image) -> Image.Image:
    # White, because transparent areas in web images are meant to show a page
    # background, which is almost always white.
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        # convert("RGB") clips 16-bit and float values at 255 instead of scaling them,
        # which turns most of a 16-bit photo white.
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im)
    return im.convert("RGB")


def _shrink(im: Image.Image, size: int) -> Image.Image:
    factor = min(im.size) // size
    return im.reduce(factor) if factor >= 2 else im


def decode_image(path, size: int | None = None) -> Image.Image:
    """The image at path as RGB, whatever its extension claims.

    GIFs give their first frame, alpha is flattened onto white, 16-bit and
    greyscale are scaled to 8-bit RGB, EXIF orientation is applied. With size,
    JPEGs are decoded at a reduced scale (draft mode) and other formats are
    reduced by an integer factor, always keeping the shorter side >= size.
    Raises ImageDecodeError naming the file if it cannot be decoded.
    """
    path = pathlib.Path(path)
    advice = "Replace it with a good copy or delete it."
    try:
        if path.is_symlink() and not path.exists():
            raise ImageDecodeError(f"cannot decode image {path}: it is a broken symbolic link (to "
                                   f"{os.readlink(path)}). Point it at the image or delete it.")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"cannot decode image {path}: the file is empty (0 bytes). {advice}")
    except OSError as e:
        raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}. {advice}") from e
    return _decode(lambda: Image.open(path), str(path), size, advice)


def _decode(open_image, name: str, size: int | None, advice: str, max_pixels: int | None = None) -> Image.Image:
    """What decode_image does once the source is open: the one decoder for files and for bytes.

    ``max_pixels`` refuses a larger image from its header, before its pixels are decoded.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = open_image()
        for w in caught:  # PIL's own warning does not say which file
            warnings.warn(f"{name}: {w.message}", w.category, stacklevel=3)
        with im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLargeError(f"cannot decode image {name}: it is {im.width}x{im.height} pixels, more than "
                                       f"the {max_pixels} allowed; send a smaller image")
            if size is not None and im.format == "JPEG":
                im.draft(None, (size, size))
            im.load()
            try:
                im_t = ImageOps.exif_transpose(im)
            except Exception:
                # A corrupt EXIF block only loses the rotation; the pixels are fine.
                im_t = im
            rgb = _to_rgb(im_t)
            if rgb is im:
                rgb = im.copy()
        if size is not None:
            rgb = _shrink(rgb, size)
        return rgb
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types for bad files; all mean "unusable"
        # PIL's own text for an unknown format names its stream object (a BytesIO's address for an upload).
        why = "not a format PIL recognises" if isinstance(e, UnidentifiedImageError) else e
        raise ImageDecodeError(f"cannot decode image {name}: {type(e).__name__}: {why}. {advice}") from e


def squared(im: Image.Image, size: int) -> np.ndarray:
    """The whole photo squashed to size x size, no crop, as uint8 (3, size, size): what every image becomes.

    Nothing is cropped because in whole-scene classes (sky, X-ray) the edges carry the class as much as the centre.
    """
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1)


def decode_square(path, size: int) -> np.ndarray:
    """The image file at path as the harness feeds it to a network: ``squared(decode_image(path, size), size)``."""
    return squared(decode_image(path, size), size)


def decode_image_bytes(data: bytes, max_pixels: int = 64_000_000, *, size: int, name: str) -> torch.Tensor:
    """An image file's bytes (``name`` says where they came from, for messages) as the harness decodes a file of
    them: RGB squashed to size x size, a uint8 tensor (3, size, size).

    Images over ``max_pixels`` are refused from their header, before their pixels are decoded; anything that is
    not a decodable image raises ImageDecodeError naming ``name``.
    """
    advice = "Send an image file (JPEG, PNG, GIF, BMP, TIFF or WebP)."
    if not data:
        raise ImageDecodeError(f"cannot decode image {name}: it is empty (0 bytes). {advice}")
    im = _decode(lambda: Image.open(io.BytesIO(data)), name, size, advice, max_pixels)
    return torch.from_numpy(squared(im, size).copy())


# ---------------------------------------------------------------------------
# Checking files: content hash and whether they decode, remembered

def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    sha256: str | None  # None when the file cannot be read
    error: str | None  # why it cannot be decoded, naming the file; None when it decodes
    warnings: tuple[str, ...] = ()  # e.g. PIL's decompression-bomb warning, naming the file


def check_file(path: str) -> FileCheck:
    """One file's sha256 and whether it decodes: the check both loading and the audit apply."""
    sha = None
    try:
        sha = file_sha256(path)
    except OSError:
        pass  # decode_image names the reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decode_image(path, 16)
            error = None
        except ImageDecodeError as e:
            error = str(e)
    return FileCheck(sha, error, tuple(str(w.message) for w in caught))


def _check_indexed(job):
    index, path = job
    return index, check_file(path)


def _memo_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # a dangling link or a vanished file: checked afresh every time
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def check_files(paths, *, workers: int = 2, memo=None, progress: bool = False) -> dict[str, FileCheck]:
    """{str(path): FileCheck} for every path: its sha256, and whether it decodes (at 16 px).

    ``memo`` (a JSON file, or None) remembers each answer under the file's path, size and
    mtime, so a rerun over unchanged files reads none of them.
    """
    paths = [str(p) for p in paths]
    memo_path = pathlib.Path(memo).expanduser() if memo is not None else None
    remembered = {}
    if memo_path is not None:
        try:
            remembered = json.loads(memo_path.read_text())
            if not isinstance(remembered, dict):
                remembered = {}
        except (OSError, ValueError):
            remembered = {}
    keys = {p: _memo_key(p) for p in paths}
    out: dict[str, FileCheck] = {}
    todo = []
    for p in paths:
        hit = remembered.get(keys[p]) if keys[p] else None
        if isinstance(hit, list) and len(hit) == 3:
            out[p] = FileCheck(hit[0], hit[1], tuple(hit[2]))
        else:
            todo.append(p)
    for index, check in run_parallel(_check_indexed, list(enumerate(todo)), workers, progress, "checking files"):
        out[todo[index]] = check
    if memo_path is not None and todo:
        fresh = {keys[p]: [out[p].sha256, out[p].error, list(out[p].warnings)] for p in todo if keys[p]}
        try:
            write_text_atomically(memo_path, json.dumps({**remembered, **fresh}))
        except OSError as e:
            warnings.warn(f"cannot remember file checks in {memo_path} ({e}); they are redone next time")
    return out


# ---------------------------------------------------------------------------
# Worker processes, and decoding a whole split with them

# The array load_images fills, set while it runs. Forked workers inherit it as
# shared memory and write their rows in place, so the pixels (200 MB for weather
# at 256) never travel through pipes, which cost more than the decoding saves.
_OUT: np.ndarray | None = None


def _decode_into_out(job):
    index, path, size = job
    with warnings.catch_warnings(record=True) as caught:  # returned: a worker's own warnings would be lost
        warnings.simplefilter("always")
        try:
            _OUT[index] = decode_square(path, size)
        except ImageDecodeError as e:
            return index, str(e), [(str(w.message), w.category) for w in caught]
    return index, None, [(str(w.message), w.category) for w in caught]


def _fork_available() -> bool:
    # fork starts workers instantly and shares memory with them; they need only
    # PIL and numpy, not torch's thread pools. Spawned workers would re-import
    # torch (seconds each) and could not share _OUT, so without fork we decode
    # in this process.
    return "fork" in multiprocessing.get_all_start_methods()


def run_parallel(func, jobs, workers: int, progress: bool, desc: str):
    """func(job) for every job, in no set order: in forked worker processes when there are
    enough jobs to pay for them, else in this process."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers > 1 and len(jobs) >= 2 * workers and _fork_available():
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for result in pool.imap_unordered(func, jobs, chunksize=8):
                    bar.update()
                    yield result
        else:
            for job in jobs:
                result = func(job)
                bar.update()
                yield result
    finally:
        bar.close()


def load_images(samples: list, size: int, workers: int = 2, progress: bool = True):
    """Decode every sample (evaluation.data.Sample, or anything with a .path) once and squash it
    to size x size.

    Returns (uint8 tensor (n_ok, 3, size, size), indices into samples of the
    images that decoded, paths that failed). Undecodable files are skipped with
    one warning that lists them all.
    """
    global _OUT
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    n = len(samples)
    shape = (n, 3, size, size)
    if n and workers > 1 and _fork_available():
        out = np.frombuffer(mmap.mmap(-1, math.prod(shape)), dtype=np.uint8).reshape(shape)
    else:
        out = np.empty(shape, dtype=np.uint8)
    jobs = [(i, str(s.path), size) for i, s in enumerate(samples)]
    errors: dict[int, str] = {}
    _OUT = out
    try:
        for index, error, caught in run_parallel(_decode_into_out, jobs, workers, progress, "decoding"):
            if error is not None:
                errors[index] = error
            for message, category in caught:
                warnings.warn(message, category, stacklevel=2)
    finally:
        _OUT = None
    kept = [i for i in range(n) if i not in errors]
    failed = [samples[i].path for i in sorted(errors)]
    if errors:
        out = out[kept]
        lines = "\n  ".join(errors[i] for i in sorted(errors))
        warnings.warn(f"{len(errors)} of {n} image files could not be decoded and are "
                      f"skipped:\n  {lines}", stacklevel=2)
    return torch.from_numpy(out), kept, failed


class ImageDataset(torch.utils.data.Dataset):
    """(float image CHW in [0, 1], label) pairs, decoded once up front.

    Undecodable files are left out (see .failed); .samples (evaluation.data.Sample, or anything
    with a .path and a .label) are the ones kept, in the order of the input list.
    """

    def __init__(self, samples: list, size: int, *, transform=None, workers: int = 2,
                 progress: bool = False):
        self.images, kept, self.failed = load_images(samples, size, workers=workers, progress=progress)
        self.samples = [samples[i] for i in kept]
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        image = self.images[index].float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
