"""Where a fine-tuning step of Lite0's last two stages spends its time (batch 32, 224², float32, channels_last).

Prints medians of: the whole network's forward; the frozen trunk's forward; a training step
of the tail alone (forward + backward, what `--unfreeze last` runs on cached trunk outputs);
and a training step through the whole network (what it would cost without the cache).

    .venv/bin/python benchmarks/bench_finetune_step.py
"""
import statistics
import time

import torch

from evaluation import backbones


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    backbone = backbones.create_backbone("efficientnet_lite0")
    backbone.model.to(memory_format=torch.channels_last)
    backbone.unfreeze("last")
    backbone.train_mode()
    trunk, tail = backbone.split()
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        trunk_out = trunk(x)

    def whole_forward():
        with torch.no_grad():
            backbone.model(x)

    def trunk_forward():
        with torch.no_grad():
            trunk(x)

    def tail_step():
        tail(trunk_out).sum().backward()

    def whole_step():
        backbone.model(x).sum().backward()

    rows = [("whole network, forward", median_seconds(whole_forward)),
            ("trunk, forward (cached by --unfreeze last)", median_seconds(trunk_forward)),
            ("tail, forward + backward (the cached step)", median_seconds(tail_step)),
            ("whole network, forward + backward (no cache)", median_seconds(whole_step))]
    print("| batch of 32 | median s |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    print(f"\ncached step / uncached step: {rows[2][1] / rows[3][1]:.2f}")


if __name__ == "__main__":
    main()
