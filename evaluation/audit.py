"""The audit behind ``python -m evaluation.data verify``: a dataset copy's counts against the
manifest, its odd and undecodable files, duplicates and train/valid leakage, and a verdict by
the rule the harness loads with (``usability_problems``).

Command line (``python -m evaluation.audit`` works too)::

    python -m evaluation.data verify {weather,fruits,covid,all} [--data-root P]
    python -m evaluation.data verify --data-dir PATH
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import defaultdict

from PIL import Image

from .data import DATA_ROOT_ENV, DATASETS, DEFAULT_DATA_ROOT, duplicates_to_drop, scan_dataset, usability_problems
from .folders import SPLITS, DatasetError, natural_key
from .images import check_file, run_parallel

_FORMAT_OF_EXTENSION = {ext: fmt for ext, fmt in Image.registered_extensions().items()}


def _probe(job):
    """Facts about one file for the audit: its hash, real format, mode, frames,
    EXIF orientation, and whether it decodes."""
    rel, path = job
    check = check_file(path)  # the harness's own check: the audit and a run agree on every file
    info = {"rel": rel, "sha256": check.sha256, "format": None, "mode": None, "frames": 1,
            "orientation": 1, "error": check.error, "warnings": check.warnings}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_file has it, with the file name
            im = Image.open(path)
        with im:
            info["format"], info["mode"] = im.format, im.mode
            info["frames"] = getattr(im, "n_frames", 1)
            try:
                info["orientation"] = im.getexif().get(0x0112, 1) or 1
            except Exception:
                info["orientation"] = 1
    except Exception:
        pass  # check.error has the reason
    return info


def _oddity(info) -> str | None:
    """Why a file deserves a mention, or None if it is a plain RGB image named right."""
    ext = os.path.splitext(info["rel"])[1].lower()
    reasons = []
    expected_fmt = _FORMAT_OF_EXTENSION.get(ext)
    if info["format"] and info["format"] != expected_fmt:
        reasons.append(f"{info['format']} named {ext or '(no extension)'}")
    if info["mode"] and info["mode"] != "RGB":
        what = {"L": "greyscale", "P": "palette", "RGBA": "RGB with alpha (flattened onto white)",
                "LA": "greyscale with alpha (flattened onto white)", "CMYK": "CMYK",
                "I;16": "16-bit greyscale", "I": "32-bit integer", "1": "1-bit"}.get(info["mode"], "")
        reasons.append(f"mode {info['mode']}" + (f" = {what}" if what else ""))
    if info["frames"] > 1:
        reasons.append(f"animated, {info['frames']} frames (the first is used)")
    if info["orientation"] not in (1, None):
        reasons.append(f"EXIF orientation {info['orientation']} (rotated on load)")
    return "; ".join(reasons) or None


def audit(name=None, *, data_root=None, data_dir=None, workers: int = 2) -> tuple[str, bool]:
    """A printable report on a dataset copy and whether it is usable for training."""
    try:
        scan = scan_dataset(name, data_root, data_dir, 0)
    except DatasetError as e:
        label = name if name is not None else f"--data-dir {data_dir}"
        return f"== {label}: NOT USABLE\n{e}\n", False

    out = [f"== {scan.name}: {scan.root}", f"layout: {scan.layout}"]
    infos = {i["rel"]: i for i in run_parallel(
        _probe, [(e.rel, str(scan.root / e.rel)) for e in scan.present], workers, False, "audit")}
    by_rel = {e.rel: e for e in scan.present}

    # Counts, beside the manifest's where there is one.
    n_expected = len(scan.present) + len(scan.missing)
    if scan.expected_counts is not None:
        out.append(f"images: {len(scan.present)} of {n_expected} expected "
                   f"({len(scan.missing)} missing, {len(scan.unexpected)} unexpected files)")
    else:
        out.append(f"images: {len(scan.present)} ({len(scan.unexpected)} other files ignored)")
    width = max(len(c) for c in scan.classes + ["class", "total"])
    out.append(f"  {'class':<{width}}  {'train':>13}  {'valid':>13}")
    totals = {s: [0, 0] for s in SPLITS}
    for i, c in enumerate(scan.classes):
        cells = []
        for s in SPLITS:
            found = sum(1 for e in scan.present if e.split == s and e.label == i)
            totals[s][0] += found
            if scan.expected_counts is not None:
                exp = scan.expected_counts[s][c]
                totals[s][1] += exp
                cells.append(f"{found:>5} of {exp:<5}")
            else:
                cells.append(f"{found:>13}")
        out.append(f"  {c:<{width}}  {cells[0]:>13}  {cells[1]:>13}")
    if scan.expected_counts is not None:
        out.append(f"  {'total':<{width}}  " + "  ".join(f"{totals[s][0]:>5} of {totals[s][1]:<5}"
                                                        for s in SPLITS))
    else:
        out.append(f"  {'total':<{width}}  " + "  ".join(f"{totals[s][0]:>13}" for s in SPLITS))

    def section(title, lines, detail=""):
        out.append(f"{title} ({len(lines)}{detail})" + (":" if lines else ""))
        out.extend(f"  {line}" for line in lines)

    if scan.expected_counts is not None:
        section("missing", [f"{e.rel} ({e.split}, {scan.classes[e.label]})" for e in scan.missing])
        section("unexpected files, not used", scan.unexpected)
    elif scan.unexpected:
        section("ignored files (not images by extension)", scan.unexpected)
    odd = [(rel, _oddity(info)) for rel, info in sorted(infos.items(), key=lambda kv: natural_key(kv[0]))]
    section("format differs from extension, or not plain RGB (all decode to RGB)",
            [f"{rel}: {why}" for rel, why in odd if why and not infos[rel]["error"]])
    undecodable = [infos[rel]["error"] for rel in sorted(infos, key=natural_key) if infos[rel]["error"]]
    section("cannot be decoded (skipped when training)", undecodable)

    groups = defaultdict(list)
    for rel, info in infos.items():
        if info["sha256"]:
            groups[info["sha256"]].append(rel)
    dup_groups = sorted((sorted(g, key=natural_key) for g in groups.values() if len(g) > 1),
                        key=lambda g: natural_key(g[0]))

    def tag(rel):
        e = by_rel[rel]
        return f"{rel} [{e.split}, {scan.classes[e.label]}]"

    section("groups of byte-identical images", [" = ".join(tag(r) for r in g) for g in dup_groups],
            f", {sum(len(g) - 1 for g in dup_groups)} redundant copies")
    leaked = [g for g in dup_groups if {by_rel[r].split for r in g} == set(SPLITS)]
    section("images in both train and valid (leakage)",
            [" = ".join(tag(r) for r in g) for g in leaked])
    mixed = [g for g in dup_groups if len({by_rel[r].label for r in g}) > 1]
    if mixed:
        section("identical images with different labels", [" = ".join(tag(r) for r in g) for g in mixed])

    digests = {rel: info["sha256"] or f"unreadable:{rel}" for rel, info in infos.items()}
    dropped, _ = duplicates_to_drop(scan.present, digests)
    out.append(f"--drop-duplicates would remove {len(dropped['train_duplicates'])} duplicate train "
               f"images, {len(dropped['valid_duplicates'])} duplicate valid images and "
               f"{len(dropped['leaked_valid'])} leaked valid images")

    warned = [w for rel in sorted(infos, key=natural_key) for w in infos[rel]["warnings"]]
    if warned:
        section("warnings while decoding", warned)
    bad = {rel for rel, info in infos.items() if info["error"]}
    problems = usability_problems(scan, bad)
    usable = not problems
    if usable:
        caveats = []
        if scan.missing:
            caveats.append(f"{len(scan.missing)} images missing")
        if bad:
            caveats.append(f"{len(bad)} undecodable images skipped")
        out.append("verdict: USABLE" + (f" ({'; '.join(caveats)})" if caveats else ""))
    else:
        out.append(f"verdict: NOT USABLE: {'; '.join(problems)}")
    return "\n".join(out) + "\n", usable


# ---------------------------------------------------------------------------
# Command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.data",
                                     description="Check dataset copies against datasets_manifest.yaml.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="audit a dataset copy: counts, odd files, duplicates, leakage")
    verify.add_argument("dataset", nargs="?", choices=DATASETS + ("all",),
                        help="a named dataset, or all three")
    verify.add_argument("--data-root", help=f"folder holding the named datasets "
                                            f"(default: ${DATA_ROOT_ENV}, else {DEFAULT_DATA_ROOT})")
    verify.add_argument("--data-dir", help="your own images: train/<class>/* and valid/<class>/*, "
                                           "or <class>/* folders")
    args = parser.parse_args(argv)
    if (args.dataset is None) == (args.data_dir is None):
        parser.error("give either a dataset name (weather, fruits, covid, all) or --data-dir PATH")
    if args.data_dir is not None:
        runs = [dict(data_dir=args.data_dir)]
    else:
        names = DATASETS if args.dataset == "all" else (args.dataset,)
        runs = [dict(name=n, data_root=args.data_root) for n in names]
    unusable = []
    for kwargs in runs:
        report, usable = audit(**kwargs)
        print(report)
        if not usable:
            unusable.append(kwargs.get("name") or kwargs.get("data_dir"))
    if unusable:
        print(f"error: not usable: {', '.join(map(str, unusable))} (see the report above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
