"""A trained run as one self-contained file, and loading it to classify and embed images.

``python -m evaluation.run --save-model`` writes, beside each finished run's record
(``records.saved_model_path``: ``<record>.model.pt``), one ``torch.save`` dict that
``torch.load(path, weights_only=True)`` reads: only tensors, strings, numbers, booleans,
None, lists and dicts, no pickled classes. Format ``"lossbank-model"``, version 1::

    format, version          "lossbank-model", 1 (a reader refuses a newer version)
    backbone                 {name, weights, weights_hash}: weights "imagenet" (rebuilt from the backbone's
                             package or torchvision's file), "none" (its seeded random initialisation) or
                             "included" (a user's weights file: its state_dict is in backbone_state);
                             weights_hash (evaluation.state_dicts.state_dict_hash) is checked on loading
    backbone_state           {name: tensor} with weights "included", else None
    mode, unfreeze           "frozen" | "finetune"; "last" | "all" (None when frozen)
    architecture             {in_features, hidden, dropout, num_classes}: evaluation.train.build_classifier's
    state_dict               what the run trained, as evaluation.train.Classifier's state_dict: frozen, the
                             standardisation, MLP and head; finetune last, also the last stages (backbone.*);
                             finetune all, also the whole backbone
    classes                  class names, in the order of the logits
    preprocessing            {decode_size, image_size, mean, std, eval_view}: an image is decoded to RGB and
                             squashed to decode_size² (evaluation.images), resized to image_size² (antialiased)
                             and normalised with mean and std, as the run's valid images were
    loss                     {name, kwargs, class_counts}: the loss and the arguments it trained with
    precision                "bf16" | "fp32" | "fp64": how the run computed (bf16: the backbone under bf16
                             autocast, and the fine-tuned layers too)
    dataset, run, created    the run's key (dataset, backbone, mode, protocol, loss, seed, fold, fraction), UTC time
    valid                    {top1, top3, macro_f1, images}: the run's final scores on its valid images
    lossbank_version

``load_model(path)`` returns a :class:`SavedModel` that classifies uint8 images at the decode size (what
``SavedModel.decode`` makes of an image file's bytes): probabilities are the softmax of the margin-free
logits. Its embedding is ``Classifier.embed``'s: the L2-normalised feature a margin loss acts on, the
penultimate feature for the other losses.
"""
from __future__ import annotations

import hashlib
import io
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

import lossbank

from . import backbones as bb
from . import features as feats
from .files import write_atomically
from .images import decode_image_bytes
from .state_dicts import BackboneError, state_dict_hash
from .train import Classifier, build_classifier

FORMAT = "lossbank-model"
VERSION = 1
EVAL_VIEW = "whole image squashed to decode_size² (PIL bilinear), resized to image_size² (antialiased), normalised"


class ModelFileError(Exception):
    """A saved model cannot be used; the message names the file and what to do."""


def save_model(path: Path, model: nn.Module, *, backbone, config, key: dict, classes: list[str],
               class_counts: list[int], loss_kwargs: dict, valid: dict) -> None:
    """Write the trained ``model`` (an evaluation.train.Classifier) of the run ``key`` to ``path`` (format above).

    ``backbone`` is the run's untrained backbone (a LazyBackbone is built only for a user's weights file).
    """
    model = getattr(model, "module", model)  # unwrapped from DistributedDataParallel
    included = config.weights not in ("imagenet", "none")
    spec = bb.SPECS[backbone.name]
    contents = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": {"name": backbone.name, "weights": "included" if included else config.weights,
                     "weights_hash": backbone.weights_hash},
        "backbone_state": _cpu(backbone.model.state_dict()) if included else None,
        "mode": config.mode,
        "unfreeze": config.unfreeze if config.mode == "finetune" else None,
        "architecture": {"in_features": spec.num_features, "hidden": config.hidden, "dropout": config.dropout,
                         "num_classes": len(classes)},
        "state_dict": _cpu(model.state_dict()),
        "classes": list(classes),
        "preprocessing": {"decode_size": config.decode_size, "image_size": config.image_size,
                          "mean": list(spec.mean), "std": list(spec.std), "eval_view": EVAL_VIEW},
        "loss": {"name": key["loss"], "kwargs": dict(loss_kwargs), "class_counts": list(class_counts)},
        "precision": config.precision,
        "dataset": key["dataset"],
        "run": dict(key),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "valid": dict(valid),
        "lossbank_version": lossbank.__version__,
    }
    write_atomically(path, lambda tmp: torch.save(contents, tmp))


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


class SavedModel:
    """A saved run, ready to classify: ``predict`` (probabilities), ``embed``, ``predict_and_embed`` (one pass).

    Images go in as uint8 tensors (N, 3, decode_size, decode_size), as ``decode`` returns them (stacked).
    """

    def __init__(self, path: Path, contents: dict, network: bb.Backbone, classifier: Classifier, device: str):
        self.path, self.device = path, device
        self.network, self.classifier = network, classifier
        self.mode, self.precision = contents["mode"], contents["precision"]
        self.classes: list[str] = list(contents["classes"])
        self.image_size: int = int(contents["preprocessing"]["image_size"])
        self.decode_size: int = int(contents["preprocessing"]["decode_size"])
        self.metadata: dict = {k: v for k, v in contents.items() if k not in ("state_dict", "backbone_state")}
        self.metadata["model_hash"] = contents["model_hash"]
        # What runs before the classifier: frozen, the whole backbone (the run's cached features); fine-tuned
        # last stages, the trunk (its cached outputs); fine-tuned everything, nothing (the classifier holds it).
        if self.mode == "frozen":
            self.features = network.model
        elif contents["unfreeze"] == "last":
            self.features = network.split()[0]
        else:
            self.features = None

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, decode_size, decode_size) -> the network's float input (N, 3, image_size, image_size)."""
        if images.dim() == 4 and tuple(images.shape[-2:]) != (self.decode_size, self.decode_size):
            raise ValueError(f"images must be decoded to {self.decode_size}x{self.decode_size} (SavedModel.decode); "
                             f"got {tuple(images.shape)}")
        return feats.normalise(feats.eval_view(images.to(self.device), self.image_size), self.network)

    @torch.no_grad()
    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # As the run computed its valid images: the backbone part as the feature cache does (channels_last,
        # bf16 autocast in bf16), the trained part as evaluation.train.evaluate does.
        device_type = torch.device(self.device).type
        bf16 = self.precision == "bf16"
        x = self.preprocess(images).contiguous(memory_format=torch.channels_last)
        if self.features is not None:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                x = self.features(x).float()
            if self.mode == "finetune":
                x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16 and self.mode == "finetune"):
            logits, embedding = self.classifier.logits_and_embedding(x)
        return logits.float(), embedding.float()

    def predict(self, images: Tensor) -> Tensor:
        """Class probabilities (N, C), the softmax of the margin-free logits; columns in the order of ``classes``."""
        return self.predict_and_embed(images)[0]

    def embed(self, images: Tensor) -> Tensor:
        """The embeddings (N, D) to compare images by (evaluation.train.Classifier.embed)."""
        return self._forward(images)[1]

    def predict_and_embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(probabilities (N, C), embeddings (N, D)) from one pass through the network."""
        logits, embedding = self._forward(images)
        return logits.softmax(dim=1), embedding

    def decode(self, data: bytes, name: str) -> Tensor:
        """An image file's bytes as uint8 (3, decode_size, decode_size), decoded as the run decoded its images;
        evaluation.images.ImageDecodeError (naming ``name``) for what is not a decodable image or is too large."""
        return decode_image_bytes(data, size=self.decode_size, name=name)


def load_model(path, device: str = "cpu") -> SavedModel:
    """The model saved at ``path``; ModelFileError (one line naming the file and what to do) when it cannot be used."""
    path = Path(path).expanduser()
    made_by = "a model written by python -m evaluation.run --save-model"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read model {path} ({exc.strerror or exc}); give the path of {made_by}") from exc
    try:
        contents = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelFileError(f"{path} is not a lossbank model: it does not load as a PyTorch file of plain data "
                             f"({type(exc).__name__}: {reason[:200]}); give {made_by}") from exc
    if not isinstance(contents, dict) or contents.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a lossbank model (no format {FORMAT!r} in it); give {made_by}")
    version = contents.get("version")
    if isinstance(version, int) and version > VERSION:
        raise ModelFileError(f"{path} is a lossbank model of format version {version}, newer than this lossbank "
                             f"({lossbank.__version__}) reads (up to {VERSION}): upgrade lossbank")
    if version != VERSION:
        raise ModelFileError(f"{path} is a damaged lossbank model (format version {version!r}); save the run again")
    contents["model_hash"] = hashlib.sha256(data).hexdigest()
    try:
        network = _network(path, contents)
        classifier = _classifier(contents, network)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path} is a damaged lossbank model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); save the run again") from exc
    network.model.to(device=device, memory_format=torch.channels_last)
    classifier.to(device).eval()
    return SavedModel(path, contents, network, classifier, device)


def _network(path: Path, contents: dict) -> bb.Backbone:
    """The untrained backbone the run started from, checked against the weights hash it recorded."""
    name, weights, want = (contents["backbone"][k] for k in ("name", "weights", "weights_hash"))
    if name not in bb.SPECS:
        raise ModelFileError(f"{path} needs backbone {name!r}, which this lossbank does not know (it knows "
                             f"{', '.join(bb.BACKBONES)}): upgrade lossbank")
    try:
        network = bb.create_backbone(name, "none" if weights == "included" else weights)
    except BackboneError as exc:
        raise ModelFileError(f"{path} needs backbone {name}'s {weights} weights: {exc}") from exc
    if weights == "included":
        network.model.load_state_dict(contents["backbone_state"])
        network.weights_hash = state_dict_hash(network.model)
    if network.weights_hash != want:
        where = (f"the package {bb.SPECS[name].weights.package}" if isinstance(bb.SPECS[name].weights, bb.PipWeights)
                 else "torchvision's weights file")
        raise ModelFileError(f"{path} was trained on {name} {weights} weights with hash {want}, but those here hash to "
                             f"{network.weights_hash}: install the version of {where} it was trained with")
    return network


def _classifier(contents: dict, network: bb.Backbone) -> Classifier:
    arch, loss = contents["architecture"], contents["loss"]
    tail = None
    if contents["mode"] == "finetune":
        tail = network.split()[1] if contents["unfreeze"] == "last" else network.model
    classifier = build_classifier(loss["name"], arch["in_features"], arch["num_classes"], loss["class_counts"],
                                  hidden=arch["hidden"], dropout=arch["dropout"], loss_kwargs=loss["kwargs"],
                                  backbone=tail)
    if contents["precision"] == "fp64":  # trained in float64 on float32 features
        classifier.double()
    classifier.load_state_dict(contents["state_dict"])
    return classifier
