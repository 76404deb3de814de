"""Wall time of the frozen-mode harness on fruits, against extracting the features alone.

Four fresh processes, each timed from start to exit (imports included on every side):
  1. extract only: decode fruits and compute the cached features (cold cache), nothing else;
  2. cold run: `python -m evaluation.run` with every loss, one seed, on an empty cache;
  3. warm run: the same command into a new --out, features from the cache, every loss retrained;
  4. resume: the same command into the same --out (every run already finished).

    LOSSBANK_DATA=../shared/datasets .venv/bin/python benchmarks/bench_harness.py [--dataset fruits]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXTRACT_ONLY = """
import sys
from evaluation import backbones, data, features
splits = data.load_dataset(sys.argv[1])
backbone = backbones.create_backbone("efficientnet_lite0")
for split, views, augment in (("train", 5, True), ("valid", 1, False)):
    features.cached_features(backbone, splits, split, views=views, augment=augment, cache_dir=sys.argv[2], progress=False)
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fruits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = [sys.executable, "-m", "evaluation.run", "--dataset", args.dataset, "--backbone", "efficientnet_lite0",
               "--no-progress", "--cache-dir", str(tmp / "cache")]
        extract = timed([sys.executable, "-c", EXTRACT_ONLY, args.dataset, str(tmp / "cache-extract-only")])
        cold = timed([*run, "--out", str(tmp / "cold")])
        sections = json.loads((tmp / "cold" / "timing.json").read_text())["sections"]
        warm = timed([*run, "--out", str(tmp / "warm")])
        resume = timed([*run, "--out", str(tmp / "warm")])
    train = sum(v for k, v in sections.items() if k.startswith("train:"))
    print(f"| {args.dataset}, efficientnet_lite0, frozen, 10 losses, 1 seed | wall s |")
    print("|---|---:|")
    print(f"| extract features only (cold cache) | {extract:.1f} |")
    print(f"| cold run, all losses | {cold:.1f} ({cold / extract:.2f}× extract only) |")
    print(f"| ↳ in it: load + extract {sum(v for k, v in sections.items() if k.startswith('load+extract')):.1f}, "
          f"train all losses {train:.1f}, report {sections.get('report', 0):.1f} | |")
    print(f"| warm cache, new --out (all losses retrained) | {warm:.1f} |")
    print(f"| rerun, same --out (finished runs skipped) | {resume:.1f} |")


if __name__ == "__main__":
    main()
