"""Classify images with a saved run: ``python -m evaluation.predict --model PATH IMAGE_OR_FOLDER...``.

Prints each image's three most probable classes with their probabilities (``--out FILE.csv`` writes
them as CSV as well), then the files it skipped and why. Folders are walked as the harness walks a
dataset folder (hidden files left out, files whose extension is not an image's listed as skipped);
files named on the command line are decoded whatever their extension, as the harness decodes by
content. The model is one written by ``python -m evaluation.run --save-model``
(evaluation/saved_model.py). Exit status 0 when at least one image was classified, 1 when none was,
2 for a model file that cannot be used.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch

from . import folders
from .files import WriteError, write_text_atomically
from .images import ImageDecodeError, decode_square
from .saved_model import ModelFileError, load_model

TOP = 3


def image_files(arguments: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(the files to classify, in order, [(path, why it is skipped)]) for the paths given."""
    files, skipped = [], []
    for arg in arguments:
        path = Path(arg).expanduser()
        if path.is_dir():
            for f in folders.list_files(path):
                if folders.is_image_name(f):
                    files.append(f)
                else:
                    skipped.append((str(f), "not an image by its extension"))
        elif path.exists() or path.is_symlink():  # a broken link is decoded, and named as one
            files.append(path)
        else:
            skipped.append((str(path), "no such file or folder"))
    return files, skipped


def top_classes(probabilities: torch.Tensor, classes: list[str]) -> list[list[tuple[str, float]]]:
    k = min(TOP, len(classes))
    values, indices = probabilities.topk(k, dim=1)
    return [[(classes[i], p) for i, p in zip(row_i.tolist(), row_p.tolist())] for row_i, row_p in zip(indices, values)]


def predict_files(model, files: list[Path], batch_size: int):
    """Yield (path, [(class, probability)] * 3) per decodable file, and (path, error) for the others, in order."""
    for start in range(0, len(files), batch_size):
        batch, decoded = files[start:start + batch_size], []
        results: dict[int, str | list] = {}
        for i, path in enumerate(batch):
            try:
                decoded.append((i, torch.from_numpy(decode_square(path, model.decode_size).copy())))
            except ImageDecodeError as exc:
                results[i] = str(exc).removeprefix(f"cannot decode image {path}: ")
        if decoded:
            probabilities = model.predict(torch.stack([image for _, image in decoded]))
            for (i, _), top in zip(decoded, top_classes(probabilities, model.classes)):
                results[i] = top
        for i, path in enumerate(batch):
            yield path, results[i]


def csv_text(rows: list[tuple[str, list[tuple[str, float]]]], k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", *[f"{what}_{j}" for j in range(1, k + 1) for what in ("class", "probability")]])
    for path, top in rows:
        writer.writerow([path, *[v for name, p in top for v in (name, f"{p:.6f}")]])
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.predict", description=__doc__.splitlines()[0],
                                epilog="example:\n  python -m evaluation.predict --model out/runs/fruits/"
                                       "efficientnet_lite0-frozen/am_softmax/seed0-frac1.model.pt photos/ "
                                       "--out predictions.csv", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH", help="a model written by evaluation.run --save-model")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--out", metavar="FILE.csv", type=Path, help="also write the predictions as CSV")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded and classified at a time (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1; got {args.batch_size}")
    try:
        model = load_model(args.model, device=args.device)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files, skipped = image_files(args.images)
    k = min(TOP, len(model.classes))
    rows = []
    print("file\t" + "\t".join(f"top-{j}" for j in range(1, k + 1)))
    for path, result in predict_files(model, files, args.batch_size):
        if isinstance(result, str):
            skipped.append((str(path), result))
            continue
        rows.append((str(path), result))
        print(f"{path}\t" + "\t".join(f"{name} {p:.3f}" for name, p in result), flush=True)
    if args.out is not None:
        try:
            write_text_atomically(args.out, csv_text(rows, k))
        except WriteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if skipped:
        print(f"\nskipped {len(skipped)} file(s):", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)
    print(f"\n{len(rows)} image(s) classified by {args.model} ({model.metadata['run']['loss']}, classes "
          f"{', '.join(model.classes)})" + (f"; CSV in {args.out}" if args.out is not None else ""), file=sys.stderr)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
