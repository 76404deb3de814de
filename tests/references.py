"""Independent per-sample references, written from each paper's formula with Python floats.

Nothing here calls lossbank or torch.nn.functional: each loss is recomputed one sample at
a time with the ``math`` module, in float64, so the library is checked against the
formulas rather than against itself. The margin losses also take ``ops=torch`` and then
run the same formula on 0-d tensors (the entries of a tensor that requires grad), so that
autograd gives the formula's first and second derivatives to check the library's against.
"""
from __future__ import annotations

import math


def _softmax(z, ops=math):
    top = max(z)
    e = [ops.exp(v - top) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _log_softmax(z, ops=math):
    top = max(z)
    log_sum = top + ops.log(sum(ops.exp(v - top) for v in z))
    return [v - log_sum for v in z]


def _norm(v, ops=math):
    return ops.sqrt(sum(a * a for a in v))


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _ce(z, y, ops=math):
    return -_log_softmax(z, ops)[y]


def l1(logits, target, **_):
    out = []
    for z, y in zip(logits, target):
        p = _softmax(z)
        out.append(sum(abs((1.0 if j == y else 0.0) - p[j]) for j in range(len(z))))
    return out


def l2(logits, target, **_):
    out = []
    for z, y in zip(logits, target):
        p = _softmax(z)
        out.append(sum(((1.0 if j == y else 0.0) - p[j]) ** 2 for j in range(len(z))))
    return out


def hinge(logits, target, margin=1.0, variant="crammer_singer", **_):
    out = []
    for z, y in zip(logits, target):
        others = [z[j] for j in range(len(z)) if j != y]
        if variant == "crammer_singer":
            out.append(max(0.0, margin - z[y] + max(others)))
        else:
            out.append(sum(max(0.0, margin - z[y] + o) for o in others) / len(z))
    return out


def cross_entropy(logits, target, weight=None, label_smoothing=0.0, **_):
    """Per-sample terms and the per-sample weights that 'mean' divides by (torch's convention)."""
    c = len(logits[0])
    w = weight if weight is not None else [1.0] * c
    terms, denominators = [], []
    for z, y in zip(logits, target):
        logp = _log_softmax(z)
        smooth = sum(-w[j] * logp[j] for j in range(c)) / c
        terms.append((1 - label_smoothing) * -w[y] * logp[y] + label_smoothing * smooth)
        denominators.append(w[y])
    return terms, denominators


def balanced_weights(class_counts):
    n, k = sum(class_counts), len(class_counts)
    return [n / (k * c) for c in class_counts]


def _value(v):
    """A float, or a 0-d tensor's value without its gradient (k below is piecewise constant)."""
    return v.detach().item() if hasattr(v, "detach") else v


def psi(theta, m, ops=math):
    k = min(int(math.floor(_value(theta) * m / math.pi)), m - 1)
    return (-1) ** k * ops.cos(m * theta) - 2 * k


def l_softmax(features, weight, target, margin=4, lambda_=0.0, ops=math, **_):
    out = []
    for x, y in zip(features, target):
        z = [_dot(w, x) for w in weight]
        nx, nw = _norm(x, ops), _norm(weight[y], ops)
        cos = max(-1.0, min(1.0, z[y] / (nx * nw)))
        theta = ops.acos(cos)
        z[y] = (lambda_ * z[y] + nw * nx * psi(theta, margin, ops)) / (1 + lambda_)
        out.append(_ce(z, y, ops))
    return out


def _cosines(x, weight, ops=math):
    nx = _norm(x, ops)
    return [_dot(w, x) / (nx * _norm(w, ops)) for w in weight]


def am_softmax(features, weight, target, scale=30.0, margin=0.35, ops=math, **_):
    out = []
    for x, y in zip(features, target):
        cos = _cosines(x, weight, ops)
        z = [scale * (c - (margin if j == y else 0.0)) for j, c in enumerate(cos)]
        out.append(_ce(z, y, ops))
    return out


def arcface(features, weight, target, scale=30.0, margin=0.5, ops=math, **_):
    out = []
    for x, y in zip(features, target):
        cos = _cosines(x, weight, ops)
        theta = ops.acos(max(-1.0, min(1.0, cos[y])))
        target_cos = ops.cos(theta + margin) if theta + margin <= math.pi else cos[y] - margin * math.sin(margin)
        z = [scale * (target_cos if j == y else c) for j, c in enumerate(cos)]
        out.append(_ce(z, y, ops))
    return out


def cosine(logits, target, xent_weight=0.0, xent_logits=None, **_):
    out = []
    for i, (z, y) in enumerate(zip(logits, target)):
        value = 1.0 - z[y] / _norm(z)
        if xent_weight > 0:
            value += xent_weight * _ce(xent_logits[i], y)
        out.append(value)
    return out


def distillation(logits, target, teacher_logits, temperature=2.0, alpha=0.3, **_):
    out = []
    for z, y, t in zip(logits, target, teacher_logits):
        q = _softmax([v / temperature for v in t])
        logp = _log_softmax([v / temperature for v in z])
        kl = sum(qj * (math.log(qj) - lpj) for qj, lpj in zip(q, logp))
        out.append(alpha * _ce(z, y) + (1 - alpha) * temperature**2 * kl)
    return out


PER_SAMPLE = {
    "l1": l1,
    "l2": l2,
    "hinge": hinge,
    "l_softmax": l_softmax,
    "am_softmax": am_softmax,
    "arcface": arcface,
    "cosine": cosine,
    "distillation": distillation,
}
