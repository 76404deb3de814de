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

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

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

REDUCTIONS = ("mean", "sum", "none")
# Floor for norms: keeps cos θ finite (0) and its gradient finite for zero-norm features.
_EPS = 1e-12


# ---------------------------------------------------------------- validation helpers
def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_matrix(x: Tensor, name: str, what: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape {what}; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")


def check_target(target: Tensor, batch: int, num_classes: int, name: str = "target") -> Tensor:
    """Class indices: integer dtype, shape (batch,), values in [0, num_classes)."""
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


def _check_logits_target(logits: Tensor, target: Tensor, name: str = "logits") -> Tensor:
    _check_matrix(logits, name, "(batch, num_classes)")
    return check_target(target, logits.shape[0], logits.shape[1])


def _check_features_weight(features: Tensor, weight: Tensor) -> None:
    _check_matrix(features, "features", "(batch, feature_dim)")
    _check_matrix(weight, "weight", "(num_classes, feature_dim)")
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


def _check_features_weight_target(features: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    _check_features_weight(features, weight)
    return check_target(target, features.shape[0], weight.shape[0])


def _check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _HALF else x


_HALF = (torch.float16, torch.bfloat16)


def _any_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def full_precision(fn):
    """Run ``fn`` with autocast off and every half-precision tensor argument upcast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Fast path (the usual float32 call, no autocast): entering autocast contexts costs
        # more than a small loss itself.
        if not _any_autocast() and not any(isinstance(a, Tensor) and a.dtype in _HALF for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        args = [_upcast(a) if isinstance(a, Tensor) else a for a in args]
        kwargs = {k: _upcast(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        device_types = {a.device.type for a in args if isinstance(a, Tensor)} or {"cpu"}
        with _autocast_off(device_types):
            return fn(*args, **kwargs)

    return wrapper


class _autocast_off:
    def __init__(self, device_types):
        self._contexts = [torch.autocast(device_type=d, enabled=False) for d in sorted(device_types)]

    def __enter__(self):
        for c in self._contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._contexts):
            c.__exit__(*exc)


# ---------------------------------------------------------------- shared by the margin losses
try:  # the optional C++ kernels (lossbank/csrc/native.cpp), built by `pip install --no-build-isolation`
    from . import _native
    _native_missing = None
except ImportError as error:
    _native = None
    _native_missing = str(error)


def has_native_kernels() -> bool:
    """Whether the margin losses' C++ kernels (CPU, float32/float64) were built and load.

    Without them L-Softmax, AM-Softmax and ArcFace give the same results from their
    PyTorch code, slower at few classes. ``pip install .`` builds none (torch is not
    importable in pip's isolated build); ``pip install --no-build-isolation .`` with a
    C++ compiler does.

    >>> import lossbank
    >>> isinstance(lossbank.has_native_kernels(), bool)
    True
    """
    return _native is not None


def _warn_native_missing() -> None:
    global _native_missing
    warnings.warn(
        "lossbank's C++ kernels of the margin losses were not built or do not load "
        f"({_native_missing}); L-Softmax, AM-Softmax and ArcFace run their PyTorch code: same results, "
        "slower at few classes. Reinstall with `pip install --no-build-isolation -e .` (needs a C++ compiler and "
        "torch installed first); lossbank.has_native_kernels() tells whether they are in use."
    )
    _native_missing = None  # once per process


def _use_native(features: Tensor, weight: Tensor) -> bool:
    """The C++ kernels cover float32/float64 CPU tensors; everything else takes the PyTorch path."""
    applies = (features.device.type == "cpu" and weight.device.type == "cpu"
               and features.dtype in (torch.float32, torch.float64) and weight.dtype == features.dtype)
    if _native is None:
        if applies and _native_missing is not None:
            _warn_native_missing()
        return False
    return applies


class _ProductAndNorms(torch.autograd.Function):
    """(x Wᵀ, ‖x‖ per row, ‖W‖ per row) with one fused backward.

    Autograd through ``Tensor.norm`` walks the (batch, D) features several times; here each
    input gets one extra scaled add on top of the matrix products a linear layer needs anyway,
    which keeps the margin losses close to the cost of a plain linear layer + cross-entropy.
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor):
        x_norm, w_norm = features.norm(dim=1), weight.norm(dim=1)
        ctx.save_for_backward(features, weight, x_norm, w_norm)
        return features @ weight.t(), x_norm, w_norm

    @staticmethod
    def backward(ctx, grad_product, grad_x_norm, grad_w_norm):
        features, weight, x_norm, w_norm = ctx.saved_tensors
        grad_features = grad_weight = None
        # d‖v‖/dv = v / ‖v‖; a zero row has no direction, and its gradient through the norm is 0.
        if ctx.needs_input_grad[0]:
            grad_features = (grad_product @ weight).addcmul_(features, (grad_x_norm / x_norm.clamp_min(_EPS))[:, None])
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_product.t() @ features).addcmul_(weight, (grad_w_norm / w_norm.clamp_min(_EPS))[:, None])
        return grad_features, grad_weight


def product_and_norms(features: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x Wᵀ (batch, C), ‖x‖ (batch,) and ‖W_j‖ (C,), differentiable in both inputs."""
    return _ProductAndNorms.apply(features, weight)


def _clamp_cos(c: Tensor) -> Tensor:
    """cos θ clamped to [−1, 1], where rounding can push it out for parallel vectors.

    Under autograd (a create_graph backward running the forward again) the gradient passes
    the clamp unchanged, as in the written-out backwards: a clamp's zero gradient would drop
    the margin's slope exactly where a feature and its class weight are parallel.
    """
    if c.requires_grad:
        return c + (c.clamp(-1.0, 1.0) - c).detach()
    return c.clamp_(-1.0, 1.0)


def _gradients_with_graph(loss_of, features: Tensor, weight: Tensor, grad_loss: Tensor, needs_input_grad):
    """d loss / d (features, weight) for a backward with create_graph=True, by autograd through ``loss_of``.

    The written-out backwards compute from values saved by the forward, so what they return
    cannot be differentiated again (a gradient penalty, a meta-gradient). Here autograd
    records the forward anew from the inputs and differentiates it, keeping the graph. Only
    a create_graph backward comes here; an ordinary one keeps the fused step.
    """
    wanted = [t for t, needed in zip((features, weight), needs_input_grad) if needed]
    with torch.enable_grad():
        loss = loss_of(features, weight)
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True, materialize_grads=True))
    return tuple(next(grads) if needed else None for needed in needs_input_grad[:2])


# ---------------------------------------------------------------- losses on probabilities
@full_precision
def l1_probability_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Σ_j |y_j − p_j| with p = softmax(logits) and y the one-hot target."""
    check_reduction(reduction)
    target = _check_logits_target(logits, target)
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    per_sample = (onehot - logits.softmax(dim=1)).abs().sum(dim=1)
    return _reduce(per_sample, reduction)


@full_precision
def l2_probability_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Σ_j (y_j − p_j)², the Brier score of p = softmax(logits)."""
    check_reduction(reduction)
    target = _check_logits_target(logits, target)
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    per_sample = (onehot - logits.softmax(dim=1)).pow(2).sum(dim=1)
    return _reduce(per_sample, reduction)


# ---------------------------------------------------------------- hinge
HINGE_VARIANTS = ("crammer_singer", "weston_watkins")


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
    check_reduction(reduction)
    _check_positive(margin, "margin", allow_zero=True)
    if variant not in HINGE_VARIANTS:
        raise ValueError(f"variant must be one of {HINGE_VARIANTS}; got {variant!r}")
    target = _check_logits_target(logits, target)
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
def _check_class_weight(weight: Tensor | None, num_classes: int | None = None, name: str = "weight") -> None:
    """Class weights: 1-D, finite, non-negative, and of length ``num_classes`` where that is known."""
    if weight is None:
        return
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.shape[0] != (num_classes or weight.shape[0]):
        shape = f"shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        length = "with one weight per class" if num_classes is None else f"of length num_classes={num_classes}"
        raise ValueError(f"{name} must be a 1-D tensor {length}; got {shape}")
    if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} must be finite and non-negative; got {weight.tolist()}")


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
    check_reduction(reduction)
    target = _check_logits_target(logits, target)
    _check_class_weight(weight, logits.shape[1])
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction=reduction)


def class_balanced_weights(class_counts) -> Tensor:
    """w_j = N / (K · N_j): each class contributes equally to the loss, and w = 1 when balanced."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() < 1:
        raise ValueError(f"class_counts must be a 1-D sequence with one count per class; got {class_counts!r}")
    if bool((counts <= 0).any()):
        empty = [i for i, c in enumerate(counts.tolist()) if c <= 0]
        raise ValueError(
            f"class_counts must be positive for every class; classes {empty} have count <= 0 "
            f"(drop those classes or give them examples)"
        )
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
def _check_margin_int(margin) -> int:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != int(margin) or margin < 1:
        raise ValueError(f"margin must be an integer >= 1 for L-Softmax (e.g. 1, 2, 3, 4); got {margin!r}")
    return int(margin)


def l_softmax_psi(cos_theta: Tensor, margin: int) -> Tensor:
    """ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m], given cos θ.

    cos(mθ) is the Chebyshev polynomial T_m(cos θ), so neither θ = acos(·) nor its
    infinite slope at cos θ = ±1 enters the gradient; k is piecewise constant.
    """
    m = _check_margin_int(margin)
    c = cos_theta.clamp(-1.0, 1.0)
    t_prev, t_cur = torch.ones_like(c), c
    for _ in range(m - 1):
        t_prev, t_cur = t_cur, 2 * c * t_cur - t_prev
    with torch.no_grad():
        k = torch.floor(torch.acos(c) * m / math.pi).clamp(0, m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * t_cur - 2 * k


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
    _check_features_weight(features, weight)
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
    check_reduction(reduction)
    _check_margin_int(margin)
    _check_positive(lambda_, "lambda_", allow_zero=True)
    target = _check_features_weight_target(features, weight, target)
    return l_softmax_ce(features, weight, target, margin, lambda_, reduction)[0]


def _psi_and_slope(c: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """ψ(θ) and dψ/d cos θ given c = cos θ in [−1, 1] (see ``l_softmax_psi``).

    cos(mθ) = T_m(c) and d T_m / dc = m·U_{m−1}(c), Chebyshev polynomials of the first and
    second kind by their recurrences; the piece k comes from c against cos(jπ/m).
    """
    if m == 1:
        return c.clone(), torch.ones_like(c)
    two_c = c * 2
    t_prev, t_cur, u_prev, u_cur = torch.ones_like(c), c, torch.ones_like(c), two_c
    for n in range(1, m):
        t_prev, t_cur = t_cur, (two_c * t_cur).sub_(t_prev)
        if n < m - 1:
            u_prev, u_cur = u_cur, (two_c * u_cur).sub_(u_prev)
    # piece = how many of cos((m−1)π/m) < ... < cos(π/m) lie below c; then k = m − 1 − piece
    bounds, signs, offsets = _psi_tables(m, c.dtype, c.device)
    piece = torch.bucketize(c, bounds)
    sign = signs[piece]
    return t_cur.mul_(sign).sub_(offsets[piece]), u_cur.mul_(sign * m)


@functools.lru_cache(maxsize=None)
def _psi_tables(m: int, dtype, device):
    k = torch.arange(m - 1, -1, -1, dtype=torch.float64)  # k for piece = 0 .. m−1
    bounds = torch.tensor([math.cos(j * math.pi / m) for j in range(m - 1, 0, -1)], dtype=dtype, device=device)
    return bounds, (1.0 - 2.0 * (k % 2)).to(dtype=dtype, device=device), (2.0 * k).to(dtype=dtype, device=device)


def _l_softmax_terms(features, weight, target, margin, lambda_, reduction):
    """L-Softmax's forward: (loss, margin-free logits W x, what ``_LSoftmaxCE.backward`` needs).

    No in-place operation on anything autograd keeps, so that a create_graph backward can
    run it again under autograd (``_gradients_with_graph``).
    """
    idx = target[:, None]
    x_norm = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    w_norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    logits = torch.mm(features, weight.t())
    dot = logits.gather(1, idx)
    w_norm_y = w_norm.index_select(0, target)
    norm_product = x_norm * w_norm_y
    cos = _clamp_cos(dot / norm_product.clamp_min(_EPS))
    psi, slope = _psi_and_slope(cos, margin)
    # λ is a float, or a 0-d tensor under torch.compile (see LSoftmax); both blend alike
    target_logit = (norm_product * psi).add_(dot * lambda_).div_(1.0 + lambda_)
    logp = torch.log_softmax(logits.scatter(1, idx, target_logit), dim=1)
    return F.nll_loss(logp, target, reduction=reduction), logits, (x_norm, w_norm, w_norm_y, cos, psi, slope, logp)


class _LSoftmaxCE(torch.autograd.Function):
    """Cross-entropy over W x with the target logit (λ·W_y·x + ‖W_y‖‖x‖ψ(θ_y)) / (1 + λ), written out.

    The target logit depends on the product d = W_y·x and on n = ‖W_y‖‖x‖ (cos θ_y = d / n),
    so the gradient is the plain linear layer's with the target column rescaled by ∂/∂d,
    plus ∂/∂n along x (and along W_y): one matrix product and one correction per input.
    The PyTorch path; ``LSoftmaxCE`` in csrc/native.cpp is its C++ counterpart on CPU.
    """

    @staticmethod
    def forward(ctx, features, weight, target, margin, lambda_, reduction):
        loss, logits, saved = _l_softmax_terms(features, weight, target, margin, lambda_, reduction)
        ctx.save_for_backward(features, weight, target, *saved)
        ctx.margin, ctx.lambda_, ctx.reduction = margin, lambda_, reduction
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_logits):
        features, weight, target, x_norm, w_norm, w_norm_y, cos, psi, slope, logp = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True)
            def loss_of(f, w):
                return _l_softmax_terms(f, w, target, ctx.margin, ctx.lambda_, ctx.reduction)[0]
            return (*_gradients_with_graph(loss_of, features, weight, grad_loss, ctx.needs_input_grad), None, None, None, None)
        idx, lam = target[:, None], ctx.lambda_
        grad = _grad_logits(logp, target, idx, grad_loss, ctx.reduction)
        grad_y = grad.gather(1, idx)
        # ∂ target logit / ∂d = (λ + ψ'(c)) / (1 + λ); ∂ / ∂n = (ψ(c) − c·ψ'(c)) / (1 + λ)
        grad.scatter_(1, idx, (slope + lam).mul_(grad_y).div_(1.0 + lam))
        grad_n = torch.addcmul(psi, cos, slope, value=-1.0).mul_(grad_y).div_(1.0 + lam)
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            # ∂n/∂x = ‖W_y‖ x / ‖x‖; a zero x has no direction and its correction is 0 · x.
            grad_features = torch.mm(grad, weight).addcmul_(features, grad_n * w_norm_y / x_norm.clamp_min(_EPS))
        if ctx.needs_input_grad[1]:
            per_class = torch.zeros_like(w_norm).index_add_(0, target, grad_n * x_norm)
            grad_weight = torch.mm(grad.t(), features).addcmul_(weight, per_class.div_(w_norm.clamp_min(_EPS)))
        return grad_features, grad_weight, None, None, None, None


def l_softmax_ce(features: Tensor, weight: Tensor, target: Tensor, margin: int, lambda_,
                 reduction: str = "none") -> tuple[Tensor, Tensor]:
    """(reduced L-Softmax loss, margin-free logits W x); inputs already validated; λ a float or 0-d tensor."""
    if _use_native(features, weight):
        return tuple(_native.l_softmax_ce(features, weight, target, int(margin), lambda_, reduction))
    return _LSoftmaxCE.apply(features, weight, target, margin, lambda_, reduction)


# ---------------------------------------------------------------- normalised margin losses
@full_precision
def cosine_logits(features: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    """s · cos θ_j between each feature and each class weight (num_classes, feature_dim): margin-free
    logits of AM-Softmax / ArcFace."""
    _check_features_weight(features, weight)
    # Dividing the (batch, C) product by the norms costs far less, forward and backward,
    # than normalising the (batch, D) features and the (C, D) weights first.
    product, x_norm, w_norm = product_and_norms(features, weight)
    cos = product / x_norm.clamp_min(_EPS)[:, None] / w_norm.clamp_min(_EPS)
    return cos * scale if scale != 1.0 else cos


def _grad_logits(logp: Tensor, target: Tensor, idx: Tensor, grad_loss: Tensor, reduction: str, scale: float = 1.0) -> Tensor:
    """d loss / d logits of cross-entropy given log-probabilities: (softmax − one-hot) · grad · ``scale``."""
    if reduction == "none":
        g = grad_loss[:, None] * scale
        return logp.exp().mul_(g).scatter_add_(1, idx, g.neg())
    g = grad_loss * (scale / max(logp.shape[0], 1) if reduction == "mean" else scale)  # an empty batch has no rows to scale
    return logp.exp().mul_(g).scatter_add_(1, idx, g.neg().expand(idx.shape))


def _cosine_margin_terms(features, weight, target, scale, target_fn, reduction):
    """AM-Softmax's / ArcFace's forward: (loss, margin-free logits s·cos θ, what ``_CosineMarginCE.backward`` needs).

    No in-place operation on anything autograd keeps, so that a create_graph backward can
    run it again under autograd (``_gradients_with_graph``).
    """
    idx = target[:, None]
    rx = torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(_EPS).reciprocal_()
    rw = torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp_min(_EPS).reciprocal_()
    unit_w = weight * rw
    cos = torch.mm(features, unit_w.t()) * rx
    t, dt = target_fn(cos.gather(1, idx))
    plain = cos * scale  # margin-free logits, for prediction
    logp = torch.log_softmax(plain.scatter(1, idx, t.mul_(scale)), dim=1)
    return F.nll_loss(logp, target, reduction=reduction), plain, (unit_w, rx, rw, cos, logp, dt)


class _CosineMarginCE(torch.autograd.Function):
    """Cross-entropy over s·cos θ_j with the target's cos θ_y replaced by t(cos θ_y).

    AM-Softmax and ArcFace differ only in t. Forward and backward are written out: the
    generic autograd graph of normalise → matmul → margin → cross-entropy walks the
    (batch, D) features several times. This is the PyTorch path (GPU, or where the C++
    kernels were not built); on CPU, ``CosineMarginCE`` in csrc/native.cpp does the same
    maths without the per-operation dispatch cost that dominates at few classes.
    """

    @staticmethod
    def forward(ctx, features, weight, target, scale, target_fn, reduction):
        loss, plain, saved = _cosine_margin_terms(features, weight, target, scale, target_fn, reduction)
        ctx.save_for_backward(features, weight, target, *saved)
        ctx.scale, ctx.target_fn, ctx.reduction = scale, target_fn, reduction
        ctx.mark_non_differentiable(plain)
        return loss, plain

    @staticmethod
    def backward(ctx, grad_loss, _grad_plain):
        features, weight, target, unit_w, rx, rw, cos, logp, dt = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True)
            def loss_of(f, w):
                return _cosine_margin_terms(f, w, target, ctx.scale, ctx.target_fn, ctx.reduction)[0]
            return (*_gradients_with_graph(loss_of, features, weight, grad_loss, ctx.needs_input_grad), None, None, None, None)
        idx = target[:, None]
        grad_cos = _grad_logits(logp, target, idx, grad_loss, ctx.reduction, ctx.scale)
        if dt is not None:
            grad_cos.scatter_(1, idx, grad_cos.gather(1, idx).mul_(dt))
        # cos_ij = x_i·ŵ_j / ‖x_i‖ with ŵ_j = w_j / ‖w_j‖. The product rule gives one matrix
        # product per input and a correction along the input itself:
        #   dL/dx_i = (Σ_j g_ij ŵ_j − (Σ_j g_ij cos_ij) x_i / ‖x_i‖) / ‖x_i‖
        #   dL/dw_j = (Σ_i g_ij x_i / ‖x_i‖ − (Σ_i g_ij cos_ij) ŵ_j) / ‖w_j‖
        weighted = grad_cos * cos
        grad_cos.mul_(rx)
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            coef = weighted.sum(1, keepdim=True).mul_(rx).mul_(rx)
            grad_features = torch.mm(grad_cos, unit_w).addcmul_(features, coef, value=-1.0)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_cos.t(), features).addcmul_(unit_w, weighted.sum(0)[:, None], value=-1.0).mul_(rw)
        return grad_features, grad_weight, None, None, None, None


def am_softmax_target(margin: float):
    """t(cos θ) = cos θ − m; its derivative is 1 (None: nothing to rescale)."""
    def target_fn(cos_y):
        return cos_y.sub_(margin), None
    return target_fn


def arcface_target(margin: float):
    """t(cos θ) = cos(θ + m), or cos θ − m·sin m where θ + m > π; and dt/d cos θ, for ArcFace."""
    cos_m, sin_m, threshold = math.cos(margin), math.sin(margin), math.cos(math.pi - margin)

    def target_fn(cos_y):
        c = _clamp_cos(cos_y)
        sin_sq = torch.addcmul(torch.ones_like(c), c, c, value=-1.0)
        sin = sin_sq.clamp_min(_EPS).sqrt_()
        use_arc = c > threshold
        # dt/dc = cos m + sin m · c / sin θ; at cos θ = ±1 exactly sin θ = 0 and the slope of sin θ is taken as 0.
        d_arc = torch.where(sin_sq > _EPS, c / sin, 0.0).mul_(sin_m).add_(cos_m)
        t = torch.where(use_arc, torch.add(c * cos_m, sin, alpha=-sin_m), c - margin * sin_m)
        return t, torch.where(use_arc, d_arc, 1.0)
    return target_fn


def cosine_margin_ce(features: Tensor, weight: Tensor, target: Tensor, scale: float, margin: float, angular: bool,
                     reduction: str = "none") -> tuple[Tensor, Tensor]:
    """(reduced loss, margin-free logits s·cos θ) of AM-Softmax (``angular=False``: cos θ_y − m) or
    ArcFace (``angular=True``: cos(θ_y + m)); inputs already validated."""
    if _use_native(features, weight):
        return tuple(_native.cosine_margin_ce(features, weight, target, float(scale), float(margin), angular, reduction))
    return _CosineMarginCE.apply(features, weight, target, scale, _margin_target(margin, angular), reduction)


def _margin_target(margin: float, angular: bool):
    return arcface_target(margin) if angular else am_softmax_target(margin)


def _native_gradients_with_graph(kernel: str, features, weight, target, grad_loss, needs_input_grad, args):
    """What the C++ kernels' backward returns under create_graph=True: ``_gradients_with_graph``
    through the PyTorch forward of the same loss (``args`` as the kernel holds them)."""
    if kernel == "l_softmax_ce":
        margin, lambda_, reduction = args

        def loss_of(f, w):
            return _l_softmax_terms(f, w, target, margin, lambda_, reduction)[0]
    else:
        scale, margin, angular, reduction = args
        target_fn = _margin_target(margin, angular)

        def loss_of(f, w):
            return _cosine_margin_terms(f, w, target, scale, target_fn, reduction)[0]
    return _gradients_with_graph(loss_of, features, weight, grad_loss, needs_input_grad)


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
    check_reduction(reduction)
    _check_positive(scale, "scale")
    _check_positive(margin, "margin", allow_zero=True)
    target = _check_features_weight_target(features, weight, target)
    return cosine_margin_ce(features, weight, target, scale, margin, False, reduction)[0]


def check_arcface_margin(margin) -> None:
    if not (isinstance(margin, (int, float)) and 0 <= margin < math.pi / 2):
        raise ValueError(f"margin must be in [0, π/2) radians for ArcFace; got {margin!r}")


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
    check_reduction(reduction)
    _check_positive(scale, "scale")
    check_arcface_margin(margin)
    target = _check_features_weight_target(features, weight, target)
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
    check_reduction(reduction)
    _check_positive(xent_weight, "xent_weight", allow_zero=True)
    target = _check_logits_target(logits, target)
    per_sample = 1.0 - F.normalize(logits, dim=1, eps=_EPS).gather(1, target[:, None]).squeeze(1)
    if xent_weight > 0:
        if xent_logits is None:
            raise ValueError(
                "xent_logits is required when xent_weight > 0: the cross-entropy term of the cosine loss "
                "is computed on a separate linear layer over the normalised embedding (MarginAwareHead adds it)"
            )
        _check_matrix(xent_logits, "xent_logits", f"({logits.shape[0]}, num_classes)")
        if xent_logits.shape[0] != logits.shape[0]:
            raise ValueError(f"xent_logits must have {logits.shape[0]} rows like logits; got {tuple(xent_logits.shape)}")
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
    check_reduction(reduction)
    _check_positive(temperature, "temperature")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
    target = _check_logits_target(logits, target)
    _check_matrix(teacher_logits, "teacher_logits", f"{tuple(logits.shape)}")
    if teacher_logits.shape != logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(logits.shape)}; got {tuple(teacher_logits.shape)}"
        )
    teacher_log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    student_log_p = F.log_softmax(logits / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="none", log_target=True).sum(dim=1)
    ce = F.cross_entropy(logits, target, reduction="none")
    per_sample = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return _reduce(per_sample, reduction)
