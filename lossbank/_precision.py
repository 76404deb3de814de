"""Every loss computes in float32 at least: half-precision inputs are upcast and autocast is off inside.

Margins such as cos(mθ) or cos θ − 0.35 lose their meaning at the 8 bits of mantissa of
bfloat16, so the loss functions are wrapped in :func:`full_precision`.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is float16/bfloat16, else unchanged."""
    return x.float() if x.dtype in HALF else x


def _any_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def full_precision(fn):
    """Run ``fn`` with autocast off and every half-precision tensor argument upcast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Fast path (the usual float32 call, no autocast): entering autocast contexts costs
        # more than a small loss itself.
        if not _any_autocast() and not any(isinstance(a, Tensor) and a.dtype in HALF for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        args = [upcast(a) if isinstance(a, Tensor) else a for a in args]
        kwargs = {k: upcast(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
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
