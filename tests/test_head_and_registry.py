"""The registry's contract and MarginAwareHead with every registered loss."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lossbank
from lossbank import MarginAwareHead, create_loss, get_loss_info, list_losses, register_loss
from lossbank.registry import _REGISTRY

from test_losses import C, D, loss_kwargs

ALL = list_losses()


# ---------------------------------------------------------------- registry
def test_registry_lists_the_documented_losses_in_order():
    assert ALL == [
        "l1", "l2", "hinge", "cross_entropy", "weighted_cross_entropy",
        "l_softmax", "am_softmax", "arcface", "cosine", "distillation",
    ]  # fmt: skip
    assert list_losses("*softmax") == ["l_softmax", "am_softmax"]
    assert list_losses("nothing*") == []


@pytest.mark.parametrize("name", ALL)
def test_every_entry_names_its_paper_defaults_and_input(name):
    info = get_loss_info(name)
    assert re.search(r"(19|20)\d\d", info.paper), "the paper entry gives the year"
    doc = info.cls.__doc__ or ""
    first_author = re.match(r"[A-Z][a-z]+", info.paper).group(0)
    assert first_author in doc, "the docstring names the paper of the registry entry"
    assert all(year in doc for year in re.findall(r"(?:19|20)\d\d", info.paper))
    assert info.defaults_source
    assert info.input in ("logits", "features")
    assert info.defaults.get("reduction") == "mean"
    assert getattr(lossbank, info.cls.__name__) is info.cls, "exported at the top level"
    assert info.cls.__doc__ and ">>>" in info.cls.__doc__, "docstring has a runnable example"
    built = create_loss(name, **loss_kwargs(name))
    assert isinstance(built, info.cls)


def test_documented_defaults():
    assert get_loss_info("am_softmax").defaults == {"scale": 30.0, "margin": 0.35, "reduction": "mean"}
    assert get_loss_info("arcface").defaults == {"scale": 30.0, "margin": 0.5, "reduction": "mean"}
    assert get_loss_info("distillation").defaults == {"temperature": 2.0, "alpha": 0.3, "reduction": "mean"}
    assert get_loss_info("l_softmax").defaults["margin"] == 4
    assert get_loss_info("hinge").defaults["margin"] == 1.0
    assert get_loss_info("cosine").defaults["xent_weight"] == 0.0
    assert "0.1" in get_loss_info("cosine").defaults_source


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown loss 'focal'; known losses: l1, l2, hinge"):
        create_loss("focal")


def test_register_decorator_and_duplicates():
    @register_loss("test_only_zero", paper="Nobody, 'Nothing', 2024", input="logits", defaults_source="none")
    class Zero(nn.Module):
        def forward(self, logits, target):
            return logits.sum() * 0

    try:
        assert "test_only_zero" in list_losses()
        assert isinstance(create_loss("test_only_zero"), Zero)
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_only_zero", paper="x 2024", input="logits", defaults_source="none")(Zero)
        with pytest.raises(ValueError, match="input must be one of"):
            register_loss("other", paper="x 2024", input="images", defaults_source="none")
    finally:
        del _REGISTRY["test_only_zero"]


# ---------------------------------------------------------------- head
@pytest.mark.parametrize("name", ALL)
def test_head_trains_with_every_loss_through_one_convention(name):
    torch.manual_seed(0)
    # Three well separated clusters: any sensible loss learns them in a few dozen steps.
    centres = 4 * torch.randn(C, D)
    target = torch.arange(200) % C
    features = centres[target] + torch.randn(200, D)
    teacher = MarginAwareHead(D, C, "cross_entropy")
    teacher_logits = 5 * nn.functional.one_hot(target, C).float()
    head = MarginAwareHead(D, C, name, **loss_kwargs(name))
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(60):
        out = head(features, target, teacher_logits=teacher_logits)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    head.eval()
    logits = head(features).logits
    assert logits.shape == (200, C)
    assert (logits.argmax(1) == target).float().mean() > 0.95
    assert teacher(features).loss is None


@pytest.mark.parametrize("name", ALL)
def test_prediction_logits_are_margin_free(name):
    head = MarginAwareHead(D, C, name, **loss_kwargs(name)).double()
    x = torch.randn(6, D, dtype=torch.float64)
    logits = head(x).logits
    w = head.weight
    if name in ("am_softmax", "arcface"):
        expected = head.criterion.scale * nn.functional.normalize(x, dim=1) @ nn.functional.normalize(w, dim=1).t()
        assert head.bias is None
    elif name == "l_softmax":
        expected = x @ w.t()
        assert head.bias is None
    else:
        expected = x @ w.t() + head.bias
    torch.testing.assert_close(logits, expected)
    # With a target the same margin-free logits come back, next to the loss.
    out = head(x, torch.arange(6) % C, teacher_logits=torch.randn(6, C, dtype=torch.float64))
    torch.testing.assert_close(out.logits.detach(), expected.detach())


def test_head_shapes_itself_to_the_loss():
    assert MarginAwareHead(8, 3, "cosine", xent_weight=0.1).xent is not None
    assert MarginAwareHead(8, 3, "cosine").xent is None
    assert MarginAwareHead(8, 3, lossbank.AMSoftmax(scale=10)).criterion.scale == 10


def test_head_bad_input():
    with pytest.raises(ValueError, match=r"num_classes=4 but the loss WeightedCrossEntropy is set up for 3 classes"):
        MarginAwareHead(8, 4, "weighted_cross_entropy", class_counts=[1, 2, 3])
    with pytest.raises(ValueError, match=r"num_classes=4 but the loss CrossEntropy is set up for 2 classes"):
        MarginAwareHead(8, 4, lossbank.CrossEntropy(weight=torch.ones(2)))
    with pytest.raises(ValueError, match="in_features must be an integer >= 1"):
        MarginAwareHead(0, 4)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        MarginAwareHead(8, 1)
    with pytest.raises(ValueError, match="loss_kwargs"):
        MarginAwareHead(8, 4, lossbank.AMSoftmax(), scale=3)
    with pytest.raises(ValueError, match="unknown loss"):
        MarginAwareHead(8, 4, "softmax")
    head = MarginAwareHead(8, 4, "am_softmax")
    with pytest.raises(ValueError, match=r"features must have shape \(batch, 8\) for this head"):
        head(torch.randn(2, 9))
    with pytest.raises(ValueError, match="teacher_logits is required for the distillation loss"):
        MarginAwareHead(8, 4, "distillation")(torch.randn(2, 8), torch.tensor([0, 1]))


def test_head_on_resnet50_pooled_features():
    torchvision = pytest.importorskip("torchvision")
    backbone = torchvision.models.resnet50(weights=None)
    backbone.fc = nn.Identity()  # pooled 2048-d features
    head = MarginAwareHead(2048, 3, "am_softmax")
    model = nn.Sequential(backbone, head).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone(images)
        out = head(features, torch.tensor([0, 2]))
    assert features.shape == (2, 2048)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    assert isinstance(model[1], MarginAwareHead)
