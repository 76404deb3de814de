"""An equal-budget search per loss (``--search N``): Optuna's seeded TPE sampler, scored on the inner validation part.

For every run (loss, unit, fraction) the search tries N settings of the learning rate and the
loss's own parameters (``config.SEARCH_SPACE``), each trained on the training part and scored by
its top-1 on the inner validation part, never on the images the run is scored on. The run then
trains with the best setting, and its record names what was chosen. Every loss gets the same N,
so no loss wins by being tuned harder.

Each study lives in an Optuna storage (``sqlite:///OUT/search.db`` by default, or
``--search-storage URL`` shared by several machines) under the run's name, so a killed search
resumes with the trials it has left, and a rerun reuses a finished one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

from . import records, train
from .config import SEARCH_LR, SEARCH_SPACE, trained_loss


def storage_url(config) -> str:
    return config.search_storage or f"sqlite:///{(config.out / 'search.db').resolve()}"


def _suggest(trial, loss: str) -> tuple[float, dict]:
    lr = trial.suggest_float("lr", *SEARCH_LR, log=True)
    kwargs = {}
    for name, (low, high, scale) in SEARCH_SPACE.get(loss, {}).items():
        if scale == "int":
            kwargs[name] = trial.suggest_int(name, int(low), int(high))
        else:
            kwargs[name] = trial.suggest_float(name, low, high, log=scale == "log")
    return lr, kwargs


def search(config, ctx, run_data: train.RunData, num_classes: int, backbone, key: dict, teacher=None) -> dict:
    """The chosen {"lr", "loss_kwargs", "inner_top1", "trials", "study"} for the run ``key``, after config.search trials."""
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    if run_data.inner_y is None or not len(run_data.inner_y):
        raise ValueError("--search needs an inner validation part (--inner-valid > 0) with images in it")
    # A trial trains on the training part and is scored on the inner part, which also stops it early.
    trial_data = replace(run_data, valid_x=run_data.inner_x, valid_y=run_data.inner_y, valid_t=run_data.inner_t,
                         inner_x=None, inner_y=None, inner_t=None)
    name = records.describe_key(records.run_key(key))
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    study = optuna.create_study(study_name=name, storage=storage_url(config), load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial):
        lr, kwargs = _suggest(trial, trained_loss(key["loss"]))
        setup = train.set_up_run(config, ctx, trial_data, num_classes, backbone, trained_loss(key["loss"]), key["seed"],
                                 key["train_fraction"], loss_kwargs=kwargs)
        for g in setup.param_groups:
            g["lr"] = lr * g.pop("lr_scale", 1.0)
        result = train.fit(setup.model, setup.param_groups, setup.train_batches, setup.valid_batches, num_classes,
                           epochs=config.epochs, lr=lr, weight_decay=config.weight_decay, patience=config.patience,
                           device=config.device, teacher=teacher,
                           amp=config.precision == "bf16" and config.mode == "finetune", train_mode=setup.train_mode)
        return result.final["valid_top1"] if result.status == "ok" else 0.0

    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if done < config.search:
        study.optimize(objective, n_trials=config.search - done)
    best = study.best_trial
    lr = best.params["lr"]
    kwargs = {k: v for k, v in best.params.items() if k != "lr"}
    return {"lr": lr, "loss_kwargs": kwargs, "inner_top1": best.value, "trials": config.search, "study": name,
            "params": json.loads(json.dumps(best.params))}
