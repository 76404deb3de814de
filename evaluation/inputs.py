"""What the runs of one dataset read: the train and test pools of its protocol, and their cached features.

Under ``--protocol split`` the train pool is the archive's train split and the test pool its valid split;
under ``cv`` both are the pooled labelled images, and ``protocol.units`` says which rows each run trains,
chooses its epoch and is scored on. Features are cached per image and view: the augmented views of the
train pool once per view seed, the eval views of each pool once, so every fold of a repeat shares them.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from . import data, distributed, images, protocol, train
from . import features as feats
from .config import RunConfig
from .distributed import Context


class DatasetInputs:
    """What the runs of one dataset read, computed (or loaded from the cache) on first use only.

    The train pool is what runs may learn from and the test pool what they are scored on: the archive's
    train and valid splits under --protocol split, both the pooled labelled images under cv. The augmented
    views of the train pool are drawn per view seed (a run's seed, or its repeat), so a seed really redraws
    the views it trains on; the eval views of both pools are drawn once.
    """

    def __init__(self, config, ctx: Context, timer, splits: data.DatasetSplits, label: str, backbone):
        self.config, self.ctx, self.timer = config, ctx, timer
        self.splits, self.label, self.backbone = splits, label, backbone
        self.progress = not config.no_progress and ctx.main
        cv = config.protocol == "cv"
        pooled = splits.train + splits.valid
        self.train_pool = pooled if cv else splits.train
        self.test_pool = pooled if cv else splits.valid
        # The feature cache is keyed by a DatasetSplits: under cv, one holding the pooled images on both sides.
        self._feature_splits = dataclasses.replace(splits, train=pooled, valid=pooled) if cv else splits
        self.train_y = torch.tensor([s.label for s in self.train_pool], dtype=torch.long)
        self.test_y = torch.tensor([s.label for s in self.test_pool], dtype=torch.long)
        self.groups = [s.sha256 or str(s.path) for s in self.train_pool]
        self._cache: dict = {}

    def _timed(self, key, compute):
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = compute()
            self.timer.add(f"load+extract:{self.label}", time.perf_counter() - t0)
        return self._cache[key]

    def _features(self, split: str, view_seed: int | None):
        """Cached features of the train pool ("train": augmented with ``view_seed``, or eval views when it is None)
        or of the test pool ("valid"), computed by the main process first, then read by the others."""
        config, ctx = self.config, self.ctx
        augment = view_seed is not None
        part = "pooled" if config.mode == "frozen" else "trunk"
        precision = "fp32" if config.precision == "fp64" else config.precision
        if not ctx.main:
            distributed.barrier(ctx)  # the main process computes and writes the cache; then the others read it
        result = feats.cached_features(
            self.backbone, self._feature_splits, split,
            views=config.views if augment else 1, augment=augment, seed=view_seed or 0,
            image_size=config.image_size, decode_size=config.decode_size, precision=precision, device=config.device,
            cache_dir=config.cache_dir, progress=self.progress, workers=config.workers, part=part)
        if ctx.main:
            distributed.barrier(ctx)
        if result.bad_files:  # checked decodable when the dataset was loaded: the files changed since
            raise data.DatasetError(f"{len(result.bad_files)} files stopped decoding while this command ran "
                                    f"({', '.join(result.bad_files[:3])}); run the command again")
        return result.features

    def _images(self, pool):
        decoded, kept, failed = images.load_images(pool, self.config.decode_size, workers=self.config.workers,
                                                   progress=self.progress)
        if failed:
            raise data.DatasetError(f"{len(failed)} files stopped decoding while this command ran "
                                    f"({', '.join(map(str, failed[:3]))}); run the command again")
        return decoded

    def run_data(self, unit: protocol.Unit) -> train.RunData:
        config = self.config
        if config.mode == "finetune" and config.unfreeze == "all":  # decoded images, augmented while training
            train_all = self._timed("train images", lambda: self._images(self.train_pool))
            test_all = train_all if config.protocol == "cv" else self._timed(
                "test images", lambda: self._images(self.test_pool))
            views = eval_train = train_all
        else:
            views = self._timed(("train", unit.seed), lambda: self._features("train", unit.seed))
            test_all = self._timed("test", lambda: self._features("valid", None))
            eval_train = (test_all if config.protocol == "cv" else
                          self._timed("train eval", lambda: self._features("train", None))) if len(unit.inner_rows) else None
            if config.mode == "frozen":  # one eval view: (n, D)
                test_all = test_all[0]
                eval_train = eval_train[0] if eval_train is not None else None
        pick = (lambda x, rows: x[rows]) if config.mode == "frozen" or config.unfreeze == "all" else \
            (lambda x, rows: x[:, rows])
        inner = unit.inner_rows
        return train.RunData(
            train_x=views[unit.train_rows] if config.unfreeze == "all" and config.mode == "finetune"
            else views[:, unit.train_rows], train_y=self.train_y[unit.train_rows],
            valid_x=pick(test_all, unit.test_rows), valid_y=self.test_y[unit.test_rows],
            inner_x=pick(eval_train, inner) if len(inner) else None, inner_y=self.train_y[inner] if len(inner) else None)


def dataset_units(config: RunConfig, splits: data.DatasetSplits) -> list[protocol.Unit]:
    cv = config.protocol == "cv"
    pool = splits.train + splits.valid if cv else splits.train
    labels = torch.tensor([s.label for s in pool], dtype=torch.long)
    return protocol.units(config, labels, [s.sha256 or str(s.path) for s in pool], len(pool if cv else splits.valid))
