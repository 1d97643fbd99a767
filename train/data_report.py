"""`python -m train data NAME --root DIR [--json] [--download]`: what a data set holds on disk.

Prints the classes, images per split, the smallest and largest class, the imbalance ratio (largest/smallest),
how many images are grayscale and which cannot be read (``core.images.check_image``: the header, and the pixels
only where it cannot vouch for the whole file), plus notes on how the files were read (the split of an image
folder, a Tiny ImageNet wnids.txt that disagrees with its train folders). For ``imagefolder`` the root is the
image folder itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import wcwidth

from core.datasets import (DATASETS, SPLITS, LabeledImages, class_counts, dataset_path, download, get_info,
                           open_dataset)
from core.images import ImageError, check_image
from core.sizes import iec_bytes
from train.cli import folder

GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "F"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(DATASETS), help="data set to describe")
    parser.add_argument("--root", default=None, type=folder,
                        help="folder holding the data set (default: $RESLENS_DATA); for imagefolder, the image folder "
                             "itself (required)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--download", action="store_true", help="download the data set first if it is missing")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="Caltech, imagefolder: share of each class held out")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="Caltech, imagefolder: N train images per class")
    parser.add_argument("--seed", type=int, default=None, help="seed of the Caltech/imagefolder split, synthetic sets")
    parser.add_argument("--include-clutter", action="store_true", default=None,
                        help="Caltech-256: count 257.clutter as a class")


def run(args: argparse.Namespace) -> int:
    """Describe a data set: classes, images per split, class balance, grayscale images."""
    if args.download:
        terminal = sys.stderr.isatty()
        download(args.name, args.root, progress=None if args.json else _progress_printer(terminal))
        if terminal and not args.json:
            print(file=sys.stderr)  # end the progress line
    report = summarize(args.name, args.root, _options(args))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("val_fraction", "train_per_class", "seed", "include_clutter")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _progress_printer(terminal: bool) -> Callable[[int, int | None], None]:
    """Download progress on stderr: one line redrawn on a terminal; in a log, a line per 10% (or per 100 MiB when
    the size is unknown)."""
    said = [-1]

    def show(done: int, total: int | None) -> None:
        text = f"downloading: {iec_bytes(done)}" + (f" of {iec_bytes(total)}" if total else "")
        if terminal:
            print(f"\r{text}", end="", file=sys.stderr, flush=True)
            return
        step = max(1, total // 10) if total else 100 << 20
        if done // step != said[0]:
            said[0] = done // step
            print(text, file=sys.stderr, flush=True)
    return show


def summarize(name: str, root: str | Path | None, options: dict[str, Any]) -> dict[str, Any]:
    """The report as a plain dict (the --json output)."""
    info = get_info(name)
    datasets = {split: open_dataset(name, root, split, **options) for split in SPLITS}
    first = datasets["train"]
    class_labels = list(getattr(first, "class_labels", first.classes))  # human names, same order as classes
    labels = dict(zip(first.classes, class_labels))
    splits = {split: _split_summary(class_counts(name, root, split, **options), _scan_headers(ds), labels)
              for split, ds in datasets.items()}
    splits["all"] = _combined(splits, labels)
    path = dataset_path(name, root)
    return {"name": name, "title": info.title, "description": info.description,
            "path": str(path) if path else None, "options": options, "classes": len(first.classes),
            "class_names": first.classes, "class_labels": class_labels, "splits": splits,
            "not_classes": dict(getattr(first, "excluded", {})),
            "notes": list(dict.fromkeys(n for ds in datasets.values() for n in getattr(ds, "notes", [])))}


def _scan_headers(ds: LabeledImages) -> dict[str, Any]:
    """Grayscale and unreadable files of a split (None for in-memory sets), as ``check_image`` finds them."""
    files = getattr(ds, "files", None)
    if files is None:
        return {"grayscale": None, "unreadable": [], "unreadable_files": {}}
    gray, unreadable, stamps = 0, [], {}
    for path in files:
        try:
            gray += check_image(path).mode in GRAY_MODES
        except ImageError as exc:
            unreadable.append(str(exc))
            stamps[str(path)] = file_stamp(path)
    return {"grayscale": gray, "unreadable": unreadable, "unreadable_files": stamps}


def file_stamp(path: str | os.PathLike[str]) -> list[int] | None:
    """What changes when a file is written or replaced: change time (a copy with old times kept still changes
    it), size and inode; None for a file that cannot be looked at (a dangling link stays None)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_ctime_ns, info.st_size, info.st_ino]


def outdated(report: dict[str, Any]) -> bool:
    """Whether a file the report found unreadable was changed since (a fix in place changes no folder, so a cache
    keyed by folders would keep refusing it)."""
    return any(file_stamp(path) != stamp for path, stamp in report["splits"]["all"]["unreadable_files"].items())


def _split_summary(counts: dict[str, int], scan: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    smallest = min(counts, key=counts.__getitem__) if counts else None
    largest = max(counts, key=counts.__getitem__) if counts else None
    low = counts[smallest] if smallest else 0
    return {"images": sum(counts.values()),
            "smallest": {"class": smallest, "label": labels.get(smallest, smallest), "count": low},
            "largest": {"class": largest, "label": labels.get(largest, largest), "count": counts.get(largest, 0)},
            "imbalance_ratio": round(counts[largest] / low, 2) if low else None,
            "grayscale": scan["grayscale"], "unreadable": scan["unreadable"],
            "unreadable_files": scan["unreadable_files"], "class_counts": counts}


def _combined(splits: dict[str, dict[str, Any]], labels: dict[str, str]) -> dict[str, Any]:
    counts = {c: sum(s["class_counts"][c] for s in splits.values()) for c in splits["train"]["class_counts"]}
    gray = [s["grayscale"] for s in splits.values()]
    scan = {"grayscale": None if None in gray else sum(gray),
            "unreadable": [u for s in splits.values() for u in s["unreadable"]],
            "unreadable_files": {k: v for s in splits.values() for k, v in s["unreadable_files"].items()}}
    return _split_summary(counts, scan, labels)


def class_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class: its name, label and images per split (the report's class counts as a table)."""
    splits = report["splits"]
    return [{"class": name, "label": label, **{split: splits[split]["class_counts"][name] for split in splits}}
            for name, label in zip(report["class_names"], report["class_labels"])]


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"{report['title']} ({report['name']})" + (f" at {report['path']}" if report["path"] else ""),
             f"classes: {report['classes']}", "",
             f"{'split':<6} {'images':>7}  {'smallest class':<28} {'largest class':<28} {'imbalance':>9} "
             f"{'grayscale':>9}"]
    lines += [_format_row(split, s) for split, s in report["splits"].items()]
    excluded = report["not_classes"]
    if excluded:
        listed = ", ".join(f"{folder} ({n} images)" for folder, n in excluded.items())
        total = report["splits"]["all"]["images"] + sum(excluded.values())
        lines += ["", f"not classes: {listed}; {total} images on disk in all"]
    lines += [""] + [f"note: {note}" for note in report["notes"]] if report["notes"] else []
    unreadable = report["splits"]["all"]["unreadable"]
    if unreadable:
        lines += ["", f"unreadable images: {len(unreadable)} (a run stops on them; a stage with options: "
                      "{skip_unreadable: true} leaves them out and lists them in its log)"]
        lines += [f"  {u}" for u in unreadable[:10]]
    return "\n".join(lines)


def _format_row(split: str, s: dict[str, Any]) -> str:
    small, large = (wcwidth.ljust(f"{c['label']} ({c['count']})", 28)  # by terminal cells: wide, combining
                    for c in (s["smallest"], s["largest"]))
    ratio = f"{s['imbalance_ratio']:.2f}" if s["imbalance_ratio"] is not None else "n/a"
    gray = "n/a" if s["grayscale"] is None else str(s["grayscale"])
    return f"{split:<6} {s['images']:>7}  {small} {large} {ratio:>9} {gray:>9}"


COMMANDS = {"data": (add_arguments, run)}
