"""multifd zstd: one zstd stream per channel, flushed at the end of every packet.

Mirrors ``migration/multifd-zstd.c``: the sender's ``ZSTD_CStream`` lives for the whole
migration (one frame that never ends) and each packet's pages are fed with ``ZSTD_e_flush``
on the last one, so the packet's payload ends on a block boundary and the receiver's
persistent ``ZSTD_DStream`` can decode it completely before the next packet arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from mfd.errors import MfdError, ProtocolError
from mfd.protocol.constants import MULTIFD_PACKET_SIZE
from mfd.protocol.multifd import MULTIFD_FLAG_ZSTD
from mfd.workers.methods.nocomp import RecvBase, check_pages, flat_bytes, size_error


def zstd_compress_bound(size: int) -> int:
    """``ZSTD_COMPRESSBOUND``: the sender's buffer in QEMU, so no QEMU payload is larger."""
    small = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
    return size + (size >> 8) + small


MAX_PAYLOAD = zstd_compress_bound(MULTIFD_PACKET_SIZE)  # 526336

# A frame header may ask for any window up to 2 GiB (ZSTD_WINDOWLOG_MAX); QEMU's levels
# (<= 20) use at most 2**25 bytes, so a larger request is refused instead of allocated.
MAX_WINDOW = 1 << 25

# The decompressor emits output in chunks of this size. It is larger than any packet, so a
# call that fills a chunk has already produced too much; a valid packet never fills one,
# which guarantees zstandard's writer leaves no decoded bytes behind in the context when the
# payload is used up (its loop stops once input is consumed, even if output is pending).
_CHUNK = MULTIFD_PACKET_SIZE + 1


class ZstdSend:
    """``multifd_zstd_send_prepare`` with one compression stream per channel."""

    def __init__(self, level: int) -> None:
        assert 0 <= level <= 20, level  # options.py checked multifd-zstd-level
        self._cobj = zstandard.ZstdCompressor(level=level).compressobj()

    def prepare(self, pages: memoryview | np.ndarray) -> bytes | memoryview:
        mv = flat_bytes(pages)
        check_pages(mv)
        if not mv.nbytes:
            return b""  # QEMU does not touch the stream for a packet without normal pages
        # COMPRESSOBJ_FLUSH_BLOCK is ZSTD_e_flush: the frame stays open for the next packet.
        payload = self._cobj.compress(mv) + self._cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        if len(payload) > MAX_PAYLOAD:  # QEMU: "compressStream buffer too small"
            raise MfdError(f"zstd: {mv.nbytes} bytes compressed to {len(payload)}, more than "
                           f"the bound {MAX_PAYLOAD}")
        return payload

    def close(self) -> None:
        self._cobj = None


class _Sink:
    """Where the decompressor writes: the current packet's ``out``, refusing overflow.

    Raising from ``write`` stops the decompressor at the first chunk past the end, so a
    hostile payload costs at most one chunk of memory, however much it would expand.
    """

    __slots__ = ("out", "pos")

    def __init__(self) -> None:
        self.out = memoryview(bytearray())
        self.pos = 0

    def write(self, chunk: bytes) -> int:
        end = self.pos + len(chunk)
        if end > self.out.nbytes:
            raise size_error("zstd", end, self.out.nbytes, at_least=True)
        self.out[self.pos : end] = chunk
        self.pos = end
        return len(chunk)


class ZstdRecv(RecvBase):
    """``multifd_zstd_recv`` with the channel's persistent decompression stream."""

    name = "zstd"
    max_payload = MAX_PAYLOAD

    def __init__(self) -> None:
        self._sink = _Sink()
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        # A stream writer, not decompressobj(): decompressobj returns all the output at once
        # with no limit, which a zstd bomb would turn into gigabytes.
        self._writer = dctx.stream_writer(self._sink, write_size=_CHUNK)

    def _decode(self, payload: memoryview, out: memoryview) -> memoryview:
        self._sink.out, self._sink.pos = out, 0
        try:
            self._writer.write(payload)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"zstd: corrupt payload of {payload.nbytes} bytes: {e}") from e
        finally:
            self._sink.out = memoryview(bytearray())  # do not keep the caller's buffer
        if self._sink.pos != out.nbytes:
            raise size_error("zstd", self._sink.pos, out.nbytes)
        return out

    def close(self) -> None:
        self._writer = None
        self._broken = "closed"


@dataclass(frozen=True)
class Zstd:
    """``multifd_zstd_ops``."""

    name: str = "zstd"
    flag: int = MULTIFD_FLAG_ZSTD
    max_payload: int = MAX_PAYLOAD
    raw_pages: bool = False

    def send_setup(self, level: int) -> ZstdSend:
        return ZstdSend(level)

    def recv_setup(self) -> ZstdRecv:
        return ZstdRecv()


ZSTD = Zstd()
