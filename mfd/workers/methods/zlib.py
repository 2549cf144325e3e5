"""multifd zlib: one deflate stream per channel, Z_SYNC_FLUSH at the end of every packet.

Mirrors ``migration/multifd-zlib.c``: ``deflateInit`` (zlib format, default window) once per
channel; the last page of each packet is deflated with ``Z_SYNC_FLUSH``, which ends the
packet on a byte boundary with all its input emitted, so the receiver's persistent inflate
stream decodes exactly that packet's pages.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from mfd.errors import MfdError, ProtocolError
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.multifd import MULTIFD_FLAG_ZLIB
from mfd.workers.methods.nocomp import RecvBase, check_pages, flat_bytes, size_error


def zlib_compress_bound(size: int) -> int:
    """zlib's ``compressBound``: QEMU's send buffer, so no QEMU payload is larger.

    A full packet of random pages streams to compressBound - 6 bytes at every level (stored
    blocks plus the sync-flush marker, measured with zlib 1.2.13), so the bound also holds for
    mfd's own sender; ``prepare`` checks it anyway.
    """
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13


def max_payload(pages: int) -> int:
    """The largest payload of a packet of ``pages`` pages (524461 for QEMU's 128)."""
    return zlib_compress_bound(pages * TARGET_PAGE_SIZE)


class ZlibSend:
    """``multifd_zlib_send_prepare`` with one deflate stream per channel."""

    def __init__(self, level: int, pages: int) -> None:
        assert 0 <= level <= 9, level  # options.py checked multifd-zlib-level
        self._cobj = zlib.compressobj(level)
        self.max_payload = max_payload(pages)

    def prepare(self, parts: list) -> bytes:
        views = [flat_bytes(p) for p in parts]
        for mv in views:
            check_pages(mv)
        size = sum(mv.nbytes for mv in views)
        if not size:
            return b""  # QEMU does not touch the stream for a packet without normal pages
        payload = b"".join(self._cobj.compress(mv) for mv in views) + \
            self._cobj.flush(zlib.Z_SYNC_FLUSH)
        if len(payload) > self.max_payload:  # QEMU: "deflate failed to compress all input"
            raise MfdError(f"zlib: {size} bytes compressed to {len(payload)}, more than "
                           f"the bound {self.max_payload}")
        return payload

    def close(self) -> None:
        self._cobj = None


class ZlibRecv(RecvBase):
    """``multifd_zlib_recv`` with the channel's persistent inflate stream."""

    name = "zlib"

    def __init__(self, pages: int) -> None:
        self.max_payload = max_payload(pages)
        self._dobj = zlib.decompressobj()

    def _decode(self, payload: memoryview, out: memoryview) -> memoryview:
        want = out.nbytes
        # One byte more than the packet holds: enough to see an overflow, never more. Any
        # output still pending in the stream would have filled that byte.
        try:
            data = self._dobj.decompress(payload, want + 1)
        except zlib.error as e:
            raise ProtocolError(f"zlib: corrupt payload of {payload.nbytes} bytes: {e}") from e
        if len(data) > want:
            raise size_error("zlib", len(data), want, at_least=True)
        if self._dobj.eof:
            # QEMU: inflate returned Z_STREAM_END instead of Z_OK; the stream never ends.
            raise ProtocolError("zlib: the deflate stream ended inside a packet (the sender "
                                "used Z_FINISH, expected Z_SYNC_FLUSH)")
        if len(data) < want:
            raise size_error("zlib", len(data), want)
        assert not self._dobj.unconsumed_tail  # limited only by max_length, which it did not hit
        out[:] = data
        return out

    def close(self) -> None:
        self._dobj = None
        self._broken = "closed"


@dataclass(frozen=True)
class Zlib:
    """``multifd_zlib_ops``."""

    name: str = "zlib"
    flag: int = MULTIFD_FLAG_ZLIB
    raw_pages: bool = False

    def max_payload(self, pages: int) -> int:
        return max_payload(pages)

    def send_setup(self, level: int, pages: int) -> ZlibSend:
        return ZlibSend(level, pages)

    def recv_setup(self, pages: int) -> ZlibRecv:
        return ZlibRecv(pages)


ZLIB = Zlib()
