"""The built-in guest's workload: which pages it writes, what it writes, and its dirty log.

Pure numpy over the mapped blocks; the guest process (``guest.py``) calls :meth:`tick` for
each 10 ms of guest run time. The dirty log is private to the guest process and harvested
by the same thread that writes (on the main process's request), so a harvest can never race
a write: a write either finished before the harvest (its bit is in this harvest, its data is
in RAM before the migration reads it) or happens after (its bit is in the next one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import bits_to_words
from mfd.shm.ramblock import WORDS_PER_PAGE, MappedBlock

PATTERNS = ("random", "hotset", "sequential")
HOT_FRACTION = 0.1  # hotset: 90% of the writes hit 10% of RAM
HOT_SHARE = 0.9


@dataclass
class WorkloadState:
    """What a saved or migrated guest needs to go on writing the same way."""

    dirty_rate: int  # bytes per second of guest run time (0 = idle)
    pattern: str
    seed: int
    counter: int = 0  # ticks run so far; stamps written pages
    cursor: int = 0  # sequential pattern's next page
    zero_fraction: float = 0.0  # share of writes that zero a whole page (memory freed)

    def to_json(self) -> dict[str, object]:
        return dict(vars(self))


class Workload:
    """The built-in workload: the guest process runs it, a tick per 10 ms of run time."""

    runs_itself = False
    parked = False
    error: str | None = None

    def __init__(self, blocks: list[MappedBlock], state: WorkloadState) -> None:
        if state.pattern not in PATTERNS:
            raise ValueError(f"pattern {state.pattern!r}, expected one of {', '.join(PATTERNS)}")
        self.blocks = blocks
        self.state = state
        self.words = [b.words.reshape(-1) for b in blocks]
        sizes = np.array([b.block.num_pages for b in blocks], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(sizes)))
        self.total_pages = int(self.starts[-1])
        self.dirty = [np.zeros(b.block.num_pages, dtype=bool) for b in blocks]
        self.rng = np.random.default_rng([state.seed, state.counter])
        self.carry = 0.0
        self.pages_written = 0
        hot = max(1, int(self.total_pages * HOT_FRACTION))
        self.hot_start = int(np.random.default_rng(state.seed).integers(0, self.total_pages - hot
                                                                         + 1))
        self.hot_pages = hot

    def pages_for(self, seconds: float) -> int:
        self.carry += self.state.dirty_rate * seconds / TARGET_PAGE_SIZE
        n = int(self.carry)
        self.carry -= n
        return min(n, self.total_pages)

    def choose(self, n: int) -> np.ndarray:
        st = self.state
        if st.pattern == "random":
            return self.rng.integers(0, self.total_pages, n)
        if st.pattern == "hotset":
            hot = self.rng.random(n) < HOT_SHARE
            out = self.rng.integers(0, self.total_pages, n)
            out[hot] = self.hot_start + self.rng.integers(0, self.hot_pages, int(hot.sum()))
            return out
        out = (st.cursor + np.arange(n)) % self.total_pages
        st.cursor = int((st.cursor + n) % self.total_pages)
        return out

    def tick(self, seconds: float) -> int:
        """Run the guest for ``seconds``: write its pages, then log them dirty."""
        n = self.pages_for(seconds)
        if n == 0:
            return 0
        self.state.counter += 1
        pages = self.choose(n)
        block_of = np.searchsorted(self.starts, pages, side="right") - 1
        stamp = np.uint64((self.state.counter << 20) | 0xA5)
        zeroing = self.rng.random(n) < self.state.zero_fraction if self.state.zero_fraction \
            else None
        for i in np.unique(block_of):
            mine = block_of == i
            local = pages[mine] - self.starts[i]
            # write first, then log: pairs with harvest() reading the log after the write
            if zeroing is None:
                self.words[i][local * WORDS_PER_PAGE + local % WORDS_PER_PAGE] = stamp
            else:
                z = zeroing[mine]
                stamped = local[~z]
                self.words[i][stamped * WORDS_PER_PAGE + stamped % WORDS_PER_PAGE] = stamp
                self.blocks[i].words[local[z]] = 0
            self.dirty[i][local] = True
        self.pages_written += n
        return n

    def start(self) -> None:
        pass  # ticks start with the guest's next timeslice

    def stop(self) -> None:
        pass

    def set_throttle(self, pct: int) -> None:
        pass  # the guest process sleeps between ticks itself

    def close(self) -> None:
        pass

    def clear(self, block: int, first_page: int, words: np.ndarray) -> None:
        pass  # its harvest clears: nothing is left to clear per chunk

    def harvest(self) -> list[bytes]:
        """Return each block's dirty log as bmap words and clear it (one thread: no race)."""
        out = []
        for d in self.dirty:
            out.append(bits_to_words(d).tobytes())
            d[:] = False
        return out
