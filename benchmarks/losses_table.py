"""Markdown table of a bench_losses.py run: median step per loss and its paired ratio to Linear + cross-entropy.

The ratio is the median over rounds of (loss step / the baseline step timed right before it),
as bench_losses.py records it; the baseline row is a baseline paired with an identical one.
"""
import json
import sys
from collections import defaultdict

BASELINE = "baseline: nn.Linear + F.cross_entropy"


def main(path):
    runs = json.load(open(path))["benchmarks"]
    if not all("paired_ratio" in b["extra_info"] for b in runs):
        sys.exit(f"{path}: no paired ratios in it; it comes from an older bench_losses.py or ran with "
                 "--benchmark-disable. Rerun the command in benchmarks/bench_losses.py's docstring.")
    cells = defaultdict(dict)
    # losses timed in more than one implementation (the margin losses: C++ kernels and PyTorch) get it named
    implementations = defaultdict(set)
    for b in runs:
        if "name" in b["params"]:
            implementations[b["params"]["name"]].add(b["params"]["implementation"])
    for b in runs:
        name = b["params"].get("name", BASELINE)
        if len(implementations.get(name, ())) > 1:
            name += f" ({b['params']['implementation']})"
        cells[name][b["params"]["num_classes"]] = (b["stats"]["median"], b["extra_info"]["baseline_median"],
                                                  b["extra_info"]["paired_ratio"])
    sizes = sorted({c for row in cells.values() for c in row})
    # the baseline's median in the same rounds shows how fast the machine was while that loss was timed
    header = " | ".join(f"C={c} median (µs) | baseline beside it (µs) | ratio" for c in sizes)
    print(f"| loss | {header} |")
    print("|---|" + "---:|---:|---:|" * len(sizes))
    for name, row in cells.items():
        text = " | ".join(f"{row[c][0] * 1e6:.0f} | {row[c][1] * 1e6:.0f} | {row[c][2]:.2f}×" for c in sizes)
        print(f"| {name} | {text} |")


if __name__ == "__main__":
    main(sys.argv[1])
