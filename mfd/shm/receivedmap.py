"""QEMU's ``receivedmap`` on the destination: which pages have arrived, and the zero-page rule.

One byte per page of every block, in one file every receive channel and the destination's
main process map: a byte store is atomic, so channels never lose each other's marks, as bits
set by several processes would (numpy has no atomic bit operations on shared memory).
"""

from __future__ import annotations

import numpy as np

from mfd.shm.ramblock import RAMBlock, attach, per_page, per_page_size


def map_size(blocks: list[RAMBlock]) -> int:
    """Bytes of the map's file for ``blocks`` (a byte per page, whole pages)."""
    return per_page_size(blocks, 1)


class ReceivedMap:
    def __init__(self, where: RAMBlock, blocks: list[RAMBlock]) -> None:
        """``where``: the map's file (``map_size(blocks)`` bytes, zeroed)."""
        self.mapped = attach(where, writable=True)
        self.received = per_page(self.mapped, blocks, np.uint8)

    def zero_pages(self, block: int, words: np.ndarray, pages: np.ndarray) -> np.ndarray:
        return zero_pages(self.received[block], words, pages)

    def close(self) -> None:
        self.received = []
        self.mapped.close()


def zero_pages(received: np.ndarray, words: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """QEMU's rule for zero pages: memset only a page received before; one never received
    is still zero (destination RAM starts zeroed) and stays untouched (unallocated).
    ``received``: a byte per page of the block; returns the pages set to zero here."""
    again = pages[received[pages] != 0]
    if len(again):
        words[again] = 0
    received[pages] = 1
    return again
