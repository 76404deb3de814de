"""The RESULTS.md section on distillation from a larger backbone (configs/results/7-distil.yaml).

Per dataset: the student trained with cross-entropy alone, the student distilled from the other backbone's
cross-entropy teacher, and that teacher, over the seeds the distilled runs have (the same seeds for all three,
so the paired test pairs each distilled run with the cross-entropy run of its seed). Size and latency come
from the backbone comparison (results/backbones.json, benchmarks/bench_backbones.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import RunConfig
from .results import _pct  # the RESULTS.md format: "–" when missing, ± std, [95 % interval]
from .tables import _interval, _p, _points, plural

DATASETS = ("weather", "fruits", "covid")


def _sizes(out: Path) -> dict:
    path = out / "backbones.json"
    if not path.is_file():
        return {}
    return {r["backbone"]: r for r in json.loads(path.read_text()) if r.get("params_m") is not None}


def distil_section(runs: list[dict], out: Path, config: RunConfig) -> list[str]:
    """The section's lines for the grid config ``config`` (the student's settings, its --teacher-backbone)."""
    from . import stats

    config = config.resolved()
    label, student, mode = config.distil_label, config.backbone, config.mode
    teacher, tmode = config.teacher_backbone, config.teacher_mode
    title = f"## Distilling {teacher} ({tmode}) into {student} ({mode})"
    full = [r for r in runs if float(r["train_fraction"]) == 1.0 and (r.get("protocol") or "split") == "split"]
    distilled = [r for r in full if r["loss"] == label and r["backbone"] == student and r["mode"] == mode]
    if not distilled:
        return [title, "", f"No distilled runs yet: `python -m evaluation.results` runs them "
                           f"(configs/results/7-distil.yaml).", ""]
    sizes = _sizes(out)

    def size_cells(backbone):
        r = sizes.get(backbone)
        return "– | – | –" if r is None else f"{r['params_m']:.1f} | {r['size_mb']:.1f} | {r['latency_ms']:.1f}"

    lines = [title, "",
             f"The student {student} ({mode}) with cross-entropy alone, the same student trained with the "
             f"distillation loss on the logits of a cross-entropy teacher on {teacher} ({tmode}, {config.teacher_image_size} px), "
             f"and the teacher itself. The teacher of each run is trained with the run's seed, on the same training "
             f"images, and gives its logits for the same augmented views (the same crop, flip and jitter, each "
             f"backbone at its own input size). Top-1 in % as mean ± std [95 % interval] over the seeds the distilled "
             f"runs have (the same seeds in every row); Δ is distilled − cross-entropy, paired by seed (t-test over "
             f"the seeds). Parameters, size and CPU latency at batch 1 are the backbone's, from the backbone "
             f"comparison (results/backbones.json; – until `benchmarks/bench_backbones.py` has measured it).", "",
             "| dataset | model | seeds | top-1 (%) | Δ top-1 vs cross-entropy (points) | p | params (M) | MB | "
             "latency (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    found = dict.fromkeys(r["dataset"] for r in distilled)
    for dataset in [d for d in DATASETS if d in found] + [d for d in found if d not in DATASETS]:
        mine = [r for r in distilled if r["dataset"] == dataset]
        seeds = {int(r["seed"]) for r in mine}
        same = lambda backbone, m, loss: [r for r in full if (r["dataset"], r["backbone"], r["mode"], r["loss"])  # noqa: E731
                                          == (dataset, backbone, m, loss) and int(r["seed"]) in seeds]
        base, taught = same(student, mode, "cross_entropy"), same(student, mode, label)
        teacher_runs = same(teacher, tmode, "cross_entropy")
        summary = stats.summarise(base + taught + teacher_runs)
        pair = stats.compare_runs(base + taught).pairs
        pair = pair[(pair["family"] == "vs baseline") & (pair["loss"] == label)]

        def row(backbone, m, loss):
            found = summary[(summary["backbone"] == backbone) & (summary["mode"] == m) & (summary["loss"] == loss)]
            return found.iloc[0] if len(found) else None

        for name, backbone, m, loss in ((f"{student} cross-entropy", student, mode, "cross_entropy"),
                                        (f"{student} distilled", student, mode, label),
                                        (f"{teacher} teacher", teacher, tmode, "cross_entropy")):
            r = row(backbone, m, loss)
            if r is None:
                lines.append(f"| {dataset} | {name} | 0 | – | | | {size_cells(backbone)} |")
                continue
            diff = p = ""
            if loss == label and len(pair):
                d = pair.iloc[0]
                diff = f"{_points(d.mean_diff, sign=True)} {_interval(d.ci_low, d.ci_high, sign=True)}"
                p = _p(d.p_value)
                verdicts.append((dataset, d.mean_diff, d.p_value, d.ci_low, d.ci_high))
            lines.append(f"| {dataset} | {name} | {int(r.seeds)} | {_pct(r.top1_mean, r.top1_std, r.top1_ci95)} | "
                         f"{diff} | {p} | {size_cells(backbone)} |")
    lines.append("")
    if verdicts:
        helped = [d for d, diff, p, lo, hi in verdicts if p < 0.05 and diff > 0]
        hurt = [d for d, diff, p, lo, hi in verdicts if p < 0.05 and diff < 0]
        unclear = [d for d, *_ in verdicts if d not in helped and d not in hurt]
        words = []
        if helped:
            words.append(f"it helps the student on {', '.join(helped)} (significant at 0.05)")
        if hurt:
            words.append(f"it hurts on {', '.join(hurt)} (significant at 0.05)")
        if unclear:
            n_seeds = len({int(r["seed"]) for r in distilled})
            words.append(f"on {', '.join(unclear)} the difference is not significant at 0.05 with "
                         f"{plural(n_seeds, 'seed')}, so no evidence that it helps there")
        answer = "Yes" if helped and not hurt and not unclear else "Partly" if helped else "No"
        lines += [f"Does distillation help here? {answer}: " + "; ".join(words) + ".", ""]
    return lines

