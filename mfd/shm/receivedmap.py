"""QEMU's ``receivedmap`` on the destination: which pages have arrived (the zero-page
rule that reads it is the placer's, ``mfd.shm.placer``).

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

    def close(self) -> None:
        self.received = []
        self.mapped.close()

