"""Migration parameters and capabilities with QEMU's names and defaults, checked once.

Mirrors ``migration/options.c``: the values live in one frozen dataclass and
:func:`check_params` rejects what QEMU rejects (ranges, mapped-ram with compression) with
QEMU-like messages. Elsewhere code branches on the fields, never re-validates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mfd.errors import UsageError
from mfd.protocol import constants as C

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
