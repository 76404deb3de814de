"""The run configuration: every setting of ``python -m evaluation.run`` and its default, once.

``RunConfig`` is a dataclass whose fields are the command-line options (``--batch-size``
is ``batch_size``); the parser is built from it, so a default, a help text or a choice lives
here only. A YAML file passed with ``--config FILE`` sets fields by the same names (``-`` or
``_``), command-line flags override it, and ``resolved()`` fills in what depends on the
machine or on other settings (epochs per mode, the device, the precision, the plots folder).
Each command keeps its resolved configuration beside the runs it trained
(``OUT/runs/<dataset>/<backbone>-<mode>/config.yaml``), and ``--config`` that file reruns it.

>>> config = RunConfig(dataset="fruits", mode="finetune").resolved()
>>> config.epochs, config.batch_size
(8, 32)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from lossbank import list_losses

from . import backbones as bb
from . import data
from . import features as feats

# Epochs per mode: the frozen head converges in about 20 epochs on these datasets, while
# fine-tuning the last stages costs a full trunk pass per image and overfits after about 8.
EPOCHS = {"frozen": 30, "finetune": 8}
# Images are decoded once at 256 px (the ImageNet recipe's resize before a 224 crop), or at the input size if larger.
DECODE_SIZE = 256
# AdamW learning rates per loss where the shared default does not suit it. The cosine loss
# saturates on small logits and wants larger steps; the bounded probability losses (L1, L2)
# have small gradients far from the target. Starting points, not the result of a search.
DEFAULT_LR = 1e-3
LOSS_LR = {"cosine": 1e-2, "l1": 3e-3, "l2": 3e-3}
# AdamW's first step is 10x the learning rate; beyond this every run diverges at once (and near
# 3e37 the step overflows float32), so a larger value is a typo.
MAX_LR = 10.0
# What --search tries, the same number of trials for every loss: the learning rate (log-uniform) and each
# loss's own parameters, (low, high, "log" | "linear" | "int"), around the papers' defaults.
SEARCH_LR = (1e-4, 3e-2)
SEARCH_SPACE = {
    "hinge": {"margin": (0.1, 2.0, "linear")},
    "cross_entropy": {"label_smoothing": (0.0, 0.2, "linear")},
    "weighted_cross_entropy": {"label_smoothing": (0.0, 0.2, "linear")},
    "l_softmax": {"margin": (1, 4, "int")},
    "am_softmax": {"scale": (8.0, 64.0, "log"), "margin": (0.1, 0.5, "linear")},
    "arcface": {"scale": (8.0, 64.0, "log"), "margin": (0.1, 0.6, "linear")},
    "cosine": {"xent_weight": (0.0, 0.5, "linear")},
    "distillation": {"temperature": (1.0, 8.0, "log"), "alpha": (0.1, 0.9, "linear")},
}
DEVICES = ("auto", "cpu", "cuda")
MODES = ("frozen", "finetune")
PROTOCOLS = ("split", "cv")
# Held-out share of each training set for choosing the epoch: none under "split" (the published
# comparison's recipe: early stopping on its valid set), a fifth under "cv".
INNER_VALID = {"split": 0.0, "cv": 0.2}


class ConfigError(ValueError):
    """A setting is wrong; the message names the option (as on the command line) and what to do."""


def _option(help: str, group: str, *, metavar: str | None = None, choices=None, shown_default: str | None = None):
    return {"help": help, "group": group, "metavar": metavar, "choices": choices, "shown_default": shown_default}


@dataclass
class RunConfig:
    # data
    dataset: str | None = field(default=None, metadata=_option(
        "a named dataset, or all three", "data", choices=(*data.DATASETS, "all")))
    data_dir: Path | None = field(default=None, metadata=_option(
        "your own images: train/<class>/* and valid|val|test/<class>/*, or <class>/*", "data"))
    data_root: str | None = field(default=None, metadata=_option(
        "folder holding weather/, fruits/, covid/", "data", shown_default="$LOSSBANK_DATA, else ~/.cache/lossbank/datasets"))
    drop_duplicates: bool = field(default=False, metadata=_option(
        "drop byte-identical train images and valid images leaked from train", "data"))
    train_fraction: list[float] = field(default_factory=lambda: [1.0], metadata=_option(
        "stratified subsample of train, e.g. 1.0,0.5,0.25,0.1", "data", metavar="F[,F...]"))
    protocol: str = field(default="split", metadata=_option(
        "split: train on the archive's train split, score on its valid split, one run per seed (the published "
        "comparison); cv: pool the labelled images and deal repeated stratified K-fold splits, the same for "
        "every loss (the protocol for verdicts)", "data", choices=PROTOCOLS))
    folds: int = field(default=5, metadata=_option("cv: K of the K-fold splits", "data"))
    repeats: int = field(default=2, metadata=_option(
        "cv: how many times the K folds are dealt anew (repeat r also draws the augmented views with seed r)", "data"))
    inner_valid: float | None = field(default=None, metadata=_option(
        "share of each training set held out to choose the epoch (early stopping) and, with --search, the "
        "learning rate and loss parameters; never the images a run is scored on. 0 = early stopping on the "
        "scored images, as the published comparison (optimistic)", "data",
        shown_default=", ".join(f"{v:g} {k}" for k, v in INNER_VALID.items())))
    # model
    backbone: str = field(default="resnet50", metadata=_option(f"one of {', '.join(bb.BACKBONES)}", "model"))
    weights: str = field(default="imagenet", metadata=_option(
        "imagenet, none (random init) or a state_dict file", "model"))
    mode: str = field(default="frozen", metadata=_option(
        "frozen: train the head on cached features; finetune: train backbone stages too", "model", choices=MODES))
    unfreeze: str = field(default="last", metadata=_option(
        "finetune: which backbone stages train", "model", choices=("last", "all")))
    hidden: int = field(default=256, metadata=_option(
        "width of an MLP layer (linear, batch norm, ReLU) before the head; 0 = none", "model"))
    dropout: float = field(default=0.2, metadata=_option("dropout on the features", "model"))
    # training
    losses: list[str] | None = field(default=None, metadata=_option(
        "which losses to train", "training", metavar="NAME[,NAME...]", shown_default="all registered"))
    teacher: str = field(default="cross_entropy", metadata=_option(
        "loss whose model of the same run teaches distillation", "training"))
    teacher_backbone: str | None = field(default=None, metadata=_option(
        "distil from the cross-entropy run of this other backbone (trained first, or reused from --out) instead "
        "of the same run's --teacher", "training", metavar="NAME", shown_default="none"))
    teacher_mode: str | None = field(default=None, metadata=_option(
        "--teacher-backbone's mode", "training", choices=MODES, shown_default="--mode"))
    teacher_image_size: int | None = field(default=None, metadata=_option(
        "--teacher-backbone's input size", "training", shown_default="that backbone's own"))
    loss_args: str = field(default="", metadata=_option(
        "arguments of the losses, e.g. 'am_softmax:margin=0.2,scale=16;arcface:margin=0.3' (checked against "
        "each loss's signature; part of a run's identity)", "training", metavar="LOSS:K=V[,K=V][;...]",
        shown_default="each loss's own defaults"))
    search: int = field(default=0, metadata=_option(
        "trials of an equal-budget Optuna search (seeded TPE) per loss and run: learning rate and the loss's own "
        "parameters, scored on the inner validation part; 0 = off", "training"))
    search_storage: str | None = field(default=None, metadata=_option(
        "Optuna storage URL shared by several machines", "training", shown_default="sqlite:///OUT/search.db"))
    baseline: str = field(default="cross_entropy", metadata=_option(
        "the loss every other is compared with (paired tests)", "training"))
    epochs: int | None = field(default=None, metadata=_option(
        "epochs of AdamW with a cosine schedule", "training",
        shown_default=", ".join(f"{n} {mode}" for mode, n in EPOCHS.items())))
    batch_size: int = field(default=32, metadata=_option("global batch (split between torchrun processes)", "training"))
    lr: float | None = field(default=None, metadata=_option(
        "AdamW learning rate for every loss", "training",
        shown_default=f"{DEFAULT_LR:g}, " + ", ".join(f"{k} {v:g}" for k, v in LOSS_LR.items())))
    weight_decay: float = field(default=1e-4, metadata=_option("AdamW weight decay", "training"))
    patience: int = field(default=10, metadata=_option(
        "stop after this many epochs without a lower valid loss; 0 = off", "training"))
    seeds: list[int] = field(default_factory=lambda: [0], metadata=_option(
        "one run per seed", "training", metavar="S[,S...]"))
    views: int = field(default=5, metadata=_option(
        "augmented views per train image in the cache (frozen, and finetune of the last stages)", "training"))
    image_size: int | None = field(default=None, metadata=_option(
        "network input size", "training", shown_default="the backbone's own (224; Lite1 240, Lite2 260)"))
    decode_size: int | None = field(default=None, metadata=_option(
        "images are decoded once to this square size", "training", shown_default="max(256, --image-size)"))
    precision: str = field(default="auto", metadata=_option(
        "auto: bf16 autocast where the device has native bf16 (CUDA, AVX-512-BF16/AMX CPUs), else fp32; "
        "channels_last either way. fp64: train in float64 on fp32 features, slow: for checking numerics",
        "training", choices=(*feats.PRECISIONS, "fp64")))
    # run
    device: str = field(default="auto", metadata=_option("auto (CUDA when available), cpu, cuda or cuda:N", "run"))
    out: Path = field(default=Path("out"), metadata=_option(
        "results folder (results/ holds what RESULTS.md is built from, and only evaluation.results writes there)", "run"))
    plots: Path | None = field(default=None, metadata=_option("plots folder", "run", shown_default="OUT/plots"))
    cache_dir: Path = field(default=Path("~/.cache/lossbank/features"), metadata=_option("feature cache", "run"))
    save_model: bool = field(default=False, metadata=_option(
        "also write each finished run's model, for python -m evaluation.predict (not part of a run's identity: a "
        "finished run without its model is trained again)", "run"))
    workers: int = field(default=2, metadata=_option("processes decoding images", "run"))
    no_progress: bool = field(default=False, metadata=_option("no progress bars", "run"))
    shard: str = field(default="0/1", metadata=_option(
        "run only the I-th of N disjoint slices of the requested grid (one job per machine, a shared --out); "
        "slices are whole (dataset, fraction, seed) groups", "run", metavar="I/N"))

    # ------------------------------------------------------------ building
    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: dict, where: str) -> "RunConfig":
        """A config from ``{field or option name: value}`` (a YAML file's contents), with each value checked for type."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a mapping of settings (e.g. 'dataset: fruits'); got {type(values).__name__}")
        known = {f.name: f for f in cls.fields()}
        settings = {}
        for key, value in values.items():
            name = str(key).lstrip("-").replace("-", "_")
            if name not in known:
                raise ConfigError(f"{where}: unknown setting {key!r}; the settings are {', '.join(known)}")
            settings[name] = _coerce(known[name], value, f"{where}: {key}")
        return cls(**settings)

    @classmethod
    def load(cls, path) -> "RunConfig":
        path = Path(path).expanduser()
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
        return cls.from_mapping(values or {}, f"--config {path}")

    def to_yaml(self) -> str:
        values = {f.name: _plain(getattr(self, f.name)) for f in self.fields()}
        return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)

    # ------------------------------------------------------------ checking and resolving
    def resolved(self) -> "RunConfig":
        """This config checked (ConfigError naming the option), with every machine- or mode-dependent default filled in."""
        c = dataclasses.replace(self)
        if (c.dataset is None) == (c.data_dir is None):
            raise ConfigError("give one of --dataset or --data-dir (on the command line or in --config)")
        known = list_losses()
        c.losses = list(c.losses or known)
        unknown = [n for n in c.losses if n not in known]
        if unknown:
            raise ConfigError(f"--losses: unknown loss {', '.join(unknown)}; known losses: {', '.join(known)}")
        if c.teacher not in known:
            raise ConfigError(f"--teacher: unknown loss {c.teacher!r}; known losses: {', '.join(known)}")
        if c.teacher == "distillation":
            raise ConfigError("--teacher: distillation cannot teach itself; name another loss, e.g. cross_entropy")
        if c.backbone not in bb.BACKBONES:
            raise ConfigError(f"--backbone: unknown backbone {c.backbone!r}; known: {', '.join(bb.BACKBONES)}")
        for f in self.fields():
            choices = f.metadata["choices"]
            if choices and getattr(c, f.name) is not None and getattr(c, f.name) not in choices:
                raise ConfigError(f"{_flag(f.name)}: invalid choice {getattr(c, f.name)!r} (choose from "
                                  f"{', '.join(map(repr, choices))})")
        bad = [f for f in c.train_fraction if not (0 < f <= 1)]
        if bad:
            raise ConfigError(f"--train-fraction must be in (0, 1], e.g. 0.25; got {', '.join(map(str, bad))}")
        if len(set(c.seeds)) != len(c.seeds):
            raise ConfigError("--seeds must not repeat a value")
        named: dict[str, list[float]] = {}
        for f in c.train_fraction:
            named.setdefault(f"{f:g}", []).append(f)  # a record's name keeps 6 significant digits
        same = [vs for vs in named.values() if len(vs) > 1]
        if same:
            raise ConfigError(f"--train-fraction {' and '.join(map(str, same[0]))} are the same run (fractions are kept "
                              f"to 6 significant digits); give each fraction once")
        c.epochs = EPOCHS[c.mode] if c.epochs is None else c.epochs
        c.inner_valid = INNER_VALID[c.protocol] if c.inner_valid is None else c.inner_valid
        if not (0 <= c.inner_valid < 1):
            raise ConfigError(f"--inner-valid must be in [0, 1); got {c.inner_valid}")
        if c.search and not c.inner_valid:
            raise ConfigError("--search scores its trials on the inner validation part: give --inner-valid > 0")
        if c.protocol == "cv":
            if c.folds < 2:
                raise ConfigError(f"--folds must be at least 2; got {c.folds}")
            if c.repeats < 1:
                raise ConfigError(f"--repeats must be at least 1; got {c.repeats}")
            if c.seeds != [0]:
                raise ConfigError("--seeds is for --protocol split; under cv, repeat r draws its folds, views and "
                                  "initialisation with seed r: use --repeats")
        if c.search < 0:
            raise ConfigError(f"--search must be >= 0; got {c.search}")
        if c.baseline not in known:
            raise ConfigError(f"--baseline: unknown loss {c.baseline!r}; known losses: {', '.join(known)}")
        parse_loss_args(c.loss_args)
        if c.hidden < 0:
            raise ConfigError(f"--hidden must be >= 0; got {c.hidden}")
        if c.teacher_backbone is not None:
            if c.teacher_backbone not in bb.BACKBONES:
                raise ConfigError(f"--teacher-backbone: unknown backbone {c.teacher_backbone!r}; known: "
                                  f"{', '.join(bb.BACKBONES)}")
            if "distillation" not in c.losses:
                raise ConfigError("--teacher-backbone teaches the distillation loss: add distillation to --losses")
            c.teacher_mode = c.teacher_mode or c.mode
            if "finetune" in (c.mode, c.teacher_mode) and c.unfreeze == "all":
                raise ConfigError("--teacher-backbone needs --unfreeze last: with all stages trained, each epoch draws "
                                  "new crops on the fly, which another backbone's logits cannot be computed for ahead")
            if c.teacher_image_size is not None and c.teacher_image_size < 1:
                raise ConfigError(f"--teacher-image-size must be at least 1; got {c.teacher_image_size}")
            c.teacher_image_size = c.teacher_image_size or bb.SPECS[c.teacher_backbone].input_size
        elif c.teacher_mode is not None or c.teacher_image_size is not None:
            raise ConfigError("--teacher-mode and --teacher-image-size describe --teacher-backbone: give it too")
        c.image_size = bb.SPECS[c.backbone].input_size if c.image_size is None else c.image_size
        c.decode_size = max(DECODE_SIZE, c.image_size) if c.decode_size is None else c.decode_size
        for name in ("epochs", "batch_size", "views", "image_size", "decode_size", "workers"):
            if getattr(c, name) < 1:
                raise ConfigError(f"{_flag(name)} must be at least 1; got {getattr(c, name)}")
        if c.patience < 0:
            raise ConfigError(f"--patience must be >= 0; got {c.patience}")
        if c.lr is not None and not (0 < c.lr <= MAX_LR):
            raise ConfigError(f"--lr must be a positive number up to {MAX_LR:g}; got {c.lr}")
        if not (0 <= c.dropout < 1):
            raise ConfigError(f"--dropout must be in [0, 1); got {c.dropout}")
        if not (math.isfinite(c.weight_decay) and c.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be a number >= 0; got {c.weight_decay}")
        if c.decode_size < c.image_size:
            raise ConfigError(f"--decode-size ({c.decode_size}) must be at least --image-size ({c.image_size})")
        c.device = _resolve_device(c.device)
        if c.weights not in ("imagenet", "none") and not Path(c.weights).expanduser().is_file():
            raise ConfigError(f"--weights: no file at {c.weights}; give imagenet, none or the path of a state_dict file")
        # argparse and YAML leave "~" alone (and the shell does too in --out=~/x): expand every path here.
        for name in ("out", "plots", "cache_dir", "data_dir"):
            if getattr(c, name) is not None:
                setattr(c, name, Path(getattr(c, name)).expanduser())
        if c.data_dir is not None and not c.data_dir.is_dir():
            raise ConfigError(f"--data-dir: {c.data_dir} is not a folder")
        if c.precision != "fp64":
            c.precision = feats.resolve_precision(c.precision, c.device)
        c.plots = c.plots or c.out / "plots"
        _parse_shard(c.shard)
        return c

    @property
    def shard_parts(self) -> tuple[int, int]:
        """(I, N) of --shard I/N."""
        return _parse_shard(self.shard)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def distil_label(self) -> str | None:
        """The loss name of the runs distilled from --teacher-backbone: their own runs, beside same-backbone ones."""
        if self.teacher_backbone is None:
            return None
        return f"{DISTIL_FROM}{self.teacher_backbone}-{self.teacher_mode}"

    def teacher_config(self) -> "RunConfig":
        """The settings of --teacher-backbone's cross-entropy runs: the student's, except backbone, mode (and its
        default epochs when the modes differ) and input size. An ordinary run: one made without distillation in
        the same --out is reused."""
        return dataclasses.replace(
            self, backbone=self.teacher_backbone, mode=self.teacher_mode, weights="imagenet", losses=["cross_entropy"],
            epochs=self.epochs if self.teacher_mode == self.mode else EPOCHS[self.teacher_mode],
            image_size=self.teacher_image_size, decode_size=max(DECODE_SIZE, self.teacher_image_size),
            teacher_backbone=None, teacher_mode=None, teacher_image_size=None)

    def lr_for(self, loss: str) -> float:
        loss = trained_loss(loss)
        return self.lr if self.lr is not None else LOSS_LR.get(loss, DEFAULT_LR)

    def units(self) -> list[tuple[int, int | None]]:
        """(seed, fold) of each run per loss and fraction: the seeds under split, (repeat, fold) under cv."""
        if self.protocol == "cv":
            return [(r, f) for r in range(self.repeats) for f in range(self.folds)]
        return [(s, None) for s in self.seeds]

    def loss_kwargs(self, loss: str) -> dict:
        return parse_loss_args(self.loss_args).get(trained_loss(loss), {})


DISTIL_FROM = "distillation-from-"


def trained_loss(name: str) -> str:
    """The lossbank loss a run's loss name trains: "distillation-from-<backbone>-<mode>" trains distillation."""
    return "distillation" if name.startswith(DISTIL_FROM) else name


def parse_loss_args(spec: str) -> dict[str, dict]:
    """'am_softmax:margin=0.2,scale=16;arcface:margin=0.3' -> {loss: {argument: value}}, each value of the type of
    the argument's default; an unknown loss, an unknown argument or a wrong type is a ConfigError naming it."""
    from lossbank import get_loss_info

    parsed: dict[str, dict] = {}
    for part in (p.strip() for p in (spec or "").split(";")):
        if not part:
            continue
        loss, sep, pairs = part.partition(":")
        loss = loss.strip()
        if not sep or not pairs.strip():
            raise ConfigError(f"--loss-args: {part!r} must be LOSS:NAME=VALUE[,NAME=VALUE], e.g. am_softmax:margin=0.2")
        if loss not in list_losses():
            raise ConfigError(f"--loss-args: unknown loss {loss!r}; known losses: {', '.join(list_losses())}")
        # Tensor-valued arguments (class weights, counts) are the harness's to set, not the command line's.
        defaults = {k: v for k, v in get_loss_info(loss).defaults.items() if k != "reduction" and v is not None}
        for pair in pairs.split(","):
            name, eq, text = (t.strip() for t in pair.partition("="))
            if not eq or not name:
                raise ConfigError(f"--loss-args {loss}: {pair.strip()!r} must be NAME=VALUE")
            if name not in defaults:
                raise ConfigError(f"--loss-args {loss}: unknown argument {name!r}; {loss} takes "
                                  f"{', '.join(defaults) or 'no arguments'}")
            default = defaults[name]
            try:
                if isinstance(default, bool):
                    if text.lower() not in ("true", "false"):
                        raise ValueError(text)
                    value = text.lower() == "true"
                elif isinstance(default, (int, float)):
                    value = float(text) if isinstance(default, float) else int(text)
                else:
                    value = text
            except ValueError:
                raise ConfigError(f"--loss-args {loss}: {name} must be {type(default).__name__} like its default "
                                  f"{default!r}; got {text!r}") from None
            parsed.setdefault(loss, {})[name] = value
        info = get_loss_info(loss)
        try:  # the loss's own checks (a margin's range, a variant's name)
            info.cls(**parsed[loss], **({"class_counts": [1, 1]} if info.needs_class_counts else {}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--loss-args {loss}: {exc}") from None
    return parsed


def _resolve_device(device: str) -> str:
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"--device {device!r}: use auto (CUDA when available), cpu, cuda or cuda:N (one GPU)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def _parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in str(shard).split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--shard must be I/N with 0 <= I < N, e.g. 0/2; got {shard!r}") from None
    return index, count


# ---------------------------------------------------------------- types and the command line
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(f: dataclasses.Field):
    """(the scalar type, whether it is a list) of a field's annotation, e.g. list[float] -> (float, True)."""
    inner = typing.get_type_hints(RunConfig)[f.name]
    if typing.get_origin(inner) in (typing.Union, types.UnionType):  # X | None
        inner = next(a for a in typing.get_args(inner) if a is not type(None))
    if typing.get_origin(inner) is list:
        return typing.get_args(inner)[0], True
    return inner, False


def _coerce(f: dataclasses.Field, value, where: str):
    """A YAML value as the field's type: lists from YAML lists or "a,b" strings, numbers from numbers or strings."""
    kind, is_list = _base_type(f)
    if value is None:
        return None
    try:
        if is_list:
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            if not items:
                raise ValueError("empty")
            return [_scalar(kind, v) for v in items]
        return _scalar(kind, value)
    except (TypeError, ValueError):
        what = {int: "whole number", float: "number", bool: "true or false", str: "text", Path: "path"}[kind]
        raise ConfigError(f"{where} must be {'a list of ' if is_list else 'a '}{what}"
                          f"{'s' if is_list else ''}; got {value!r}") from None


def _scalar(kind, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise ValueError(value)
    if kind is Path:
        return Path(str(value))
    return kind(value.strip() if isinstance(value, str) else value)


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _csv(kind, flag):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a comma-separated list of {kind.__name__}s; got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} must not be empty")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per RunConfig field, grouped as the fields are, with the field's default in its help.

    Options default to "not given" (argparse.SUPPRESS), so that only what the command line says
    overrides a --config file.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in RunConfig.fields():
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = meta["shown_default"] or (",".join(map(str, default)) if isinstance(default, list) else default)
        kind, is_list = _base_type(f)
        kwargs = {"default": argparse.SUPPRESS, "dest": f.name}
        if kind is bool:
            group.add_argument(_flag(f.name), action="store_true", help=meta["help"], **kwargs)
            continue
        help_text = meta["help"] + ("" if shown is None else f" (default {shown})")
        kwargs.update(help=help_text, metavar=meta["metavar"], choices=meta["choices"])
        kwargs["type"] = _csv(kind, _flag(f.name)) if is_list else kind
        group.add_argument(_flag(f.name), **kwargs)


def from_command_line(namespace: argparse.Namespace) -> RunConfig:
    """The --config file's settings (if any) overridden by the flags given on the command line."""
    given = dict(vars(namespace))
    path = given.pop("config", None)
    base = RunConfig.load(path) if path else RunConfig()
    if "dataset" in given or "data_dir" in given:  # one names the data: the other from the file no longer applies
        base = dataclasses.replace(base, dataset=None, data_dir=None)
    return dataclasses.replace(base, **given)
