"""lossbank: classification losses for small-data image classifiers, as PyTorch modules.

>>> import torch
>>> from lossbank import AMSoftmax, MarginAwareHead, create_loss, list_losses
>>> head = MarginAwareHead(in_features=512, num_classes=4, loss="am_softmax")
>>> out = head(torch.randn(8, 512), torch.randint(0, 4, (8,)))
>>> out.loss.backward()
"""
from . import functional
from ._kernels import has_native_kernels
from .head import HeadOutput, MarginAwareHead
from .losses import (
    AMSoftmax,
    ArcFace,
    CosineLoss,
    CrossEntropy,
    DistillationLoss,
    L1Probability,
    L2Probability,
    LSoftmax,
    MulticlassHinge,
    WeightedCrossEntropy,
)
from .registry import LossInfo, create_loss, get_loss_info, list_losses, register_loss

__version__ = "0.1.0"

__all__ = [
    "functional",
    "has_native_kernels",
    "HeadOutput",
    "MarginAwareHead",
    "AMSoftmax",
    "ArcFace",
    "CosineLoss",
    "CrossEntropy",
    "DistillationLoss",
    "L1Probability",
    "L2Probability",
    "LSoftmax",
    "MulticlassHinge",
    "WeightedCrossEntropy",
    "LossInfo",
    "create_loss",
    "get_loss_info",
    "list_losses",
    "register_loss",
]
