"""Byte counts as text for people: one formatter for disk, checkpoint, cache and archive sizes."""
from __future__ import annotations

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
