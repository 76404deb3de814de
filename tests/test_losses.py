"""Every registered loss against its independent reference, plus gradients, precision and limits.

Parametrised over ``list_losses()``: a newly registered loss is picked up by every test
here; it only needs a reference in ``tests/references.py`` (the first test fails until
it has one). Every test runs twice: with the margin losses' C++ kernels
(lossbank/csrc/native.cpp) and with their PyTorch code, the fallback where the kernels
are not built or the tensors are not float32/float64 on CPU.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lossbank
from lossbank import _kernels as kernels
from lossbank import functional as LF
from lossbank import get_loss_info, list_losses

import references as ref

ALL = list_losses()
MARGIN = [n for n in ALL if get_loss_info(n).input == "features"]
C, D, N = 5, 7, 11


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def implementation(request, monkeypatch):
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "_native", None)
    elif not lossbank.has_native_kernels():
        pytest.fail("lossbank's C++ kernels are not built: install with `pip install --no-build-isolation -e .` "
                    "(needs a C++ compiler), as the README's set-up command does")
    return request.param


def loss_kwargs(name: str, num_classes: int = C) -> dict:
    """What a loss needs beyond its defaults to be built (class counts for weighted CE)."""
    if get_loss_info(name).needs_class_counts:
        return {"class_counts": [3 + 2 * j for j in range(num_classes)]}
    return {}


def make_inputs(name, n=N, c=C, d=D, dtype=torch.float64, seed=0):
    """Random inputs for one loss: (tensors by argument name, target)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    if get_loss_info(name).input == "features":
        inputs = {"features": torch.randn(n, d, generator=g, dtype=dtype), "weight": torch.randn(c, d, generator=g, dtype=dtype)}
    else:
        inputs = {"logits": 3 * torch.randn(n, c, generator=g, dtype=dtype)}
        if get_loss_info(name).needs_teacher:
            inputs["teacher_logits"] = 3 * torch.randn(n, c, generator=g, dtype=dtype)
    return inputs, target


def call(loss, inputs, target):
    if loss.input == "features":
        return loss(inputs["features"], inputs["weight"], target)
    extra = {k: v for k, v in inputs.items() if k != "logits"}
    return loss(inputs["logits"], target, **extra)


def reference(name, loss, inputs, target, reduction):
    args = {k: v.double().tolist() for k, v in inputs.items()}
    y = target.tolist()
    if name in ("cross_entropy", "weighted_cross_entropy"):
        weight = None if loss.weight is None else loss.weight.double().tolist()
        terms, denominators = ref.cross_entropy(args["logits"], y, weight, loss.label_smoothing)
        if reduction == "none":
            return terms
        return sum(terms) / sum(denominators) if reduction == "mean" else sum(terms)
    params = {k: getattr(loss, k) for k in ("margin", "scale", "variant", "temperature", "alpha", "xent_weight") if hasattr(loss, k)}
    if name == "l_softmax":
        params["lambda_"] = loss.current_lambda
    per_sample = ref.PER_SAMPLE[name](**args, target=y, **params)
    if reduction == "none":
        return per_sample
    return sum(per_sample) / len(per_sample) if reduction == "mean" else sum(per_sample)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ALL)
def test_matches_independent_reference(name, reduction, dtype):
    assert name in ref.PER_SAMPLE or name in ("cross_entropy", "weighted_cross_entropy"), f"write a reference for {name}"
    loss = lossbank.create_loss(name, reduction=reduction, **loss_kwargs(name)).eval()
    inputs, target = make_inputs(name, dtype=dtype)
    expected = torch.tensor(reference(name, loss, inputs, target, reduction), dtype=torch.float64)
    got = call(loss, inputs, target)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-10)


NON_DEFAULT = [
    ("hinge", {"margin": 0.5, "variant": "weston_watkins"}),
    ("cross_entropy", {"weight": torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]), "label_smoothing": 0.1}),
    ("weighted_cross_entropy", {"class_counts": [1, 2, 3, 4, 10], "label_smoothing": 0.2}),
    ("l_softmax", {"margin": 2, "base": 10.0}),
    ("l_softmax", {"margin": 3, "base": 0.0}),
    ("am_softmax", {"scale": 10.0, "margin": 0.2}),
    ("arcface", {"scale": 16.0, "margin": 0.3}),
    ("distillation", {"temperature": 4.0, "alpha": 0.7}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,kwargs", NON_DEFAULT, ids=[f"{n}-{i}" for i, (n, _) in enumerate(NON_DEFAULT)])
def test_non_default_parameters_match_reference(name, kwargs, dtype):
    loss = lossbank.create_loss(name, reduction="none", **kwargs).eval()
    inputs, target = make_inputs(name, dtype=dtype, seed=1)
    expected = torch.tensor(reference(name, loss, inputs, target, "none"), dtype=torch.float64)
    torch.testing.assert_close(call(loss, inputs, target).double(), expected, rtol=1e-5, atol=1e-6)


def test_cosine_with_cross_entropy_term_matches_reference():
    inputs, target = make_inputs("cosine", seed=2)
    xent_logits = torch.randn(N, C, dtype=torch.float64)
    got = LF.cosine_loss(inputs["logits"], target, xent_weight=0.1, xent_logits=xent_logits, reduction="none")
    expected = ref.cosine(inputs["logits"].tolist(), target.tolist(), 0.1, xent_logits.tolist())
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-10)


def test_weston_watkins_equals_multi_margin_loss():
    inputs, target = make_inputs("hinge", seed=3)
    ours = lossbank.MulticlassHinge(variant="weston_watkins")(inputs["logits"], target)
    torch.testing.assert_close(ours, torch.nn.MultiMarginLoss()(inputs["logits"], target))


# ---------------------------------------------------------------- limiting cases
@pytest.mark.parametrize("lambda_", [0.0, 5.0])
def test_l_softmax_with_m1_is_softmax_cross_entropy(lambda_):
    inputs, target = make_inputs("l_softmax", seed=4)
    f, w = inputs["features"], inputs["weight"]
    got = LF.l_softmax_loss(f, w, target, margin=1, lambda_=lambda_)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(f @ w.t(), target), rtol=1e-10, atol=1e-12)


def test_am_softmax_with_m0_is_scaled_softmax_cross_entropy():
    inputs, target = make_inputs("am_softmax", seed=5)
    f, w = inputs["features"], inputs["weight"]
    cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    got = LF.am_softmax_loss(f, w, target, scale=12.0, margin=0.0)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(12.0 * cos, target), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_psi_is_continuous_and_decreasing(m):
    """ψ and its slope as training computes them: the C++ kernels' on the native path, the PyTorch code's on the other."""
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    psi = LF.l_softmax_psi(torch.cos(theta), m)
    steps = psi[1:] - psi[:-1]
    assert bool((steps <= 1e-12).all()), "ψ must not increase on [0, π]"
    # Continuity: neighbouring samples never jump by more than the steepest slope allows (m per radian).
    assert float(steps.abs().max()) <= m * (theta[1] - theta[0]).item() * 1.01
    # At the piece boundaries kπ/m the two pieces meet.
    for k in range(1, m):
        edge = torch.tensor([k * math.pi / m - 1e-9, k * math.pi / m + 1e-9], dtype=torch.float64)
        left, right = LF.l_softmax_psi(torch.cos(edge), m)
        assert abs(float(left - right)) < 1e-6
    torch.testing.assert_close(psi[0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(psi[-1], torch.tensor(-2.0 * m + 1, dtype=torch.float64))
    # The slope the backward uses is dψ/d cos θ: against central differences in cos θ.
    c = torch.linspace(-0.999, 0.999, 1001, dtype=torch.float64)
    h = 1e-6
    value, slope = kernels.psi_and_slope(c, m)
    torch.testing.assert_close(value, LF.l_softmax_psi(c, m))
    numeric = (kernels.psi_and_slope(c + h, m)[0] - kernels.psi_and_slope(c - h, m)[0]) / (2 * h)
    torch.testing.assert_close(slope, numeric, rtol=1e-5, atol=1e-5)


def test_l_softmax_under_torch_compile_does_not_recompile_as_lambda_anneals():
    """λ changes every step; it must be computed in the graph, not guarded on as a Python float."""
    torch._dynamo.reset()
    head = lossbank.MarginAwareHead(D, C, "l_softmax", margin=2)
    eager = lossbank.MarginAwareHead(D, C, "l_softmax", margin=2)
    eager.load_state_dict(head.state_dict())
    inputs, target = make_inputs("l_softmax", dtype=torch.float32)
    step = torch.compile(lambda features, y: head(features, y).loss, backend="aot_eager")
    for warm_up in range(2):  # the first calls compile, and may once mark sizes dynamic
        step(inputs["features"], target).backward()
        eager(inputs["features"], target).loss.backward()
    lambdas = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(10):
            torch.testing.assert_close(step(inputs["features"], target), eager(inputs["features"], target).loss)
            lambdas.append(head.criterion.current_lambda)
    assert len(set(lambdas)) == 10 and int(head.criterion.step) == 12
    torch._dynamo.reset()


def test_l_softmax_lambda_anneals_and_is_readable():
    loss = lossbank.LSoftmax()
    assert loss.current_lambda == pytest.approx(1000.0)
    inputs, target = make_inputs("l_softmax", dtype=torch.float32)
    for _ in range(300):
        loss(inputs["features"], inputs["weight"], target)
    assert int(loss.step) == 300
    assert loss.current_lambda == pytest.approx(1000.0 / 31**2)
    loss.eval()
    loss(inputs["features"], inputs["weight"], target)
    assert int(loss.step) == 300, "evaluation must not advance the schedule"
    assert "step" in loss.state_dict()
    assert lossbank.LSoftmax(lambda_min=5.0, base=1.0).current_lambda == 5.0


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["first", "second"])
@pytest.mark.parametrize("name", ALL)
def test_gradcheck_float64(name, check):
    """First and second derivatives (gradient penalties, meta-gradients) against finite differences."""
    loss = lossbank.create_loss(name, **loss_kwargs(name)).eval()
    inputs, target = make_inputs(name, n=4, seed=6)
    differentiable = ["features", "weight"] if loss.input == "features" else ["logits"]
    for key in differentiable:
        inputs[key].requires_grad_(True)

    def fn(*tensors):
        return call(loss, {**inputs, **dict(zip(differentiable, tensors))}, target)

    assert check(fn, tuple(inputs[k] for k in differentiable), eps=1e-6, atol=1e-5)


# l_softmax with λ = 0.5 (not the default 1000, under which the margin barely enters)
PENALTY_KWARGS = {"l_softmax": {"margin": 3, "base": 0.5, "gamma": 0.0}, "am_softmax": {}, "arcface": {}}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", MARGIN)
def test_gradient_penalty_matches_autograd_through_the_reference(name, reduction):
    """P = ‖∂L/∂x‖², and ∂P/∂x, ∂P/∂W: against autograd through tests/references.py's formula."""
    loss = lossbank.create_loss(name, reduction=reduction, **PENALTY_KWARGS[name]).eval()
    inputs, target = make_inputs(name, n=5, c=4, d=3, seed=8)
    weights_per_sample = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)  # a non-uniform grad_output for 'none'

    def penalty_and_its_gradients(per_sample_or_reduced):
        x = inputs["features"].clone().requires_grad_(True)
        w = inputs["weight"].clone().requires_grad_(True)
        value = per_sample_or_reduced(x, w)
        grad_output = weights_per_sample if reduction == "none" else None
        (g,) = torch.autograd.grad(value, x, grad_output, create_graph=True)
        penalty = (g**2).sum()
        return (penalty.detach(), *torch.autograd.grad(penalty, (x, w)))

    def reference_formula(x, w):
        rows = [[x[i, j] for j in range(x.shape[1])] for i in range(x.shape[0])]
        cols = [[w[i, j] for j in range(w.shape[1])] for i in range(w.shape[0])]
        params = {k: getattr(loss, k) for k in ("margin", "scale") if hasattr(loss, k)}
        if name == "l_softmax":
            params["lambda_"] = loss.current_lambda
        per_sample = torch.stack(ref.PER_SAMPLE[name](rows, cols, target.tolist(), ops=torch, **params))
        return per_sample if reduction == "none" else per_sample.mean()

    ours = penalty_and_its_gradients(lambda x, w: loss(x, w, target))
    expected = penalty_and_its_gradients(reference_formula)
    assert float(expected[0]) > 1e-3, "a penalty large enough to compare"
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", MARGIN)
@pytest.mark.parametrize("case", ["cos=+1", "cos=-1", "zero-features"])
def test_margin_gradients_finite_at_the_edges(name, case):
    weight = torch.randn(C, D, dtype=torch.float64)
    target = torch.arange(C) % C
    features = {"cos=+1": weight[target].clone(), "cos=-1": -2.0 * weight[target], "zero-features": torch.zeros(C, D, dtype=torch.float64)}[case]
    features.requires_grad_(True)
    weight.requires_grad_(True)
    value = lossbank.create_loss(name)(features, weight, target)
    value.backward()
    assert torch.isfinite(value)
    assert bool(torch.isfinite(features.grad).all()) and bool(torch.isfinite(weight.grad).all())


@pytest.mark.parametrize("name", ALL)
def test_head_gradients_finite_for_zero_features(name):
    head = lossbank.MarginAwareHead(D, C, name, **loss_kwargs(name)).double()
    features = torch.zeros(4, D, dtype=torch.float64, requires_grad=True)
    out = head(features, torch.tensor([0, 1, 2, 3]), teacher_logits=torch.randn(4, C, dtype=torch.float64))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert bool(torch.isfinite(features.grad).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in head.parameters() if p.grad is not None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ALL)
def test_empty_batch_backward(name, reduction):
    """A batch of 0 rows (a filtered or ragged last batch) gives torch's values and zero gradients."""
    loss = lossbank.create_loss(name, reduction=reduction, **loss_kwargs(name))
    inputs, target = make_inputs(name, n=0)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    value = call(loss, inputs, target)
    expected = torch.nn.functional.cross_entropy(torch.zeros(0, C, dtype=torch.float64), target, reduction=reduction)
    torch.testing.assert_close(value.detach(), expected, equal_nan=True)
    if reduction == "none":
        value.sum().backward()
    else:
        value.backward()
    for key, tensor in inputs.items():
        if tensor.grad is not None:
            assert tensor.grad.shape == tensor.shape and not bool(tensor.grad.any()), key


# ---------------------------------------------------------------- reduced precision
@pytest.mark.parametrize("name", MARGIN)
def test_native_kernels_run_where_they_apply(name, implementation):
    """float32/float64 on CPU take the C++ kernels when built (also under autocast, which upcasts first)."""
    inputs, target = make_inputs(name, dtype=torch.float32)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    loss = lossbank.create_loss(name)
    expected = "CppNode" if implementation == "native" else "CEBackward"  # _CosineMarginCE / _LSoftmaxCE
    assert expected in call(loss, inputs, target).grad_fn.name()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert expected in call(loss, inputs, target).grad_fn.name()
    half = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in inputs.items()}
    assert expected in call(loss, half, target).grad_fn.name()


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_close_to_float32(name):
    torch.manual_seed(0)
    head = lossbank.MarginAwareHead(64, C, name, **loss_kwargs(name)).eval()
    features, target = torch.randn(32, 64), torch.randint(0, C, (32,))
    teacher = torch.randn(32, C)
    reference_value = head(features, target, teacher_logits=teacher).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(features.bfloat16(), target, teacher_logits=teacher.bfloat16()).loss
    assert low.dtype == torch.float32, "the loss is computed in float32 under autocast"
    torch.testing.assert_close(low, reference_value, rtol=1e-2, atol=1e-2)


HEADS = [(n, loss_kwargs(n)) for n in ALL] + [("cosine", {"xent_weight": 0.1})]


@pytest.mark.parametrize("how", ["to", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", HEADS, ids=[f"{n}-{k}" if "xent_weight" in k else n for n, k in HEADS])
def test_every_head_trains_in_half_precision(name, kwargs, dtype, how):
    """head.to(bf16)/.half() with features of that dtype, or a float32 head under autocast."""
    torch.manual_seed(0)
    head = lossbank.MarginAwareHead(64, C, name, **kwargs)
    features, target, teacher = torch.randn(32, 64), torch.randint(0, C, (32,)), torch.randn(32, C)
    reference_value = head(features, target, teacher_logits=teacher).loss.detach()
    if how == "to":
        head = head.to(dtype)
        out = head(features.to(dtype), target, teacher_logits=teacher.to(dtype))
    else:
        with torch.autocast("cpu", dtype=dtype):
            out = head(features, target, teacher_logits=teacher)
    assert out.loss.dtype == torch.float32, "the loss is computed in float32"
    out.loss.backward()
    for parameter in head.parameters():
        assert parameter.grad is not None and parameter.grad.dtype == parameter.dtype
        assert bool(torch.isfinite(parameter.grad).all())
    torch.testing.assert_close(out.loss.detach(), reference_value, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(ALL),
    n=st.integers(1, 9),
    c=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
)
def test_non_negative_finite_and_order_invariant(name, n, c, seed, scale):
    inputs, target = make_inputs(name, n=n, c=c, d=4, dtype=torch.float32, seed=seed)
    inputs = {k: v * scale for k, v in inputs.items()}
    loss = lossbank.create_loss(name, reduction="none", **loss_kwargs(name, c)).eval()
    per_sample = call(loss, inputs, target)
    assert bool(torch.isfinite(per_sample).all())
    assert bool((per_sample >= -1e-6).all())
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = {k: (v[perm] if k != "weight" else v) for k, v in inputs.items()}
    torch.testing.assert_close(call(loss, shuffled, target[perm]), per_sample[perm])
    loss.reduction = "mean"
    torch.testing.assert_close(call(loss, shuffled, target[perm]), call(loss, inputs, target), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ALL)
def test_bad_targets_and_shapes_raise(name):
    loss = lossbank.create_loss(name, **loss_kwargs(name))
    inputs, target = make_inputs(name, dtype=torch.float32)
    with pytest.raises(ValueError, match="target.*integer"):
        call(loss, inputs, target.float())
    with pytest.raises(ValueError, match=r"target values must be in \[0, 4\]"):
        call(loss, inputs, torch.full_like(target, C))
    with pytest.raises(ValueError, match=r"target must have shape \(11,\)"):
        call(loss, inputs, target[:-1])
    key = "features" if loss.input == "features" else "logits"
    with pytest.raises(ValueError, match=f"{key} must have shape"):
        call(loss, {**inputs, key: inputs[key][0]}, target)
    if loss.input == "features":
        with pytest.raises(ValueError, match="weight must be"):
            call(loss, {**inputs, "weight": inputs["weight"][:, :-1]}, target)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: lossbank.LSoftmax(margin=0), "margin must be an integer >= 1"),
        (lambda: lossbank.LSoftmax(margin=2.5), "margin must be an integer >= 1"),
        (lambda: lossbank.AMSoftmax(scale=-1.0), "scale must be a finite number > 0"),
        (lambda: lossbank.ArcFace(scale=0.0), "scale must be a finite number > 0"),
        (lambda: lossbank.ArcFace(margin=2.0), "margin must be in"),
        (lambda: lossbank.AMSoftmax(margin=-0.1), "margin must be a finite number >= 0"),
        (lambda: lossbank.MulticlassHinge(variant="svm"), "variant must be one of"),
        (lambda: lossbank.DistillationLoss(temperature=0), "temperature must be"),
        (lambda: lossbank.DistillationLoss(alpha=1.5), "alpha must be in"),
        (lambda: lossbank.CrossEntropy(label_smoothing=1.0), "label_smoothing must be in"),
        (lambda: lossbank.CrossEntropy(weight=torch.tensor([1.0, -1.0])), "weight must be finite and non-negative"),
        (lambda: lossbank.WeightedCrossEntropy(), "class_counts is required"),
        (lambda: lossbank.WeightedCrossEntropy(class_counts=[3, 0, 2]), r"classes \[1\] have count <= 0"),
        (lambda: lossbank.CosineLoss(xent_weight=-1), "xent_weight must be"),
        (lambda: lossbank.CrossEntropy(reduction="avg"), "reduction must be one of"),
    ],
)
def test_bad_parameters_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_functional_bad_arguments_raise():
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        LF.distillation_loss(logits, target, torch.randn(3, 5))
    with pytest.raises(ValueError, match="xent_logits is required"):
        LF.cosine_loss(logits, target, xent_weight=0.1)
    with pytest.raises(ValueError, match="class_counts has 3 entries but logits has 4 classes"):
        LF.weighted_cross_entropy_loss(logits, target, [1, 2, 3])
    with pytest.raises(ValueError, match=r"weight must be a 1-D tensor of length num_classes=4"):
        LF.cross_entropy_loss(logits, target, weight=torch.ones(3))
    with pytest.raises(ValueError, match="lambda_ must be"):
        LF.l_softmax_loss(torch.randn(3, 2), torch.randn(4, 2), target, lambda_=-1.0)


@pytest.mark.parametrize("name", ALL)
def test_wrong_dtypes_raise_value_errors_naming_the_argument(name):
    head = lossbank.MarginAwareHead(D, C, name, **loss_kwargs(name))
    target = torch.arange(4) % C
    with pytest.raises(ValueError, match=r"features has dtype torch.float64 but .*torch.float32"):
        head(torch.randn(4, D, dtype=torch.float64), target, teacher_logits=torch.randn(4, C))
    with pytest.raises(ValueError, match="features must be a floating-point tensor; got dtype torch.int64"):
        head(torch.ones(4, D, dtype=torch.long), target, teacher_logits=torch.randn(4, C))
    with pytest.raises(ValueError, match="features must be a floating-point tensor"):
        head(torch.ones(4, D, dtype=torch.long))
    if head.uses_margin:
        with pytest.raises(ValueError, match=r"features has dtype torch.float64 but weight has dtype torch.float32"):
            head.criterion(torch.randn(4, D, dtype=torch.float64), head.weight, target)
        with pytest.raises(ValueError, match=r"features has dtype torch.float64 but weight has dtype torch.float32"):
            head.criterion.logits(torch.randn(4, D, dtype=torch.float64), head.weight)


@pytest.mark.parametrize("name", MARGIN)
def test_margin_loss_called_like_a_logits_loss_says_what_it_takes(name):
    logits, target = torch.randn(4, C), torch.arange(4) % C
    with pytest.raises(ValueError, match=r"margin losses take \(features, weight, target\)"):
        lossbank.create_loss(name)(logits, target)


@pytest.mark.parametrize("name", MARGIN)
def test_transposed_weight_is_named(name):
    """(D, C) instead of (C, D): when D != C the error says the weight looks transposed."""
    features, target = torch.randn(4, D), torch.arange(4) % C
    loss = lossbank.create_loss(name)
    with pytest.raises(ValueError, match=r"weight looks transposed: expected \(num_classes, feature_dim\) = \(\?, 7\), got \(7, 5\)"):
        loss(features, torch.randn(D, C), target)
    with pytest.raises(ValueError, match="weight looks transposed"):
        loss.logits(features, torch.randn(D, C))
    assert "(num_classes, feature_dim)" in type(loss).__doc__


def test_create_loss_lists_the_valid_arguments():
    with pytest.raises(ValueError, match=r"unknown argument 'margn' for loss 'arcface'; valid arguments: scale, margin, reduction"):
        lossbank.create_loss("arcface", margn=0.3)
    with pytest.raises(ValueError, match=r"unknown argument 'margn' for loss 'arcface'"):
        lossbank.MarginAwareHead(D, C, "arcface", margn=0.3)


def test_class_weight_of_the_wrong_shape_says_what_it_needs():
    with pytest.raises(ValueError, match=r"weight must be a 1-D tensor with one weight per class; got shape \(3, 1\)") as error:
        lossbank.CrossEntropy(weight=torch.ones(3, 1))
    assert "-1" not in str(error.value)


def test_import_pulls_in_torch_only():
    code = (
        "import sys; import torch; before = set(sys.modules); import lossbank; "
        "new = sorted(m.split('.')[0] for m in set(sys.modules) - before); "
        "print(','.join(sorted(set(new))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert set(out.split(",")) - {""} <= {"lossbank"}, f"import lossbank also imported: {out}"
