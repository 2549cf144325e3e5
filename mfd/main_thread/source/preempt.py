"""postcopy-preempt's channel: the pages the destination asked for, on a connection of
their own, so they never wait behind the push on the main channel.

QEMU takes the connection after the main channel for it (its PONG came long ago): PAGE
records, bare (no section), straight from guest memory, flushed at once
(``ram_save_host_page_urgent``).
"""

from __future__ import annotations

import socket

import numpy as np

from mfd.main_thread.precopy import Precopy
from mfd.main_thread.source.channel import MainChannel
from mfd.main_thread.source.ramstream import guest_rows, page_records
from mfd.main_thread.source.verify import Verification
from mfd.workers import tcp


class Preempt:
    def __init__(self, channel: MainChannel, precopy: Precopy,
                 verification: Verification) -> None:
        self.channel = channel
        self.blocks = precopy.blocks
        self.mapped = precopy.mapped
        self.stats = precopy.stats
        self.limiter = precopy.limiter
        self.verification = verification
        self.sock: socket.socket | None = None
        self.last_block: int | None = None  # the block its records last named

    def open(self) -> None:
        self.sock = self.channel.connect()
        self.last_block = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def send(self, block: int, pages: np.ndarray) -> None:
        assert self.sock is not None
        words = self.mapped[block].words
        idstr = None if self.last_block == block else self.blocks[block].idstr
        self.last_block = block
        try:
            sent = tcp.send_all(self.sock, page_records(pages, guest_rows(words, pages), idstr),
                                self.channel.tick)
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"preempt channel: {e}") from None
        self.stats.transferred += sent
        self.limiter.account(sent)  # QEMU counts every channel's bytes in max-bandwidth
        self.stats.normal += len(pages)
        self.verification.record(block, words, pages)
