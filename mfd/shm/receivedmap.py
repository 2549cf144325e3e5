"""QEMU's ``receivedmap`` on the destination: which pages have arrived, and the zero-page rule.

One byte per page of every block, in one file every receive channel and the destination's
main process map: a byte store is atomic, so channels never lose each other's marks, as bits
set by several processes would (numpy has no atomic bit operations on shared memory).
"""

from __future__ import annotations

import itertools

import numpy as np

from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.shm.ramblock import RAMBlock, attach


def map_size(blocks: list[RAMBlock]) -> int:
    """Bytes of the map's file for ``blocks`` (a byte per page, whole pages)."""
    return -(-sum(b.num_pages for b in blocks) // TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE


class ReceivedMap:
    def __init__(self, where: RAMBlock, blocks: list[RAMBlock]) -> None:
        """``where``: the map's file (``map_size(blocks)`` bytes, zeroed)."""
        self.mapped = attach(where, writable=True)
        flat = np.frombuffer(self.mapped.mm, dtype=np.uint8)
        starts = np.cumsum([0] + [b.num_pages for b in blocks])
        self.received = [flat[a:b] for a, b in itertools.pairwise(starts)]

    def zero_pages(self, block: int, words: np.ndarray, pages: np.ndarray) -> None:
        """QEMU's rule for zero pages: memset only a page received before; one never received
        is still zero (destination RAM starts zeroed) and stays untouched (unallocated)."""
        received = self.received[block]
        again = pages[received[pages] != 0]
        if len(again):
            words[again] = 0
        received[pages] = 1

    def close(self) -> None:
        self.received = []
        self.mapped.close()
