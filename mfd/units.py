"""Sizes as people write and read them: ``200M`` in, ``1.5 GiB`` out (binary units, as QEMU)."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_HEX = re.compile(r"^\s*0x([0-9a-f]+)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4096``, ``16384K``, ``200M``, ``1G``, ``1.5GiB`` (binary units, as QEMU's -m), or
    ``0x104a9``: hex, as mfd prints offsets."""
    if m := _HEX.match(text):
        return int(m.group(1), 16)
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 0x1000, "
                                         "200M, 1G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
