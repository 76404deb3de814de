"""The run record: one JSON file per finished (dataset, backbone, mode, loss, seed, train fraction) run.

Everything about records lives here: their fields and version (``new_record``), their key and
path (``run_key``, ``record_path``), writing them (``write_record``, through the one atomic
writer of ``evaluation.files``), reading and checking them (``read_record``, ``load_runs``),
and what makes two records the same run (``signature``: the settings and the data it was
trained and evaluated on; ``check_compatible`` refuses a results folder whose finished runs
were made otherwise).

Fields of a record (version ``RECORD_VERSION``)::

    dataset backbone mode protocol loss seed fold train_fraction
                                     the run's key; under --protocol cv, seed is the repeat and fold the fold
                                     scored on (split: fold None; records before version 3 lack both: split)
    status ("ok" | "failed") failed_epoch failure     how it ended
    history                          one dict per epoch: train loss/top-1, valid_* on the scored images,
                                     inner_* on the inner validation part that chose the epoch (if any)
    final                            the last epoch's valid_top1/top3/macro_f1/loss and confusion
                                     (rows = true class, columns = predicted) on the scored images, and
                                     (version 4 on) the final model's retrieval metrics on them:
                                     valid_precision_at_1 valid_r_precision valid_map_at_r
                                     (evaluation.metrics.retrieval_metrics; None when no class had two
                                     scored images; absent in older records and in failed runs)
    best_epoch best_valid_top1       the best epoch on the scored images: optimistic, for scale only
    train_seconds
    classes num_train num_inner num_valid train_class_counts
                                     what it saw: trained on, held out to choose the epoch, scored on
    signature                        settings + data identity: what must agree to reuse it
    config                           what it used beyond the signature (lr, device, teacher, loss_args)
    search                           with --search: the chosen lr and loss arguments, their inner top-1
    weights_hash command notes skipped_files dropped record_version
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from . import data
from .files import write_atomically, write_json_atomically

RECORD_VERSION = 4  # 4: retrieval metrics in final; 3: protocol and fold
# A run is identified by these fields, and by its protocol and fold (absent: "split", no fold); a
# second record with the same identity (e.g. after merging shard folders) is a duplicate.
RUN_KEY_FIELDS = ("dataset", "backbone", "mode", "loss", "seed", "train_fraction")
# The settings of a RunConfig that change what a run computes; the others (output folders,
# progress bars, workers, the grid itself) do not.
SIGNATURE_SETTINGS = ("protocol", "folds", "inner_valid", "epochs", "batch_size", "lr", "weight_decay", "patience",
                      "hidden", "dropout", "views", "image_size", "decode_size", "precision", "unfreeze", "teacher",
                      "search")


def protocol_of(rec) -> str:
    return rec.get("protocol") or "split"


def run_key(rec) -> tuple:
    fold = rec.get("fold")
    return (rec["dataset"], rec["backbone"], rec["mode"], protocol_of(rec), rec["loss"], int(rec["seed"]),
            None if fold is None else int(fold), round(float(rec["train_fraction"]), 6))


def describe_key(key) -> str:
    dataset, backbone, mode, protocol, loss, seed, fold, frac = key
    unit = f"seed {seed}" if fold is None else f"repeat {seed} fold {fold}"
    return f"{dataset}/{backbone}/{mode}/{protocol}/{loss} {unit} train_fraction {frac:g}"


def run_folder(out: Path, dataset: str, backbone: str, mode: str, protocol: str = "split") -> Path:
    """Where the runs of (dataset, backbone, mode, protocol) live; split runs keep the folder they always had."""
    return Path(out) / "runs" / dataset / (f"{backbone}-{mode}" + ("" if protocol == "split" else f"-{protocol}"))


def record_path(out: Path, key: dict) -> Path:
    folder = run_folder(out, key["dataset"], key["backbone"], key["mode"], protocol_of(key)) / key["loss"]
    if key.get("fold") is None:
        return folder / f"seed{key['seed']}-frac{key['train_fraction']:g}.json"
    return folder / f"repeat{key['seed']}-fold{key['fold']}-frac{key['train_fraction']:g}.json"


def model_path(out: Path, key: dict) -> Path:
    """The trained model of a run that teaches distillation, beside its record."""
    return record_path(out, key).with_suffix(".pt")


def saved_model_path(out: Path, key: dict) -> Path:
    """The self-contained model of a finished run (--save-model; evaluation/saved_model.py), beside its record."""
    return record_path(out, key).with_suffix(".model.pt")


def is_finished(out: Path, key: dict, want_model: bool) -> bool:
    """Whether the run of ``key`` need not be trained: its record is there, and so is its model when one is wanted
    (a failed run has none to want)."""
    path = record_path(out, key)
    if not path.exists():
        return False
    if not want_model or saved_model_path(out, key).exists():
        return True
    return read_record(path).get("status") != "ok"


def config_path(out: Path, dataset: str, backbone: str, mode: str, protocol: str = "split") -> Path:
    """The resolved configuration of the last command that trained runs of (dataset, backbone, mode), beside them."""
    return run_folder(out, dataset, backbone, mode, protocol) / "config.yaml"


def data_path(out: Path, label: str) -> Path:
    """Where the files a dataset's runs were made on are listed, to name what changed if they change."""
    return Path(out) / "datasets" / f"{label}.json"


def signature(config, weights_hash: str, splits: data.DatasetSplits, loss: str, teacher_hash: str | None = None) -> dict:
    """What must agree for a finished run of ``loss`` to be reused: the settings (its own loss arguments among
    them), and the data it was trained and evaluated on. A run distilled from --teacher-backbone adds its
    teacher's identity (``teacher_hash``: that backbone's weights hash; the teacher's seed is the run's own)."""
    settings = {name: getattr(config, name) for name in SIGNATURE_SETTINGS}
    if loss == config.distil_label:
        settings["teacher_run"] = {"backbone": config.teacher_backbone, "mode": config.teacher_mode,
                                   "image_size": config.teacher_image_size, "weights_hash": teacher_hash}
    settings["views"] = config.views if config.mode == "frozen" else None
    settings["unfreeze"] = config.unfreeze if config.mode == "finetune" else None
    settings["folds"] = config.folds if config.protocol == "cv" else None
    settings["loss_args"] = config.loss_kwargs(loss)
    return {"data": splits.identity(), "weights_hash": weights_hash, **settings}


def new_record(key: dict, sig: dict, command: str, *, status: str, failure: str | None = None,
               failed_epoch: int | None = None, **fields) -> dict:
    """A record with every field, in one order; ``fields`` are the outcome and what the run saw."""
    return {**key, "record_version": RECORD_VERSION, "weights_hash": sig["weights_hash"], "status": status,
            "failed_epoch": failed_epoch, "failure": failure, "history": [], **fields, "signature": sig,
            "command": command}


def write_record(record: dict, out: Path) -> Path:
    path = record_path(out, record)
    write_json_atomically(record, path)
    return path


def save_model(model: torch.nn.Module, out: Path, key: dict) -> None:
    write_atomically(model_path(out, key), lambda tmp: torch.save(model.state_dict(), tmp))


def read_record(path: Path) -> dict:
    """A finished run's record, for reuse; a file that is not one is named, with what to do."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read finished run {path} ({exc}); delete it to have it rerun")
    if not isinstance(record, dict) or not isinstance(record.get("signature"), dict):
        what = "holds " + json.dumps(record)[:40] if not isinstance(record, dict) else "has no signature"
        raise SystemExit(f"error: {path} is not a run record (it {what}); delete it to have the run redone")
    return record


# ---------------------------------------------------------------- loading what a results folder holds
def record_problem(rec) -> str | None:
    """Why `rec` cannot be used as a run record, or None when it can."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    missing = [k for k in (*RUN_KEY_FIELDS, "status") if k not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if rec["status"] not in ("ok", "failed"):
        return f"status must be 'ok' or 'failed', got {rec['status']!r}"
    try:
        float(rec["train_fraction"])
    except (TypeError, ValueError):
        return f"train_fraction must be a number, got {rec['train_fraction']!r}"
    if isinstance(rec["seed"], bool) or not isinstance(rec["seed"], int):
        return f"seed must be an integer, got {rec['seed']!r}"
    if rec["status"] == "ok":
        final = rec.get("final")
        if not isinstance(final, dict) or "valid_top1" not in final:
            return "an 'ok' run needs final.valid_top1"
        top1 = final["valid_top1"]
        # Percentages written by mistake would silently scale every table by 100.
        if not isinstance(top1, (int, float)) or not 0.0 <= top1 <= 1.0:
            return f"final.valid_top1 must be a fraction in [0, 1], got {top1!r}"
    if not isinstance(rec.get("history", []), list):
        return "history must be a list of per-epoch dicts"
    return None


def dedupe(runs: list[dict]) -> list[dict]:
    """One record per run identity: an 'ok' record beats a 'failed' one, else the first wins."""
    kept: dict[tuple, int] = {}
    for i, rec in enumerate(runs):
        key = run_key(rec)
        if key not in kept:
            kept[key] = i
            continue
        j = kept[key]
        keep, drop = (i, j) if (rec["status"] == "ok" and runs[j]["status"] != "ok") else (j, i)
        where = [runs[k].get("_file", f"record #{k}") for k in (keep, drop)]
        warnings.warn(
            f"duplicate run record for {describe_key(key)}: keeping {where[0]} "
            f"({runs[keep]['status']}), ignoring {where[1]} ({runs[drop]['status']})",
            stacklevel=3,
        )
        kept[key] = keep
    # Keep the original order so that "order of first appearance" means something.
    chosen = set(kept.values())
    return [r for i, r in enumerate(runs) if i in chosen]


def load_runs(out_dir) -> list[dict]:
    """Every usable run record under ``out_dir/runs`` (searched recursively for ``*.json``).

    Unreadable or malformed files are skipped with a warning naming them; duplicate
    runs (same dataset, backbone, mode, loss, seed, train_fraction) are reduced to
    one with a warning. Each record gets a ``_file`` key with the path it came from.
    Records come in lossbank registry order of their loss (losses the registry does
    not know go last), then in sorted path order, so tables list losses the way the
    harness ran them whatever the file names are.
    """
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        return []
    runs = []
    for path in sorted(runs_dir.rglob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable run record {path}: {exc}", stacklevel=2)
            continue
        problem = record_problem(rec)
        if problem:
            warnings.warn(f"skipping run record {path}: {problem}", stacklevel=2)
            continue
        rec["_file"] = str(path)
        runs.append(rec)
    rank = _registry_rank()
    runs.sort(key=lambda r: rank.get(r["loss"], len(rank)))  # stable: path order within a loss
    return dedupe(runs)


def _registry_rank() -> dict[str, int]:
    """Position of each registered loss; empty when lossbank cannot be imported
    (the report then still works, in file order)."""
    try:
        from lossbank import list_losses
    except ImportError:
        return {}
    return {name: i for i, name in enumerate(list_losses())}


def _data_of(rec: dict):
    signature = rec.get("signature")
    return signature.get("data") if isinstance(signature, dict) else None


def refuse_mixed_data(runs: list[dict]) -> None:
    """Runs of one dataset name made on different data (other classes or files) must never share a table."""
    first: dict[str, dict] = {}
    for rec in runs:
        seen = first.setdefault(rec["dataset"], rec)
        if _data_of(seen) != _data_of(rec):
            where = [r.get("_file", f"a record of {r['loss']} seed {r['seed']}") for r in (seen, rec)]
            describe = [json.dumps(_data_of(r)) if _data_of(r) else "no record of its data (older lossbank)"
                        for r in (seen, rec)]
            raise ValueError(
                f"runs of {rec['dataset']!r} were made on different data and cannot be summarised together: "
                f"{where[0]} ({describe[0]}) and {where[1]} ({describe[1]}); keep each dataset version in its own "
                f"results folder")


# ---------------------------------------------------------------- the same run, on the same data
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


def check_compatible(config, datasets, weights_hash: str, write_listing: bool, teacher_hash: str | None = None) -> None:
    """Refuse to mix finished runs made with other settings, or on other data, into this command's results.

    The files of each dataset are listed in OUT/datasets/<label>.json by the first command that trains on it
    (``write_listing``: the main process), so that a later command on changed data can say which files changed.
    """
    out = config.out
    for splits, label in datasets:
        want = signature(config, weights_hash, splits, config.baseline)
        listing = data_path(out, label)
        listed = None
        if listing.is_file():
            try:
                listed = json.loads(listing.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                listed = None
        files = listed.get("files") if isinstance(listed, dict) else None
        if isinstance(listed, dict) and listed.get("identity") not in (None, want["data"]):
            raise SystemExit(
                f"error: {out} already holds runs of {label} made on other data ({listing}): "
                f"{describe_data_change(listed['identity'], splits, files)}.\n"
                f"Use another --out for this data, or delete {out / 'runs' / label} and {listing} to retrain on it.")
        folder = run_folder(out, label, config.backbone, config.mode, config.protocol)
        for path in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
            record = read_record(path)
            have, want = record["signature"], signature(config, weights_hash, splits, record.get("loss", ""), teacher_hash)
            if have.get("data") != want["data"]:
                raise SystemExit(
                    f"error: {out} already holds runs of {label} made on other data ({path}): "
                    f"{describe_data_change(have.get('data'), splits, files)}.\n"
                    f"Use another --out for this data, or delete {out / 'runs' / label} to retrain on it.")
            diff = {k: (have.get(k), v) for k, v in want.items() if k != "data" and have.get(k) != v}
            if diff:
                details = ", ".join(f"{k} {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
                raise SystemExit(
                    f"error: {out} already holds runs made with other settings ({path}: {details}).\n"
                    f"Use another --out for these settings, or the same settings to resume.")
        if write_listing and not isinstance(listed, dict):
            write_json_atomically({"identity": want["data"], "root": str(splits.root), "files": splits.file_list()},
                                  listing)
