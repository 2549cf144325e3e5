"""RAM verified at switchover (``mfd.shm.pagehash``), the source's part.

Every page is hashed by whoever sends it: a channel as it moves a job (JOB_HASH), the main
process for what it sends itself (no multifd, postcopy-preempt) and for legacy zero pages.
After the vmdesc the table goes to an mfd destination, which compares it with its own and
answers with its verdict. Only with an mfd destination (its PONG to MFD_PING says), unless
``--no-verify``; QEMU has no digests to compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from mfd.main_thread.source.channel import MainChannel
from mfd.protocol import peer, trailer
from mfd.shm import pagehash
from mfd.shm.ramblock import SHM_DIR, PendingRAM, RAMBlock

# how fast the switchover's verification goes beyond hashing the final round's pages (which
# the channels do as they move them, inside the bandwidth measured): the source's table out
# on the main channel and the destination's comparison, in table bytes per second. Measured
# here: 2 MiB of table (1 GiB of RAM) in ~4 ms, end to end; half that rate, to be safe.
VERIFY_RATE = 250 << 20


class Verification:
    def __init__(self, blocks: list[RAMBlock], channel: MainChannel, wanted: bool) -> None:
        self.blocks = blocks
        self.channel = channel
        self.wanted = wanted  # not --no-verify
        self.file: PendingRAM | None = None
        self.hashes: pagehash.PageHashes | None = None

    def open(self) -> RAMBlock:
        """The table, in a file the channels map (before they start)."""
        self.file = PendingRAM(SHM_DIR, [("pagehash", pagehash.table_size(self.blocks))])
        self.hashes = pagehash.PageHashes(self.file.blocks[0], self.blocks)
        return self.file.blocks[0]

    def close(self) -> None:
        if self.hashes is not None:
            self.hashes.close()
        if self.file is not None:
            self.file.close()

    @property
    def on(self) -> bool:
        """Both ends hash what they move and compare at switchover: an mfd destination,
        unless --no-verify."""
        return bool(self.channel.peer_mfd) and self.wanted

    def zero(self, block: int, pages: np.ndarray) -> None:
        """Pages sent as zero: their hash is 0."""
        if self.on:
            assert self.hashes is not None
            self.hashes.table[block][pages] = 0

    def record(self, block: int, words: np.ndarray, pages: np.ndarray) -> None:
        """Pages the main process sent itself, hashed as it sent them (as QEMU's migration
        thread carries them)."""
        if self.on:
            assert self.hashes is not None
            self.hashes.record(block, words, pages)

    def cost(self) -> float:
        """Seconds the switchover takes beyond sending the final round, with an mfd
        destination: it finishes placing and hashing what is in flight (as far behind as
        it was at the end of the last round: MFD_ROUND_PING), then receives our page hash
        table and compares it with its own (VERIFY_RATE), before it answers."""
        if not self.channel.peer_mfd or self.file is None:
            return 0.0
        table = self.file.blocks[0].used_length if self.on else 0
        return self.channel.destination_lag + table / VERIFY_RATE

    def send(self, warn: Callable[[str], None]) -> float:
        """After EOF and the vmdesc: the table (to mfd with --no-verify: none). Returns the
        seconds it took."""
        start = time.monotonic()
        if self.on:
            assert self.hashes is not None
            self.channel.send(peer.encode_hashes(self.hashes.tables()))
        elif self.channel.peer_mfd:
            self.channel.send(peer.encode_hashes({}))  # none: --no-verify
        else:
            warn("the destination is QEMU: RAM is not verified at switchover (QEMU has no "
                 "digests to compare)")
        return time.monotonic() - start

    def digests(self) -> dict[str, str]:
        """A name for what was compared (blake3 of each block's table), after the
        downtime."""
        if not self.on:
            return {}
        assert self.hashes is not None
        return {k: trailer.blake3_of(t) for k, t in self.hashes.tables().items()}

    def seconds(self, hashing: list[float], sending: float) -> float:
        """The part of the downtime QEMU does not have: each end hashing the final round's
        pages (in its channels, in parallel: pagehash.wall_share), the table sent, the
        destination's comparison (it says how long its part took)."""
        if not self.on:
            return 0.0
        return (pagehash.wall_share(hashing) + sending
                + float(self.channel.result.get("verify_ms", 0)) / 1000)
