"""What a run is scored by: classification (``topk_accuracy``, ``macro_f1``) and retrieval (``retrieval_metrics``).

Pure functions of tensors: no files, no models. Scores are fractions in [0, 1].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "map_at_r")

# Query rows whose similarities are held at once: rows × images floats, about 40 MB for 5 000 images.
_CHUNK = 2048


def topk_accuracy(logits: Tensor, target: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().mean().item()


def macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean over classes of F1; a class absent from both predictions and targets is left out."""
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def retrieval_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """Precision@1, R-precision and MAP@R of the images retrieving each other by cosine similarity.

    Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020, section 3.2: each image queries
    all the others (itself excluded); R is the number of other images of its class. For one query,
    P@1 is 1 when its nearest neighbour has its class; R-precision is the share of its class among its R
    nearest neighbours; MAP@R = (1/R)·Σ_{i=1..R} P(i)·rel(i), with rel(i) = 1 when the i-th neighbour has its
    class and P(i) the precision of the first i neighbours. Each metric is the mean over the queries, as
    pytorch-metric-learning's ``AccuracyCalculator`` computes them (its default, not an average per class).

    Similarity is the cosine of the embeddings (they are L2-normalised here), so their scale does not
    matter. Neighbours with equal similarity are ranked by their position in ``embeddings``, so the result
    is deterministic. A query whose class has no other image (R = 0) can retrieve nothing and is left out,
    as pytorch-metric-learning leaves it out; with no query left every metric is NaN. The queries are
    scored in chunks, so memory grows with chunk × images, not images².
    """
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(f"retrieval_metrics: embeddings must be a 2-D float tensor (images, dim), got "
                         f"{getattr(embeddings, 'dtype', type(embeddings).__name__)} of shape "
                         f"{tuple(getattr(embeddings, 'shape', ()))}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(embeddings):
        raise ValueError(f"retrieval_metrics: labels must be a 1-D integer tensor with one label per embedding "
                         f"({len(embeddings)}), got {getattr(labels, 'dtype', type(labels).__name__)} of shape "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("retrieval_metrics: embeddings hold NaN or infinite values; score a model whose "
                         "training did not diverge")
    x = torch.nn.functional.normalize(embeddings.detach().cpu().to(torch.promote_types(embeddings.dtype,
                                                                                       torch.float32)), dim=1)
    labels = labels.detach().cpu().long()
    n = len(labels)
    _, inverse, counts = labels.unique(return_inverse=True, return_counts=True)
    r_all = counts[inverse] - 1  # other images of each query's class
    k = int(r_all.max()) if n else 0
    totals = {name: 0.0 for name in RETRIEVAL_METRICS}
    queries = 0
    for start in range(0, n, _CHUNK):
        rows = torch.arange(start, min(start + _CHUNK, n))
        r = r_all[rows]
        keep = r > 0
        if not keep.any():
            continue
        rows, r = rows[keep], r[keep]
        sim = x[rows] @ x.T
        sim[torch.arange(len(rows)), rows] = -math.inf  # a query never retrieves itself
        # stable: equal similarities keep the order of the images
        order = sim.sort(dim=1, descending=True, stable=True).indices[:, :k]
        hits = (labels[order] == labels[rows, None]).double()  # (queries, k): neighbour i has the query's class
        within_r = torch.arange(1, k + 1)[None, :] <= r[:, None]
        hits_r = hits * within_r
        precision_at_i = hits_r.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float64)
        totals["precision_at_1"] += hits[:, 0].sum().item()
        totals["r_precision"] += (hits_r.sum(1) / r).sum().item()
        totals["map_at_r"] += ((precision_at_i * hits_r).sum(1) / r).sum().item()
        queries += len(rows)
    return {name: total / queries if queries else math.nan for name, total in totals.items()}
