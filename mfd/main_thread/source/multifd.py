"""The multifd sender: pages to idle channels through the channel pool.

N send channels connect to the destination before the main stream says a word of RAM
(QEMU's destination reads the main channel only once every channel is there); each writes
MultiFDInit_t with mfd's settings in its unused bytes. A job is up to JOB_PACKETS packets
of one block, handed only to an idle channel (``multifd_send``); at a round's end every
channel puts a SYNC packet on its connection and the main stream says MULTIFD_FLUSH
(``multifd_ram_flush_and_sync``; legacy --multifd-flush-after-each-section: SYNC only,
the destination syncs at EOS). Without multifd there are no channels (the pool still
watches the main channel).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mfd.main_thread.pipeline import ChannelPool
from mfd.main_thread.precopy import Precopy
from mfd.main_thread.source.channel import MainChannel
from mfd.main_thread.source.verify import Verification
from mfd.options import MigrateOptions
from mfd.protocol import messages, peer, ram
from mfd.shm.ramblock import RAMBlock
from mfd.workers.socket_channel import SocketChannelConfig, send_main

# packets per job handed to an idle channel: each job costs the main process a round trip
# (~60 us), as much as a channel spends on a packet; 8 packets per job cut that 8-fold
# while a job still takes only milliseconds (the channel writes one packet at a time)
JOB_PACKETS = 8


def start_channels(precopy: Precopy, options: MigrateOptions, channel: MainChannel,
                   hashes: RAMBlock, tick: Callable[[], None]) -> ChannelPool:
    """The send channels (none without multifd), connected to the main channel's peer."""
    params = precopy.params
    level = (params.multifd_zstd_level if params.multifd_compression == "zstd"
             else params.multifd_zlib_level)
    n = params.multifd_channels if options.multifd else 0
    settings = peer.encode_settings(peer.ChannelSettings(
        n, params.multifd_compression, options.flush_after_each_section, options.verify,
        peer.MFD_PACKET_PAGES))
    configs = [SocketChannelConfig(
        channel_id=i, endpoint="", parent_pid=0, blocks=tuple(precopy.blocks),
        compression=params.multifd_compression, level=level,
        peer=channel.addr if options.multifd else None, uuid=options.uuid,
        init_unused=settings, packet_pages=peer.MFD_PACKET_PAGES,
        zero_page_detection=params.zero_page_detection == "multifd",
        connect_timeout=options.connect_timeout, tls=channel.tls, hashes=hashes)
        for i in range(n)]
    assert channel.sock is not None
    return ChannelPool(configs, send_main, inherited=(channel.sock,), tick=tick)


class MultifdSender:
    def __init__(self, pool: ChannelPool, channel: MainChannel, precopy: Precopy,
                 verification: Verification, flush_after_each_section: bool) -> None:
        self.pool = pool
        self.channel = channel
        self.precopy = precopy  # what moved is counted there
        self.verification = verification
        self.legacy = flush_after_each_section

    @property
    def packets(self) -> int:
        """JOB_MFD_PACKETS toward an mfd peer (known from its PONG before the first packet
        goes out): packets of the size its MultiFDInit proposed, QEMU's otherwise."""
        assert self.channel.peer_mfd is not None, "the first packet waits for the PONG"
        return messages.JOB_MFD_PACKETS if self.channel.peer_mfd else 0

    def send(self, block: int, pages: np.ndarray) -> None:
        """One job to an idle channel, which hashes what it sends when verifying."""
        flags = self.packets | (messages.JOB_HASH if self.verification.on else 0)
        self.pool.send(block, pages, self.precopy.sent(pages), flags=flags)

    def flush_and_sync(self) -> None:
        """``multifd_ram_flush_and_sync``: every channel finishes its work and puts a SYNC
        packet on its connection; then MULTIFD_FLUSH on the main stream (not in legacy
        mode, where the destination syncs at EOS instead)."""
        self.pool.sync(messages.SYNC, self.packets)
        if not self.legacy:
            self.channel.send(ram.encode_multifd_flush())

    def end_round(self) -> None:
        if self.legacy:
            self.pool.sync(messages.SYNC, self.packets)  # per section; EOS syncs the receiver
        else:
            self.flush_and_sync()
