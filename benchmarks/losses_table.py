"""Markdown table of a bench_losses.py run: median per loss and its ratio to Linear + cross-entropy."""
import json
import sys
from collections import defaultdict


def main(path):
    runs = json.load(open(path))["benchmarks"]
    medians = defaultdict(dict)
    # losses timed in more than one implementation (the margin losses: C++ kernels and PyTorch) get it named
    implementations = defaultdict(set)
    for b in runs:
        if "name" in b["params"]:
            implementations[b["params"]["name"]].add(b["params"]["implementation"])
    for b in runs:
        name = b["params"].get("name", "baseline: nn.Linear + F.cross_entropy")
        if len(implementations.get(name, ())) > 1:
            name += f" ({b['params']['implementation']})"
        medians[name][b["params"]["num_classes"]] = b["stats"]["median"]
    sizes = sorted({c for row in medians.values() for c in row})
    base = medians["baseline: nn.Linear + F.cross_entropy"]
    header = " | ".join(f"C={c} median (µs) | ratio" for c in sizes)
    print(f"| loss | {header} |")
    print("|---|" + "---:|---:|" * len(sizes))
    for name, row in medians.items():
        cells = " | ".join(f"{row[c] * 1e6:.0f} | {row[c] / base[c]:.2f}×" for c in sizes)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1])
