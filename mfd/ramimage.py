"""Deterministic RAM images for tests and benchmarks.

Pages come in three kinds, assigned in runs of ``run`` pages: zero, random (incompressible)
and compressible (text from a small seeded word list; the first 16 bytes hold the page index
and the seed), like the generator behind shared/reference. Vectorized per chunk of pages.
"""

from __future__ import annotations

import os

import numpy as np

from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs

_WORDS = (b"migration ram page block dirty bitmap channel multifd packet sync flush zero "
          b"mapped file offset header guest vcpu throttle converge downtime bandwidth ").split()
CHUNK_PAGES = 4096  # 16 MiB generated at a time


def page_kinds(num_pages: int, seed: int, zero: float, random: float, run: int) -> np.ndarray:
    """0 = zero, 1 = random, 2 = compressible, per page, in runs of ``run`` pages."""
    rng = np.random.default_rng([seed, 0])
    runs = -(-num_pages // run)
    u = rng.random(runs)
    kinds = np.where(u < zero, 0, np.where(u < zero + random, 1, 2)).astype(np.uint8)
    return np.repeat(kinds, run)[:num_pages]


def _text_pages(first: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1, first])
    words = np.array([w + b" " for w in _WORDS], dtype=object)
    # one shared random text block per chunk, rotated per page: compressible, not identical
    text = b"".join(words[rng.integers(0, len(words), 2 * TARGET_PAGE_SIZE // 5)])
    base = np.frombuffer(text[: 2 * TARGET_PAGE_SIZE], dtype=np.uint8)
    shifts = rng.integers(0, TARGET_PAGE_SIZE, n)
    idx = (shifts[:, None] + np.arange(TARGET_PAGE_SIZE)[None, :]) % len(base)
    pages = base[idx]
    head = np.zeros((n, 2), dtype="<u8")
    head[:, 0] = np.arange(first, first + n)
    head[:, 1] = seed
    pages[:, :16] = head.view(np.uint8).reshape(n, 16)
    return pages


def generate(path: str, size: int, *, seed: int = 1, zero: float = 0.5, random: float = 0.25,
             run: int = 16, create: bool = True, first_page: int = 0) -> dict[str, int]:
    """Write the image to ``path``; returns the page-kind counts. ``create=False`` writes
    the nonzero pages into an existing file of ``size`` bytes (a running guest's RAM) and
    leaves the rest alone, and the pages below ``first_page`` too (a KVM guest's program)."""
    if size <= 0 or size % TARGET_PAGE_SIZE:
        raise ValueError(f"size {size} is not a positive multiple of {TARGET_PAGE_SIZE}")
    num_pages = size // TARGET_PAGE_SIZE
    kinds = page_kinds(num_pages, seed, zero, random, run)
    kinds[:first_page] = 0
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
    try:
        if create:
            os.ftruncate(fd, size)
        for first in range(0, num_pages, CHUNK_PAGES):
            k = kinds[first : first + CHUNK_PAGES]
            chunk = np.zeros((len(k), TARGET_PAGE_SIZE), dtype=np.uint8)
            rnd = np.flatnonzero(k == 1)
            if len(rnd):
                rng = np.random.default_rng([seed, 2, first])
                chunk[rnd] = np.frombuffer(rng.bytes(len(rnd) * TARGET_PAGE_SIZE),
                                           dtype=np.uint8).reshape(-1, TARGET_PAGE_SIZE)
            txt = np.flatnonzero(k == 2)
            if len(txt):
                chunk[txt] = _text_pages(first, len(txt), seed)
            nz = np.flatnonzero(k)
            for s, e in page_runs(nz).tolist():
                os.pwrite(fd, chunk[s:e].tobytes(), (first + s) * TARGET_PAGE_SIZE)
    finally:
        os.close(fd)
    return {"zero": int((kinds == 0).sum()), "random": int((kinds == 1).sum()),
            "compressible": int((kinds == 2).sum())}

