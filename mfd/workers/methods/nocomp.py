"""multifd without compression, plus the helpers every method shares.

Mirrors ``migration/multifd-nocomp.c``, which in QEMU also hosts the code common to all
methods (``multifd_send_prepare_common``); the buffer and payload checks below play that
role for ``zstd.py`` and ``zlib.py``. The payload is the normal pages' bytes, as they are
(``raw_pages``): the send channel writes them from guest memory and the receive channel
reads them straight into RAM (``mfd.workers.socket_channel``), so there is nothing to
encode and no channel state; ``mfd.protocol.multifd`` checks that next_packet_size is
exactly the pages' size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.multifd import MULTIFD_FLAG_NOCOMP

# --- shared by all methods -------------------------------------------------------------------


def flat_bytes(buf: memoryview | np.ndarray | bytes | bytearray) -> memoryview:
    """A 1-D unsigned-byte view of ``buf``, no copy (``cast`` needs C-contiguous input)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim == 1 and mv.format == "B":
        return mv
    if mv.nbytes == 0:
        return memoryview(b"")  # cast() refuses shapes with a zero in them
    return mv.cast("B")


def check_pages(pages: memoryview) -> None:
    """Send side: the caller hands whole pages, contiguous (an internal invariant)."""
    assert pages.c_contiguous and pages.nbytes % TARGET_PAGE_SIZE == 0, pages.nbytes


def check_payload(name: str, payload: memoryview, out: memoryview, max_payload: int) -> None:
    """Receive-side checks that need no decoding; ``out`` is the caller's, so asserted."""
    assert not out.readonly and out.nbytes % TARGET_PAGE_SIZE == 0, out.nbytes
    if payload.nbytes > max_payload:
        raise ProtocolError(f"{name}: payload is {payload.nbytes} bytes, expected at most "
                            f"{max_payload}")
    if out.nbytes == 0 and payload.nbytes:
        raise ProtocolError(f"{name}: payload of {payload.nbytes} bytes for a packet without "
                            "normal pages")


def size_error(name: str, got: int, expected: int, *, at_least: bool = False) -> ProtocolError:
    more = "at least " if at_least else ""
    return ProtocolError(f"{name}: decompressed packet is {more}{got} bytes, expected "
                         f"{expected}")


class RecvBase:
    """A receive state that refuses further packets after a decoding error.

    After an error the decompression stream's position is unknown, so any later packet of
    the channel would decode to garbage; the channel is failed, as in QEMU.
    """

    name = "?"
    max_payload = 0  # for the channel's packet size, set by each method's recv_setup
    _broken: str | None = None

    def recv(self, payload: bytes | memoryview, out: memoryview) -> memoryview:
        if self._broken is not None:
            raise ProtocolError(f"{self.name}: the channel's context is unusable "
                                f"({self._broken})")
        src, dst = flat_bytes(payload), flat_bytes(out)
        try:
            check_payload(self.name, src, dst, self.max_payload)
            return self._decode(src, dst) if dst.nbytes else dst
        except ProtocolError as e:
            self._broken = f"earlier error: {e}"
            raise

    def _decode(self, payload: memoryview, out: memoryview) -> memoryview:
        raise NotImplementedError


# --- none ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nocomp:
    """``multifd_nocomp_ops``: no ``send_setup``/``recv_setup``, the pages are the payload."""

    name: str = "none"
    flag: int = MULTIFD_FLAG_NOCOMP
    raw_pages: bool = True

    def max_payload(self, pages: int) -> int:
        return pages * TARGET_PAGE_SIZE


NOCOMP = Nocomp()
