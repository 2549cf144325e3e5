"""Migration parameters, capabilities and each command's options, checked here and only here.

Mirrors ``migration/options.c``: the values live in frozen dataclasses, and each one's
``check()`` rejects what QEMU rejects (ranges, mapped-ram with compression, postcopy with
multifd) in QEMU's words where QEMU has some. The API's entry points (:mod:`mfd.api`) call
the checks before they look at any file or guest, so the CLI, a script and the monitor
(``migrate-set-parameters``: :meth:`MigrationParameters.updated`) get the same line.
Elsewhere code branches on the fields, never re-validates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from mfd.errors import UsageError
from mfd.protocol import constants as C
from mfd.protocol.multifd import UUID_SIZE
from mfd.workers.tls import TLSOptions
from mfd.xhooks import NO_HOOKS, XHooks

CONNECT_TIMEOUT = 30.0
ZERO_PAGE_DETECTION = ("multifd", "legacy", "none")
COMPRESSION = ("none", "zstd", "zlib")
# what migrate-set-parameters (and migrate-set-capabilities' auto-converge) may change while
# a migration runs
LIVE = frozenset({"max_bandwidth", "max_postcopy_bandwidth", "downtime_limit", "auto_converge",
                  "cpu_throttle_initial", "cpu_throttle_increment", "cpu_throttle_tailslow",
                  "max_cpu_throttle", "throttle_trigger_threshold"})
_QAPI_TYPES = {"int": (int, "integer"), "bool": (bool, "boolean"), "str": (str, "string")}


def _qmp_name(field: str) -> str:
    return field.replace("_", "-")


def _range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise UsageError(f"Parameter '{_qmp_name(name)}' expects a value between {lo} and "
                         f"{hi}, got {value}")


def _not_negative(name: str, value: float) -> None:
    if value < 0:
        raise UsageError(f"Parameter '{_qmp_name(name)}' must not be negative")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{_qmp_name(name)} {value!r}, expected one of {', '.join(allowed)}")


def check_channels(channels: int) -> None:
    """QEMU's range of multifd-channels, for every command and the bench."""
    _range("multifd_channels", channels, 1, 255)


def check_ram(what: str, images: object, guest: object, *, required: bool = True) -> None:
    """Where the RAM comes from or goes: raw images or a guest, never both (and one of them
    unless not ``required``: an incoming migration's guest has a default name)."""
    if images is not None and guest is not None:
        raise UsageError(f"{what} takes either images or a guest, not both")
    if required and images is None and guest is None:
        raise UsageError(f"{what} needs either images or a guest")


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
        return {_qmp_name(f.name): getattr(self, f.name) for f in fields(self)}

    def check(self, *, mapped_ram: bool) -> None:
        """``migrate_params_check`` + ``migrate_caps_check`` for what mfd supports."""
        check_channels(self.multifd_channels)
        _range("multifd_zstd_level", self.multifd_zstd_level, 0, 20)
        _range("multifd_zlib_level", self.multifd_zlib_level, 0, 9)
        _range("downtime_limit", self.downtime_limit, 0, 2_000_000)
        _range("throttle_trigger_threshold", self.throttle_trigger_threshold, 1, 100)
        _range("cpu_throttle_initial", self.cpu_throttle_initial, 1, 99)
        _range("cpu_throttle_increment", self.cpu_throttle_increment, 1, 99)
        _range("max_cpu_throttle", self.max_cpu_throttle, 1, 99)
        _range("x_clear_bitmap_shift", self.x_clear_bitmap_shift, 6, 31)
        _not_negative("max_bandwidth", self.max_bandwidth)
        _not_negative("max_postcopy_bandwidth", self.max_postcopy_bandwidth)
        size = self.xbzrle_cache_size
        if size < C.TARGET_PAGE_SIZE or size & (size - 1):
            raise UsageError("Parameter 'xbzrle_cache_size' expects a power of two no less "
                             "than the target page size")
        _one_of("zero_page_detection", self.zero_page_detection, ZERO_PAGE_DETECTION)
        _one_of("multifd_compression", self.multifd_compression, COMPRESSION)
        if mapped_ram and self.multifd_compression != "none":
            raise UsageError("Cannot use compression with mapped-ram")
        if self.direct_io and not mapped_ram:
            raise UsageError("direct-io is only available with mapped-ram")

    def updated(self, changes: dict[str, object], *, mapped_ram: bool) -> MigrationParameters:
        """These parameters with ``changes`` (field names) applied while migrating, as QEMU's
        ``migrate-set-parameters``: only what may change live (:data:`LIVE`), of QAPI's
        types, then checked."""
        bad = sorted(set(changes) - LIVE)
        if bad:
            raise UsageError(f"parameter {_qmp_name(bad[0])!r} cannot be changed while "
                             "migrating")
        types = {f.name: _QAPI_TYPES[f.type] for f in fields(self)}
        for name, value in changes.items():
            kind, what = types[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UsageError(f"Invalid parameter type for '{_qmp_name(name)}', "
                                 f"expected: {what}")
        new = replace(self, **changes)
        new.check(mapped_ram=mapped_ram)
        return new


@dataclass(frozen=True)
class SaveOptions:
    machine: str = "none"
    offset: int = 0  # file:PATH,offset=N: keep the first N bytes (libvirt's header)
    stop_first: bool = False
    runstate: str | None = None  # globalstate; default from the guest's state
    batch_pages: int = C.MULTIFD_PAGE_COUNT  # pages per job: QEMU's 128 (512 KiB)
    x: XHooks = NO_HOOKS  # test-only behaviour (channel_delays, skip_round_sync,
    # ignore_dirty_log)

    def check(self) -> None:
        _not_negative("offset", self.offset)


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
        _postcopy_preempt(self.postcopy, self.postcopy_preempt)
        if self.postcopy_after is not None and not self.postcopy:
            raise UsageError("--postcopy-after goes with --postcopy-ram")
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
    # (idstr, size): RAM blocks allocated and zeroed before listening (QEMU's prealloc=on),
    # each the size the source must list for it
    prealloc: tuple[tuple[str, int], ...] = ()
    x: XHooks = NO_HOOKS  # test-only: channel_delays, skip_sync, fault

    def check(self, images: dict[str, str] | None = None) -> None:
        """``images``: where the RAM goes when not to a guest (``--image``)."""
        if self.multifd_channels is not None:
            check_channels(self.multifd_channels)
        if self.multifd_compression is not None:
            _one_of("multifd_compression", self.multifd_compression, COMPRESSION)
        _postcopy_preempt(self.postcopy_ram, self.postcopy_preempt)
        seen: set[str] = set()
        for idstr, size in self.prealloc:
            if idstr in seen:
                raise UsageError(f"--prealloc {idstr}: given twice")
            seen.add(idstr)
            if size <= 0 or size % C.TARGET_PAGE_SIZE:
                raise UsageError(f"--prealloc {idstr}={size}: the size is not a positive "
                                 f"multiple of {C.TARGET_PAGE_SIZE}")
            if images is not None and idstr not in images:
                raise UsageError(f"--prealloc {idstr}: no --image {idstr}=PATH to put it in")


@dataclass(frozen=True)
class RestoreOptions:
    multifd_channels: int = 2  # channels that load a mapped-ram file (any number, any file)
    offset: int = 0  # where the stream starts in the file (libvirt's header before it)
    direct_io: bool = False  # O_DIRECT channel reads
    # the guest runs at once, its RAM arriving as it needs it and as the channels load it
    # (a mapped-ram file and a guest: mfd.main_thread.lazy)
    lazy: bool = False
    x: XHooks = NO_HOOKS  # test-only: channel_delays, run_exits

    def check(self, *, guest: bool) -> None:
        check_channels(self.multifd_channels)
        _not_negative("offset", self.offset)
        if self.lazy and not guest:
            raise UsageError("a lazy restore starts a guest: give --guest, not --image")


def _postcopy_preempt(postcopy_ram: bool, preempt: bool) -> None:
    if preempt and not postcopy_ram:
        raise UsageError("Postcopy preempt requires postcopy-ram (QEMU's reason)")
