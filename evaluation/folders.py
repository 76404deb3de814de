"""What a dataset folder holds and which split each file goes to: the record a scan makes
(``Scan``), the seeded split rule, and a user's own folder of images (``data_dir`` /
``--data-dir``).

The named datasets are scanned against the manifest in evaluation.data; both kinds of scan
end in the same ``Scan``, so that loading and the audit treat them alike. ``DatasetError``
is defined here, below evaluation.images and evaluation.data, so that a file that will not
decode and a folder that cannot be used are the same kind of error.
"""
from __future__ import annotations

import hashlib
import math
import os
import pathlib
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

SPLITS = ("train", "valid")
# What counts as an image in a user's folder; anything else there is listed, not read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
VALID_FOLDER_NAMES = ("valid", "val", "test")
# Folder names that mean a split of a dataset, not a class: --data-dir pointing one level too
# high (at an archive's root) would otherwise train a "train vs test" classifier.
SPLIT_LIKE_NAME = re.compile(r"(train|training|test|testing|valid|validation|val|dev|eval)([_ -]?(zip|set|data|images|split))?")
USER_VALID_FRACTION = 0.2


class DatasetError(Exception):
    """A dataset cannot be used as given; the message says what to do."""


# ---------------------------------------------------------------------------
# Splitting

def natural_key(text: str):
    """Sort key that puts cloudy2 before cloudy10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def valid_count(n: int, valid_fraction) -> int:
    """ceil(valid_fraction * n) in exact arithmetic (0.2 * 300 is 60, not 60.000...01),
    leaving at least one training image in a class of two or more."""
    if n < 2:
        return 0
    return min(n - 1, math.ceil(Fraction(str(valid_fraction)) * n))


def stratified_split(files_by_class: dict[str, list[str]], valid_fraction, seed: int,
                     keep_together=()) -> dict[str, set[str]]:
    """The valid file names of each class; the rest is train.

    Depends only on the names given, the seed and the groups, never on the machine
    or on which files exist on disk. The rule is spelt out in datasets_manifest.yaml
    (weather, split.rule).
    """
    group_of = {}
    for group in keep_together:
        for name in group:
            group_of[name] = tuple(group)
    valid = {}
    for cls, names in files_by_class.items():
        names = sorted(set(names), key=natural_key)
        in_class = set(names)
        units, seen = [], set()
        for name in names:
            if name in seen:
                continue
            unit = tuple(sorted((m for m in group_of.get(name, (name,)) if m in in_class), key=natural_key))
            seen.update(unit)
            units.append(unit)
        units.sort(key=lambda u: hashlib.sha256(f"{seed}/{cls}/{u[0]}".encode()).digest())
        target = valid_count(len(names), valid_fraction)
        chosen: set[str] = set()
        for unit in units:
            if len(chosen) == target:
                break
            if len(chosen) + len(unit) <= target:
                chosen.update(unit)
        valid[cls] = chosen
    return valid


# ---------------------------------------------------------------------------
# What a scan finds

@dataclass
class Entry:
    rel: str  # posix path relative to the dataset root
    split: str
    label: int


@dataclass
class Scan:
    """Everything a dataset folder holds, before duplicates are dropped."""
    name: str
    root: pathlib.Path
    classes: list[str]
    present: list[Entry]
    missing: list[Entry]
    unexpected: list[str]
    expected_counts: dict[str, dict[str, int]] | None  # split -> class -> count; None for user data
    layout: str
    notes: list[str]


def relative(path: pathlib.Path, root: pathlib.Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def list_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Every non-hidden file under folder (hidden ones are OS litter like .DS_Store)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(pathlib.Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out, key=lambda p: natural_key(p.as_posix()))


# ---------------------------------------------------------------------------
# A user's own folder

def canonical_class(raw: str) -> str:
    """Lower case, runs of anything but letters and digits (of any script) as one "_": 'Crème Brûlée' -> 'crème_brûlée'."""
    text = unicodedata.normalize("NFC", raw).strip().casefold()
    return re.sub(r"[\W_]+", "_", text).strip("_")


def is_image_name(p: pathlib.Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: natural_key(d.name))


def _find_child(folder: pathlib.Path, wanted: str) -> pathlib.Path | None:
    for d in _class_folders(folder):
        if d.name.lower() == wanted:
            return d
    return None


def _refuse_split_folders_as_classes(root: pathlib.Path, layout_help: str) -> None:
    """--data-dir one level too high (an archive's root holding train_zip/, test_zip/...) is refused,
    naming the folder below that has the expected layout, if there is one."""
    folders = _class_folders(root)
    split_like = [d.name for d in folders if SPLIT_LIKE_NAME.fullmatch(d.name.strip().lower())]
    if not split_like or (len(split_like) < 2 and len(split_like) < len(folders)):
        return
    hint = ""
    for below in sorted((p for p in root.glob("**/") if p != root and len(p.relative_to(root).parts) <= 3),
                        key=lambda p: natural_key(p.as_posix())):
        if _find_child(below, "train") is not None and any(_find_child(below, v) for v in VALID_FOLDER_NAMES):
            hint = f" The folder {below} has that layout: pass --data-dir {below}."
            break
    raise DatasetError(f"--data-dir {root}: its folders {', '.join(split_like)} look like dataset splits, not "
                       f"classes, and a model would learn to tell the splits apart.{hint} Expected {layout_help}.")


def scan_user_dir(data_dir, split_seed: int) -> Scan:
    """A user's folder: train/ and valid/ (or val/ or test/) of class folders, or class folders
    alone, which are then split by ``stratified_split``."""
    root = pathlib.Path(data_dir).expanduser().absolute()
    layout_help = (f"{root}/train/<class>/<images> plus {root}/valid/<class>/<images> "
                   f"(or val/ or test/), or just {root}/<class>/<images> for a seeded, "
                   f"stratified 80/20 split")
    if not root.is_dir():
        raise DatasetError(f"--data-dir {root} is not a folder. Expected {layout_help}.")
    train_dir = _find_child(root, "train")
    valid_dirs = [d for d in (_find_child(root, cand) for cand in VALID_FOLDER_NAMES) if d is not None]
    valid_dir = valid_dirs[0] if valid_dirs else None
    notes: list[str] = []
    unexpected: list[str] = []
    if train_dir is not None and len(valid_dirs) > 1:
        notes.append(f"{root.name}: found {', '.join(d.name + '/' for d in valid_dirs)}; using {valid_dir.name}/ as "
                     f"the validation split, {', '.join(d.name + '/' for d in valid_dirs[1:])} is not used")

    def images_by_class(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
        out = {}
        for d in _class_folders(folder):
            files = list_files(d)
            imgs = [p for p in files if is_image_name(p)]
            unexpected.extend(relative(p, root) for p in files if not is_image_name(p))
            if imgs:
                out[d.name] = imgs
        for p in folder.iterdir():
            if p.is_file() and not p.name.startswith("."):
                unexpected.append(relative(p, root))
        return out

    if train_dir is not None or valid_dir is not None:
        if train_dir is None or valid_dir is None:
            have = (train_dir or valid_dir).name
            raise DatasetError(f"--data-dir {root} has {have}/ but not its partner: expected "
                               f"{layout_help}.")
        per_split = {"train": images_by_class(train_dir), "valid": images_by_class(valid_dir)}
        split_note = f"train = {train_dir.name}/, valid = {valid_dir.name}/"
    else:
        _refuse_split_folders_as_classes(root, layout_help)
        found = images_by_class(root)
        if not found:
            raise DatasetError(f"--data-dir {root} holds no class folders with images. "
                               f"Expected {layout_help}.")
        names = {raw: [relative(p, root / raw) for p in paths] for raw, paths in found.items()}
        valid_names = stratified_split(names, USER_VALID_FRACTION, split_seed)
        per_split = {"train": {}, "valid": {}}
        for raw, paths in found.items():
            for p in paths:
                s = "valid" if relative(p, root / raw) in valid_names[raw] else "train"
                per_split[s].setdefault(raw, []).append(p)
        split_note = (f"seeded stratified split (seed {split_seed}): valid = "
                      f"ceil({USER_VALID_FRACTION} x n) per class, files ranked by "
                      f"sha256('<seed>/<class folder>/<path in it>')")

    folder_of = {"train": train_dir.name, "valid": valid_dir.name} if train_dir is not None else {"train": "", "valid": ""}
    canonical_of = {}
    for split in SPLITS:
        by_class = defaultdict(list)
        for raw in per_split[split]:
            c = canonical_class(raw)
            if not c:
                raise DatasetError(f"--data-dir {root}: the class folder name '{raw}' has no letters "
                                   f"or digits; rename it.")
            canonical_of[raw] = c
            by_class[c].append(raw)
        for c, raws in by_class.items():
            if len(raws) > 1:
                where = ", ".join(f"'{folder_of[split]}/{r}'" if folder_of[split] else f"'{r}'"
                                  for r in sorted(raws))
                raise DatasetError(f"--data-dir {root}: class folders {where} all mean class "
                                   f"'{c}'; rename or merge them.")
    spelled = defaultdict(set)
    for raw, c in canonical_of.items():
        spelled[c].add(raw)
    for c, raws in spelled.items():
        if len(raws) > 1:  # e.g. train/apple and valid/Apple: one class, spelt differently in the two splits
            notes.append(f"{root.name}: class '{c}' is spelt {' and '.join(repr(r) for r in sorted(raws))} "
                         f"in {folder_of['train']}/ and {folder_of['valid']}/: taken as one class")
    classes = sorted(set(canonical_of.values()))
    train_classes = {canonical_of[raw] for raw in per_split["train"]}
    no_train = sorted(c for c in classes if c not in train_classes)
    if no_train:
        raise DatasetError(f"--data-dir {root}: class(es) {', '.join(no_train)} have no training "
                           f"images; a model cannot learn them. Add images or remove the folder.")
    if len(classes) < 2:
        raise DatasetError(f"--data-dir {root}: found only class {classes}; a classifier needs "
                           f"at least two class folders. Expected {layout_help}.")
    valid_classes = {canonical_of[raw] for raw in per_split["valid"]}
    no_valid = sorted(c for c in classes if c not in valid_classes)
    if no_valid:
        notes.append(f"{root.name}: no validation images for class(es) {', '.join(no_valid)}")
    present = [Entry(relative(p, root), s, classes.index(canonical_of[raw]))
               for s in SPLITS for raw, paths in per_split[s].items() for p in paths]
    present.sort(key=lambda e: (SPLITS.index(e.split), e.label, natural_key(e.rel)))
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (", ..." if len(unexpected) > 10 else "")
        notes.append(f"{root.name}: {len(unexpected)} files that are not images by their extension "
                     f"are ignored ({shown})")
    return Scan(root.name, root, classes, present, [], sorted(unexpected, key=natural_key), None,
                 f"{split_note}; expected {layout_help}", notes)

