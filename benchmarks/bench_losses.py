"""Forward + backward of MarginAwareHead + loss for every registered loss (pytest-benchmark).

Batch 256, feature dim 512, C = 4 and C = 1000, float32 on CPU; the baseline is a plain
nn.Linear + F.cross_entropy of the same size. The margin losses run their C++ kernels
(lossbank/csrc/native.cpp) and, as "<name> (pytorch)", their PyTorch fallback. Run
(prints the table with ratios):

    .venv/bin/python -m pytest benchmarks/bench_losses.py --benchmark-only \
        --benchmark-json=.benchmarks/losses.json -q && .venv/bin/python benchmarks/losses_table.py .benchmarks/losses.json
"""
import pytest
import torch
from torch import nn

from lossbank import MarginAwareHead, get_loss_info, list_losses
from lossbank import functional as LF

BATCH, DIM = 256, 512


def _inputs(num_classes):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, DIM, generator=g, requires_grad=True)
    target = torch.randint(0, num_classes, (BATCH,), generator=g)
    return features, target


@pytest.mark.parametrize("num_classes", [4, 1000])
def test_baseline_linear_cross_entropy(benchmark, num_classes):
    benchmark.group = f"C={num_classes}"
    linear = nn.Linear(DIM, num_classes)
    features, target = _inputs(num_classes)

    def step():
        nn.functional.cross_entropy(linear(features), target).backward()

    benchmark(step)


MARGIN = [n for n in list_losses() if get_loss_info(n).input == "features"]
CASES = [(n, "native" if n in MARGIN else "pytorch") for n in list_losses()] + [(n, "pytorch") for n in MARGIN]


@pytest.mark.parametrize("num_classes", [4, 1000])
@pytest.mark.parametrize("name,implementation", CASES)
def test_head_and_loss(benchmark, name, implementation, num_classes, monkeypatch):
    benchmark.group = f"C={num_classes}"
    if implementation == "pytorch":
        monkeypatch.setattr(LF, "_native", None)
    elif LF._native is None:
        pytest.fail("lossbank's C++ kernels are not built: pip install --no-build-isolation -e .")
    kwargs = {"class_counts": [10] * num_classes} if get_loss_info(name).needs_class_counts else {}
    head = MarginAwareHead(DIM, num_classes, name, **kwargs)
    features, target = _inputs(num_classes)
    teacher = torch.randn(BATCH, num_classes)

    def step():
        head(features, target, teacher_logits=teacher).loss.backward()

    benchmark(step)
