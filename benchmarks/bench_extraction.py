"""Feature extraction speed and fidelity: fp32 (default layout), fp32 channels_last, bf16 channels_last.

Decodes real images of one dataset once, then extracts eval-view features with each
setting `--repeats` times and reports the median images per second, and how far each
setting's features are from plain fp32, image by image (relative L2 difference).
With --probe it also trains the same linear probe on fp32 and on bf16 features of the
whole dataset and reports valid accuracy, which is what matters for the comparison.
bf16 is only fast on devices with native bf16 (AVX512-BF16/AMX CPUs, CUDA).

    python benchmarks/bench_extraction.py --probe               # Lite0 on fruits
    python benchmarks/bench_extraction.py --backbone resnet50 --weights none --n 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from evaluation.backbones import create_backbone
from evaluation.data import load_dataset
from evaluation.images import load_images
from evaluation.features import eval_view, extract, native_bf16, normalise


def linear_probe_accuracy(train_x, train_y, valid_x, valid_y, classes: int, steps: int = 300) -> float:
    """Valid accuracy of a softmax regression trained full-batch on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, valid_x = (train_x - mean) / std, (valid_x - mean) / std
    torch.manual_seed(0)
    layer = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(layer(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (layer(valid_x).argmax(1) == valid_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--dataset", default="fruits")
    parser.add_argument("--data-root", default=None, help="default: $LOSSBANK_DATA, else ../shared/datasets")
    parser.add_argument("--n", type=int, default=32, help="valid images timed and compared")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probe", action="store_true", help="also compare linear-probe accuracy on the whole dataset")
    args = parser.parse_args()

    data_root = args.data_root
    if data_root is None:
        data_root = os.environ.get("LOSSBANK_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    splits = load_dataset(args.dataset, data_root=data_root)
    backbone = create_backbone(args.backbone, args.weights)
    print(f"backbone {backbone.name} weights={backbone.weights} ({backbone.weights_hash}); "
          f"dataset {splits.name}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    images, _, _ = load_images(splits.valid[: args.n], 256, progress=False)
    warm = images[: min(8, len(images))]

    def plain_fp32():
        # The reference without extract's channels_last: same numbers, default layout.
        model = backbone.model.to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            out = torch.cat([model(normalise(eval_view(images[i : i + args.batch_size], backbone.input_size), backbone))
                             for i in range(0, len(images), args.batch_size)])
        return out

    runs = {
        "fp32, default layout": plain_fp32,
        "fp32, channels_last": lambda: extract(backbone, images, batch_size=args.batch_size, precision="fp32", progress=False)[0],
        "bf16, channels_last": lambda: extract(backbone, images, batch_size=args.batch_size, precision="bf16", progress=False)[0],
    }
    feats, speeds = {}, {label: [] for label in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 without native support warns; measuring it is the point
        for label in runs:  # first calls pay for oneDNN's kernel setup
            extract(backbone, warm, precision="bf16" if "bf16" in label else "fp32", progress=False)
        # Interleaved, so that other work on the shared cores slows every setting alike.
        for _ in range(args.repeats):
            for label, run in runs.items():
                start = time.perf_counter()
                feats[label] = run()
                speeds[label].append(len(images) / (time.perf_counter() - start))

    print(f"\n{len(images)} images, batch {args.batch_size}, {args.repeats} repeats; "
          f"native bf16 on this CPU: {native_bf16('cpu')}")
    print(f"{'extraction':<24}{'median img/s':>14}{'min':>8}{'max':>8}{'max rel diff':>14}{'mean rel diff':>15}")
    reference = feats["fp32, default layout"]
    for label, values in speeds.items():
        rel = (feats[label] - reference).norm(dim=1) / reference.norm(dim=1)
        print(f"{label:<24}{statistics.median(values):>14.1f}{min(values):>8.1f}{max(values):>8.1f}"
              f"{rel.max():>14.2e}{rel.mean():>15.2e}")
    print("rel diff = ||features - fp32 default layout|| / ||fp32 default layout||, per image")

    if args.probe:
        train_images, train_ok, _ = load_images(splits.train, 256, progress=False)
        valid_images, valid_ok, _ = load_images(splits.valid, 256, progress=False)
        train_y = torch.tensor([splits.train[i].label for i in train_ok])
        valid_y = torch.tensor([splits.valid[i].label for i in valid_ok])
        print(f"\nlinear probe, {len(train_y)} train / {len(valid_y)} valid images, {len(splits.classes)} classes "
              f"(chance {1 / len(splits.classes):.2f}, majority {valid_y.bincount().max().item() / len(valid_y):.2f})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for precision in ("fp32", "bf16"):
                start = time.perf_counter()
                tx = extract(backbone, train_images, precision=precision, progress=False)[0]
                vx = extract(backbone, valid_images, precision=precision, progress=False)[0]
                seconds = time.perf_counter() - start
                acc = linear_probe_accuracy(tx, train_y, vx, valid_y, len(splits.classes))
                print(f"  {precision}: valid accuracy {acc:.3f} (extraction {seconds:.0f} s)")

if __name__ == "__main__":
    main()
