"""multifd zlib: one deflate stream per channel, Z_SYNC_FLUSH at the end of every packet.

Mirrors ``migration/multifd-zlib.c``: ``deflateInit`` (zlib format, default window) once per
channel; the last page of each packet is deflated with ``Z_SYNC_FLUSH``, which ends the
packet on a byte boundary with all its input emitted, so the receiver's persistent inflate
stream decodes exactly that packet's pages.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from mfd.errors import MfdError, ProtocolError
from mfd.protocol.constants import MULTIFD_PACKET_SIZE
from mfd.protocol.multifd import MULTIFD_FLAG_ZLIB
from mfd.workers.methods.nocomp import RecvBase, check_pages, flat_bytes, size_error


def zlib_compress_bound(size: int) -> int:
    """zlib's ``compressBound``: QEMU's send buffer, so no QEMU payload is larger.

    A full packet of random pages streams to compressBound - 6 bytes at every level (stored
    blocks plus the sync-flush marker, measured with zlib 1.2.13), so the bound also holds for
    mfd's own sender; ``prepare`` checks it anyway.
    """
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13


MAX_PAYLOAD = zlib_compress_bound(MULTIFD_PACKET_SIZE)  # 524461


class ZlibSend:
    """``multifd_zlib_send_prepare`` with one deflate stream per channel."""

    def __init__(self, level: int) -> None:
        assert 0 <= level <= 9, level  # options.py checked multifd-zlib-level
        self._cobj = zlib.compressobj(level)

    def prepare(self, pages: memoryview | np.ndarray) -> bytes | memoryview:
        mv = flat_bytes(pages)
        check_pages(mv)
        if not mv.nbytes:
            return b""  # QEMU does not touch the stream for a packet without normal pages
        payload = self._cobj.compress(mv) + self._cobj.flush(zlib.Z_SYNC_FLUSH)
        if len(payload) > MAX_PAYLOAD:  # QEMU: "deflate failed to compress all input"
            raise MfdError(f"zlib: {mv.nbytes} bytes compressed to {len(payload)}, more than "
                           f"the bound {MAX_PAYLOAD}")
        return payload

    def close(self) -> None:
        self._cobj = None


class ZlibRecv(RecvBase):
    """``multifd_zlib_recv`` with the channel's persistent inflate stream."""

    name = "zlib"
    max_payload = MAX_PAYLOAD

    def __init__(self) -> None:
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
    max_payload: int = MAX_PAYLOAD
    raw_pages: bool = False

    def send_setup(self, level: int) -> ZlibSend:
        return ZlibSend(level)

    def recv_setup(self) -> ZlibRecv:
        return ZlibRecv()


ZLIB = Zlib()
