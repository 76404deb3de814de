"""Input and parameter checks shared by :mod:`lossbank.functional`, the loss modules and the head.

Each check is written once here; each raises a ``ValueError`` that names the argument and
says what it should be. The modules check their parameters when built, the functions on
every call (they can be called on their own).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._precision import upcast

REDUCTIONS = ("mean", "sum", "none")
HINGE_VARIANTS = ("crammer_singer", "weston_watkins")


# ---------------------------------------------------------------- parameters
def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}")


def check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")


def check_hinge_variant(variant: str) -> None:
    if variant not in HINGE_VARIANTS:
        raise ValueError(f"variant must be one of {HINGE_VARIANTS}; got {variant!r}")


def check_label_smoothing(label_smoothing: float) -> None:
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")


def check_margin_int(margin) -> int:
    """L-Softmax's m: a whole number >= 1, returned as an int."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != int(margin) or margin < 1:
        raise ValueError(f"margin must be an integer >= 1 for L-Softmax (e.g. 1, 2, 3, 4); got {margin!r}")
    return int(margin)


def check_arcface_margin(margin) -> None:
    if not (isinstance(margin, (int, float)) and 0 <= margin < math.pi / 2):
        raise ValueError(f"margin must be in [0, π/2) radians for ArcFace; got {margin!r}")


def check_class_weight(weight: Tensor | None, num_classes: int | None = None, name: str = "weight") -> None:
    """Class weights: 1-D, finite, non-negative, and of length ``num_classes`` where that is known."""
    if weight is None:
        return
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.shape[0] != (num_classes or weight.shape[0]):
        shape = f"shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        length = "with one weight per class" if num_classes is None else f"of length num_classes={num_classes}"
        raise ValueError(f"{name} must be a 1-D tensor {length}; got {shape}")
    if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} must be finite and non-negative; got {weight.tolist()}")


def check_class_counts(counts: Tensor, class_counts) -> None:
    """``counts``: ``class_counts`` as a float64 tensor; one positive count per class."""
    if counts.dim() != 1 or counts.numel() < 1:
        raise ValueError(f"class_counts must be a 1-D sequence with one count per class; got {class_counts!r}")
    if bool((counts <= 0).any()):
        empty = [i for i, c in enumerate(counts.tolist()) if c <= 0]
        raise ValueError(
            f"class_counts must be positive for every class; classes {empty} have count <= 0 "
            f"(drop those classes or give them examples)"
        )


# ---------------------------------------------------------------- tensors
def check_matrix(x: Tensor, name: str, what: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape {what}; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")


def check_target(target: Tensor, batch: int, num_classes: int, name: str = "target") -> Tensor:
    """Class indices: integer dtype, shape (batch,), values in [0, num_classes); returned as long."""
    if not isinstance(target, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of class indices; got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer class indices (dtype torch.long), not {target.dtype}; "
            f"for one-hot or soft targets pass target.argmax(1)"
        )
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch; got shape {tuple(target.shape)}")
    if batch:
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} values must be in [0, {num_classes - 1}] for num_classes={num_classes}; got min {lo}, max {hi}"
            )
    return target.long()


def check_logits_target(logits: Tensor, target: Tensor, name: str = "logits") -> Tensor:
    check_matrix(logits, name, "(batch, num_classes)")
    return check_target(target, logits.shape[0], logits.shape[1])


def check_xent_logits(xent_logits: Tensor | None, logits: Tensor) -> None:
    """The cosine loss's cross-entropy term: the extra layer's (batch, num_classes) output."""
    if xent_logits is None:
        raise ValueError(
            "xent_logits is required when xent_weight > 0: the cross-entropy term of the cosine loss "
            "is computed on a separate linear layer over the normalised embedding (MarginAwareHead adds it)"
        )
    check_matrix(xent_logits, "xent_logits", f"({logits.shape[0]}, num_classes)")
    if xent_logits.shape[0] != logits.shape[0]:
        raise ValueError(f"xent_logits must have {logits.shape[0]} rows like logits; got {tuple(xent_logits.shape)}")


def check_teacher_logits(teacher_logits: Tensor, logits: Tensor) -> None:
    check_matrix(teacher_logits, "teacher_logits", f"{tuple(logits.shape)}")
    if teacher_logits.shape != logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(logits.shape)}; got {tuple(teacher_logits.shape)}"
        )


def check_features_weight(features: Tensor, weight: Tensor) -> None:
    """A margin loss's features (batch, D) and class weight matrix (num_classes, D), in one dtype."""
    check_matrix(features, "features", "(batch, feature_dim)")
    check_matrix(weight, "weight", "(num_classes, feature_dim)")
    dim = features.shape[1]
    if weight.shape[1] != dim:
        # A square (D, D) weight cannot be told from its transpose; any other (D, C) can.
        hint = (f"weight looks transposed: expected (num_classes, feature_dim) = (?, {dim}), got {tuple(weight.shape)}; "
                f"pass weight.t()" if weight.shape[0] == dim else f"weight must be (num_classes, {dim})")
        raise ValueError(f"features has feature_dim {dim} but weight has shape {tuple(weight.shape)}; {hint}")
    if features.dtype != weight.dtype:
        raise ValueError(
            f"features has dtype {features.dtype} but weight has dtype {weight.dtype}; pass both in one dtype, "
            f"e.g. features.to({weight.dtype}) (float16/bfloat16 mix with float32: they are upcast)"
        )


def check_features_weight_target(features: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    check_features_weight(features, weight)
    return check_target(target, features.shape[0], weight.shape[0])


def check_head_features(features: Tensor, in_features: int, weight: Tensor, uses_margin: bool) -> None:
    """What ``MarginAwareHead`` takes: (batch, in_features), floating point, in a dtype its layer can use."""
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != in_features:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(
            f"features must have shape (batch, {in_features}) for this head (in_features={in_features}); got {shape}"
        )
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor; got dtype {features.dtype}")
    own = weight.dtype
    if features.dtype == own:
        return
    # Margin losses compute in float32 at least, so float16/bfloat16 mix with float32 there; a
    # linear layer needs one dtype, or autocast, which casts float32 (never float64) down.
    autocast_fits = not uses_margin and torch.float64 not in (features.dtype, own)
    if uses_margin:
        fits = upcast(features).dtype == upcast(weight).dtype
    else:
        fits = autocast_fits and torch.is_autocast_enabled(features.device.type)
    if not fits:
        raise ValueError(
            f"features has dtype {features.dtype} but this head's parameters are {own}; cast the features "
            f"(features.to({own})) or the head (head.to({features.dtype}))"
            + (", or run it under torch.autocast" if autocast_fits else "")
        )
