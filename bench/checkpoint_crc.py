"""How much does checking a checkpoint's checksums cost, and is the hand-written check worth having?

``load_checkpoint`` checks every record's CRC-32 before ``torch.load`` (which does not: a block zeroed on disk
loads as weights). The check is ``core.checkpoints.first_damaged_record``, a CRC over the mapped file; the library's
own is ``zipfile.ZipFile.testzip``. This writes one ResNet-50 checkpoint (best.pt-sized, or last.pt-sized with
``--with-optimizer``) and times, in one run, best of ``--repeats``: testzip, first_damaged_record and torch.load.

    python bench/checkpoint_crc.py [--with-optimizer] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.checkpoints import first_damaged_record, save_checkpoint  # noqa: E402
from core.models import Preprocessing, build_model  # noqa: E402


def best_of(repeats: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-optimizer", action="store_true", help="add SGD momentum buffers, as last.pt has")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model = build_model("resnet50", 101)
    payload = {"arch": "resnet50", "num_classes": 101, "class_names": [f"c{i}" for i in range(101)],
               "preprocessing": Preprocessing.for_size(224).to_dict(), "model": model.state_dict()}
    if args.with_optimizer:
        payload["optimizer"] = {"momentum": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "x.pt", payload)
        records = zipfile.ZipFile(path).infolist()
        library = best_of(args.repeats, lambda: zipfile.ZipFile(path).testzip())
        ours = best_of(args.repeats, lambda: first_damaged_record(path, records))
        load = best_of(args.repeats, lambda: torch.load(path, weights_only=True, map_location="cpu"))
        size = path.stat().st_size / 2**20
    print("| checkpoint | ZipFile.testzip | first_damaged_record | torch.load | speed-up over testzip | "
          "check / load |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| {size:.0f} MiB | {library * 1000:.0f} ms | {ours * 1000:.0f} ms | {load * 1000:.0f} ms | "
          f"{library / ours:.1f}x | {ours / load:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
