"""One pure function per loss; the modules in :mod:`lossbank.losses` wrap these.

Losses on logits take ``(logits, target, ...)``; margin losses take
``(features, weight, target, ...)`` with ``weight`` of shape (num_classes, feature_dim).
Every function validates its input (``ValueError`` naming the argument), accepts
``reduction`` = 'mean' | 'sum' | 'none' as torch.nn does, and computes in at least
float32: under bf16/fp16 autocast the inputs are upcast and autocast is switched off
inside, because margins such as cos(mθ) or cos θ − 0.35 lose their meaning at 8 bits
of mantissa.

>>> import torch
>>> from lossbank import functional as LF
>>> logits, target = torch.randn(8, 4), torch.randint(0, 4, (8,))
>>> LF.cross_entropy_loss(logits, target).shape
torch.Size([])
>>> features, weight = torch.randn(8, 16), torch.randn(4, 16)
>>> LF.am_softmax_loss(features, weight, target, reduction="none").shape
torch.Size([8])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as checks
from ._kernels import EPS, cosine_margin_ce, l_softmax_ce, product_and_norms, psi_and_slope
from ._precision import full_precision

__all__ = [
    "l1_probability_loss",
    "l2_probability_loss",
    "multiclass_hinge_loss",
    "cross_entropy_loss",
    "class_balanced_weights",
    "weighted_cross_entropy_loss",
    "l_softmax_psi",
    "l_softmax_lambda",
    "l_softmax_logits",
    "l_softmax_loss",
    "cosine_logits",
    "am_softmax_loss",
    "arcface_loss",
    "cosine_loss",
    "distillation_loss",
]


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


# ---------------------------------------------------------------- losses on probabilities
@full_precision
def l1_probability_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Σ_j |y_j − p_j| with p = softmax(logits) and y the one-hot target."""
    checks.check_reduction(reduction)
    target = checks.check_logits_target(logits, target)
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    per_sample = (onehot - logits.softmax(dim=1)).abs().sum(dim=1)
    return _reduce(per_sample, reduction)


@full_precision
def l2_probability_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Σ_j (y_j − p_j)², the Brier score of p = softmax(logits)."""
    checks.check_reduction(reduction)
    target = checks.check_logits_target(logits, target)
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    per_sample = (onehot - logits.softmax(dim=1)).pow(2).sum(dim=1)
    return _reduce(per_sample, reduction)


# ---------------------------------------------------------------- hinge
@full_precision
def multiclass_hinge_loss(
    logits: Tensor,
    target: Tensor,
    margin: float = 1.0,
    variant: str = "crammer_singer",
    reduction: str = "mean",
) -> Tensor:
    """Multi-class hinge loss.

    ``crammer_singer``: max(0, margin − z_y + max_{j≠y} z_j).
    ``weston_watkins``: Σ_{j≠y} max(0, margin − z_y + z_j) / C, which is what
    ``torch.nn.MultiMarginLoss`` computes.
    """
    checks.check_reduction(reduction)
    checks.check_positive(margin, "margin", allow_zero=True)
    checks.check_hinge_variant(variant)
    target = checks.check_logits_target(logits, target)
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes for a hinge loss; got shape {tuple(logits.shape)}")
    is_target = F.one_hot(target, logits.shape[1]).bool()
    target_logit = logits.gather(1, target[:, None])
    if variant == "crammer_singer":
        runner_up = logits.masked_fill(is_target, float("-inf")).amax(dim=1, keepdim=True)
        per_sample = (margin - target_logit + runner_up).clamp_min(0).squeeze(1)
    else:
        violations = (margin - target_logit + logits).clamp_min(0).masked_fill(is_target, 0)
        per_sample = violations.sum(dim=1) / logits.shape[1]
    return _reduce(per_sample, reduction)


# ---------------------------------------------------------------- cross-entropy
@full_precision
def cross_entropy_loss(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Softmax cross-entropy, as ``torch.nn.functional.cross_entropy``.

    With class weights, 'mean' divides by the summed weight of the targets (torch's convention).
    """
    checks.check_reduction(reduction)
    target = checks.check_logits_target(logits, target)
    checks.check_class_weight(weight, logits.shape[1])
    checks.check_label_smoothing(label_smoothing)
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction=reduction)


def class_balanced_weights(class_counts) -> Tensor:
    """w_j = N / (K · N_j): each class contributes equally to the loss, and w = 1 when balanced."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    checks.check_class_counts(counts, class_counts)
    return (counts.sum() / (counts.numel() * counts)).float()


@full_precision
def weighted_cross_entropy_loss(
    logits: Tensor,
    target: Tensor,
    class_counts,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy with class-balanced weights computed from ``class_counts``."""
    weight = class_balanced_weights(class_counts)
    if logits.dim() == 2 and weight.shape[0] != logits.shape[1]:
        raise ValueError(
            f"class_counts has {weight.shape[0]} entries but logits has {logits.shape[1]} classes; "
            f"give one count per class"
        )
    return cross_entropy_loss(logits, target, weight=weight, label_smoothing=label_smoothing, reduction=reduction)


# ---------------------------------------------------------------- L-Softmax
def l_softmax_psi(cos_theta: Tensor, margin: int) -> Tensor:
    """ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m], given cos θ: the ψ training computes.

    cos(mθ) is the Chebyshev polynomial T_m(cos θ), so neither θ = acos(·) nor its
    infinite slope at cos θ = ±1 enters the gradient; k is piecewise constant.

    >>> l_softmax_psi(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), 2)
    tensor([ 1., -1., -3.], dtype=torch.float64)
    """
    return psi_and_slope(cos_theta.clamp(-1.0, 1.0), checks.check_margin_int(margin))[0]


def l_softmax_lambda(step, base: float = 1000.0, gamma: float = 0.1, power: float = 2.0, lambda_min: float = 0.0):
    """The authors' annealing: λ = max(λ_min, base · (1 + γ · step)^(−power)).

    An int ``step`` gives a float; a tensor (``LSoftmax.step`` under torch.compile) a 0-d
    float64 tensor, so that λ is computed in the graph.

    >>> round(l_softmax_lambda(300), 3), l_softmax_lambda(torch.tensor(300)).dtype
    (1.041, torch.float64)
    """
    value = base * (1.0 + gamma * (step.double() if isinstance(step, Tensor) else step)) ** (-power)
    return value.clamp_min(lambda_min) if isinstance(value, Tensor) else max(lambda_min, value)


@full_precision
def l_softmax_logits(features: Tensor, weight: Tensor) -> Tensor:
    """Margin-free logits W x (no bias): what L-Softmax predicts with; ``weight`` is (num_classes, feature_dim)."""
    checks.check_features_weight(features, weight)
    return features @ weight.t()


@full_precision
def l_softmax_loss(
    features: Tensor,
    weight: Tensor,
    target: Tensor,
    margin: int = 4,
    lambda_: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """L-Softmax (Liu et al. 2016) with the authors' λ blend of the target logit.

    target logit = (λ · W_y·x + ‖W_y‖‖x‖ψ(θ_y)) / (1 + λ); other logits W_j·x. ``weight``
    is (num_classes, feature_dim), the layout of ``nn.Linear.weight``.
    """
    checks.check_reduction(reduction)
    checks.check_margin_int(margin)
    checks.check_positive(lambda_, "lambda_", allow_zero=True)
    target = checks.check_features_weight_target(features, weight, target)
    return l_softmax_ce(features, weight, target, margin, lambda_, reduction)[0]


# ---------------------------------------------------------------- normalised margin losses
@full_precision
def cosine_logits(features: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    """s · cos θ_j between each feature and each class weight (num_classes, feature_dim): margin-free
    logits of AM-Softmax / ArcFace."""
    checks.check_features_weight(features, weight)
    # Dividing the (batch, C) product by the norms costs far less, forward and backward,
    # than normalising the (batch, D) features and the (C, D) weights first.
    product, x_norm, w_norm = product_and_norms(features, weight)
    cos = product / x_norm.clamp_min(EPS)[:, None] / w_norm.clamp_min(EPS)
    return cos * scale if scale != 1.0 else cos


@full_precision
def am_softmax_loss(
    features: Tensor,
    weight: Tensor,
    target: Tensor,
    scale: float = 30.0,
    margin: float = 0.35,
    reduction: str = "mean",
) -> Tensor:
    """AM-Softmax (Wang et al. 2018): cross-entropy over s·(cos θ_y − m) and s·cos θ_j."""
    checks.check_reduction(reduction)
    checks.check_positive(scale, "scale")
    checks.check_positive(margin, "margin", allow_zero=True)
    target = checks.check_features_weight_target(features, weight, target)
    return cosine_margin_ce(features, weight, target, scale, margin, False, reduction)[0]


@full_precision
def arcface_loss(
    features: Tensor,
    weight: Tensor,
    target: Tensor,
    scale: float = 30.0,
    margin: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """ArcFace (Deng et al. 2019): cross-entropy over s·cos(θ_y + m) and s·cos θ_j.

    Where θ_y + m would pass π, cos(θ + m) stops decreasing; there the usual fallback
    cos θ_y − m·sin m (a CosFace-style margin) keeps the target logit monotonic in θ.
    """
    checks.check_reduction(reduction)
    checks.check_positive(scale, "scale")
    checks.check_arcface_margin(margin)
    target = checks.check_features_weight_target(features, weight, target)
    return cosine_margin_ce(features, weight, target, scale, margin, True, reduction)[0]


# ---------------------------------------------------------------- cosine loss
@full_precision
def cosine_loss(
    logits: Tensor,
    target: Tensor,
    xent_weight: float = 0.0,
    xent_logits: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cosine loss (Barz & Denzler 2020): 1 − cos(f(x), one-hot(y)).

    With ``xent_weight`` λ > 0 the paper adds λ · cross-entropy computed by a separate
    linear layer on the L2-normalised embedding; pass that layer's output as ``xent_logits``.
    """
    checks.check_reduction(reduction)
    checks.check_positive(xent_weight, "xent_weight", allow_zero=True)
    target = checks.check_logits_target(logits, target)
    per_sample = 1.0 - F.normalize(logits, dim=1, eps=EPS).gather(1, target[:, None]).squeeze(1)
    if xent_weight > 0:
        checks.check_xent_logits(xent_logits, logits)
        per_sample = per_sample + xent_weight * F.cross_entropy(xent_logits, target, reduction="none")
    return _reduce(per_sample, reduction)


# ---------------------------------------------------------------- distillation
@full_precision
def distillation_loss(
    logits: Tensor,
    target: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    alpha: float = 0.3,
    reduction: str = "mean",
) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015).

    α · CE(z_s, y) + (1 − α) · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)). The teacher
    is a fixed target: no gradient flows into ``teacher_logits``.
    """
    checks.check_reduction(reduction)
    checks.check_positive(temperature, "temperature")
    checks.check_alpha(alpha)
    target = checks.check_logits_target(logits, target)
    checks.check_teacher_logits(teacher_logits, logits)
    teacher_log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    student_log_p = F.log_softmax(logits / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="none", log_target=True).sum(dim=1)
    ce = F.cross_entropy(logits, target, reduction="none")
    per_sample = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return _reduce(per_sample, reduction)
