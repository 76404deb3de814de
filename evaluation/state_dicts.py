"""Reading, renaming and hashing the state_dict files that hold a backbone's weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


class BackboneError(Exception):
    """The backbone's weights cannot be had; the message says what to do instead."""


def read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
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


def map_by_order(source: dict, target: dict, what: str) -> dict:
    """Rename `source`'s tensors to `target`'s keys, pairing them in order.

    For networks whose files name the same tensors otherwise, e.g. the original
    EfficientNet names (``_blocks.0._bn1``) where timm says ``blocks.0.0.bn1``.
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


def state_dict_hash(model: nn.Module) -> str:
    """Short sha256 of every tensor (names, dtypes, shapes and values) of `model`."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
