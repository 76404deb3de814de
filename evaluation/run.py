"""Train every loss on a small image dataset and write accuracy tables and loss-curve plots.

The command line it printed reproduces a run. Finished runs are saved as they end, and
rerunning the same command skips them, so a killed process loses at most one run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lossbank import get_loss_info, list_losses

from . import backbones as bb
from . import data
from . import distributed
from . import features as feats
from .files import WriteError, write_atomically, write_json_atomically, write_text_atomically
from .train import TrainConfig, build_classifier, feature_batches, fit, frozen_copy

EXAMPLES = """\
examples:
  # every loss on fruits, frozen EfficientNet-Lite0 features (works offline), one seed
  python -m evaluation.run --dataset fruits --backbone efficientnet_lite0
  # three datasets, five seeds, two losses
  python -m evaluation.run --dataset all --backbone efficientnet_lite0 --losses cross_entropy,am_softmax --seeds 0,1,2,3,4
  # limited data: 10 % and 25 % of train (stratified)
  python -m evaluation.run --dataset covid --backbone efficientnet_lite0 --train-fraction 0.1,0.25
  # fine-tune the last two stages of the backbone
  python -m evaluation.run --dataset weather --backbone efficientnet_lite0 --mode finetune --unfreeze last --epochs 8
  # one fine-tuning run on 4 processes (gloo on CPU, NCCL on GPUs): the same history as one process
  torchrun --standalone --nproc-per-node=4 -m evaluation.run --dataset weather --backbone efficientnet_lite0 --mode finetune
  # your own images: DIR/train/<class>/*, DIR/valid/<class>/*  (or DIR/<class>/* with a seeded 80/20 split)
  python -m evaluation.run --data-dir ~/my_images --backbone efficientnet_lite0
"""

DEFAULT_EPOCHS = {"frozen": 30, "finetune": 8}
DEFAULT_BATCH = {"frozen": 32, "finetune": 32}
DEFAULT_FEATURE_CACHE = Path("~/.cache/lossbank/features")
# Not results/: that folder holds what RESULTS.md is built from, and a user's first run must not overwrite it.
DEFAULT_OUT = Path("out")
DEVICES = ("auto", "cpu", "cuda")
# AdamW's first step is 10x the learning rate; beyond this every run diverges at once (and near
# 3e37 the step overflows float32), so a larger value is a typo.
MAX_LR = 10.0
# Fine-tuning moves pretrained stages with smaller steps than the new head.
BACKBONE_LR_SCALE = 0.1


# ---------------------------------------------------------------- arguments
def _csv(kind, name):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list of {kind.__name__}s; got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"{name} must not be empty")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.run", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("data")
    where = src.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", choices=[*data.DATASETS, "all"], help="a named dataset, or all three")
    where.add_argument("--data-dir", type=Path, help="your own images: train/<class>/* and valid|val|test/<class>/*, or <class>/*")
    src.add_argument("--data-root", help="folder holding weather/, fruits/, covid/ (default: $LOSSBANK_DATA, else ~/.cache/lossbank/datasets)")
    src.add_argument("--drop-duplicates", action="store_true", help="drop byte-identical train images and valid images leaked from train")
    src.add_argument("--train-fraction", type=_csv(float, "--train-fraction"), default=[1.0], metavar="F[,F...]",
                     help="stratified subsample of train, e.g. 1.0,0.5,0.25,0.1 (default 1.0)")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="resnet50", help=f"one of {', '.join(bb.BACKBONES)} (default resnet50)")
    model.add_argument("--weights", default="imagenet", help="imagenet (default), none (random init) or a state_dict file")
    model.add_argument("--mode", choices=["frozen", "finetune"], default="frozen",
                       help="frozen: train the head on cached features (default); finetune: train backbone stages too")
    model.add_argument("--unfreeze", choices=["last", "all"], default="last", help="finetune: which backbone stages train (default last)")
    model.add_argument("--hidden", type=int, default=256,
                       help="width of an MLP layer (linear, batch norm, ReLU) before the head; 0 = none (default 256)")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout on the features (default 0.2)")
    train = p.add_argument_group("training")
    train.add_argument("--losses", type=_csv(str, "--losses"), default=None, metavar="NAME[,NAME...]",
                       help=f"default: all registered ({', '.join(list_losses())})")
    train.add_argument("--teacher", default="cross_entropy", help="loss whose model of the same run teaches distillation (default cross_entropy)")
    train.add_argument("--epochs", type=int, help="default 30 frozen, 8 finetune")
    train.add_argument("--batch-size", type=int, help="default 32")
    train.add_argument("--lr", type=float, help="AdamW learning rate for every loss (default: per loss, see evaluation/train.py)")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a lower valid loss; 0 = off (default 10)")
    train.add_argument("--seeds", type=_csv(int, "--seeds"), default=[0], metavar="S[,S...]", help="default 0")
    train.add_argument("--views", type=int, default=5, help="frozen: augmented views per train image in the cache (default 5)")
    train.add_argument("--image-size", type=int, default=224, help="network input size (default 224)")
    train.add_argument("--decode-size", type=int, default=256, help="images are decoded once to this square size (default 256)")
    train.add_argument("--precision", choices=[*feats.PRECISIONS, "fp64"], default="auto",
                       help="auto (default): bf16 autocast where the device has native bf16 (CUDA, AVX-512-BF16/AMX CPUs), "
                            "else fp32; channels_last either way. fp64: train in float64 on fp32 features, slow: "
                            "for checking numerics (the test that torchrun matches one process uses it)")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT}/)")
    run.add_argument("--plots", type=Path, help="plots folder (default OUT/plots)")
    run.add_argument("--cache-dir", type=Path, default=DEFAULT_FEATURE_CACHE, help="feature cache (default ~/.cache/lossbank/features)")
    run.add_argument("--workers", type=int, default=2, help="processes decoding images (default 2)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--shard", default="0/1", metavar="I/N",
                     help="run only the I-th of N disjoint slices of the requested grid (one job per machine, "
                          "a shared --out); slices are whole (dataset, fraction, seed) groups (default 0/1: all)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    known = list_losses()
    args.losses = args.losses or known
    unknown = [n for n in args.losses if n not in known]
    if unknown:
        parser.error(f"--losses: unknown loss {', '.join(unknown)}; known losses: {', '.join(known)}")
    if args.teacher not in known:
        parser.error(f"--teacher: unknown loss {args.teacher!r}; known losses: {', '.join(known)}")
    if args.teacher == "distillation":
        parser.error("--teacher: distillation cannot teach itself; name another loss, e.g. cross_entropy")
    if args.backbone not in bb.BACKBONES:
        parser.error(f"--backbone: unknown backbone {args.backbone!r}; known: {', '.join(bb.BACKBONES)}")
    bad = [f for f in args.train_fraction if not (0 < f <= 1)]
    if bad:
        parser.error(f"--train-fraction must be in (0, 1], e.g. 0.25; got {', '.join(map(str, bad))}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must not repeat a value")
    named = defaultdict(list)
    for f in args.train_fraction:
        named[f"{f:g}"].append(f)  # the record's name keeps 6 significant digits (record_path)
    same = [vs for vs in named.values() if len(vs) > 1]
    if same:
        parser.error(f"--train-fraction {' and '.join(map(str, same[0]))} are the same run (fractions are kept to 6 "
                     f"significant digits); give each fraction once")
    args.epochs = DEFAULT_EPOCHS[args.mode] if args.epochs is None else args.epochs
    args.batch_size = DEFAULT_BATCH[args.mode] if args.batch_size is None else args.batch_size
    if args.hidden < 0:
        parser.error(f"--hidden must be >= 0; got {args.hidden}")
    for name in ("epochs", "batch_size", "views", "image_size", "decode_size", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.patience < 0:
        parser.error(f"--patience must be >= 0; got {args.patience}")
    if args.lr is not None and not (0 < args.lr <= MAX_LR):
        parser.error(f"--lr must be a positive number up to {MAX_LR:g}; got {args.lr}")
    if not (0 <= args.dropout < 1):
        parser.error(f"--dropout must be in [0, 1); got {args.dropout}")
    if args.decode_size < args.image_size:
        parser.error(f"--decode-size ({args.decode_size}) must be at least --image-size ({args.image_size})")
    if args.device not in DEVICES and not re.fullmatch(r"cuda:\d+", args.device):
        parser.error(f"--device {args.device!r}: use auto (CUDA when available), cpu, cuda or cuda:N (one GPU)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    elif args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                     f"numbered from 0")
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        parser.error(f"--weights: no file at {args.weights}; give imagenet, none or the path of a state_dict file")
    if args.data_dir is not None and not args.data_dir.expanduser().is_dir():
        parser.error(f"--data-dir: {args.data_dir} is not a folder")
    # argparse leaves "~" alone (and the shell does too in --out=~/x): expand every path here.
    for name in ("out", "plots", "cache_dir", "data_dir"):
        if getattr(args, name) is not None:
            setattr(args, name, Path(getattr(args, name)).expanduser())
    if args.precision != "fp64":
        args.precision = feats.resolve_precision(args.precision, args.device)
    args.plots = args.plots or args.out / "plots"
    try:
        index, count = (int(v) for v in args.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be I/N with 0 <= I < N, e.g. 0/2; got {args.shard!r}")
    args.shard = (index, count)
    args.device_type = torch.device(args.device).type
    return args


# ---------------------------------------------------------------- records
def dataset_label(name: str, drop_duplicates: bool) -> str:
    return f"{name}-dedup" if drop_duplicates else name


def record_path(out: Path, key: dict) -> Path:
    return (out / "runs" / key["dataset"] / f"{key['backbone']}-{key['mode']}" / key["loss"]
            / f"seed{key['seed']}-frac{key['train_fraction']:g}.json")


def save_model_atomically(model: torch.nn.Module, path: Path) -> None:
    write_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp))


def data_path(out: Path, label: str) -> Path:
    """Where the files a dataset's runs were made on are listed, to name what changed if they change."""
    return out / "datasets" / f"{label}.json"


def run_signature(args, weights_hash: str, splits: data.DatasetSplits) -> dict:
    """What must agree for a finished run to be reused: the settings, and the data it was trained and evaluated on."""
    return {
        "data": splits.identity(),
        "weights_hash": weights_hash, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "patience": args.patience, "hidden": args.hidden, "dropout": args.dropout,
        "views": args.views if args.mode == "frozen" else None, "image_size": args.image_size,
        "decode_size": args.decode_size, "precision": args.precision,
        "unfreeze": args.unfreeze if args.mode == "finetune" else None, "teacher": args.teacher,
    }


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a seeded, per-class subsample: round(fraction · n_c), at least one per class."""
    if fraction >= 1:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(10_007 + seed)
    keep = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        k = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(keep).sort().values


# ---------------------------------------------------------------- one dataset
class Timer:
    def __init__(self):
        self.sections: dict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        self.sections[name] += seconds


def _summary_line(key: dict, result) -> str:
    where = f"{key['dataset']} {key['backbone']} {key['mode']} {key['loss']} seed {key['seed']} frac {key['train_fraction']:g}"
    if result["status"] != "ok":
        return f"{where}: FAILED in epoch {result['failed_epoch']} ({result['failure']})"
    return (f"{where}: valid top-1 {100 * result['final']['valid_top1']:.1f} % "
            f"(best {100 * result['best_valid_top1']:.1f} % @ epoch {result['best_epoch']}), "
            f"{len(result['history'])} epochs, {result['train_seconds']:.1f} s")


def run_dataset(args, splits: data.DatasetSplits, label: str, backbone: bb.Backbone, timer: Timer, command: str) -> None:
    progress = not args.no_progress
    # Distillation needs its teacher trained first, whatever order --losses gives.
    losses = sorted(args.losses, key=lambda n: (n == "distillation", list_losses().index(n)))
    loaded = {}

    def inputs():
        # Features (or decoded images) only when something is left to train: a finished grid costs nothing.
        if not loaded:
            loaded.update(prepare_inputs(args, splits, label, backbone, timer, progress))
        return loaded

    for fraction in args.train_fraction:
        for seed in args.seeds:
            if (label, fraction, seed) not in args.my_groups:
                continue

            def key_of(loss):
                return {"dataset": label, "backbone": backbone.name, "mode": args.mode, "loss": loss,
                        "seed": seed, "train_fraction": fraction}

            # Across processes every one must make the same choices: the main process looks at
            # the disk (which other nodes may not share) and tells the others what it found.
            on_disk = {loss: record_path(args.out, key_of(loss)).exists() for loss in [*losses, args.teacher]}
            teacher_saved = record_path(args.out, key_of(args.teacher)).with_suffix(".pt").exists()
            on_disk, teacher_saved = distributed.from_main((on_disk, teacher_saved), args.ctx)
            teacher_needed = "distillation" in losses and not on_disk["distillation"]
            order = [args.teacher] + [n for n in losses if n != args.teacher] if teacher_needed else losses
            teacher_model = None
            for loss in order:
                key = key_of(loss)
                path = record_path(args.out, key)
                is_teacher = teacher_needed and loss == args.teacher
                recorded = loss in losses
                if on_disk[loss] and recorded:
                    recorded = False  # already on disk: at most the teacher's model is still wanted
                    if not is_teacher:
                        continue
                if is_teacher and teacher_saved:
                    teacher_model = load_model(args, inputs(), splits, backbone, loss, seed, fraction, path)
                    if teacher_model is not None:
                        continue
                if loss == "distillation" and teacher_model is None:
                    record = {**key, "status": "failed", "failed_epoch": 0, "history": [],
                              "failure": f"its teacher ({args.teacher}) failed to train", "command": command,
                              "signature": run_signature(args, backbone.weights_hash, splits)}
                    if args.ctx.main:
                        write_json_atomically(record, path)
                    continue
                given = inputs()  # loaded (or extracted) outside the timing of the first loss's training
                t0 = time.perf_counter()
                record, model = train_run(args, given, splits, backbone, key, command, progress,
                                          teacher=teacher_model if loss == "distillation" else None)
                timer.add(f"train:{loss}", time.perf_counter() - t0)
                if recorded and args.ctx.main:
                    write_json_atomically(record, path)
                    (tqdm.write if progress else print)(_summary_line(key, record))
                if is_teacher and record["status"] == "ok":
                    teacher_model = frozen_copy(model)
                    if args.ctx.main:
                        save_model_atomically(teacher_model, path.with_suffix(".pt"))


def prepare_inputs(args, splits, label, backbone, timer, progress) -> dict:
    """Cached features of train (augmented views) and valid: pooled ones for frozen, the backbone's trunk
    for finetune of the last stages. Finetune of all stages: decoded images in memory."""
    t0 = time.perf_counter()
    if args.mode == "frozen" or args.unfreeze == "last":
        common = dict(image_size=args.image_size, decode_size=args.decode_size,
                      precision="fp32" if args.precision == "fp64" else args.precision,
                      device=args.device, cache_dir=args.cache_dir, progress=progress, workers=args.workers,
                      part="pooled" if args.mode == "frozen" else "trunk")

        def cached():
            return (feats.cached_features(backbone, splits, "train", views=args.views, augment=True, seed=0, **common),
                    feats.cached_features(backbone, splits, "valid", views=1, augment=False, **common))

        if not args.ctx.main:
            distributed.barrier(args.ctx)  # the main process computes and writes the cache; then the others read it
        train, valid = cached()
        if args.ctx.main:
            distributed.barrier(args.ctx)
        inputs = {"train_x": train.features, "train_y": train.labels, "valid_x": valid.features[0] if args.mode == "frozen" else valid.features, "valid_y": valid.labels,
                  "bad_files": train.bad_files + valid.bad_files, "cache_hit": train.cache_hit and valid.cache_hit,
                  "seconds": {k: train.seconds.get(k, 0) + valid.seconds.get(k, 0) for k in train.seconds}}
    else:
        train_images, train_ok, train_bad = data.load_images(splits.train, args.decode_size, workers=args.workers, progress=progress)
        valid_images, valid_ok, valid_bad = data.load_images(splits.valid, args.decode_size, workers=args.workers, progress=progress)
        inputs = {"train_x": train_images, "train_y": torch.tensor([splits.train[i].label for i in train_ok]),
                  "valid_x": valid_images, "valid_y": torch.tensor([splits.valid[i].label for i in valid_ok]),
                  "bad_files": [str(p) for p in train_bad + valid_bad], "cache_hit": False, "seconds": {}}
    timer.add(f"load+extract:{label}", time.perf_counter() - t0)
    if inputs["bad_files"]:
        splits.notes.append(f"{len(inputs['bad_files'])} undecodable files skipped: {', '.join(inputs['bad_files'])}")
    return inputs


def _make_model(args, inputs, splits, backbone, loss, seed, fraction):
    """The untrained model for one run, its trainable parameter groups, batches and train mode."""
    subset = stratified_subset(inputs["train_y"], fraction, seed)
    train_y = inputs["train_y"][subset]
    counts = torch.bincount(train_y, minlength=len(splits.classes)).tolist()
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         patience=args.patience, hidden=args.hidden, dropout=args.dropout)
    torch.manual_seed(seed)
    if args.mode == "frozen":
        train_x = inputs["train_x"][:, subset]
        flat = train_x.reshape(-1, train_x.shape[-1])
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        model = build_classifier(loss, backbone.num_features, len(splits.classes), counts, config, mean=mean, std=std)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        train_batches = feature_batches(train_x, train_y, args.batch_size, seed)
        valid_x, valid_y = inputs["valid_x"], inputs["valid_y"]

        def valid_batches():
            return ((valid_x[i:i + 256], valid_y[i:i + 256]) for i in range(0, len(valid_y), 256))
        train_mode = model.train
    else:
        net = copy.deepcopy(backbone)
        backbone_params = net.unfreeze(args.unfreeze)
        net.model.to(memory_format=torch.channels_last)
        # unfreeze last: the inputs are the cached trunk outputs, and only the tail runs here
        cached = args.unfreeze == "last"
        model = build_classifier(loss, net.num_features, len(splits.classes), counts, config,
                                 backbone=net.split()[1] if cached else net.model, context=args.ctx)
        head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [{"params": head_params}, {"params": backbone_params, "lr_scale": BACKBONE_LR_SCALE}]
        train_x = inputs["train_x"][:, subset] if cached else inputs["train_x"][subset]
        train_batches = finetune_batches(args, net, train_x, train_y, seed, train=True, cached=cached)
        valid_batches = lambda: finetune_batches(args, net, inputs["valid_x"], inputs["valid_y"], seed,  # noqa: E731
                                                 train=False, cached=cached)(0)

        def train_mode():
            model.train()
            net.train_mode()
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    return model.to(args.device, dtype), groups, train_batches, valid_batches, train_mode, config, counts, len(subset)


def finetune_batches(args, net, inputs, labels, seed, *, train: bool, cached: bool):
    """epoch -> (this process's inputs, the global batch's target) for each global batch.

    ``inputs`` are cached trunk outputs (views, N, C, H, W), each epoch picking a view per
    image, or decoded images (N, 3, S, S), each augmented with its own generator. Either
    way the random choices depend on (seed, epoch, image) only, never on which process
    handles the image.
    """
    n = len(labels)

    def epoch_batches(epoch):
        epoch_seed = seed * 100_003 + epoch
        if cached:
            views = inputs.shape[0]
            view = (torch.randint(0, views, (n,), generator=torch.Generator().manual_seed(epoch_seed))
                    if train else torch.zeros(n, dtype=torch.long))
        for local, rows in distributed.batch_indices(n, args.batch_size, args.ctx, shuffle=train, seed=seed, epoch=epoch):
            if train and len(rows) < 2:  # a batch of one breaks BatchNorm in the MLP: skip it (other epochs see it)
                continue
            if cached:
                x = inputs[view[local], local].to(args.device)
            else:
                images = inputs[local].to(args.device)
                if train:
                    images = torch.cat([feats.train_view(images[j:j + 1], args.image_size,
                                                         torch.Generator().manual_seed(epoch_seed * 1_000_003 + int(i)))
                                        for j, i in enumerate(local)])
                else:
                    images = feats.eval_view(images, args.image_size)
                x = feats.normalise(images, net)
            yield x.contiguous(memory_format=torch.channels_last), labels[rows].to(args.device)

    return epoch_batches


def load_model(args, inputs, splits, backbone, loss, seed, fraction, path):
    """The saved teacher model of a finished run, or None (with a warning) when its file is unusable: it is then retrained."""
    model = _make_model(args, inputs, splits, backbone, loss, seed, fraction)[0]  # not yet wrapped in DDP
    weights = path.with_suffix(".pt")
    # Read by the main process only: other nodes need not share --out.
    state = None
    if args.ctx.main:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # truncated, foreign or older files are all just retrained
            warnings.warn(f"the saved teacher model {weights} is unusable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); training the teacher again")
            state = None
    state = distributed.from_main(state, args.ctx)
    if state is None:
        return None
    model.load_state_dict(state)
    return frozen_copy(model)


def train_run(args, inputs, splits, backbone, key, command, progress, teacher=None):
    model, groups, train_batches, valid_batches, train_mode, config, counts, n_train = _make_model(
        args, inputs, splits, backbone, key["loss"], key["seed"], key["train_fraction"])
    lr = config.lr_for(key["loss"])
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)
    if args.ctx.distributed:
        local = [args.ctx.local_rank] if args.device_type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=local)
    bar = tqdm(total=config.epochs, desc=f"{key['dataset']} {key['loss']} seed {key['seed']}", unit="epoch",
               disable=not progress, leave=False)

    def on_epoch(row):
        bar.update(1)
        bar.set_postfix(train_loss=f"{row['train_loss']:.3g}", valid_top1=f"{100 * row['valid_top1']:.1f}")

    try:
        result = fit(model, groups, train_batches, valid_batches, len(splits.classes), config, lr, device=args.device,
                     teacher=teacher, amp=args.precision == "bf16" and args.mode == "finetune",
                     train_mode=train_mode, progress=on_epoch)
    finally:
        bar.close()
    signature = run_signature(args, backbone.weights_hash, splits)
    settings = {k: v for k, v in signature.items() if k != "data"}
    record = {
        **key, "weights_hash": backbone.weights_hash, "status": result.status, "failed_epoch": result.failed_epoch,
        "failure": result.failure, "classes": splits.classes, "num_train": n_train, "num_valid": len(inputs["valid_y"]),
        "train_class_counts": counts, "history": result.history, "best_epoch": result.best_epoch,
        "best_valid_top1": result.best_valid_top1, "final": result.final, "train_seconds": result.train_seconds,
        "config": {**config.as_dict(key["loss"]), **settings, "lr": lr,
                   "device": args.device, "teacher": args.teacher if key["loss"] == "distillation" else None},
        "signature": signature, "notes": splits.notes, "command": command,
        "skipped_files": splits.skipped + inputs["bad_files"], "dropped": splits.dropped,
    }
    return record, result.model


# ---------------------------------------------------------------- the whole command
def read_record(path: Path) -> dict:
    """A finished run's record; a file that is not one is named, with what to do."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read finished run {path} ({exc}); delete it to have it rerun")
    if not isinstance(record, dict) or not isinstance(record.get("signature"), dict):
        what = "holds " + json.dumps(record)[:40] if not isinstance(record, dict) else "has no signature"
        raise SystemExit(f"error: {path} is not a run record (it {what}); delete it to have the run redone")
    return record


def describe_data_change(have: dict | None, now: data.DatasetSplits, listed: dict | None) -> str:
    """What differs between the data a finished run named (``have``, with the file list ``listed`` if kept) and ``now``."""
    if not have:
        return "it was made by an older lossbank that did not record which files it used"
    changes = []
    if have.get("classes") != now.classes:
        changes.append(f"the classes were {have.get('classes')}, now {now.classes}")
    files_now = now.file_list()
    for split in data.SPLITS:
        if have.get(split) == now.identity()[split]:
            continue
        before = (listed or {}).get(split)
        if not isinstance(before, dict):
            changes.append(f"the {split} split had {have.get(split, {}).get('images')} images, now "
                           f"{len(files_now[split])}, with other files or contents")
            continue
        added = [f for f in files_now[split] if f not in before]
        removed = [f for f in before if f not in files_now[split]]
        changed = [f for f in files_now[split] if f in before and before[f] != files_now[split][f]]
        parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
        changes.append(f"in the {split} split {'; '.join(parts) or 'the labels changed'}")
    return "; ".join(changes) or "the data differs"


def check_finished_runs_agree(args, datasets, weights_hash: str) -> None:
    """Refuse to mix finished runs made with other settings, or on other data, into this command's results.

    The files of each dataset are listed in OUT/datasets/<label>.json by the first command that trains on it,
    so that a later command on changed data can say which files changed.
    """
    for splits, label in datasets:
        want = run_signature(args, weights_hash, splits)
        listing = data_path(args.out, label)
        listed = None
        if listing.is_file():
            try:
                listed = json.loads(listing.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                listed = None
        if isinstance(listed, dict) and listed.get("identity") not in (None, want["data"]):
            raise SystemExit(
                f"error: {args.out} already holds runs of {label} made on other data ({listing}): "
                f"{describe_data_change(listed['identity'], splits, listed.get('files'))}.\n"
                f"Use another --out for this data, or delete {args.out / 'runs' / label} and {listing} to retrain on it.")
        folder = args.out / "runs" / label / f"{args.backbone}-{args.mode}"
        for path in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
            have = read_record(path)["signature"]
            if have.get("data") != want["data"]:
                raise SystemExit(
                    f"error: {args.out} already holds runs of {label} made on other data ({path}): "
                    f"{describe_data_change(have.get('data'), splits, listed.get('files') if isinstance(listed, dict) else None)}.\n"
                    f"Use another --out for this data, or delete {args.out / 'runs' / label} to retrain on it.")
            diff = {k: (have.get(k), v) for k, v in want.items() if k != "data" and have.get(k) != v}
            if diff:
                details = ", ".join(f"{k} {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
                raise SystemExit(
                    f"error: {args.out} already holds runs made with other settings ({path}: {details}).\n"
                    f"Use another --out for these settings, or the same settings to resume.")
        if args.ctx.main and not isinstance(listed, dict):
            write_json_atomically({"identity": want["data"], "root": str(splits.root), "files": splits.file_list()}, listing)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if distributed.launched_by_torchrun() and args.mode != "finetune":
        print("error: torchrun trains one fine-tuning run across processes (--mode finetune); frozen runs take "
              "seconds each: split their grid across jobs with --shard I/N instead", file=sys.stderr)
        return 2
    args.ctx = distributed.init_from_env(args.device_type)
    if args.ctx.distributed and args.device_type == "cuda":
        args.device = f"cuda:{args.ctx.local_rank}"
    if args.batch_size % args.ctx.world:
        print(f"error: --batch-size {args.batch_size} must be a multiple of the number of processes "
              f"({args.ctx.world}): it is the global batch, split evenly between them", file=sys.stderr)
        distributed.shutdown(args.ctx)
        return 2
    try:
        return _main(args, argv)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished runs are saved in {args.out}; the same command resumes", file=sys.stderr)
        return 130
    except (bb.BackboneError, data.DatasetError, WriteError) as exc:
        # A user's file or folder, not a bug: one line, no traceback. Finished runs are already on disk.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(args.ctx)


def check_output_folder(path: Path, option: str) -> None:
    """Fail before any work when ``path`` cannot hold this command's output."""
    if path.exists() and not path.is_dir():
        raise WriteError(f"{option} {path} is a file, not a folder; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"lossbank")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise WriteError(f"{option} {path} cannot be written to ({exc.strerror or exc}); choose a folder you can "
                         f"write to, on a disk with free space") from exc


def _main(args, argv) -> int:
    main_process = args.ctx.main
    args.no_progress = args.no_progress or not main_process
    say = print if main_process else (lambda *a, **k: None)
    # The command needs no torchrun to reproduce a run: the history is the same for any number of processes.
    command = "python -m evaluation.run " + " ".join(shlex.quote(a) for a in argv)
    start = time.perf_counter()
    timer = Timer()
    bb.check_backbone_available(args.backbone, args.weights)
    if main_process:
        for path, option in ((args.out, "--out"), (args.plots, "--plots"), (args.cache_dir, "--cache-dir")):
            check_output_folder(path, option)
    names = list(data.DATASETS) if args.dataset == "all" else [args.dataset] if args.dataset else [None]
    datasets = []
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Unusable data (verify's rule) is refused here, before any extraction or training.
            splits = data.load_dataset(name, data_root=args.data_root, data_dir=args.data_dir,
                                       drop_duplicates=args.drop_duplicates, workers=args.workers,
                                       memo=args.cache_dir / "file_checks.json")
        for w in caught:
            say(f"warning: {w.message}", file=sys.stderr)
        datasets.append((splits, dataset_label(splits.name, args.drop_duplicates)))
    t0 = time.perf_counter()
    # Frozen runs whose features are cached never need the network itself: build it lazily.
    backbone = bb.LazyBackbone(args.backbone, args.weights, **({} if main_process else {"memo": None}))
    if args.mode == "finetune":
        backbone = backbone.build()
    timer.add("backbone", time.perf_counter() - t0)
    check_finished_runs_agree(args, datasets, backbone.weights_hash)
    say(f"# {command}")
    say(f"# backbone {backbone.name} (weights {args.weights}, hash {backbone.weights_hash}), mode {args.mode}, "
        f"device {args.device}, {len(args.losses)} losses x seeds {args.seeds} x fractions {args.train_fraction}"
        + (f", {args.ctx.world} processes ({torch.distributed.get_backend()})" if args.ctx.distributed else ""))
    grid = [{"dataset": label, "backbone": backbone.name, "mode": args.mode, "loss": loss, "seed": seed,
             "train_fraction": fraction}
            for _, label in datasets for fraction in args.train_fraction for seed in args.seeds for loss in args.losses]
    if main_process:
        write_json_atomically(grid, args.out / "grid.json")
    # A distillation run needs its teacher from the same (dataset, fraction, seed), so shards
    # are made of whole groups, dealt out in a fixed order: every job computes the same split.
    groups = [(label, fraction, seed) for _, label in datasets for fraction in args.train_fraction for seed in args.seeds]
    args.my_groups = {g for i, g in enumerate(groups) if i % args.shard[1] == args.shard[0]}
    for splits, label in datasets:
        if any(g[0] == label for g in args.my_groups):
            run_dataset(args, splits, label, backbone, timer, command)
    if not main_process:
        return 0
    from . import report  # pandas and matplotlib load only once there is something to report

    t0 = time.perf_counter()
    timing = {"sections": dict(timer.sections), "total": None}
    result = report.write_report(args.out, args.plots, timing=timing, grid=grid)
    timer.add("report", time.perf_counter() - t0)
    timing = {"sections": dict(timer.sections), "total": time.perf_counter() - start}
    write_json_atomically(timing, args.out / "timing.json")
    write_text_atomically(args.out / "timing.md", report.format_timing(timing))
    for _, label in datasets:
        print()
        print(report.format_table(result["summary"], label))
    print("\ntiming (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing["sections"].items()) + f", total {timing['total']:.1f}")
    print(f"tables in {args.out}, plots in {args.plots}")
    missing = result.get("missing", [])
    if missing:
        print(f"{len(missing)} requested runs are not finished", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
