"""The margin losses' forward and backward: autograd Functions and the C++ kernels they dispatch to.

L-Softmax, AM-Softmax and ArcFace each have a written-out forward and backward
(``_LSoftmaxCE``, ``_CosineMarginCE``): the PyTorch path, used on GPU and wherever the C++
kernels (lossbank/csrc/native.cpp, the same maths in one autograd node) were not built or
do not apply. :mod:`lossbank.functional` calls ``l_softmax_ce`` and ``cosine_margin_ce``,
which pick one; inputs arrive validated.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# Floor for norms: keeps cos θ finite (0) and its gradient finite for zero-norm features.
EPS = 1e-12


# ---------------------------------------------------------------- which path
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


# ---------------------------------------------------------------- shared by the margin losses
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
            grad_features = (grad_product @ weight).addcmul_(features, (grad_x_norm / x_norm.clamp_min(EPS))[:, None])
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_product.t() @ features).addcmul_(weight, (grad_w_norm / w_norm.clamp_min(EPS))[:, None])
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


def _forward(ctx, terms, features: Tensor, weight: Tensor, target: Tensor, *params):
    """The autograd Functions' forward: ``terms`` (the loss's PyTorch forward) and what its backward keeps."""
    loss, plain, saved = terms(features, weight, target, *params)
    ctx.save_for_backward(features, weight, target, *saved)
    ctx.params = params
    ctx.mark_non_differentiable(plain)  # margin-free logits, to predict with
    return loss, plain


def _gradients_with_graph(terms, params, features: Tensor, weight: Tensor, target: Tensor, grad_loss: Tensor,
                          needs_input_grad):
    """d loss / d (features, weight) for a backward with create_graph=True, by autograd through ``terms``.

    The written-out backwards compute from values saved by the forward, so what they return
    cannot be differentiated again (a gradient penalty, a meta-gradient). Here autograd
    records the forward anew from the inputs and differentiates it, keeping the graph. Only
    a create_graph backward comes here; an ordinary one keeps the fused step.
    """
    wanted = [t for t, needed in zip((features, weight), needs_input_grad) if needed]
    with torch.enable_grad():
        loss = terms(features, weight, target, *params)[0]
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True, materialize_grads=True))
    return tuple(next(grads) if needed else None for needed in needs_input_grad[:2])


# ---------------------------------------------------------------- L-Softmax
def psi_and_slope(c: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """ψ(θ) and dψ/d cos θ given c = cos θ in [−1, 1], by the code training runs on such a tensor:
    the C++ kernels' on CPU (float32/float64, nothing to differentiate), else ``_psi_and_slope``."""
    if not c.requires_grad and _use_native(c, c):
        return tuple(_native.l_softmax_psi(c, m))
    return _psi_and_slope(c, m)


def _psi_and_slope(c: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """ψ(θ) and dψ/d cos θ given c = cos θ in [−1, 1] (see ``functional.l_softmax_psi``): the PyTorch path's.

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
    cos = _clamp_cos(dot / norm_product.clamp_min(EPS))
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
        return _forward(ctx, _l_softmax_terms, features, weight, target, margin, lambda_, reduction)

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_logits):
        features, weight, target, x_norm, w_norm, w_norm_y, cos, psi, slope, logp = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True)
            return (*_gradients_with_graph(_l_softmax_terms, ctx.params, features, weight, target, grad_loss,
                                           ctx.needs_input_grad), None, None, None, None)
        _, lam, reduction = ctx.params
        idx = target[:, None]
        grad = _grad_logits(logp, target, idx, grad_loss, reduction)
        grad_y = grad.gather(1, idx)
        # ∂ target logit / ∂d = (λ + ψ'(c)) / (1 + λ); ∂ / ∂n = (ψ(c) − c·ψ'(c)) / (1 + λ)
        grad.scatter_(1, idx, (slope + lam).mul_(grad_y).div_(1.0 + lam))
        grad_n = torch.addcmul(psi, cos, slope, value=-1.0).mul_(grad_y).div_(1.0 + lam)
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            # ∂n/∂x = ‖W_y‖ x / ‖x‖; a zero x has no direction and its correction is 0 · x.
            grad_features = torch.mm(grad, weight).addcmul_(features, grad_n * w_norm_y / x_norm.clamp_min(EPS))
        if ctx.needs_input_grad[1]:
            per_class = torch.zeros_like(w_norm).index_add_(0, target, grad_n * x_norm)
            grad_weight = torch.mm(grad.t(), features).addcmul_(weight, per_class.div_(w_norm.clamp_min(EPS)))
        return grad_features, grad_weight, None, None, None, None


def l_softmax_ce(features: Tensor, weight: Tensor, target: Tensor, margin: int, lambda_,
                 reduction: str = "none") -> tuple[Tensor, Tensor]:
    """(reduced L-Softmax loss, margin-free logits W x); inputs already validated; λ a float or 0-d tensor."""
    if _use_native(features, weight):
        return tuple(_native.l_softmax_ce(features, weight, target, int(margin), lambda_, reduction))
    return _LSoftmaxCE.apply(features, weight, target, margin, lambda_, reduction)


# ---------------------------------------------------------------- AM-Softmax and ArcFace
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
    rx = torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(EPS).reciprocal_()
    rw = torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp_min(EPS).reciprocal_()
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
        return _forward(ctx, _cosine_margin_terms, features, weight, target, scale, target_fn, reduction)

    @staticmethod
    def backward(ctx, grad_loss, _grad_plain):
        features, weight, target, unit_w, rx, rw, cos, logp, dt = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True)
            return (*_gradients_with_graph(_cosine_margin_terms, ctx.params, features, weight, target, grad_loss,
                                           ctx.needs_input_grad), None, None, None, None)
        scale, _, reduction = ctx.params
        idx = target[:, None]
        grad_cos = _grad_logits(logp, target, idx, grad_loss, reduction, scale)
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
        sin = sin_sq.clamp_min(EPS).sqrt_()
        use_arc = c > threshold
        # dt/dc = cos m + sin m · c / sin θ; at cos θ = ±1 exactly sin θ = 0 and the slope of sin θ is taken as 0.
        d_arc = torch.where(sin_sq > EPS, c / sin, 0.0).mul_(sin_m).add_(cos_m)
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
    if kernel == "l_softmax_ce":  # (margin, λ, reduction)
        terms, params = _l_softmax_terms, args
    else:
        scale, margin, angular, reduction = args
        terms, params = _cosine_margin_terms, (scale, _margin_target(margin, angular), reduction)
    return _gradients_with_graph(terms, params, features, weight, target, grad_loss, needs_input_grad)
