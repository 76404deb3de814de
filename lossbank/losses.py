"""The losses as ``nn.Module``s: thin, registered wrappers over :mod:`lossbank.functional`.

Three calling conventions, told apart by the class attribute ``input``:

- ``input == "logits"``: ``loss(logits, target)``; ``DistillationLoss`` also takes
  ``teacher_logits`` and ``CosineLoss`` optionally ``xent_logits``.
- ``input == "features"`` (margin losses): ``loss(features, weight, target)``, and
  ``loss.logits(features, weight)`` gives the margin-free logits to predict with.

:class:`lossbank.MarginAwareHead` hides the difference: ``head(features, target).loss``.
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from . import _checks as checks
from . import functional as LF
from ._kernels import cosine_margin_ce, l_softmax_ce
from ._precision import full_precision
from .registry import register_loss

__all__ = [
    "L1Probability",
    "L2Probability",
    "MulticlassHinge",
    "CrossEntropy",
    "WeightedCrossEntropy",
    "LSoftmax",
    "AMSoftmax",
    "ArcFace",
    "CosineLoss",
    "DistillationLoss",
]


class _Loss(nn.Module):
    # Set by register_loss.
    registry_name: str
    input: str
    needs_teacher: bool

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        checks.check_reduction(reduction)
        self.reduction = reduction

    @property
    def num_classes(self) -> int | None:
        """The number of classes this loss is tied to (by class weights or counts), else None."""
        return None


@register_loss(
    "l1",
    paper="Janocha & Czarnecki, 'On Loss Functions for Deep Neural Networks in Classification', 2017",
    input="logits",
    defaults_source="no parameters",
)
class L1Probability(_Loss):
    """L1 distance between the one-hot target and softmax probabilities: Σ_j |y_j − p_j|.

    Paper: K. Janocha and W. M. Czarnecki, "On Loss Functions for Deep Neural Networks in
    Classification", 2017 (they call it the L1 loss on probabilities). No parameters.

    >>> import torch
    >>> L1Probability()(torch.tensor([[10.0, -10.0]]), torch.tensor([0])).item() < 1e-6
    True
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return LF.l1_probability_loss(logits, target, reduction=self.reduction)


@register_loss(
    "l2",
    paper="Brier, 'Verification of forecasts expressed in terms of probability', 1950; "
    "Janocha & Czarnecki, 'On Loss Functions for Deep Neural Networks in Classification', 2017",
    input="logits",
    defaults_source="no parameters",
)
class L2Probability(_Loss):
    """Squared distance between one-hot target and softmax probabilities (the Brier score).

    Papers: G. W. Brier, "Verification of forecasts expressed in terms of probability", 1950;
    K. Janocha and W. M. Czarnecki, "On Loss Functions for Deep Neural Networks in
    Classification", 2017. No parameters.

    >>> import torch
    >>> round(L2Probability()(torch.zeros(1, 4), torch.tensor([2])).item(), 4)  # (3/4)² + 3·(1/4)²
    0.75
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return LF.l2_probability_loss(logits, target, reduction=self.reduction)


@register_loss(
    "hinge",
    paper="Crammer & Singer, 'On the Algorithmic Implementation of Multiclass Kernel-based Vector Machines', 2001",
    input="logits",
    defaults_source="margin 1 as in Crammer & Singer 2001; variant 'weston_watkins' follows "
    "Weston & Watkins, 'Support Vector Machines for Multi-Class Pattern Recognition', 1999",
)
class MulticlassHinge(_Loss):
    """Multi-class hinge loss.

    Default (Crammer & Singer, "On the Algorithmic Implementation of Multiclass
    Kernel-based Vector Machines", JMLR 2001): max(0, margin − z_y + max_{j≠y} z_j).
    ``variant="weston_watkins"`` (Weston & Watkins, "Support Vector Machines for
    Multi-Class Pattern Recognition", 1999) sums the violations over j ≠ y and divides
    by C, which equals ``torch.nn.MultiMarginLoss``. Default margin 1 (both papers).

    >>> import torch
    >>> MulticlassHinge()(torch.tensor([[3.0, 1.0, 2.5]]), torch.tensor([0])).item()
    0.5
    """

    def __init__(self, margin: float = 1.0, variant: str = "crammer_singer", reduction: str = "mean"):
        super().__init__(reduction)
        checks.check_positive(margin, "margin", allow_zero=True)
        checks.check_hinge_variant(variant)
        self.margin, self.variant = float(margin), variant

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return LF.multiclass_hinge_loss(logits, target, self.margin, self.variant, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, variant={self.variant!r}"


@register_loss(
    "cross_entropy",
    paper="Bridle, 'Probabilistic Interpretation of Feedforward Classification Network Outputs, with "
    "Relationships to Statistical Pattern Recognition', 1990; label smoothing: Szegedy et al., 'Rethinking the Inception Architecture', 2016",
    input="logits",
    defaults_source="no class weights, no label smoothing (plain softmax cross-entropy)",
)
class CrossEntropy(_Loss):
    """Softmax cross-entropy with optional class weights and label smoothing.

    Papers: J. S. Bridle, "Probabilistic Interpretation of Feedforward Classification
    Network Outputs...", 1990; label smoothing from C. Szegedy et al., "Rethinking the
    Inception Architecture for Computer Vision", 2016. Defaults: ``weight=None``,
    ``label_smoothing=0`` — the plain loss. Same semantics as ``torch.nn.CrossEntropyLoss``.

    >>> import torch
    >>> round(CrossEntropy()(torch.zeros(2, 4), torch.tensor([0, 3])).item(), 4)  # log 4
    1.3863
    """

    def __init__(self, weight: Tensor | None = None, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__(reduction)
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            checks.check_class_weight(weight)
        checks.check_label_smoothing(label_smoothing)
        self.register_buffer("weight", weight)
        self.label_smoothing = float(label_smoothing)

    @property
    def num_classes(self) -> int | None:
        return None if self.weight is None else int(self.weight.shape[0])

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return LF.cross_entropy_loss(logits, target, self.weight, self.label_smoothing, reduction=self.reduction)


@register_loss(
    "weighted_cross_entropy",
    paper="King & Zeng, 'Logistic Regression in Rare Events Data', 2001 (inverse-frequency class weights)",
    input="logits",
    defaults_source="w_j = N / (K · N_j), the 'balanced' weights of King & Zeng 2001 (scikit-learn's class_weight='balanced')",
    needs_class_counts=True,
)
class WeightedCrossEntropy(_Loss):
    """Cross-entropy with class-balanced weights w_j = N / (K · N_j) from the class counts.

    Paper: G. King and L. Zeng, "Logistic Regression in Rare Events Data", Political
    Analysis 2001 — the inverse-frequency weighting that scikit-learn calls 'balanced'.
    ``class_counts`` (required) are the training-set counts per class; ``label_smoothing``
    defaults to 0.

    >>> import torch
    >>> [round(w, 4) for w in WeightedCrossEntropy(class_counts=[30, 10]).weight.tolist()]
    [0.6667, 2.0]
    """

    def __init__(self, class_counts=None, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__(reduction)
        if class_counts is None:
            raise ValueError(
                "class_counts is required for weighted_cross_entropy: pass the number of training "
                "examples per class, e.g. class_counts=[75, 73, 20, 72]"
            )
        self.register_buffer("weight", LF.class_balanced_weights(class_counts))
        checks.check_label_smoothing(label_smoothing)
        self.label_smoothing = float(label_smoothing)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return LF.cross_entropy_loss(logits, target, self.weight, self.label_smoothing, reduction=self.reduction)


class _MarginLoss(_Loss):
    """Margin losses take the class weight matrix with the features: ``loss(features, weight, target)``."""

    def forward(self, features: Tensor, weight: Tensor, target: Tensor | None = None) -> Tensor:
        if target is None:
            raise ValueError(
                f"{type(self).__name__} got two arguments, but margin losses take (features, weight, target): the "
                f"features, the class weight matrix of shape (num_classes, feature_dim) and the class indices. "
                f"MarginAwareHead(in_features, num_classes, {self.registry_name!r}) holds the weight for you."
            )
        return self.logits_and_loss(features, weight, target)[1]


@register_loss(
    "l_softmax",
    paper="Liu, Wen, Yu & Yang, 'Large-Margin Softmax Loss for Convolutional Neural Networks', ICML 2016",
    input="features",
    defaults_source="m = 4 and base = 1000 as in the paper's experiments and the authors' Caffe layer; "
    "gamma = 0.1, power = 2, lambda_min = 0 are lossbank's, chosen so λ falls below 1 after about 300 "
    "steps (a short small-data run; the authors' schedules span tens of thousands of iterations)",
)
class LSoftmax(_MarginLoss):
    """L-Softmax loss with the authors' λ annealing.

    Paper: W. Liu, Y. Wen, Z. Yu and M. Yang, "Large-Margin Softmax Loss for Convolutional
    Neural Networks", ICML 2016. The target logit is ‖W_y‖‖x‖ψ(θ_y) with
    ψ(θ) = (−1)^k cos(mθ) − 2k on [kπ/m, (k+1)π/m], blended as the authors' code does:
    (λ · W_y·x + ‖W_y‖‖x‖ψ(θ_y)) / (1 + λ), where λ = max(λ_min, base·(1 + γ·step)^(−power))
    decays with each training step, from plain softmax towards the full margin.

    Defaults: ``margin=4`` and ``base=1000`` (paper, authors' Caffe layer); ``gamma=0.1``,
    ``power=2``, ``lambda_min=0`` (lossbank's, for short small-data runs: λ ≈ 1 after
    300 steps). The step count advances on every forward in training mode and is saved in
    the state dict; read λ from ``current_lambda``.

    Call as ``loss(features, weight, target)``, ``weight`` of shape (num_classes, feature_dim)
    like ``nn.Linear.weight``; ``MarginAwareHead`` holds it for you.

    >>> import torch
    >>> loss = LSoftmax(margin=2)
    >>> features, weight = torch.randn(8, 16), torch.randn(3, 16)
    >>> value = loss(features, weight, torch.randint(0, 3, (8,)))
    >>> loss.step.item(), round(loss.current_lambda, 1)
    (1, 826.4)
    """

    def __init__(
        self,
        margin: int = 4,
        base: float = 1000.0,
        gamma: float = 0.1,
        power: float = 2.0,
        lambda_min: float = 0.0,
        reduction: str = "mean",
    ):
        super().__init__(reduction)
        self.margin = checks.check_margin_int(margin)
        for name, value in (("base", base), ("gamma", gamma), ("power", power), ("lambda_min", lambda_min)):
            checks.check_positive(value, name, allow_zero=True)
        self.base, self.gamma, self.power, self.lambda_min = float(base), float(gamma), float(power), float(lambda_min)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def current_lambda(self) -> float:
        return LF.l_softmax_lambda(int(self.step), self.base, self.gamma, self.power, self.lambda_min)

    def _lambda(self):
        if torch.compiler.is_compiling():
            # λ changes every step: as a Python float it would be a guard, and every step would recompile.
            return LF.l_softmax_lambda(self.step, self.base, self.gamma, self.power, self.lambda_min)
        return self.current_lambda

    def logits(self, features: Tensor, weight: Tensor) -> Tensor:
        return LF.l_softmax_logits(features, weight)

    @full_precision
    def logits_and_loss(self, features: Tensor, weight: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(margin-free logits W x, loss) from one matrix product; advances λ's step when training."""
        target = checks.check_features_weight_target(features, weight, target)
        value, logits = l_softmax_ce(features, weight, target, self.margin, self._lambda(), self.reduction)
        if self.training:
            self.step += 1
        return logits, value

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, base={self.base}, gamma={self.gamma}, power={self.power}, "
            f"lambda_min={self.lambda_min}, step={int(self.step)}"
        )


class _NormalisedMargin(_MarginLoss):
    angular = False  # the margin's kind: on cos θ_y (AM-Softmax) or on the angle θ_y (ArcFace)

    def __init__(self, scale: float, margin: float, reduction: str):
        super().__init__(reduction)
        checks.check_positive(scale, "scale")
        checks.check_positive(margin, "margin", allow_zero=True)
        self.scale, self.margin = float(scale), float(margin)

    def logits(self, features: Tensor, weight: Tensor) -> Tensor:
        return LF.cosine_logits(features, weight, self.scale)

    @full_precision
    def logits_and_loss(self, features: Tensor, weight: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(margin-free logits s·cos θ, loss) from one matrix product."""
        target = checks.check_features_weight_target(features, weight, target)
        value, logits = cosine_margin_ce(features, weight, target, self.scale, self.margin, self.angular, self.reduction)
        return logits, value

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


@register_loss(
    "am_softmax",
    paper="Wang, Cheng, Liu & Liu, 'Additive Margin Softmax for Face Verification', IEEE SPL 2018",
    input="features",
    defaults_source="s = 30, m = 0.35: the paper's recommended setting",
)
class AMSoftmax(_NormalisedMargin):
    """AM-Softmax: cross-entropy over s·(cos θ_y − m) on L2-normalised features and weights.

    Paper: F. Wang, J. Cheng, W. Liu and H. Liu, "Additive Margin Softmax for Face
    Verification", IEEE Signal Processing Letters 2018. Defaults ``scale=30``,
    ``margin=0.35`` (the paper's). ``margin=0`` is cross-entropy on s·cos θ. Call as
    ``loss(features, weight, target)``, ``weight`` of shape (num_classes, feature_dim).

    >>> import torch
    >>> loss = AMSoftmax()
    >>> features, weight = torch.randn(8, 16), torch.randn(3, 16)
    >>> loss(features, weight, torch.randint(0, 3, (8,))).shape
    torch.Size([])
    """

    def __init__(self, scale: float = 30.0, margin: float = 0.35, reduction: str = "mean"):
        super().__init__(scale, margin, reduction)


@register_loss(
    "arcface",
    paper="Deng, Guo, Xue & Zafeiriou, 'ArcFace: Additive Angular Margin Loss for Deep Face Recognition', CVPR 2019",
    input="features",
    defaults_source="m = 0.5 (the paper's); s = 30 (the paper uses 64 for face sets of ~10^5 identities; "
    "30 matches AM-Softmax here and suits few classes)",
)
class ArcFace(_NormalisedMargin):
    """ArcFace: cross-entropy over s·cos(θ_y + m) on L2-normalised features and weights.

    Paper: J. Deng, J. Guo, N. Xue and S. Zafeiriou, "ArcFace: Additive Angular Margin Loss
    for Deep Face Recognition", CVPR 2019. Defaults ``margin=0.5`` (paper) and
    ``scale=30`` (the paper's 64 is tuned for 10^5 classes). Where θ_y + m > π the target
    uses cos θ_y − m·sin m instead, the fallback of the authors' code. Call as
    ``loss(features, weight, target)``, ``weight`` of shape (num_classes, feature_dim).

    >>> import torch
    >>> loss = ArcFace()
    >>> features, weight = torch.randn(8, 16), torch.randn(3, 16)
    >>> loss(features, weight, torch.randint(0, 3, (8,))).shape
    torch.Size([])
    """

    angular = True

    def __init__(self, scale: float = 30.0, margin: float = 0.5, reduction: str = "mean"):
        super().__init__(scale, margin, reduction)
        checks.check_arcface_margin(margin)


@register_loss(
    "cosine",
    paper="Barz & Denzler, 'Deep Learning on Small Datasets without Pre-Training using Cosine Loss', WACV 2020",
    input="logits",
    defaults_source="xent_weight = 0 (the plain cosine loss); the paper's combined loss uses 0.1",
)
class CosineLoss(_Loss):
    """Cosine loss: 1 − cos(f(x), one-hot(y)), optionally plus λ · cross-entropy.

    Paper: B. Barz and J. Denzler, "Deep Learning on Small Datasets without Pre-Training
    using Cosine Loss", WACV 2020. Default ``xent_weight=0`` (plain cosine loss); the
    paper's combined variant uses λ = 0.1, with the cross-entropy computed by an extra
    linear layer on the L2-normalised embedding (``MarginAwareHead`` creates it).

    >>> import torch
    >>> CosineLoss()(torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([1])).item()
    0.0
    """

    def __init__(self, xent_weight: float = 0.0, reduction: str = "mean"):
        super().__init__(reduction)
        checks.check_positive(xent_weight, "xent_weight", allow_zero=True)
        self.xent_weight = float(xent_weight)

    def forward(self, logits: Tensor, target: Tensor, xent_logits: Tensor | None = None) -> Tensor:
        return LF.cosine_loss(logits, target, self.xent_weight, xent_logits, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"xent_weight={self.xent_weight}"


@register_loss(
    "distillation",
    paper="Hinton, Vinyals & Dean, 'Distilling the Knowledge in a Neural Network', 2015",
    input="logits",
    defaults_source="T = 2 and α = 0.3 (weight of the hard-label term): values in the range the paper "
    "recommends (T from 1 to 20, a smaller weight on the hard targets)",
    needs_teacher=True,
)
class DistillationLoss(_Loss):
    """Knowledge distillation: α·CE(z_s, y) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)).

    Paper: G. Hinton, O. Vinyals and J. Dean, "Distilling the Knowledge in a Neural
    Network", 2015. Defaults ``temperature=2``, ``alpha=0.3``; the T² factor keeps the soft
    term's gradients on the scale of the hard term's, as the paper prescribes.

    >>> import torch
    >>> z = torch.randn(4, 3)
    >>> loss = DistillationLoss(alpha=0.0)
    >>> loss(z, torch.tensor([0, 1, 2, 0]), teacher_logits=z).abs().item() < 1e-6
    True
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 0.3, reduction: str = "mean"):
        super().__init__(reduction)
        checks.check_positive(temperature, "temperature")
        checks.check_alpha(alpha)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, logits: Tensor, target: Tensor, teacher_logits: Tensor) -> Tensor:
        return LF.distillation_loss(logits, target, teacher_logits, self.temperature, self.alpha, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"

