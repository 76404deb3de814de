"""MarginAwareHead: one classification layer that serves every registered loss."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_head_features
from ._precision import upcast
from .registry import create_loss

__all__ = ["MarginAwareHead", "HeadOutput"]


class HeadOutput(NamedTuple):
    logits: Tensor  # margin-free: argmax these to predict
    loss: Tensor | None  # None when no target was given


class MarginAwareHead(nn.Module):
    """The last layer of a classifier, shaped by the loss it trains with.

    It owns the class weight matrix W of shape (num_classes, in_features). For losses on
    logits (cross-entropy, hinge, L1/L2, cosine, distillation) it is an ordinary linear
    layer with bias; for margin losses (L-Softmax, AM-Softmax, ArcFace) it has no bias and
    hands the features and W to the loss, which puts the margin on the target class
    only. ``head(features)`` gives margin-free logits for prediction; with a target it also
    returns the training loss, so the training step is the same for every loss::

        head = MarginAwareHead(2048, num_classes=4, loss="am_softmax")   # on ResNet-50 features
        out = head(backbone(images), target)                             # teacher_logits=... for distillation
        out.loss.backward()
        predictions = head(backbone(images)).logits.argmax(1)

    ``loss`` is a registered name (with ``**loss_kwargs``) or a lossbank loss module.
    For the cosine loss with ``xent_weight > 0`` the head adds the paper's extra linear
    layer on the L2-normalised embedding for the cross-entropy term.

    >>> import torch
    >>> head = MarginAwareHead(16, 3, "arcface")
    >>> out = head(torch.randn(8, 16), torch.randint(0, 3, (8,)))
    >>> out.logits.shape, out.loss.shape
    (torch.Size([8, 3]), torch.Size([]))
    """

    def __init__(self, in_features: int, num_classes: int, loss: str | nn.Module = "cross_entropy", **loss_kwargs):
        super().__init__()
        for name, value, low in (("in_features", in_features, 1), ("num_classes", num_classes, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if isinstance(loss, str):
            loss = create_loss(loss, **loss_kwargs)
        elif loss_kwargs:
            raise ValueError(f"loss_kwargs {sorted(loss_kwargs)} are only accepted with a loss name, not a loss module")
        if not isinstance(loss, nn.Module) or getattr(loss, "input", None) not in ("logits", "features"):
            raise ValueError(f"loss must be a registered loss name or a lossbank loss module; got {loss!r}")
        tied = getattr(loss, "num_classes", None)
        if tied is not None and tied != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the loss {type(loss).__name__} is set up for {tied} classes "
                f"(its class weights or class_counts); make them agree"
            )
        self.in_features, self.num_classes = in_features, num_classes
        self.criterion = loss
        self.uses_margin = loss.input == "features"
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = None if self.uses_margin else nn.Parameter(torch.empty(num_classes))
        needs_xent_layer = getattr(loss, "xent_weight", 0.0) > 0
        self.xent = nn.Linear(num_classes, num_classes) if needs_xent_layer else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so a logits head starts exactly like a plain Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def logits(self, features: Tensor) -> Tensor:
        """Margin-free logits: what to argmax at test time."""
        check_head_features(features, self.in_features, self.weight, self.uses_margin)
        if self.uses_margin:
            return self.criterion.logits(features, self.weight)
        return F.linear(features, self.weight, self.bias)

    def forward(self, features: Tensor, target: Tensor | None = None, teacher_logits: Tensor | None = None) -> HeadOutput:
        if target is None:
            return HeadOutput(self.logits(features), None)
        check_head_features(features, self.in_features, self.weight, self.uses_margin)
        if self.uses_margin:
            logits, loss = self.criterion.logits_and_loss(features, self.weight, target)
            return HeadOutput(logits, loss)
        logits = F.linear(features, self.weight, self.bias)
        if self.criterion.needs_teacher:
            if teacher_logits is None:
                raise ValueError(
                    f"teacher_logits is required for the {self.criterion.registry_name} loss: pass the teacher's "
                    f"logits for the same batch, shape ({features.shape[0]}, {self.num_classes})"
                )
            return HeadOutput(logits, self.criterion(logits, target, teacher_logits))
        if self.xent is not None:
            # normalised in float32, then in the layer's own dtype (bf16 after head.to(torch.bfloat16))
            xent_logits = self.xent(F.normalize(upcast(logits), dim=1).to(self.xent.weight.dtype))
            return HeadOutput(logits, self.criterion(logits, target, xent_logits))
        return HeadOutput(logits, self.criterion(logits, target))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"
