"""Byte counts: as text for people (one formatter for disk, checkpoint, cache and archive sizes), and of a folder."""
from __future__ import annotations

import os
from pathlib import Path

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def iec_bytes(n: float) -> str:
    """A byte count in IEC binary units (powers of 1024): ``512`` -> ``"512 bytes"``, ``1536`` -> ``"1.5 KiB"``,
    ``50 << 20`` -> ``"50.0 MiB"``; TiB is the largest unit."""
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in _UNITS:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes the files under ``folder`` take (0 when it is missing; a file that vanishes meanwhile counts 0)."""
    total = 0
    for here, _, names in os.walk(folder):
        for name in names:
            try:
                total += (Path(here) / name).stat().st_size
            except OSError:
                pass
    return total
