"""Migration parameters and capabilities with QEMU's names and defaults, checked once.

Mirrors ``migration/options.c``: the values live in one frozen dataclass and
:func:`check_params` rejects what QEMU rejects (ranges, mapped-ram with compression) with
QEMU-like messages. Elsewhere code branches on the fields, never re-validates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mfd.errors import UsageError
from mfd.protocol import constants as C
from mfd.protocol.multifd import UUID_SIZE
from mfd.workers.tls import TLSOptions
from mfd.xhooks import NO_HOOKS, XHooks

CONNECT_TIMEOUT = 30.0
ZERO_PAGE_DETECTION = ("multifd", "legacy", "none")
COMPRESSION = ("none", "zstd", "zlib")


@dataclass(frozen=True)
class MigrationParameters:
    """``migrate-set-parameters`` plus the capabilities mfd implements.

    Defaults are QEMU 10's, except ``max_bandwidth``: QEMU's 128 MiB/s slows even file
    saves, so mfd's default is unlimited (0), as libvirt sets for saves.
    """

    multifd_channels: int = 2
    multifd_compression: str = "none"
    multifd_zstd_level: int = 1
    multifd_zlib_level: int = 1
    zero_page_detection: str = "multifd"
    direct_io: bool = False
    downtime_limit: int = 300  # ms
    max_bandwidth: int = 0  # bytes per second; 0 = unlimited
    max_postcopy_bandwidth: int = 0  # the same after the switch to postcopy (QEMU's)
    auto_converge: bool = False
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99
    throttle_trigger_threshold: int = 50
    xbzrle_cache_size: int = 64 << 20  # bytes (QEMU's default); the capability is an option
    # pages per clear_bmap chunk, as a power of two: a KVM guest with manual dirty log
    # protect has each chunk's pages write-protected again just before the chunk is sent
    x_clear_bitmap_shift: int = 18

    def to_qmp(self) -> dict[str, object]:
        """QEMU's ``query-migrate-parameters`` field names."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise UsageError(f"Parameter '{name.replace('_', '-')}' expects a value between "
                         f"{lo} and {hi}, got {value}")


def check_params(p: MigrationParameters, *, mapped_ram: bool) -> MigrationParameters:
    """``migrate_params_check`` + ``migrate_caps_check`` for what mfd supports."""
    _range("multifd_channels", p.multifd_channels, 1, 255)
    _range("multifd_zstd_level", p.multifd_zstd_level, 0, 20)
    _range("multifd_zlib_level", p.multifd_zlib_level, 0, 9)
    _range("downtime_limit", p.downtime_limit, 0, 2_000_000)
    _range("throttle_trigger_threshold", p.throttle_trigger_threshold, 1, 100)
    _range("cpu_throttle_initial", p.cpu_throttle_initial, 1, 99)
    _range("cpu_throttle_increment", p.cpu_throttle_increment, 1, 99)
    _range("max_cpu_throttle", p.max_cpu_throttle, 1, 99)
    _range("x_clear_bitmap_shift", p.x_clear_bitmap_shift, 6, 31)
    for name in ("max_bandwidth", "max_postcopy_bandwidth"):
        if getattr(p, name) < 0:
            raise UsageError(f"Parameter '{name.replace('_', '-')}' must not be negative")
    size = p.xbzrle_cache_size
    if size < C.TARGET_PAGE_SIZE or size & (size - 1):
        raise UsageError("Parameter 'xbzrle_cache_size' expects a power of two no less than "
                         "the target page size")
    if p.zero_page_detection not in ZERO_PAGE_DETECTION:
        raise UsageError(f"zero-page-detection {p.zero_page_detection!r}, expected one of "
                         f"{', '.join(ZERO_PAGE_DETECTION)}")
    if p.multifd_compression not in COMPRESSION:
        raise UsageError(f"multifd-compression {p.multifd_compression!r}, expected one of "
                         f"{', '.join(COMPRESSION)}")
    if mapped_ram and p.multifd_compression != "none":
        raise UsageError("Cannot use compression with mapped-ram")
    if p.direct_io and not mapped_ram:
        raise UsageError("direct-io is only available with mapped-ram")
    return p


@dataclass(frozen=True)
class SaveOptions:
    machine: str = "none"
    offset: int = 0  # file:PATH,offset=N: keep the first N bytes (libvirt's header)
    stop_first: bool = False
    runstate: str | None = None  # globalstate; default from the guest's state
    batch_pages: int = C.MULTIFD_PAGE_COUNT  # pages per job: QEMU's 128 (512 KiB)
    x: XHooks = NO_HOOKS  # test-only behaviour (channel_delays, skip_round_sync,
    # ignore_dirty_log)


@dataclass(frozen=True)
class MigrateOptions:
    machine: str = "none"
    multifd: bool = True  # QEMU's capability: off sends every page on the main channel
    flush_after_each_section: bool = False  # QEMU's multifd-flush-after-each-section
    uuid: bytes = bytes(UUID_SIZE)  # QEMU's -uuid (zeros: unset)
    timeout: float | None = None  # cancel when the migration would take longer
    connect_timeout: float = CONNECT_TIMEOUT
    keep_source: bool = False  # the source guest stays paused afterwards (QEMU's postmigrate)
    verify: bool = True  # to an mfd destination: compare RAM at switchover (mfd.shm.pagehash)
    postcopy: bool = False  # QEMU's postcopy-ram capability: the switch may go postcopy
    postcopy_after: float | None = None  # switch to postcopy after this many seconds
    postcopy_preempt: bool = False  # QEMU's: requested pages on a connection of their own
    tls: TLSOptions | None = None  # QEMU's tls-creds, tls-hostname: every connection TLS
    xbzrle: bool = False  # QEMU's capability: pages sent again as what changed (no multifd)

    def check(self) -> None:
        """``migrate_caps_check`` for these capabilities, with QEMU's reasons."""
        if self.postcopy_preempt and not self.postcopy:
            raise UsageError("Postcopy preempt requires postcopy-ram (QEMU's reason)")
        if self.postcopy and self.multifd:
            raise UsageError("Postcopy is not yet compatible with multifd (QEMU's reason; "
                             "use --no-multifd)")
        if self.xbzrle and self.multifd:
            raise UsageError("Multifd is not compatible with xbzrle (QEMU's reason; use "
                             "--no-multifd)")


@dataclass(frozen=True)
class IncomingOptions:
    timeout: float | None = None  # give up when no migration completed within this
    # QEMU's settings for its destination; None: QEMU's default, or what an mfd source says
    multifd_channels: int | None = None
    multifd_compression: str | None = None
    flush_after_each_section: bool | None = None
    uuid: bytes = bytes(UUID_SIZE)  # QEMU's -uuid: channels must carry it
    stopped: bool = False  # the guest stays paused after the migration (QEMU's -S)
    postcopy_ram: bool = False  # QEMU's capability: the source may switch to postcopy
    postcopy_preempt: bool = False  # QEMU's: requested pages come on a channel of their own
    tls: TLSOptions | None = None  # QEMU's tls-creds, verify-peer, tls-authz
    x: XHooks = NO_HOOKS  # test-only: channel_delays, skip_sync, fault
