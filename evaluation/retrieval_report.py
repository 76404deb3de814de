"""The RESULTS.md section "Embeddings: retrieval metrics per loss", from the summary and the run records.

Per dataset, on the frozen backbone (cross-validated runs when there are any, else the archive split), each
loss's P@1, R-precision and MAP@R (``metrics.retrieval_metrics``) as mean ± std, their paired difference to
cross-entropy by the project's own tests (``significance.compare`` with the metric in place of top-1:
Nadeau–Bengio corrected t under cv, paired t over seeds under split, Holm over the losses), and one sentence
on whether the margin losses (the registry's losses on ``features``) give better embeddings than it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import significance, stats
from .metrics import RETRIEVAL_METRICS
from .records import protocol_of
from .tables import RETRIEVAL_HEADERS, TEST_NAME, _p_is, _pct, _points, _vs_cell

BASELINE = "cross_entropy"
MODE = "frozen"
VERDICT_METRIC = "map_at_r"  # the metric Musgrave et al. recommend; the sentence decides on it


def margin_losses() -> list[str]:
    """The registry's margin losses: those whose input is the feature (they put a margin on its angle)."""
    from lossbank import get_loss_info, list_losses

    return [name for name in list_losses() if get_loss_info(name).input == "features"]


def _compare(scores: pd.DataFrame, metric: str, alpha: float) -> pd.DataFrame:
    """The "vs baseline" rows of ``significance.compare`` on ``metric``, indexed by loss."""
    pairs = significance.compare(scores.assign(top1=scores[metric]), BASELINE, alpha)
    return pairs[pairs["family"] == "vs baseline"].set_index("loss")


def _sentence(dataset: str, protocol: str, vs: dict[str, pd.DataFrame], margins: list[str], alpha: float) -> str:
    """Whether the margin losses give better embeddings than the baseline on one dataset, decided on MAP@R."""
    test = f"{TEST_NAME[protocol]}, Holm, α = {alpha:g}"
    primary = vs[VERDICT_METRIC]
    tested = [m for m in margins if m in primary.index and np.isfinite(primary.at[m, "p_holm"])]
    if not tested:
        return (f"On {dataset} no margin loss can be compared with {BASELINE} yet: they need paired runs with "
                f"retrieval metrics (two or more each).")

    def described(losses, metric="map_at_r"):
        return ", ".join(f"{m} ({_points(vs[metric].at[m, 'mean_diff'], sign=True)} points, "
                         f"p_holm{_p_is(vs[metric].at[m, 'p_holm'])})" for m in losses)

    better = [m for m in tested if primary.at[m, "p_holm"] < alpha and primary.at[m, "mean_diff"] > 0]
    worse = [m for m in tested if primary.at[m, "p_holm"] < alpha and primary.at[m, "mean_diff"] < 0]
    same = [m for m in tested if m not in better and m not in worse]
    if better:
        text = f"On {dataset}, yes for {described(better)}: better MAP@R than {BASELINE} ({test})"
    else:
        text = f"On {dataset}, no: no margin loss gives a better MAP@R than {BASELINE} ({test})"
    parts = ([f"worse: {described(worse)}"] if worse else []) + (
        [f"not significantly different: {described(same)}"] if same else [])
    text += ("; " + "; ".join(parts) if parts else "") + "."
    others = []
    for metric in RETRIEVAL_METRICS:
        if metric == VERDICT_METRIC:
            continue
        up = [m for m in tested if m in vs[metric].index and vs[metric].at[m, "p_holm"] < alpha
              and vs[metric].at[m, "mean_diff"] > 0]
        others.append(f"{RETRIEVAL_HEADERS[metric]}: {', '.join(up) if up else 'none'}")
    return text + " Significantly better than it by " + "; by ".join(others) + "."


def section(summary: pd.DataFrame, runs: list[dict], datasets=("weather", "fruits", "covid"),
            alpha: float = 0.05) -> list[str]:
    """The markdown lines of the section (``summary``: ``stats.summarise`` of ``runs``, e.g. results/summary.csv)."""
    lines = ["## Embeddings: retrieval metrics per loss", "",
             "Do margin losses give better embeddings than cross-entropy? Each scored image queries the others by "
             "cosine similarity of the final model's embedding (the normalised feature the margin losses act on, the "
             "same penultimate feature for the others: under cosine similarity both compare alike). P@1: its nearest "
             "neighbour has its class; R-prec: the share of its class among its R nearest (R = the other images of "
             "its class); MAP@R: mean average precision over those R (Musgrave et al., \"A Metric Learning Reality "
             "Check\", ECCV 2020). In %, mean ± std over the runs; Δ: paired difference to cross_entropy in points "
             "[95 % interval], Holm-adjusted p over the losses. Frozen backbone; cross-validated runs where there are "
             "any.", ""]
    margins = margin_losses()
    protocol_col = summary["protocol"] if "protocol" in summary else pd.Series("split", index=summary.index)
    wrote = False
    for dataset in datasets:
        mine = summary[(summary["dataset"] == dataset) & (summary["mode"] == MODE)]
        if mine.empty:
            continue
        protocol = "cv" if (protocol_col[mine.index] == "cv").any() else "split"
        part = mine[protocol_col[mine.index] == protocol]
        part = part[part["train_fraction"] == part["train_fraction"].max()]
        chosen = [r for r in runs if r["dataset"] == dataset and r["mode"] == MODE and protocol_of(r) == protocol]
        scores = stats.scores_of(chosen)
        for backbone in dict.fromkeys(part["backbone"]):
            rows = part[part["backbone"] == backbone]
            have = scores[scores["backbone"] == backbone]
            heading = (f"### {dataset} — {backbone}, {MODE}, "
                       f"{'repeated K-fold CV' if protocol == 'cv' else 'seeds on the archive split'}")
            if not any(f"{m}_mean" in rows and np.isfinite(rows[f"{m}_mean"].astype(float)).any()
                       for m in RETRIEVAL_METRICS):  # a summary older than the metrics lacks their columns
                lines += [heading, "", "No retrieval metrics in these run records (made before they were measured): "
                          "rerun `python -m evaluation.results` to measure them.", ""]
                wrote = True
                continue
            vs = {m: _compare(have, m, alpha) for m in RETRIEVAL_METRICS}
            header = ["loss", "runs" if protocol == "cv" else "seeds"] + list(RETRIEVAL_HEADERS.values()) + [
                f"Δ {h}" for h in RETRIEVAL_HEADERS.values()]
            lines += [heading, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
            for row in rows.itertuples(index=False):
                cells = [str(row.loss), str(int(row.seeds))]
                cells += [_pct(getattr(row, f"{m}_mean"), getattr(row, f"{m}_std")) for m in RETRIEVAL_METRICS]
                cells += [_vs_cell(row.loss, vs[m], BASELINE) for m in RETRIEVAL_METRICS]
                lines.append("| " + " | ".join(cells) + " |")
            lines += ["", _sentence(dataset, protocol, vs, margins, alpha) if BASELINE in set(have["loss"]) else
                      f"No verdict on {dataset}: {BASELINE} has no finished run here to compare with.", ""]
            wrote = True
    if not wrote:
        lines += ["No frozen runs of these datasets yet.", ""]
    return lines
