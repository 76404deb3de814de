"""Backbone comparison on fruits with cross-entropy: accuracy, size, CPU latency, cold start, memory.

For each backbone: valid top-1/top-3 from `python -m evaluation.run` (frozen, cross-entropy,
5 seeds; torchvision backbones use random initialisation when their ImageNet weights cannot be
had here, and the table says so), parameter count, weights size in MB (float32 state_dict),
CPU latency per image at batch 1 (median of 30, after 5 warm-ups), cold start (a fresh process:
interpreter start, imports, building the network, one prediction) and that process's peak RSS;
a last row measures the same process without any network (imports only), the baseline that
cold start and peak RSS of each backbone should be read against.

    LOSSBANK_DATA=../shared/datasets .venv/bin/python benchmarks/bench_backbones.py
    # only some backbones, keeping the others' rows of results/backbones.json:
    ... bench_backbones.py --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from evaluation import backbones as bb
from evaluation import records, run, stats

# Peak RSS from /proc/self/status (VmHWM), which starts afresh at exec: getrusage's ru_maxrss
# is kept across exec, so a child would report its parent's peak (this script's, 1.7-2.1 GB).
PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

COLD_START = PEAK_RSS + """
import sys, time, torch
from evaluation import backbones, features
t0 = float(sys.argv[3])
backbone = backbones.create_backbone(sys.argv[1], sys.argv[2])
image = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
with torch.inference_mode():
    x = features.normalise(features.eval_view(image, 224), backbone).contiguous(memory_format=torch.channels_last)
    backbone.model.to(memory_format=torch.channels_last)(x)
print(time.time() - t0, peak_rss_mb())
"""


# The same process without any network: what torch and the harness's imports alone cost.
BASELINE = PEAK_RSS + """
import sys, time, torch
from evaluation import backbones, features
import timm, torchvision
print(time.time() - float(sys.argv[1]), peak_rss_mb())
"""


def weights_for(name: str) -> str:
    try:
        bb.check_backbone_available(name, "imagenet")
        return "imagenet"
    except bb.BackboneError:
        return "none"


def latency_ms(backbone) -> float:
    from evaluation.features import eval_view, normalise

    model = backbone.model.eval().to(memory_format=torch.channels_last)
    size = backbone.input_size  # each at its own input size: Lite1 and Lite2 cost more partly through it
    x = normalise(eval_view(torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8), size), backbone)
    x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(35):
            start = time.perf_counter()
            model(x)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/backbones"), help="runs of each backbone")
    parser.add_argument("--json", type=Path, default=Path("results/backbones.json"), help="the table, for RESULTS.md")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--backbones", default=",".join(bb.BACKBONES),
                        help="comma-separated; the other backbones' rows already in --json are kept")
    args = parser.parse_args()
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    unknown = [n for n in names if n not in bb.BACKBONES]
    if unknown:
        parser.error(f"--backbones: unknown {', '.join(unknown)}; known: {', '.join(bb.BACKBONES)}")
    kept = {r["backbone"]: r for r in json.loads(args.json.read_text()) if r["backbone"] in bb.BACKBONES} \
        if args.json.is_file() else {}
    measured = {}
    for name in names:
        weights = weights_for(name)
        code = run.main(["--dataset", "fruits", "--backbone", name, "--weights", weights, "--losses", "cross_entropy",
                         "--seeds", args.seeds, "--out", str(args.out / name), "--no-progress"])
        if code:
            raise SystemExit(f"the run for {name} failed with exit code {code}")
        summary = stats.summarise(records.load_runs(args.out / name)).iloc[0]
        backbone = bb.create_backbone(name, weights)
        params = sum(p.numel() for p in backbone.model.parameters())
        size_mb = sum(t.numel() * t.element_size() for t in backbone.model.state_dict().values()) / 2**20
        cold = subprocess.run([sys.executable, "-c", COLD_START, name, weights, str(time.time())],
                              capture_output=True, text=True, check=True).stdout.split()
        measured[name] = {"backbone": name, "weights": weights, "top1_mean": summary.top1_mean,
                          "top1_std": summary.top1_std, "top3_mean": summary.top3_mean, "params_m": params / 1e6,
                          "size_mb": size_mb, "latency_ms": latency_ms(backbone), "cold_start_s": float(cold[0]),
                          "peak_rss_mb": float(cold[1])}
    rows = [measured.get(name) or kept[name] for name in bb.BACKBONES if name in measured or name in kept]
    base = subprocess.run([sys.executable, "-c", BASELINE, str(time.time())], capture_output=True, text=True,
                          check=True).stdout.split()
    rows.append({"backbone": "none (imports only)", "weights": "", "top1_mean": None, "top1_std": None,
                 "top3_mean": None, "params_m": None, "size_mb": None, "latency_ms": None,
                 "cold_start_s": float(base[0]), "peak_rss_mb": float(base[1])})
    args.json.write_text(json.dumps(rows, indent=1))
    print("| backbone | weights | top-1 (%) | top-3 (%) | params (M) | size (MB) | latency, batch 1 (ms) "
          "| cold start (s) | peak RSS (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["top1_mean"] is None:
            print(f"| {r['backbone']} | | | | | | | {r['cold_start_s']:.1f} | {r['peak_rss_mb']:.0f} |")
            continue
        weights = "ImageNet" if r["weights"] == "imagenet" else "**random init** (no weights offline)"
        print(f"| {r['backbone']} | {weights} | {100 * r['top1_mean']:.1f} ± {100 * r['top1_std']:.1f} | "
              f"{100 * r['top3_mean']:.1f} | {r['params_m']:.1f} | {r['size_mb']:.1f} | {r['latency_ms']:.1f} | "
              f"{r['cold_start_s']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
