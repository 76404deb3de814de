"""The datasets the loss comparison trains on: finding them, splitting them and loading
them as lists of samples.

The three named datasets (weather, fruits, covid) are described in
``datasets_manifest.yaml`` at the repository root, file by file, as their public
archives unpack. A user's own images come in through ``data_dir`` (evaluation.folders).
Decoding the images is evaluation.images's job, auditing a copy evaluation.audit's.

Command line::

    python -m evaluation.data verify {weather,fruits,covid,all} [--data-root P]
    python -m evaluation.data verify --data-dir PATH
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import pathlib
import sys
import warnings
from dataclasses import dataclass, field

import yaml

from .folders import (SPLITS, DatasetError, Entry, Scan, list_files, natural_key, relative, scan_user_dir,
                      stratified_split)
from .images import check_files, file_sha256

DATASETS = ("weather", "fruits", "covid")
MANIFEST_PATH = pathlib.Path(__file__).resolve().parent.parent / "datasets_manifest.yaml"
DEFAULT_DATA_ROOT = pathlib.Path("~/.cache/lossbank/datasets")
DATA_ROOT_ENV = "LOSSBANK_DATA"
# A copy missing more than this share of its images is most likely an interrupted
# download or unpack, and results on it would not be comparable: refuse it.
MAX_MISSING_FRACTION = 0.10


@dataclass(frozen=True)
class Sample:
    path: pathlib.Path  # absolute
    label: int  # index into DatasetSplits.classes
    sha256: str | None = None  # of the file's bytes; load_dataset fills it in


@dataclass
class DatasetSplits:
    name: str
    classes: list[str]
    train: list[Sample]
    valid: list[Sample]
    root: pathlib.Path
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # undecodable files left out, as absolute paths

    def fingerprint(self) -> str:
        """Digest of which files' contents, as which label and split, make up this dataset.

        Built from the files' sha256 (which load_dataset computes once and remembers), so a
        copied or touched file with the same bytes keeps it and a replaced one changes it.
        """
        h = hashlib.sha256()
        h.update(f"{self.name}\n{','.join(self.classes)}\n".encode())
        for split in SPLITS:
            h.update(self._split_digest(split).encode())
        return h.hexdigest()

    def _split_digest(self, split: str) -> str:
        h = hashlib.sha256()
        for s in getattr(self, split):
            digest = s.sha256 or file_sha256(s.path)
            h.update(f"{split}\t{relative(s.path, self.root)}\t{digest}\t{s.label}\n".encode())
        return h.hexdigest()

    def identity(self) -> dict:
        """What a run trained and was evaluated on: the classes and, per split, its image count and
        a digest of its files (relative path, content, label). Two runs are comparable only if equal."""
        return {"classes": list(self.classes),
                **{split: {"images": len(getattr(self, split)), "sha256": self._split_digest(split)[:16]}
                   for split in SPLITS}}

    def file_list(self) -> dict[str, dict[str, str]]:
        """{split: {path relative to the root: sha256}}: kept beside the runs to name what changed."""
        return {split: {relative(s.path, self.root): s.sha256 or file_sha256(s.path) for s in getattr(self, split)}
                for split in SPLITS}


# ---------------------------------------------------------------------------
# Locating data and the manifest

def resolve_data_root(data_root: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder holding weather/, fruits/ and covid/: the argument, else
    $LOSSBANK_DATA, else ~/.cache/lossbank/datasets."""
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return pathlib.Path(data_root).expanduser().absolute()


def _data_root_origin(data_root) -> str:
    if data_root is not None and str(data_root) != "":
        return "from --data-root"
    if os.environ.get(DATA_ROOT_ENV):
        return f"from ${DATA_ROOT_ENV}"
    return f"the default; set --data-root or ${DATA_ROOT_ENV} to use another folder"


def load_manifest(path=None) -> dict:
    """The parsed datasets_manifest.yaml: {dataset name: entry}."""
    path = pathlib.Path(path) if path is not None else MANIFEST_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read the dataset manifest {path}: {e}") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DatasetError(f"the dataset manifest {path} is not valid YAML: {e}") from e
    datasets = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(datasets, dict):
        raise DatasetError(f"the dataset manifest {path} has no 'datasets:' mapping")
    required = ("sources", "layout", "classes", "split", "counts", "files")
    for name in DATASETS:
        entry = datasets.get(name)
        if not isinstance(entry, dict):
            raise DatasetError(f"the dataset manifest {path} has no entry for '{name}'")
        lacking = [k for k in required if k not in entry]
        if lacking:
            raise DatasetError(f"the dataset manifest {path}: '{name}' lacks {', '.join(lacking)}")
    return datasets


# ---------------------------------------------------------------------------
# Finding the files of a dataset

def _not_found_message(name, spec, where: pathlib.Path, data_root: pathlib.Path, origin: str,
                       what: str) -> str:
    sources = "\n  ".join(spec["sources"])
    return (f"{what}\n"
            f"Looked in: {where} (data root {data_root}, {origin}).\n"
            f"Download it from:\n  {sources}\n"
            f"and unpack it into the data root so that the images are at "
            f"{spec['layout']['expected']}.\n"
            f"Then check the copy with: python -m evaluation.data verify {name}")


def _scan_named(name: str, data_root, split_seed: int) -> Scan:
    manifest = load_manifest()
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}, "
                           f"or pass data_dir / --data-dir for your own images")
    spec = manifest[name]
    layout = spec["layout"]
    root = resolve_data_root(data_root) / name
    origin = _data_root_origin(data_root)
    if not root.is_dir():
        what = f"Dataset '{name}' not found: {root} does not exist."
        if all((root.parent / folder).is_dir() for folder in layout["folders"].values()):
            what += (f" {root.parent} itself looks like the {name} folder: the data root is the "
                     f"folder that holds {name}/, i.e. {root.parent.parent}.")
        raise DatasetError(_not_found_message(name, spec, root, root.parent, origin, what))
    canonical = list(spec["classes"])
    raw_to_label = {raw: i for i, raw in enumerate(spec["classes"].values())}
    by_folder_labels = layout["labels"]

    expected: list[Entry] = []
    for key, folder in layout["folders"].items():
        if not (root / folder).is_dir():
            raise DatasetError(_not_found_message(
                name, spec, root / folder, root.parent, origin,
                f"Dataset '{name}' is incomplete: the folder {root / folder} is missing."))
        files = spec["files"][key]
        if key == "all":
            valid_names = stratified_split(files, spec["split"]["valid_fraction"], split_seed,
                                           spec["split"].get("keep_together") or ())
        for raw, names in files.items():
            for fname in names:
                if key == "all":
                    split = "valid" if fname in valid_names[raw] else "train"
                else:
                    split = key
                rel = f"{folder}/{raw}/{fname}" if by_folder_labels == "class_folder" else f"{folder}/{fname}"
                expected.append(Entry(rel, split, raw_to_label[raw]))

    on_disk = set()
    for folder in layout["folders"].values():
        for p in list_files(root / folder):
            on_disk.add(relative(p, root))
    ignore = layout.get("ignore") or ()
    expected_rels = {e.rel for e in expected}
    present = [e for e in expected if e.rel in on_disk]
    missing = [e for e in expected if e.rel not in on_disk]
    unexpected = sorted((r for r in on_disk - expected_rels
                         if not any(fnmatch.fnmatch(r.rsplit("/", 1)[-1], pat) for pat in ignore)),
                        key=natural_key)

    counts = {s: {c: int(spec["counts"][s][c]) for c in canonical} for s in SPLITS}
    scan = Scan(name, root, canonical, present, missing, unexpected, counts, layout["expected"], [])

    problems = []
    for s in SPLITS:
        for i, c in enumerate(canonical):
            if not any(e.split == s and e.label == i for e in present):
                problems.append(f"no {s} images of class '{c}'")
    if len(missing) > MAX_MISSING_FRACTION * len(expected):
        problems.append(f"{len(missing)} of {len(expected)} images are missing")
    if problems:
        raise DatasetError(_not_found_message(
            name, spec, root, root.parent, origin, f"Dataset '{name}' is incomplete: {'; '.join(problems)}."))
    if missing:
        shown = ", ".join(e.rel for e in missing[:10]) + (", ..." if len(missing) > 10 else "")
        scan.notes.append(f"{name}: {len(missing)} of {len(expected)} images are missing from {root} "
                          f"({shown}); using the {len(present)} present. A full download from "
                          f"{spec['sources'][0]} has them.")
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (", ..." if len(unexpected) > 10 else "")
        scan.notes.append(f"{name}: {len(unexpected)} files in {root} are not in the manifest "
                          f"and are not used ({shown})")
    return scan


def scan_dataset(name, data_root, data_dir, split_seed) -> Scan:
    """What the named dataset, or the user's folder data_dir, holds; the split is seeded by split_seed."""
    if (name is None) == (data_dir is None):
        raise DatasetError("give exactly one of a dataset name "
                           f"({', '.join(DATASETS)}) or data_dir / --data-dir")
    if data_dir is not None:
        return scan_user_dir(data_dir, split_seed)
    return _scan_named(name, data_root, split_seed)


# ---------------------------------------------------------------------------
# Duplicates

def duplicates_to_drop(entries: list[Entry], digests: dict[str, str]):
    """Which entries --drop-duplicates removes: (dropped rels by reason, notes).

    Within train one copy of each byte-identical group stays (the first in name
    order); valid images whose bytes are in train are leaked and go; so do extra
    copies inside valid.
    """
    ordered = sorted(entries, key=lambda e: natural_key(e.rel))
    train_seen: dict[str, Entry] = {}
    dropped = {"train_duplicates": [], "valid_duplicates": [], "leaked_valid": []}
    notes = []
    for e in ordered:
        if e.split != "train":
            continue
        first = train_seen.setdefault(digests[e.rel], e)
        if first is not e:
            dropped["train_duplicates"].append(e.rel)
            if first.label != e.label:
                notes.append(f"{e.rel} and {first.rel} are the same image with different labels; "
                             f"kept {first.rel}")
    valid_seen: dict[str, Entry] = {}
    for e in ordered:
        if e.split != "valid":
            continue
        d = digests[e.rel]
        if d in train_seen:
            dropped["leaked_valid"].append(e.rel)
        elif valid_seen.setdefault(d, e) is not e:
            dropped["valid_duplicates"].append(e.rel)
    return dropped, notes


# ---------------------------------------------------------------------------
# Loading

def usability_problems(scan: Scan, undecodable) -> list[str]:
    """Why a dataset cannot be trained and evaluated on, given the files that do not decode; [] if it can.

    The one rule, shared by ``verify`` and the harness: every class needs a decodable train
    image; a named dataset needs a decodable valid image of every class too, and a user's
    folder at least one decodable valid image (a class without valid images is only noted).
    """
    bad = set(undecodable)
    usable = [e for e in scan.present if e.rel not in bad]
    problems = []
    for s in SPLITS:
        for i, c in enumerate(scan.classes):
            if not any(e.split == s and e.label == i for e in usable):
                if s == "train" or scan.expected_counts is not None:
                    problems.append(f"no decodable {s} images of class '{c}'")
    if scan.expected_counts is None and not any(e.split == "valid" for e in usable):
        problems.append("no decodable valid images at all: nothing to evaluate on")
    return problems


def load_dataset(name: str | None = None, *, data_root=None, data_dir=None,
                 drop_duplicates: bool = False, split_seed: int = 0, workers: int = 2,
                 memo=None, progress: bool = False) -> DatasetSplits:
    """Train and valid samples of a named dataset, or of a user's folder (data_dir).

    Every file is hashed and test-decoded first (``check_files``; ``memo`` is a JSON file
    that remembers the results per path, size and mtime, so a rerun only stats the files).
    Undecodable files are left out and listed in ``skipped``; a dataset that is not usable
    by ``usability_problems`` (the rule ``verify`` applies) raises DatasetError with the
    reasons, before any other work. A partial copy loads with a warning naming the missing
    count; a missing or badly incomplete one raises DatasetError saying where it looked
    and what to get.
    """
    scan = scan_dataset(name, data_root, data_dir, split_seed)
    notes = list(scan.notes)
    for note in scan.notes:
        warnings.warn(note, stacklevel=2)
    checks = check_files([scan.root / e.rel for e in scan.present], workers=workers, memo=memo, progress=progress)
    digests = {e.rel: checks[str(scan.root / e.rel)].sha256 for e in scan.present}
    errors = {e.rel: checks[str(scan.root / e.rel)].error for e in scan.present if checks[str(scan.root / e.rel)].error}
    for e in scan.present:
        for warning in checks[str(scan.root / e.rel)].warnings:
            warnings.warn(warning, stacklevel=2)
    problems = usability_problems(scan, errors)
    if problems:
        shown = "".join(f"\n  {errors[rel]}" for rel in sorted(errors, key=natural_key)[:10])
        raise DatasetError(f"{scan.name} ({scan.root}): NOT USABLE: {'; '.join(problems)}."
                           + (f" Undecodable files:{shown}" if shown else "")
                           + f"\nThe full report: {_verify_command(name, data_root, data_dir)}")
    entries = [e for e in scan.present if e.rel not in errors]
    skipped = [str(scan.root / rel) for rel in sorted(errors, key=natural_key)]
    if errors:
        lines = "\n  ".join(errors[rel] for rel in sorted(errors, key=natural_key))
        message = f"{scan.name}: {len(errors)} of {len(scan.present)} image files cannot be decoded and are left out:\n  {lines}"
        warnings.warn(message, stacklevel=2)
        notes.append(f"{scan.name}: {len(errors)} undecodable image files left out: {', '.join(sorted(errors, key=natural_key))}")
    dropped_counts: dict[str, int] = {}
    if drop_duplicates:
        dropped, dup_notes = duplicates_to_drop(entries, digests)
        gone = {rel for rels in dropped.values() for rel in rels}
        entries = [e for e in entries if e.rel not in gone]
        dropped_counts = {k: len(v) for k, v in dropped.items()}
        notes.append(f"{scan.name}: --drop-duplicates removed {dropped_counts['train_duplicates']} "
                     f"duplicate train images, {dropped_counts['valid_duplicates']} duplicate valid "
                     f"images and {dropped_counts['leaked_valid']} valid images identical to a train "
                     f"image")
        notes.extend(dup_notes)

    def samples(split):
        chosen = [e for e in entries if e.split == split]
        chosen.sort(key=lambda e: (e.label, natural_key(e.rel)))
        return [Sample(scan.root / e.rel, e.label, digests[e.rel]) for e in chosen]

    return DatasetSplits(scan.name, list(scan.classes), samples("train"), samples("valid"),
                         scan.root, notes, dropped_counts, skipped)


def _verify_command(name, data_root, data_dir) -> str:
    if data_dir is not None:
        return f"python -m evaluation.data verify --data-dir {data_dir}"
    return f"python -m evaluation.data verify {name}" + (f" --data-root {data_root}" if data_root else "")


if __name__ == "__main__":  # the README's `python -m evaluation.data verify ...`; the audit is in audit.py
    from .audit import main
    sys.exit(main())
