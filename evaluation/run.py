"""Train every loss on a small image dataset and write accuracy tables and loss-curve plots.

The command line it printed reproduces a run. Finished runs are saved as they end, and
rerunning the same command skips them, so a killed process loses at most one run. Every
setting and its default is in ``evaluation.config.RunConfig``; this module is the command
line and the orchestration of a grid of (dataset, fraction, seed, loss) runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lossbank import list_losses

from . import backbones as bb
from . import data
from . import distributed
from . import folders
from . import records
from .config import ConfigError, RunConfig, add_arguments, from_command_line, trained_loss
from .distributed import Context
from .files import WriteError, write_json_atomically, write_text_atomically
from . import protocol
from .inputs import DatasetInputs, dataset_units
from . import saved_model
from . import search
from . import train
from .train import frozen_copy

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
  # settings from a YAML file (keys as the options, e.g. "losses: [cross_entropy, hinge]"); flags override it
  python -m evaluation.run --config configs/fruits-quick.yaml --seeds 0,1
  # also save each run's model, then classify images with one
  python -m evaluation.run --dataset fruits --backbone efficientnet_lite0 --losses am_softmax --save-model
  python -m evaluation.predict --model out/runs/fruits/efficientnet_lite0-frozen/am_softmax/seed0-frac1.model.pt photo.jpg
  # your own images: DIR/train/<class>/*, DIR/valid/<class>/*  (or DIR/<class>/* with a seeded 80/20 split)
  python -m evaluation.run --data-dir ~/my_images --backbone efficientnet_lite0
"""


# ---------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.run", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                   help="settings from a YAML file (keys as below, - or _); options given here override it")
    add_arguments(p)
    return p


def parse_args(argv=None) -> RunConfig:
    """The resolved RunConfig of a command line; a wrong setting exits with a one-line usage error."""
    parser = build_parser()
    try:
        return from_command_line(parser.parse_args(argv)).resolved()
    except ConfigError as exc:
        parser.error(str(exc))


def dataset_label(name: str, drop_duplicates: bool) -> str:
    return f"{name}-dedup" if drop_duplicates else name


# ---------------------------------------------------------------- one command
class Timer:
    def __init__(self, sections: dict[str, float] | None = None, tag: str = ""):
        self.sections: dict[str, float] = defaultdict(float) if sections is None else sections
        self.tag = tag

    def add(self, name: str, seconds: float) -> None:
        self.sections[f"{name} ({self.tag})" if self.tag else name] += seconds

    def tagged(self, tag: str) -> "Timer":
        """The same sections, with ``tag`` on the names this one adds (a teacher's time apart from the student's)."""
        return Timer(self.sections, tag)


@dataclass
class Job:
    """One command as it runs: its settings, its place among torchrun's processes and its share of the grid."""
    config: RunConfig
    ctx: Context
    command: str
    groups: set = field(default_factory=set)  # the (dataset, fraction, seed) groups of this --shard
    timer: Timer = field(default_factory=Timer)
    teacher: "Job | None" = None  # --teacher-backbone's cross-entropy runs, as a job of their own
    teacher_backbone: object = None

    @property
    def progress(self) -> bool:
        return not self.config.no_progress and self.ctx.main


def _summary_line(key: dict, result) -> str:
    unit = f"seed {key['seed']}" if key.get("fold") is None else f"repeat {key['seed']} fold {key['fold']}"
    where = f"{key['dataset']} {key['backbone']} {key['mode']} {key['loss']} {unit} frac {key['train_fraction']:g}"
    if result["status"] != "ok":
        return f"{where}: FAILED in epoch {result['failed_epoch']} ({result['failure']})"
    return (f"{where}: valid top-1 {100 * result['final']['valid_top1']:.1f} % "
            f"(best {100 * result['best_valid_top1']:.1f} % @ epoch {result['best_epoch']}), "
            f"{len(result['history'])} epochs, {result['train_seconds']:.1f} s")


def run_dataset(job: Job, splits: data.DatasetSplits, label: str, backbone: bb.Backbone,
                units: list[protocol.Unit]) -> None:
    config, ctx = job.config, job.ctx
    # Distillation needs its teacher trained first, whatever order --losses gives.
    losses = sorted(config.losses, key=lambda n: (n == "distillation", list_losses().index(n)))
    if job.teacher is not None:  # distillation learns from another backbone's runs, not from this run's
        losses.remove("distillation")
    inputs = DatasetInputs(job.config, job.ctx, job.timer, splits, label, backbone)  # features only once something is left to train
    teacher_inputs = None if job.teacher is None else DatasetInputs(
        job.teacher.config, job.ctx, job.teacher.timer, splits, label, job.teacher_backbone)

    for fraction in config.train_fraction:
        for unit in units:
            if (label, fraction, unit.seed, unit.fold) not in job.groups:
                continue

            def key_of(loss):
                return {"dataset": label, "backbone": backbone.name, "mode": config.mode, "protocol": config.protocol,
                        "loss": loss, "seed": unit.seed, "fold": unit.fold, "train_fraction": fraction}

            # Across processes every one must make the same choices: the main process looks at
            # the disk (which other nodes may not share) and tells the others what it found.
            # With --save-model a finished run whose model is missing is trained again, to write it.
            on_disk = {loss: records.is_finished(config.out, key_of(loss), config.save_model)
                       for loss in [*losses, config.teacher]}
            teacher_saved = records.model_path(config.out, key_of(config.teacher)).exists()
            on_disk, teacher_saved = distributed.from_main((on_disk, teacher_saved), ctx)
            teacher_needed = "distillation" in losses and not on_disk["distillation"]
            order = [config.teacher] + [n for n in losses if n != config.teacher] if teacher_needed else losses
            teacher_model = None
            for loss in order:
                key = key_of(loss)
                sig = records.signature(config, backbone.weights_hash, splits, loss)
                is_teacher = teacher_needed and loss == config.teacher
                recorded = loss in losses
                if on_disk[loss] and recorded:
                    recorded = False  # already on disk: at most the teacher's model is still wanted
                    if not is_teacher:
                        continue
                if is_teacher and teacher_saved:
                    teacher_model = load_teacher(job, inputs.run_data(unit), len(splits.classes), backbone, key)
                    if teacher_model is not None:
                        continue
                if loss == "distillation" and teacher_model is None:
                    if ctx.main:
                        records.write_record(records.new_record(
                            key, sig, job.command, status="failed", failed_epoch=0,
                            failure=f"its teacher ({config.teacher}) failed to train"), config.out)
                    continue
                given = inputs.run_data(unit)  # loaded (or extracted) outside the timing of the first loss's training
                record, model = train_run(job, given, splits, backbone, key, sig,
                                          teacher=teacher_model if loss == "distillation" else None)
                if recorded and ctx.main:
                    if config.save_model and record["status"] == "ok":  # before the record: it never lacks its model
                        save_run_model(config, backbone, key, record, model)
                    records.write_record(record, config.out)
                    (tqdm.write if job.progress else print)(_summary_line(key, record))
                if is_teacher and record["status"] == "ok":
                    teacher_model = frozen_copy(model)
                    if ctx.main:
                        records.save_model(teacher_model, config.out, key)
            if job.teacher is not None:
                distil_from_other(job, inputs, teacher_inputs, splits, backbone, unit, key_of(config.distil_label))


def other_teacher(job: Job, inputs: DatasetInputs, splits: data.DatasetSplits, unit, student_key: dict):
    """--teacher-backbone's trained cross-entropy model for the student run ``student_key``: reused from --out if
    finished, trained (and saved) first otherwise. A failed or foreign teacher run stops the command here."""
    tjob, tbackbone = job.teacher, job.teacher_backbone
    key = {**student_key, "backbone": tbackbone.name, "mode": tjob.config.mode, "loss": "cross_entropy"}
    path = records.record_path(tjob.config.out, key)
    found = None
    if job.ctx.main and path.exists():
        rec = records.read_record(path)
        found = (rec["status"], rec.get("failure"), rec.get("classes"),
                 records.model_path(tjob.config.out, key).exists())
    found = distributed.from_main(found, job.ctx)
    where = f"teacher run {path}"
    if found is not None:
        status, failure, classes, saved = found
        if status != "ok":
            raise SystemExit(f"error: the {where} failed ({failure}); delete it to train the teacher again")
        if classes != splits.classes:
            raise SystemExit(f"error: the {where} learnt the classes {classes}, the student has {splits.classes}; "
                             f"use another --out, or delete it to train the teacher again")
        if saved:
            model = load_teacher(tjob, inputs.run_data(unit), len(splits.classes), tbackbone, key)
            if model is not None:
                return model
    sig = records.signature(tjob.config, tbackbone.weights_hash, splits, "cross_entropy")
    record, model = train_run(tjob, inputs.run_data(unit), splits, tbackbone, key, sig)
    if job.ctx.main and found is None:  # a finished run without its saved model keeps its record: only the model is wanted
        records.write_record(record, tjob.config.out)
        (tqdm.write if job.progress else print)(_summary_line(key, record))
    if record["status"] != "ok":
        raise SystemExit(f"error: the {where} failed ({record['failure']}); the student is not trained")
    model = frozen_copy(model)
    if job.ctx.main:
        records.save_model(model, tjob.config.out, key)
    return model


@torch.no_grad()
def teacher_logits(teacher, run: train.RunData, device: str) -> dict:
    """The teacher's logits for every view of its own RunData: train_t (views, n, classes), valid_t and inner_t
    (n, classes). Each process computes them all: they are a few thousand rows."""
    teacher = teacher.to(device)
    teacher.context = distributed.SINGLE  # no rows to gather: this is not a training step

    def of(x):  # x: (n, ...) inputs of the teacher's model
        return torch.cat([teacher(x[i:i + 256].to(device)).logits.float().cpu() for i in range(0, len(x), 256)])

    def eval_view(x):  # frozen: (n, D); fine-tuning: one eval view (1, n, ...)
        return of(x[0] if x.dim() == run.train_x.dim() else x)

    return {"train_t": torch.stack([of(v) for v in run.train_x]), "valid_t": eval_view(run.valid_x),
            "inner_t": eval_view(run.inner_x) if run.inner_x is not None else None}


def distil_from_other(job: Job, inputs: DatasetInputs, teacher_inputs: DatasetInputs, splits: data.DatasetSplits,
                      backbone, unit, key: dict) -> None:
    """The distillation run ``key`` of the student, taught by --teacher-backbone's model of the same unit.

    The teacher's logits are for the same images and the same augmented views: view v of an image is drawn
    by the same generator (features.view_generator) for both backbones, so it is the same crop, flip and
    jitter of the image, taken from each one's decoded copy at each one's input size (the crop box is the
    same fraction of the image, up to rounding to pixels).
    """
    config = job.config
    on_disk = distributed.from_main(records.record_path(config.out, key).exists(), job.ctx)
    if on_disk:
        return
    teacher = other_teacher(job, teacher_inputs, splits, unit, key)
    given = dataclasses.replace(inputs.run_data(unit), **teacher_logits(teacher, teacher_inputs.run_data(unit),
                                                                         config.device))
    sig = records.signature(config, backbone.weights_hash, splits, key["loss"], job.teacher_backbone.weights_hash)
    record, _ = train_run(job, given, splits, backbone, key, sig)
    record["config"]["teacher_run"] = {**sig["teacher_run"], "seed": key["seed"], "loss": "cross_entropy"}
    if job.ctx.main:
        records.write_record(record, config.out)
        (tqdm.write if job.progress else print)(_summary_line(key, record))


def save_run_model(config, backbone, key: dict, record: dict, model) -> None:
    final = record["final"]
    saved_model.save_model(records.saved_model_path(config.out, key), model, backbone=backbone, config=config,
                           key=key, classes=record["classes"], class_counts=record["train_class_counts"],
                           loss_kwargs=record["config"]["loss_args"],
                           valid={"top1": final["valid_top1"], "top3": final["valid_top3"],
                                  "macro_f1": final["valid_macro_f1"], "images": record["num_valid"]})


def load_teacher(job: Job, run_data: train.RunData, num_classes: int, backbone, key: dict):
    """The saved teacher model of a finished run, or None (with a warning) when its file is unusable: it is then retrained."""
    setup = train.set_up_run(job.config, job.ctx, run_data, num_classes, backbone, key["loss"], key["seed"],
                             key["train_fraction"])
    model = setup.model  # not wrapped in DDP: a teacher does not train
    weights = records.model_path(job.config.out, key)
    # Read by the main process only: other nodes need not share --out.
    state = None
    if job.ctx.main:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # truncated, foreign or older files are all just retrained
            warnings.warn(f"the saved teacher model {weights} is unusable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); training the teacher again")
            state = None
    state = distributed.from_main(state, job.ctx)
    if state is None:
        return None
    model.load_state_dict(state)
    return frozen_copy(model)


def train_run(job: Job, run_data: train.RunData, splits: data.DatasetSplits, backbone, key: dict, sig: dict,
              teacher=None):
    config, ctx = job.config, job.ctx
    chosen = None
    if config.search:
        t0 = time.perf_counter()
        chosen = search.search(config, ctx, run_data, len(splits.classes), backbone, key, teacher=teacher)
        job.timer.add(f"search:{key['loss']}", time.perf_counter() - t0)
    t0 = time.perf_counter()
    setup = train.set_up_run(config, ctx, run_data, len(splits.classes), backbone, trained_loss(key["loss"]),
                             key["seed"], key["train_fraction"], loss_kwargs=chosen["loss_kwargs"] if chosen else None)
    lr = chosen["lr"] if chosen else config.lr_for(key["loss"])
    for g in setup.param_groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)
    model = setup.model
    if ctx.distributed:
        local = [ctx.local_rank] if config.device_type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=local)
    bar = tqdm(total=config.epochs, desc=f"{key['dataset']} {key['loss']} seed {key['seed']}", unit="epoch",
               disable=not job.progress, leave=False)

    def on_epoch(row):
        bar.update(1)
        bar.set_postfix(train_loss=f"{row['train_loss']:.3g}", valid_top1=f"{100 * row['valid_top1']:.1f}")

    try:
        result = train.fit(model, setup.param_groups, setup.train_batches, setup.valid_batches, len(splits.classes),
                           epochs=config.epochs, lr=lr, weight_decay=config.weight_decay, patience=config.patience,
                           device=config.device, teacher=teacher,
                           amp=config.precision == "bf16" and config.mode == "finetune", train_mode=setup.train_mode,
                           progress=on_epoch, select_batches=setup.select_batches)
    finally:
        bar.close()
        job.timer.add(f"train:{key['loss']}", time.perf_counter() - t0)
    num_inner = 0 if run_data.inner_y is None else len(run_data.inner_y)
    record = records.new_record(
        key, sig, job.command, status=result.status, failure=result.failure, failed_epoch=result.failed_epoch,
        history=result.history, final=result.final, best_epoch=result.best_epoch,
        best_valid_top1=result.best_valid_top1, train_seconds=result.train_seconds, classes=splits.classes,
        num_train=setup.num_train, num_inner=num_inner, num_valid=len(run_data.valid_y),
        train_class_counts=setup.class_counts,
        config={"lr": lr, "device": config.device, "teacher": config.teacher if key["loss"] == "distillation" else None,
                "loss_args": chosen["loss_kwargs"] if chosen else config.loss_kwargs(key["loss"])},
        search=chosen,
        notes=splits.notes, skipped_files=splits.skipped, dropped=splits.dropped)
    return record, result.model


# ---------------------------------------------------------------- the whole command
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = parse_args(argv)
    if distributed.launched_by_torchrun() and config.search:
        print("error: --search runs in one process (its trials are small runs of their own): split the grid with "
              "--shard I/N instead of torchrun", file=sys.stderr)
        return 2
    if distributed.launched_by_torchrun() and config.mode != "finetune":
        print("error: torchrun trains one fine-tuning run across processes (--mode finetune); frozen runs take "
              "seconds each: split their grid across jobs with --shard I/N instead", file=sys.stderr)
        return 2
    ctx = distributed.init_from_env(config.device_type)
    if ctx.distributed and config.device_type == "cuda":
        config.device = f"cuda:{ctx.local_rank}"
    if config.batch_size % ctx.world:
        print(f"error: --batch-size {config.batch_size} must be a multiple of the number of processes "
              f"({ctx.world}): it is the global batch, split evenly between them", file=sys.stderr)
        distributed.shutdown(ctx)
        return 2
    # The command needs no torchrun to reproduce a run: the history is the same for any number of processes.
    job = Job(config, ctx, "python -m evaluation.run " + " ".join(shlex.quote(a) for a in argv))
    try:
        return run_command(job)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished runs are saved in {config.out}; the same command resumes", file=sys.stderr)
        return 130
    except (bb.BackboneError, data.DatasetError, WriteError) as exc:
        # A user's file or folder, not a bug: one line, no traceback. Finished runs are already on disk.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(ctx)


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


def load_datasets(job: Job) -> list[tuple[data.DatasetSplits, str]]:
    """(splits, label) of each dataset the command names; unusable data (verify's rule) is refused here."""
    config = job.config
    names = list(data.DATASETS) if config.dataset == "all" else [config.dataset] if config.dataset else [None]
    datasets = []
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits = data.load_dataset(name, data_root=config.data_root, data_dir=config.data_dir,
                                       drop_duplicates=config.drop_duplicates, workers=config.workers,
                                       memo=config.cache_dir / "file_checks.json")
        if job.ctx.main:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
        datasets.append((splits, dataset_label(splits.name, config.drop_duplicates)))
    return datasets


def run_command(job: Job) -> int:
    config, ctx = job.config, job.ctx
    say = print if ctx.main else (lambda *a, **k: None)
    start = time.perf_counter()
    bb.check_backbone_available(config.backbone, config.weights)
    if ctx.main:
        for path, option in ((config.out, "--out"), (config.plots, "--plots"), (config.cache_dir, "--cache-dir")):
            check_output_folder(path, option)
    datasets = load_datasets(job)
    t0 = time.perf_counter()
    # Frozen runs whose features are cached never need the network itself: build it lazily.
    backbone = bb.LazyBackbone(config.backbone, config.weights, **({} if ctx.main else {"memo": None}))
    if config.mode == "finetune":
        backbone = backbone.build()
    job.timer.add("backbone", time.perf_counter() - t0)
    teacher_hash = None
    if config.teacher_backbone is not None:  # checked and built here, before any student trains
        bb.check_backbone_available(config.teacher_backbone)
        tconfig = config.teacher_config()
        job.teacher = Job(tconfig, ctx, job.command, job.groups, job.timer.tagged(f"teacher {tconfig.backbone}"))
        tbackbone = bb.LazyBackbone(tconfig.backbone, "imagenet", **({} if ctx.main else {"memo": None}))
        job.teacher_backbone = tbackbone.build() if tconfig.mode == "finetune" else tbackbone
        teacher_hash = tbackbone.weights_hash
        records.check_compatible(tconfig, datasets, teacher_hash, write_listing=False)
    records.check_compatible(config, datasets, backbone.weights_hash, write_listing=ctx.main, teacher_hash=teacher_hash)
    say(f"# {job.command}")
    say(f"# backbone {backbone.name} (weights {config.weights}, hash {backbone.weights_hash}), mode {config.mode}, "
        f"device {config.device}, {len(config.losses)} losses x "
        + (f"seeds {config.seeds}" if config.protocol == "split" else f"{config.repeats} repeats of {config.folds} folds")
        + f" x fractions {config.train_fraction}"
        + (f", {ctx.world} processes ({torch.distributed.get_backend()})" if ctx.distributed else ""))
    units = {label: dataset_units(config, splits) for splits, label in datasets}
    grid = [{"dataset": label, "backbone": backbone.name, "mode": config.mode, "protocol": config.protocol,
             "loss": config.distil_label if loss == "distillation" and config.distil_label else loss,
             "seed": unit.seed, "fold": unit.fold, "train_fraction": fraction}
            for _, label in datasets for fraction in config.train_fraction for unit in units[label]
            for loss in config.losses]
    if ctx.main:
        write_json_atomically(grid, config.out / "grid.json")
        for splits, label in datasets:  # as timm keeps args.yaml: --config this file reruns the command
            write_text_atomically(records.config_path(config.out, label, backbone.name, config.mode, config.protocol),
                                  config.to_yaml())
            if config.protocol == "cv":
                pool = splits.train + splits.valid
                protocol.write_folds(config.out / "folds" / f"{label}.csv", label,
                                     [folders.relative(s.path, splits.root) for s in pool],
                                     [s.sha256 or "" for s in pool], units[label])
    # A distillation run needs its teacher from the same (dataset, fraction, unit), so shards
    # are made of whole groups, dealt out in a fixed order: every job computes the same split.
    index, count = config.shard_parts
    groups = [(label, fraction, unit.seed, unit.fold) for splits, label in datasets
              for fraction in config.train_fraction for unit in units[label]]
    job.groups = {g for i, g in enumerate(groups) if i % count == index}
    for splits, label in datasets:
        if any(g[0] == label for g in job.groups):
            run_dataset(job, splits, label, backbone, units[label])
    if not ctx.main:
        return 0
    from . import report, tables  # pandas and matplotlib load only once there is something to report

    t0 = time.perf_counter()
    timing = {"sections": dict(job.timer.sections), "total": None}
    result = report.write_report(config.out, config.plots, timing=timing, grid=grid, baseline=config.baseline)
    job.timer.add("report", time.perf_counter() - t0)
    timing = {"sections": dict(job.timer.sections), "total": time.perf_counter() - start}
    write_json_atomically(timing, config.out / "timing.json")
    write_text_atomically(config.out / "timing.md", tables.format_timing(timing))
    for _, label in datasets:
        print()
        print(tables.format_table(result["summary"], label, result["comparison"]))
    print("\ntiming (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing["sections"].items()) + f", total {timing['total']:.1f}")
    print(f"tables in {config.out}, plots in {config.plots}")
    missing = result.get("missing", [])
    if missing:
        print(f"{len(missing)} requested runs are not finished", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
