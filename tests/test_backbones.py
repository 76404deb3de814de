"""Backbone registry, weights (ImageNet, none, file), offline errors, hashes, unfreezing."""

import copy
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluation import backbones
from evaluation.backbones import (
    BACKBONES,
    SPECS,
    BackboneError,
    PipWeights,
    TorchvisionWeights,
    check_backbone_available,
    create_backbone,
    list_backbones,
    torchvision_cache_file,
)

TORCHVISION = tuple(name for name, spec in SPECS.items() if isinstance(spec.weights, TorchvisionWeights))


def data_root() -> Path:
    return Path(os.environ.get("LOSSBANK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def random_init():
    """Backbones with weights="none", built once per name (building ResNet-50 takes seconds)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = create_backbone(name, "none")
        return built[name]

    return get


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and a network that refuses every download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def refuse(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return calls


def test_registry_lists_the_backbones_of_the_spec_table():
    assert list_backbones() == list(BACKBONES) == list(SPECS)
    assert {"resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2",
            "efficientnet_b0"} <= set(BACKBONES)
    assert [SPECS[f"efficientnet_lite{i}"].input_size for i in range(3)] == [224, 240, 260]
    assert isinstance(SPECS[backbones.OFFLINE_BACKBONE].weights, PipWeights)


def last_prefixes(name):
    return tuple(stage + "." for stage in SPECS[name].last_stages)


@pytest.mark.parametrize("name", BACKBONES)
def test_spec_is_complete_and_consistent(name, random_init):
    """What the table says of each backbone holds for its network and its weights source."""
    spec = SPECS[name]
    assert spec.input_size > 0 and len(spec.mean) == len(spec.std) == 3 and all(0 < s for s in spec.std)
    full = spec.build()
    head = [m for m in full.get_submodule(spec.head).modules() if isinstance(m, nn.Linear)]
    assert head and head[-1].in_features == spec.num_features
    model = random_init(name).model
    assert not any(key.startswith(spec.head + ".") for key in model.state_dict())  # the classifier is gone
    # Trunk and last stages are submodules that share nothing and hold every parameter between them.
    parts = [{id(p) for m in names for p in model.get_submodule(m).parameters()}
             for names in (spec.trunk, spec.last_stages)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == {id(p) for p in model.parameters()}
    if isinstance(spec.weights, TorchvisionWeights):
        assert torchvision_cache_file(name).suffix == ".pth"  # the enum resolves, offline
    else:  # a pip package works offline: its weights must load, every tensor, into the network
        full.load_state_dict(backbones.imagenet_state_dict(name), strict=True)


def test_unknown_backbone_names_the_known_ones():
    for call in (create_backbone, check_backbone_available):
        with pytest.raises(ValueError) as info:
            call("resnet18")
        for name in BACKBONES:
            assert name in str(info.value)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_weights_offline_fail_with_clear_message(name, offline):
    expected = torchvision_cache_file(name)
    assert str(expected).startswith(os.environ["TORCH_HOME"])
    for call in (check_backbone_available, create_backbone):
        with pytest.raises(BackboneError) as info:
            call(name, "imagenet")
        message = str(info.value)
        assert str(expected) in message
        assert "--weights PATH" in message
        assert "--backbone efficientnet_lite0" in message
        assert "URLError" in message
    assert len(offline) == 2  # one download attempt per call, no retries
    assert not expected.exists()


def test_torchvision_weights_come_from_the_cache_or_a_download(monkeypatch, tmp_path, random_init):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    published = random_init("mobilenet_v2")
    # Stand-in for the published file: same architecture, other values, classifier included.
    reference = SPECS["mobilenet_v2"].build()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01)
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    check_backbone_available("mobilenet_v2")
    assert torchvision_cache_file("mobilenet_v2").is_file()
    backbone = create_backbone("mobilenet_v2")  # now from the cache: no second download
    assert len(downloads) == 1
    url, prefix = downloads[0]
    assert url.endswith(torchvision_cache_file("mobilenet_v2").name) and prefix and prefix in url
    assert backbone.weights == "imagenet"
    assert backbone.weights_hash != published.weights_hash
    got = backbone.model.state_dict()
    for key, tensor in reference.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("name", BACKBONES)
def test_random_init_builds_with_the_right_width(name, random_init):
    backbone = random_init(name)
    assert backbone.name == name and backbone.weights == "none"
    spec = SPECS[name]
    assert backbone.num_features == spec.num_features and backbone.input_size == spec.input_size
    assert (backbone.mean, backbone.std) == (spec.mean, spec.std)
    with torch.no_grad():
        out = backbone.model(torch.randn(2, 3, spec.input_size, spec.input_size))
    assert out.shape == (2, spec.num_features)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_random_init_is_one_fixed_initialisation(name, random_init):
    torch.manual_seed(123)  # the global seed must not matter
    again = create_backbone(name, "none")
    assert again.weights_hash == random_init(name).weights_hash
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), random_init(name).model.parameters()))


def test_lite0_imagenet_loads_offline_with_its_preprocessing(lite0, random_init, offline):
    check_backbone_available("efficientnet_lite0")
    assert lite0.num_features == 1280 and lite0.weights == "imagenet"
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    assert lite0.weights_hash != random_init("efficientnet_lite0").weights_hash
    create_backbone("efficientnet_lite0")
    assert offline == []  # never touched the network


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_package_weights_classify_real_fruit(name):
    """The order-mapped weights are ImageNet's: a real banana and orange come out as such, at each one's size."""
    import timm
    from PIL import Image

    folder = data_root() / "fruits" / "test_zip" / "test"
    model = timm.create_model(f"tf_{name}", pretrained=False).eval()
    model.load_state_dict(backbones.imagenet_state_dict(name))
    size = SPECS[name].input_size
    imagenet_class = {"banana": 954, "orange": 950}
    hits = 0
    for fruit, index in imagenet_class.items():
        paths = sorted(folder.glob(f"{fruit}_*.jpg"))[:6]
        assert len(paths) == 6, f"fruits test images missing under {folder}"
        images = torch.stack([
            torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((size, size)))).permute(2, 0, 1)
            for p in paths
        ])
        with torch.no_grad():
            top5 = model((images.float() / 255 - 0.5) / 0.5).topk(5, dim=1).indices
        hits += (top5 == index).any(dim=1).sum().item()
    assert hits >= 10  # of 12; measured 12 (banana top-1 on 5 of 6, orange on all)


def test_weights_hash_follows_the_weights(lite0, tmp_path):
    path = tmp_path / "lite0.pt"
    torch.save(lite0.model.state_dict(), path)  # no classifier: the backbone's own state_dict
    from_file = create_backbone("efficientnet_lite0", str(path))
    assert from_file.weights == str(path)
    assert from_file.weights_hash == lite0.weights_hash

    changed = {k: v.clone() for k, v in lite0.model.state_dict().items()}
    changed["conv_stem.weight"][0, 0, 0, 0] += 1e-3
    torch.save({"state_dict": changed}, path)  # checkpoint-style wrapper is accepted
    assert create_backbone("efficientnet_lite0", str(path)).weights_hash != lite0.weights_hash


def test_lite0_accepts_the_package_key_names_from_a_file(lite0, tmp_path):
    source = torch.load(backbones.weights_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert next(iter(source)).startswith("_")  # the original EfficientNet names, not timm's
    path = tmp_path / "package_copy.pth"
    torch.save(source, path)
    assert create_backbone("efficientnet_lite0", str(path)).weights_hash == lite0.weights_hash


def test_map_by_order_rejects_mismatched_shapes():
    target = {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(4)}
    assert list(backbones.map_by_order({"x": torch.ones(3, 2), "y": torch.ones(4)}, target, "t")) == list(target)
    with pytest.raises(BackboneError, match=r"'y'.*\(5,\).*'b.weight'.*\(4,\)"):
        backbones.map_by_order({"x": torch.ones(3, 2), "y": torch.ones(5)}, target, "t")
    with pytest.raises(BackboneError, match="1 tensors, but the model has 2"):
        backbones.map_by_order({"x": torch.ones(3, 2)}, target, "t")


def test_bad_weights_files_are_named(tmp_path):
    missing = tmp_path / "nope.pt"
    for call in (check_backbone_available, create_backbone):
        with pytest.raises(BackboneError, match="nope.pt"):
            call("efficientnet_lite0", str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match="garbage.pt"):
        create_backbone("efficientnet_lite0", str(garbage))
    wrong = tmp_path / "mobilenet.pt"
    torch.save(SPECS["mobilenet_v2"].build().state_dict(), wrong)
    with pytest.raises(BackboneError, match=r"mobilenet.pt: 314 tensors, but the model has 294"):
        create_backbone("efficientnet_lite0", str(wrong))  # foreign names: paired by order, and refused
    lite0_file = tmp_path / "lite0.pt"
    torch.save(SPECS["efficientnet_lite0"].build().state_dict(), lite0_file)
    with pytest.raises(BackboneError, match=r"lite0.pt does not fit backbone 'mobilenet_v2'.*missing"):
        create_backbone("mobilenet_v2", str(lite0_file))


@pytest.mark.parametrize("name", BACKBONES)
def test_unfreeze_last_trains_only_the_last_stages(name, random_init):
    backbone = copy.deepcopy(random_init(name))
    model = backbone.model
    trainable = backbone.unfreeze("last")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in dict(model.named_parameters()) if n.startswith(last_prefixes(name))}
    assert len(trainable) == len(names) and 0 < len(names) < len(list(model.parameters()))

    backbone.train_mode()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    live = [m for n, m in bns.items() if (n + ".").startswith(last_prefixes(name))]
    # The trained stages are in train mode, but every BatchNorm keeps its running statistics...
    assert any(m.training for n, m in model.named_modules() if n and (n + ".").startswith(last_prefixes(name)))
    assert live and not any(m.training for m in bns.values())
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(m.running_mean, before[n]) for n, m in bns.items())
    # ...while the trained stages' BatchNorm scale and shift still learn.
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in live)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(last_prefixes(name)))


@pytest.mark.parametrize("name", BACKBONES)
def test_split_into_trunk_and_tail_reproduces_the_model(name, random_init):
    backbone = random_init(name)
    trunk, tail = backbone.split()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tail(trunk(x)), backbone.model.eval()(x), rtol=1e-5, atol=1e-5)
    # The tail holds exactly the stages unfreeze("last") trains, the trunk everything else.
    tail_params = {id(p) for p in tail.parameters()}
    last = {id(p) for n, p in backbone.model.named_parameters() if n.startswith(last_prefixes(name))}
    assert tail_params == last
    assert len(tail_params) + len(list(trunk.parameters())) == len(list(backbone.model.parameters()))


def test_unfreeze_all_and_none(random_init):
    backbone = copy.deepcopy(random_init("efficientnet_lite0"))
    every = list(backbone.model.parameters())
    assert len(backbone.unfreeze("all")) == len(every)
    backbone.train_mode()
    modules = list(backbone.model.modules())
    assert all(m.training for m in modules if isinstance(m, nn.Conv2d))
    assert not any(m.training for m in modules if isinstance(m, nn.BatchNorm2d))
    assert backbone.unfreeze("none") == []
    backbone.train_mode()
    assert not any(m.training for m in backbone.model.modules())
    with pytest.raises(ValueError, match="'none', 'last' or 'all'"):
        backbone.unfreeze("first")


def test_lazy_backbone_remembers_the_hash_and_builds_only_when_used(lite0, tmp_path):
    memo = tmp_path / "hashes.json"
    first = backbones.LazyBackbone("efficientnet_lite0", memo=memo)
    assert first.built and first.weights_hash == lite0.weights_hash  # nothing remembered yet: built to hash it
    again = backbones.LazyBackbone("efficientnet_lite0", memo=memo)
    assert not again.built and again.weights_hash == lite0.weights_hash and again.num_features == 1280
    assert again.model is not None and again.built  # any other attribute builds the real network
