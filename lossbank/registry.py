"""The loss registry: ``register_loss`` (a class decorator), ``create_loss``, ``list_losses``."""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field

from torch import nn

__all__ = ["LossInfo", "register_loss", "create_loss", "list_losses", "get_loss_info"]

INPUTS = ("logits", "features")


@dataclass(frozen=True)
class LossInfo:
    """What the registry knows of a loss.

    ``input`` is 'logits' (the loss takes a linear layer's outputs) or 'features'
    (a margin loss: it takes the features and the class weight matrix itself).
    """

    name: str
    cls: type
    paper: str
    input: str
    defaults: dict = field(default_factory=dict)
    defaults_source: str = ""
    needs_teacher: bool = False
    needs_class_counts: bool = False


_REGISTRY: dict[str, LossInfo] = {}


def register_loss(
    name: str,
    *,
    paper: str,
    input: str,
    defaults_source: str,
    needs_teacher: bool = False,
    needs_class_counts: bool = False,
):
    """Class decorator that adds a loss module to the registry under ``name``.

    The defaults recorded are the keyword defaults of the class's ``__init__``.
    """
    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}; got {input!r}")

    def decorate(cls):
        if name in _REGISTRY:
            raise ValueError(f"a loss named {name!r} is already registered ({_REGISTRY[name].cls.__qualname__})")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_loss expects an nn.Module subclass; got {cls!r}")
        defaults = {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        _REGISTRY[name] = LossInfo(
            name=name,
            cls=cls,
            paper=paper,
            input=input,
            defaults=defaults,
            defaults_source=defaults_source,
            needs_teacher=needs_teacher,
            needs_class_counts=needs_class_counts,
        )
        cls.registry_name = name
        cls.input = input
        cls.needs_teacher = needs_teacher
        return cls

    return decorate


def list_losses(pattern: str | None = None) -> list[str]:
    """Registered names in registration order, optionally filtered by a shell-style pattern."""
    names = list(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_loss_info(name: str) -> LossInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(_REGISTRY)}") from None


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build the registered loss ``name`` with its defaults, overridden by ``kwargs``.

    >>> create_loss("am_softmax", margin=0.2)
    AMSoftmax(scale=30.0, margin=0.2)
    """
    cls = get_loss_info(name).cls
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # after self
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        valid = [p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise ValueError(
                f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for loss {name!r}; "
                f"valid arguments: {', '.join(valid)}"
            )
    return cls(**kwargs)
