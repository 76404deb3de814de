"""Which images each run trains, chooses its epoch and is scored on: the archive split or repeated K-fold CV.

A *unit* is what one run per loss is made of: a seed under ``--protocol split`` (train on the
archive's train split, score on its valid split), or a (repeat, fold) under ``--protocol cv``
(the labelled images pooled, dealt into K stratified folds anew for each repeat; a run
trains on K − 1 folds and is scored on the other). Every loss gets the same units, so its
scores pair with every other loss's: the design the paired tests in ``stats`` assume.

Byte-identical images (same sha256) always fall in the same fold, and on the same side of
the inner split, so no image is scored on a copy of itself. The inner split holds out a
share of each training set to choose the epoch (and, with ``--search``, the learning rate
and the loss's parameters): nothing is chosen on the images a run is scored on.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .files import write_text_atomically


@dataclass(frozen=True)
class Unit:
    seed: int  # split: the seed; cv: the repeat (it seeds the folds, the views and the initialisation)
    fold: int | None  # cv: the fold scored on; split: None
    train_rows: Tensor  # rows of the train pool this run may learn from (its inner validation part included)
    inner_rows: Tensor  # rows of the train pool held out to choose the epoch (empty: none)
    test_rows: Tensor  # rows of the test pool it is scored on


def _stratified_group_folds(labels: np.ndarray, groups: list[str], k: int, seed: int) -> list[np.ndarray]:
    """The test indices of each of k folds: stratified by label, byte-identical images (one group) together."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(labels)), labels, groups)]


def deal_folds(labels: Tensor, groups: list[str], folds: int, repeat: int) -> list[Tensor]:
    """Repeat ``repeat``'s K folds of the pooled images, as sorted row indices; the same for every loss and rerun."""
    largest = int(torch.bincount(labels).max()) if len(labels) else 0
    if largest < folds:
        raise ValueError(f"--folds {folds}: the largest class has only {largest} images to deal; use fewer folds")
    dealt = _stratified_group_folds(labels.numpy(), groups, folds, repeat)
    return [torch.as_tensor(np.sort(rows), dtype=torch.long) for rows in dealt]


def inner_split(rows: Tensor, labels: Tensor, groups: list[str], fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(rows to train on, rows to choose the epoch on): about ``fraction`` of ``rows`` held out, stratified, grouped.

    Classes with fewer than two groups keep all their images for training: a class must be learnt before
    a held-out image of it can say anything.
    """
    if not fraction:
        return rows, rows[:0]
    sub_labels = labels[rows].numpy()
    sub_groups = [groups[int(i)] for i in rows]
    counts = {c: len({g for g, l in zip(sub_groups, sub_labels) if l == c}) for c in set(sub_labels.tolist())}
    eligible = np.array([counts[l] >= 2 for l in sub_labels])
    # A small class cannot give a fifth of itself: hold out less (down to half) rather than nothing.
    k = max(2, min(round(1 / fraction), max(counts.values())))
    if eligible.sum() < k:
        return rows, rows[:0]
    held_local = _stratified_group_folds(sub_labels[eligible], [g for g, e in zip(sub_groups, eligible) if e], k, seed)[0]
    held = np.flatnonzero(eligible)[held_local]
    mask = np.zeros(len(rows), dtype=bool)
    mask[held] = True
    return rows[torch.as_tensor(~mask)], rows[torch.as_tensor(mask)]


def units(config, train_labels: Tensor, train_groups: list[str], test_count: int) -> list[Unit]:
    """Every unit of a command, in grid order. Under cv the train and test pools are the same pooled images."""
    out = []
    if config.protocol == "cv":
        for repeat in range(config.repeats):
            folds = deal_folds(train_labels, train_groups, config.folds, repeat)
            everything = torch.arange(len(train_labels))
            for fold, test in enumerate(folds):
                train = everything[~torch.isin(everything, test)]
                fit, inner = inner_split(train, train_labels, train_groups, config.inner_valid,
                                         seed=10_000 + repeat * config.folds + fold)
                out.append(Unit(repeat, fold, fit, inner, test))
        return out
    for seed in config.seeds:
        fit, inner = inner_split(torch.arange(len(train_labels)), train_labels, train_groups, config.inner_valid,
                                 seed=10_000 + seed)
        out.append(Unit(seed, None, fit, inner, torch.arange(test_count)))
    return out


def write_folds(path, dataset: str, relative_paths: list[str], digests: list[str], unit_list: list[Unit]) -> None:
    """folds.csv of one dataset: every pooled image's path (relative to the dataset root), sha256, repeat and fold,
    so that anyone can recompute every test from scores.csv."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "path", "sha256", "repeat", "fold"])
    for unit in unit_list:
        for row in unit.test_rows.tolist():
            writer.writerow([dataset, relative_paths[row], digests[row], unit.seed, unit.fold])
    write_text_atomically(path, buffer.getvalue())
