"""Forward + backward of MarginAwareHead + loss for every registered loss (pytest-benchmark).

Batch 256, feature dim 512, C = 4 and C = 1000, float32 on CPU; the baseline is a plain
nn.Linear + F.cross_entropy of the same size. The margin losses run their C++ kernels
(lossbank/csrc/native.cpp) and, as "<name> (pytorch)", their PyTorch fallback.

Each round times one baseline step and then one loss step, and the ratio reported is the
median over rounds of (loss step / baseline step right before it). On a shared machine the
speed drifts over seconds; pairing puts both steps under the same drift, where timing each
loss in its own block let the drift land on single cells. The baseline row is paired with
a second, identical baseline: its ratio shows what the pairing itself costs (ideally 1.00).
Run (prints the table):

    .venv/bin/python -m pytest benchmarks/bench_losses.py --benchmark-only \
        --benchmark-json=.benchmarks/losses.json -q && .venv/bin/python benchmarks/losses_table.py .benchmarks/losses.json
"""
import statistics
import time

import pytest
import torch
from torch import nn

from lossbank import MarginAwareHead, get_loss_info, has_native_kernels, list_losses
from lossbank import _kernels

BATCH, DIM = 256, 512
# 2-3 s of paired steps per loss and size on this CPU (steps of about 0.4 ms at C = 4, 7 ms at C = 1000)
ROUNDS = {4: 2000, 1000: 200}
WARMUP = 20


def _inputs(num_classes):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, DIM, generator=g, requires_grad=True)
    target = torch.randint(0, num_classes, (BATCH,), generator=g)
    return features, target


def _linear_cross_entropy(features, target, num_classes):
    linear = nn.Linear(DIM, num_classes)
    return lambda: nn.functional.cross_entropy(linear(features), target).backward()


def _paired(benchmark, step, baseline, num_classes):
    """Time `step` with pytest-benchmark, each round right after one timed `baseline` step."""
    baseline_times = []

    def timed_baseline():
        start = time.perf_counter()
        baseline()
        baseline_times.append(time.perf_counter() - start)

    benchmark.group = f"C={num_classes}"
    benchmark.pedantic(step, setup=timed_baseline, rounds=ROUNDS[num_classes], warmup_rounds=WARMUP)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing to report
        return
    step_times = benchmark.stats.stats.data
    baseline_times = baseline_times[WARMUP:]
    assert len(step_times) == len(baseline_times)
    benchmark.extra_info["baseline_median"] = statistics.median(baseline_times)
    benchmark.extra_info["paired_ratio"] = statistics.median(s / b for s, b in zip(step_times, baseline_times))


@pytest.mark.parametrize("num_classes", [4, 1000])
def test_baseline_linear_cross_entropy(benchmark, num_classes):
    features, target = _inputs(num_classes)
    _paired(benchmark, _linear_cross_entropy(features, target, num_classes),
            _linear_cross_entropy(features, target, num_classes), num_classes)


MARGIN = [n for n in list_losses() if get_loss_info(n).input == "features"]
CASES = [(n, "native" if n in MARGIN else "pytorch") for n in list_losses()] + [(n, "pytorch") for n in MARGIN]


@pytest.mark.parametrize("num_classes", [4, 1000])
@pytest.mark.parametrize("name,implementation", CASES)
def test_head_and_loss(benchmark, name, implementation, num_classes, monkeypatch):
    if implementation == "pytorch":
        monkeypatch.setattr(_kernels, "_native", None)
    elif not has_native_kernels():
        pytest.fail("lossbank's C++ kernels are not built: pip install --no-build-isolation -e .")
    kwargs = {"class_counts": [10] * num_classes} if get_loss_info(name).needs_class_counts else {}
    head = MarginAwareHead(DIM, num_classes, name, **kwargs)
    features, target = _inputs(num_classes)
    teacher = torch.randn(BATCH, num_classes)

    def step():
        head(features, target, teacher_logits=teacher).loss.backward()

    _paired(benchmark, step, _linear_cross_entropy(features, target, num_classes), num_classes)
