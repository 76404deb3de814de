"""Training and evaluation of one (loss, seed) run: ``train_one_epoch``, ``evaluate``, ``fit``.

The same functions serve both modes. In frozen mode the inputs are cached backbone
features and the model is (optional MLP →) MarginAwareHead; in finetune mode the inputs
are image batches and the model also holds the backbone, of which only the unfrozen
stages train. Every model is called as ``model(inputs, target, teacher_logits)`` and
returns lossbank's ``HeadOutput(logits, loss)``.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from lossbank import HeadOutput, MarginAwareHead, get_loss_info

from . import distributed
from . import features as feats
from .distributed import SINGLE, Context, gather_rows
from .metrics import macro_f1, retrieval_metrics, topk_accuracy

# Fine-tuning moves pretrained stages with smaller steps than the new head.
BACKBONE_LR_SCALE = 0.1

class Classifier(nn.Module):
    """[backbone →] [standardise →] [dropout → MLP →] MarginAwareHead.

    ``standardise`` centres frozen features with the training mean and std: pooled CNN
    features are all non-negative, which crowds them into one orthant and hurts the
    angle-based margin losses.

    Under torchrun (``context`` with more than one process) ``inputs`` are this process's
    rows of the global batch and ``target`` is the whole global batch's: the backbone's
    features are gathered before the MLP, so everything after the backbone sees the
    global batch (see evaluation/distributed.py).
    """

    def __init__(self, head: MarginAwareHead, *, backbone: nn.Module | None = None, in_features: int,
                 hidden: int = 0, dropout: float = 0.0, mean: Tensor | None = None, std: Tensor | None = None,
                 context: Context = SINGLE):
        super().__init__()
        self.backbone = backbone
        self.context = context
        self.register_buffer("mean", mean if mean is not None else torch.zeros(in_features))
        self.register_buffer("std", std if std is not None else torch.ones(in_features))
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        if hidden:
            # No bias before BatchNorm, which subtracts the mean anyway: its gradient would be
            # rounding noise, which AdamW scales up to full-size steps.
            layers += [nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
        self.neck = nn.Sequential(*layers)
        self.head = head

    def head_inputs(self, inputs: Tensor, target: Tensor | None = None) -> Tensor:
        """The features the head receives (after the backbone, standardising and the MLP)."""
        dtype = self.mean.dtype  # float64 for a model in double precision; inputs arrive as float32
        x = self.backbone(inputs.to(dtype)) if self.backbone is not None else inputs
        if self.context.distributed:
            if target is None:
                raise ValueError("a model trained across processes needs the global batch's target to gather its rows")
            x = gather_rows(x, len(target), self.context)
        return self.neck((x.to(dtype) - self.mean) / self.std)

    def embed(self, inputs: Tensor | None = None, target: Tensor | None = None, *,
              head_inputs: Tensor | None = None) -> Tensor:
        """The embedding to compare images by: the L2-normalised feature a margin loss acts on, or, for
        losses on logits, the penultimate feature (the head's input) as it is.

        ``head_inputs``: ``self.head_inputs(inputs, target)`` already computed (by a forward that also wants the
        logits, as ``evaluate`` does), so the backbone does not run twice."""
        return self._embedding(self.head_inputs(inputs, target) if head_inputs is None else head_inputs)

    def logits_and_embedding(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Margin-free logits and ``embed``'s embedding, from one pass through the network."""
        x = self.head_inputs(inputs)
        return self.head(x).logits, self._embedding(x)

    def _embedding(self, head_inputs: Tensor) -> Tensor:
        return nn.functional.normalize(head_inputs, dim=1) if self.head.uses_margin else head_inputs

    def forward(self, inputs: Tensor, target: Tensor | None = None, teacher_logits: Tensor | None = None) -> HeadOutput:
        return self.head(self.head_inputs(inputs, target), target, teacher_logits)


def build_classifier(loss: str, in_features: int, num_classes: int, class_counts: list[int], *, hidden: int,
                     dropout: float, loss_kwargs: dict | None = None, backbone: nn.Module | None = None,
                     mean: Tensor | None = None, std: Tensor | None = None, context: Context = SINGLE) -> Classifier:
    kwargs = dict(loss_kwargs or {})
    if get_loss_info(loss).needs_class_counts:
        kwargs.setdefault("class_counts", class_counts)
    head = MarginAwareHead(hidden or in_features, num_classes, loss, **kwargs)
    return Classifier(head, backbone=backbone, in_features=in_features, hidden=hidden,
                      dropout=dropout, mean=mean, std=std, context=context)


# ---------------------------------------------------------------- batches
Batches = Callable[[int], Iterable[tuple[Tensor, ...]]]  # epoch -> (inputs, target[, teacher logits]) batches


def feature_batches(features: Tensor, labels: Tensor, batch_size: int, seed: int,
                    teacher_logits: Tensor | None = None) -> Batches:
    """Each epoch: every image once, in a seeded order, as one of its cached augmented views.

    With ``teacher_logits`` (views, n, classes) each batch also carries the teacher's logits for the same views."""
    views, n = features.shape[0], features.shape[1]

    def epoch_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
        view = torch.randint(0, views, (n,), generator=g)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2 and n >= 2:  # a batch of one breaks BatchNorm in the MLP: skip it (other epochs see it)
                continue
            if teacher_logits is None:
                yield features[view[idx], idx], labels[idx]
            else:
                yield features[view[idx], idx], labels[idx], teacher_logits[view[idx], idx]

    return epoch_batches


def stratified_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
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


def finetune_batches(config, ctx: Context, net, inputs: Tensor, labels: Tensor, seed: int, *, train: bool,
                     cached: bool, teacher_logits: Tensor | None = None) -> Batches:
    """epoch -> (this process's inputs, the global batch's target) for each global batch.

    ``inputs`` are cached trunk outputs (views, N, C, H, W), each epoch picking a view per
    image, or decoded images (N, 3, S, S), each augmented with its own generator. Either
    way the random choices depend on (seed, epoch, image) only, never on which process
    handles the image. ``teacher_logits`` (views, N, classes), with cached inputs only, add the global
    batch's teacher logits for the same views.
    """
    n = len(labels)

    def epoch_batches(epoch):
        epoch_seed = seed * 100_003 + epoch
        if cached:
            views = inputs.shape[0]
            view = (torch.randint(0, views, (n,), generator=torch.Generator().manual_seed(epoch_seed))
                    if train else torch.zeros(n, dtype=torch.long))
        for local, rows in distributed.batch_indices(n, config.batch_size, ctx, shuffle=train, seed=seed, epoch=epoch):
            if train and len(rows) < 2:  # a batch of one breaks BatchNorm in the MLP: skip it (other epochs see it)
                continue
            if cached:
                x = inputs[view[local], local].to(config.device)
            else:
                images = inputs[local].to(config.device)
                if train:
                    images = torch.cat([feats.train_view(images[j:j + 1], config.image_size,
                                                         torch.Generator().manual_seed(epoch_seed * 1_000_003 + int(i)))
                                        for j, i in enumerate(local)])
                else:
                    images = feats.eval_view(images, config.image_size)
                x = feats.normalise(images, net)
            x = x.contiguous(memory_format=torch.channels_last)
            if teacher_logits is None:
                yield x, labels[rows].to(config.device)
            else:
                yield x, labels[rows].to(config.device), teacher_logits[view[rows], rows].to(config.device)

    return epoch_batches


@dataclass
class RunData:
    """The images of one run: to train on (every cached view, or decoded images), to score on, to choose on.

    Frozen: features (views, n, D) to train on, (n, D) to score and choose on. Fine-tuning the last stages:
    trunk outputs (views, n, C, H, W) and (1, n, C, H, W). Fine-tuning everything: decoded images (n, 3, S, S).
    """
    train_x: Tensor
    train_y: Tensor
    valid_x: Tensor
    valid_y: Tensor
    inner_x: Tensor | None = None  # the inner validation part of the training set; None: no early stopping on it
    inner_y: Tensor | None = None
    # Another backbone's logits for the same images and views (--teacher-backbone): (views, n, classes) to
    # train on, (n, classes) to score and choose on. None: the run has no such teacher.
    train_t: Tensor | None = None
    valid_t: Tensor | None = None
    inner_t: Tensor | None = None


@dataclass
class RunSetup:
    """An untrained model for one run and what trains it."""
    model: nn.Module
    param_groups: list[dict]  # the backbone's with "lr_scale"
    train_batches: Batches
    valid_batches: Callable[[], Iterable]
    select_batches: Callable[[], Iterable] | None  # the inner validation part's, to choose the epoch on
    train_mode: Callable[[], None]
    class_counts: list[int]  # of the training subset
    num_train: int


def set_up_run(config, ctx: Context, run: RunData, num_classes: int, backbone, loss: str, seed: int,
               fraction: float, loss_kwargs: dict | None = None) -> RunSetup:
    """The model of one run (frozen: head on cached features; finetune: backbone stages too), seeded, with its batches.

    ``loss_kwargs`` (a search's trial) replace the loss arguments of the config."""
    subset = stratified_subset(run.train_y, fraction, seed)
    train_y = run.train_y[subset]
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    given = run.train_t is not None  # the teacher's logits come with the batches
    train_t = run.train_t[:, subset].to(dtype) if given else None
    counts = torch.bincount(train_y, minlength=num_classes).tolist()
    loss_kwargs = config.loss_kwargs(loss) if loss_kwargs is None else loss_kwargs
    torch.manual_seed(seed)
    if config.mode == "frozen":
        train_x = run.train_x[:, subset]
        flat = train_x.reshape(-1, train_x.shape[-1])
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        model = build_classifier(loss, backbone.num_features, num_classes, counts, hidden=config.hidden,
                                 dropout=config.dropout, loss_kwargs=loss_kwargs, mean=mean, std=std)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        train_batches = feature_batches(train_x, train_y, config.batch_size, seed, train_t)

        def batches_of(x, y, t):
            return lambda: ((x[i:i + 256], y[i:i + 256], *([] if t is None else [t[i:i + 256]]))
                            for i in range(0, len(y), 256))
        train_mode = model.train
    else:
        net = copy.deepcopy(backbone)
        backbone_params = net.unfreeze(config.unfreeze)
        net.model.to(memory_format=torch.channels_last)
        # unfreeze last: the inputs are the cached trunk outputs, and only the tail runs here
        cached = config.unfreeze == "last"
        model = build_classifier(loss, net.num_features, num_classes, counts, hidden=config.hidden,
                                 dropout=config.dropout, loss_kwargs=loss_kwargs,
                                 backbone=net.split()[1] if cached else net.model, context=ctx)
        head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [{"params": head_params}, {"params": backbone_params, "lr_scale": BACKBONE_LR_SCALE}]
        train_x = run.train_x[:, subset] if cached else run.train_x[subset]
        train_batches = finetune_batches(config, ctx, net, train_x, train_y, seed, train=True, cached=cached,
                                         teacher_logits=train_t)

        def batches_of(x, y, t):
            return lambda: finetune_batches(config, ctx, net, x, y, seed, train=False, cached=cached,
                                            teacher_logits=None if t is None else t[None])(0)

        def train_mode():
            model.train()
            net.train_mode()
    select = (batches_of(run.inner_x, run.inner_y, run.inner_t.to(dtype) if given else None)
              if run.inner_y is not None and len(run.inner_y) else None)
    valid = batches_of(run.valid_x, run.valid_y, run.valid_t.to(dtype) if given else None)
    return RunSetup(model.to(config.device, dtype), groups, train_batches, valid, select,
                    train_mode, counts, len(subset))


# ---------------------------------------------------------------- one epoch
def _autocast(device: str, enabled: bool):
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if enabled else nullcontext()


def _full(logits: Tensor) -> Tensor:
    """bf16 autocast output in float32; float32 and float64 as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], optimiser: torch.optim.Optimizer,
                    *, device: str = "cpu", teacher: nn.Module | None = None, amp: bool = False,
                    train_mode: Callable[[], None] | None = None) -> dict:
    """One pass over the training batches. Returns mean train loss and top-1 (sample-weighted).

    Stops at the first non-finite loss and reports it as ``{"nonfinite": True}`` so the
    caller can record the failure; the weights are not updated with that batch.
    """
    (train_mode or model.train)()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, target, *given in batches:  # given: the teacher's logits, when they come with the batch
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        teacher_logits = given[0].to(device) if given else None
        if teacher is not None:
            with torch.no_grad(), _autocast(device, amp):
                # with the target: across processes the teacher gathers its rows like the student
                teacher_logits = _full(teacher(inputs, target).logits)
        with _autocast(device, amp):
            out = model(inputs, target, teacher_logits)
        if not torch.isfinite(out.loss):
            return {"train_loss": out.loss.item(), "train_top1": correct / max(seen, 1), "nonfinite": True}
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        optimiser.step()
        n = target.shape[0]
        total_loss += out.loss.item() * n
        correct += (out.logits.argmax(1) == target).sum().item()
        seen += n
    return {"train_loss": total_loss / max(seen, 1), "train_top1": correct / max(seen, 1), "nonfinite": False}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, *, device: str = "cpu",
             teacher: nn.Module | None = None, amp: bool = False, embed: bool = False) -> dict:
    """Valid loss (the training loss on valid data), top-1, top-3, macro-F1, and the confusion matrix
    (``confusion``: rows = true class, columns = predicted, counts).

    ``embed``: also ``embeddings`` (images, dim; float32 on the CPU) of the scored images, in their order, from
    ``Classifier.embed`` on the same forward as the logits, and their ``labels``."""
    model.eval()
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    logits_all, targets, embedded, total_loss, seen = [], [], [], 0.0, 0
    for inputs, target, *given in batches:
        inputs, target = inputs.to(device), target.to(device)
        with _autocast(device, amp):
            teacher_logits = _full(teacher(inputs, target).logits) if teacher is not None else \
                given[0].to(device) if given else None
            if embed:  # Classifier.forward, split open to keep the head's input
                x = inner.head_inputs(inputs, target)
                out = inner.head(x, target, teacher_logits)
                embedded.append(inner.embed(head_inputs=x).float().cpu())
            else:
                out = model(inputs, target, teacher_logits)
        total_loss += out.loss.item() * target.shape[0]
        seen += target.shape[0]
        logits_all.append(out.logits.float().cpu())
        targets.append(target.cpu())
    logits, target = torch.cat(logits_all), torch.cat(targets)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((target.long(), logits.argmax(1)), torch.ones_like(target, dtype=torch.long), accumulate=True)
    scores = {
        "valid_loss": total_loss / max(seen, 1),
        "valid_top1": topk_accuracy(logits, target, 1),
        "valid_top3": topk_accuracy(logits, target, 3),
        "valid_macro_f1": macro_f1(logits.argmax(1), target, num_classes),
        "confusion": confusion.tolist(),
    }
    if embed:
        scores.update(embeddings=torch.cat(embedded), labels=target)
    return scores


# ---------------------------------------------------------------- a whole run
@dataclass
class FitResult:
    history: list[dict]
    status: str  # "ok" | "failed"
    failed_epoch: int | None
    failure: str | None
    best_epoch: int
    best_valid_top1: float
    final: dict
    train_seconds: float
    model: nn.Module


def fit(model: nn.Module, params: Iterable[nn.Parameter], train_batches: Batches, valid_batches: Callable[[], Iterable],
        num_classes: int, *, epochs: int, lr: float, weight_decay: float, patience: int, device: str = "cpu",
        teacher: nn.Module | None = None, amp: bool = False, train_mode: Callable[[], None] | None = None,
        progress: Callable[[dict], None] | None = None, select_batches: Callable[[], Iterable] | None = None
        ) -> FitResult:
    """Train for ``epochs`` with AdamW and a cosine schedule, stopping after ``patience`` epochs (0: never)
    without a lower loss on ``select_batches`` (the inner validation part of the training set), or, without
    them, on ``valid_batches`` (the images the run is scored on: the published comparison's recipe, optimistic).

    ``final`` is the state at the last epoch trained, scored on ``valid_batches`` (with its confusion matrix and,
    when the run did not fail, the retrieval metrics of its embeddings: ``valid_precision_at_1``,
    ``valid_r_precision``, ``valid_map_at_r``, see ``metrics.retrieval_metrics``);
    ``best_*`` are the best epoch's valid top-1, chosen on the scored images themselves: optimistic, for scale.
    """
    optimiser = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    history: list[dict] = []
    best_loss, best_epoch, best_top1, waited = math.inf, 0, 0.0, 0
    status, failed_epoch, failure = "ok", None, None
    start = time.perf_counter()
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    criterion = inner.head.criterion if hasattr(inner, "head") else None
    embeds = hasattr(inner, "embed")  # a Classifier; a bare test module has no embedding
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        train = train_one_epoch(model, train_batches(epoch), optimiser, device=device, teacher=teacher, amp=amp,
                                train_mode=train_mode)
        if train.pop("nonfinite"):
            status, failed_epoch = "failed", epoch
            failure = f"training loss became {train['train_loss']} in epoch {epoch}"
            break
        # The embeddings come from the same forward as the logits; only the final model's are scored (below).
        valid = evaluate(model, valid_batches(), num_classes, device=device, teacher=teacher, amp=amp, embed=embeds)
        confusion = valid.pop("confusion")
        embedded = (valid.pop("embeddings"), valid.pop("labels")) if embeds else None
        chosen_on = valid["valid_loss"]
        if select_batches is not None:
            inner_scores = evaluate(model, select_batches(), num_classes, device=device, teacher=teacher, amp=amp)
            valid.update(inner_loss=inner_scores["valid_loss"], inner_top1=inner_scores["valid_top1"])
            chosen_on = inner_scores["valid_loss"]
        schedule.step()
        row = {"epoch": epoch, **train, **valid,
               "lambda": getattr(criterion, "current_lambda", None),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if progress:
            progress(row)
        if not (math.isfinite(valid["valid_loss"]) and math.isfinite(chosen_on)):
            status, failed_epoch, failure = "failed", epoch, f"valid loss became {valid['valid_loss']} in epoch {epoch}"
            break
        if valid["valid_top1"] > best_top1 or best_epoch == 0:
            best_top1, best_epoch = valid["valid_top1"], epoch
        if chosen_on < best_loss - 1e-6:
            best_loss, waited = chosen_on, 0
        else:
            waited += 1
            if patience and waited >= patience:
                break
    last = history[-1] if history else {}
    final = {k: last.get(k) for k in ("valid_top1", "valid_top3", "valid_macro_f1", "valid_loss")}
    if history:
        final["confusion"] = confusion
    if status == "ok" and history and embeds:
        # Retrieval is scored once, on the final model: the embeddings of every scored image, each querying the
        # others.
        final.update({f"valid_{name}": None if math.isnan(value) else value  # NaN: no class with two images
                      for name, value in retrieval_metrics(*embedded).items()})
    return FitResult(history, status, failed_epoch, failure, best_epoch, best_top1, final,
                     time.perf_counter() - start, model)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, gradient-free copy: how a finished model serves as a distillation teacher."""
    teacher = copy.deepcopy(getattr(model, "module", model)).eval()  # unwrapped from DistributedDataParallel
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
