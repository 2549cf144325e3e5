"""The coordinator of a live migration's source (the package's docstring has the flow)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from mfd.errors import MfdError
from mfd.main_thread.precopy import Precopy, Progress
from mfd.main_thread.source.channel import PEER_TIMEOUT
from mfd.main_thread.source.multifd import JOB_PACKETS, MultifdSender, start_channels
from mfd.main_thread.source.postcopy import Postcopy
from mfd.main_thread.source.preempt import Preempt
from mfd.main_thread.source.qmp import SourceQMP
from mfd.main_thread.source.ramstream import RamStream
from mfd.main_thread.source.session import Control, Session
from mfd.main_thread.source.switchover import Switchover
from mfd.main_thread.source.verify import Verification
from mfd.main_thread.state import MigrationStatus
from mfd.main_thread.stats import MigrationStats
from mfd.main_thread.xbzrle import Xbzrle
from mfd.options import MigrateOptions, MigrationParameters
from mfd.protocol import constants as C
from mfd.protocol import devices, peer, postcopy, ram, stream
from mfd.shm.control import GuestClient
from mfd.shm.ramblock import DataExtents, RAMBlock

_PING = 1  # QEMU's own first PING value


class Migration:
    def __init__(self, uri: str, blocks: list[RAMBlock], params: MigrationParameters,
                 options: MigrateOptions, guest: GuestClient | None = None,
                 progress: Progress | None = None,
                 warn: Callable[[str], None] | None = None, monitored: bool = False) -> None:
        """``monitored``: a QMP monitor serves this migration (``qmp``), so a postcopy
        whose link is lost can be resumed."""
        self.stats = MigrationStats(total=sum(b.used_length for b in blocks))
        self.precopy = Precopy(blocks, params, guest, self.stats, progress,
                               batch_pages=JOB_PACKETS * C.MULTIFD_PAGE_COUNT)
        self.control = Control(params, options.tls, self.stats)
        self.session = Session(uri, options, self.precopy, self.control)
        self.xbzrle = Xbzrle(params.xbzrle_cache_size, blocks) if options.xbzrle else None
        self.stats.xbzrle = self.xbzrle.counters if self.xbzrle is not None else None
        self.options = options
        self.guest = guest
        self.warn = warn or (lambda line: None)
        self.monitored = monitored
        self.qmp = SourceQMP(self.control, options)
        self.verification = Verification(blocks, self.session.channel, options.verify)
        self.switchover = Switchover(self.session, self.verification, options.machine,
                                     self.warn)

    @property
    def digests(self) -> dict[str, str]:
        """Blake3 of each block's page hash table, once both ends compared them."""
        return self.switchover.digests

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:
            self.session.fail(e)
        finally:
            self.session.close()
        if self.guest is not None and not self.options.keep_source:
            with contextlib.suppress(MfdError):
                self.guest.quit()  # it runs on the destination now

    def _run(self) -> None:
        session, channel, precopy = self.session, self.session.channel, self.precopy
        channel.open()
        session.resources.callback(precopy.release)
        live = precopy.start()
        extents = [DataExtents(m.fd) for m in precopy.mapped]
        session.resources.callback(self.verification.close)
        hashes = self.verification.open()
        with start_channels(precopy, self.options, channel, hashes, session.tick) as pool:
            channel.watch(pool)
            multifd = MultifdSender(pool, channel, precopy, self.verification,
                                    self.options.flush_after_each_section) \
                if self.options.multifd else None
            ram_stream = RamStream(channel, precopy, extents, self.verification, self.xbzrle,
                                   multifd)
            channel.send(self._setup_stream())
            # the PONG says whether the peer is mfd, which sets the size of every packet
            session.wait(lambda: channel.peer_mfd is not None, PEER_TIMEOUT, "answer PING")
            if multifd is not None:
                multifd.flush_and_sync()
            channel.send(ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))
            channel.check()
            self.stats.setup_time = time.monotonic() - self.stats.start
            session.move(MigrationStatus.ACTIVE)
            postcopy_ = self._postcopy(ram_stream)
            precopy.iterate(ram_stream, live, postcopy_.due, self.verification.cost)
            if postcopy_.due():
                postcopy_.run()
            else:
                self.switchover.complete(ram_stream, pool)

    def _postcopy(self, ram_stream: RamStream) -> Postcopy:
        preempt = None
        if self.options.postcopy_preempt:
            preempt = Preempt(self.session.channel, self.precopy, self.verification)
            self.session.resources.callback(preempt.close)
        return Postcopy(self.session, self.options, ram_stream, self.switchover, preempt,
                        self.monitored, self.warn)

    def _setup_stream(self) -> bytes:
        cfg = stream.Configuration(self.options.machine)
        return (
            stream.encode_file_header() + stream.encode_configuration(cfg)
            + stream.encode_command(stream.Command(C.MIG_CMD_OPEN_RETURN_PATH))
            + stream.encode_command(stream.Command(C.MIG_CMD_PING, _PING.to_bytes(4, "big")))
            + stream.encode_command(stream.Command(C.MIG_CMD_PING,
                                                   peer.MFD_PING.to_bytes(4, "big")))
            + (postcopy.encode_advise() if self.options.postcopy else b"")
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, devices.RAM_SECTION_ID,
                                          C.RAM_SECTION_IDSTR, 0, C.RAM_SECTION_VERSION)
            + ram.encode_mem_size(self.stats.total)
            + b"".join(ram.encode_block_entry(b.idstr, b.used_length)
                       for b in self.precopy.blocks))
