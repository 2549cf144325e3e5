"""multifd zstd: one zstd stream per channel, flushed at the end of every packet.

Mirrors ``migration/multifd-zstd.c``: the sender's ``ZSTD_CStream`` lives for the whole
migration (one frame that never ends) and each packet's pages are fed with ``ZSTD_e_flush``
on the last one, so the packet's payload ends on a block boundary and the receiver's
persistent ``ZSTD_DStream`` can decode it completely before the next packet arrives.

Both ends call libzstd's streaming functions as QEMU does, through python-zstandard's cffi
binding of the libzstd it bundles (``zstandard.backend_cffi``): the sender compresses the
pages where they are (guest RAM, a run at a time) into one buffer it keeps, the receiver
decompresses straight into the buffer it is given. python-zstandard's own objects return
each output as a new ``bytes``: two more copies of every page, a third of the receive
channel's CPU in a profile of QEMU -> mfd.
"""

from __future__ import annotations

from dataclasses import dataclass

from zstandard.backend_cffi import ffi, lib

from mfd.errors import MfdError, ProtocolError
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.multifd import MULTIFD_FLAG_ZSTD
from mfd.workers.methods.nocomp import RecvBase, check_pages, flat_bytes, size_error


def zstd_compress_bound(size: int) -> int:
    """``ZSTD_COMPRESSBOUND``: the sender's buffer in QEMU, so no QEMU payload is larger."""
    small = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
    return size + (size >> 8) + small


def max_payload(pages: int) -> int:
    """The largest payload of a packet of ``pages`` pages (526336 for QEMU's 128)."""
    return zstd_compress_bound(pages * TARGET_PAGE_SIZE)


# A frame header may ask for any window up to 2 GiB (ZSTD_WINDOWLOG_MAX); QEMU's levels
# (<= 20) use at most 2**25 bytes, so a larger request is refused instead of allocated.
WINDOW_LOG_MAX = 25


def _error(result: int) -> str | None:
    """libzstd's name for the error ``result`` is, or None when it is not one."""
    return ffi.string(lib.ZSTD_getErrorName(result)).decode() \
        if lib.ZSTD_isError(result) else None


def _checked(result: int, what: str) -> int:
    """A receiver's call: its error is the peer's (a corrupt payload)."""
    if (name := _error(result)) is not None:
        raise ProtocolError(f"zstd: {what}: {name}")
    return result


class ZstdSend:
    """``multifd_zstd_send_prepare`` with one compression stream per channel."""

    def __init__(self, level: int, pages: int) -> None:
        """``pages``: the most a packet holds (its payload buffer is sized for them)."""
        assert 0 <= level <= 20, level  # options.py checked multifd-zstd-level
        self._cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
        lib.ZSTD_CCtx_setParameter(self._cctx, lib.ZSTD_c_compressionLevel, level)
        self._buffer = bytearray(max_payload(pages))
        self._in = ffi.new("ZSTD_inBuffer *")
        self._out = ffi.new("ZSTD_outBuffer *")

    def prepare(self, parts: list) -> memoryview:
        """The payload of the pages in ``parts`` (each whole pages, contiguous), in order: a
        view of this stream's buffer, valid until the next call."""
        out = self._out
        out.dst, out.size, out.pos = ffi.from_buffer(self._buffer), len(self._buffer), 0
        views = [flat_bytes(p) for p in parts]
        for i, mv in enumerate(views):
            check_pages(mv)
            mode = lib.ZSTD_e_flush if i == len(views) - 1 else lib.ZSTD_e_continue
            self._in.src, self._in.size, self._in.pos = ffi.from_buffer(mv), mv.nbytes, 0
            while True:  # ZSTD_e_flush: until the packet's last block is out (returns 0)
                left = lib.ZSTD_compressStream2(self._cctx, out, self._in, mode)
                if (name := _error(left)) is not None:
                    raise MfdError(f"zstd: {name}")
                done = self._in.pos == self._in.size and (mode != lib.ZSTD_e_flush or not left)
                if done:
                    break
                if out.pos == out.size:  # QEMU: "compressStream buffer too small"
                    raise MfdError(f"zstd: {sum(v.nbytes for v in views)} bytes compressed to "
                                   f"more than the bound {out.size}")
        return memoryview(self._buffer)[: out.pos]

    def close(self) -> None:
        self._cctx = None


class ZstdRecv(RecvBase):
    """``multifd_zstd_recv`` with the channel's persistent decompression stream."""

    name = "zstd"

    def __init__(self, pages: int) -> None:
        self.max_payload = max_payload(pages)
        self._dctx = ffi.gc(lib.ZSTD_createDCtx(), lib.ZSTD_freeDCtx)
        _checked(lib.ZSTD_DCtx_setParameter(self._dctx, lib.ZSTD_d_windowLogMax,
                                            WINDOW_LOG_MAX), "window limit")
        self._in = ffi.new("ZSTD_inBuffer *")
        self._out = ffi.new("ZSTD_outBuffer *")
        self._probe = bytearray(1)

    def _decode(self, payload: memoryview, out: memoryview) -> memoryview:
        """Straight into ``out``, which bounds what any input can make it write; then what is
        left of the payload (the end of its last block) must decode to nothing: more would
        be pages beyond the packet's, landing in the next packet."""
        src, dst = self._in, self._out
        src.src, src.size, src.pos = ffi.from_buffer(payload), payload.nbytes, 0
        dst.dst, dst.size, dst.pos = ffi.from_buffer(out), out.nbytes, 0
        while dst.pos < dst.size and src.pos < src.size:
            self._step(payload)
        if dst.pos < dst.size:
            raise size_error("zstd", dst.pos, out.nbytes)
        dst.dst, dst.size, dst.pos = ffi.from_buffer(self._probe), 1, 0
        while True:
            before = src.pos
            self._step(payload)
            if dst.pos:
                raise size_error("zstd", out.nbytes + 1, out.nbytes, at_least=True)
            if src.pos == src.size:
                return out
            if src.pos == before:
                raise ProtocolError(f"zstd: {src.size - src.pos} bytes left over in a payload "
                                    f"of {payload.nbytes}")

    def _step(self, payload: memoryview) -> None:
        _checked(lib.ZSTD_decompressStream(self._dctx, self._out, self._in),
                 f"corrupt payload of {payload.nbytes} bytes")

    def close(self) -> None:
        self._dctx = None
        self._broken = "closed"


@dataclass(frozen=True)
class Zstd:
    """``multifd_zstd_ops``."""

    name: str = "zstd"
    flag: int = MULTIFD_FLAG_ZSTD
    raw_pages: bool = False

    def max_payload(self, pages: int) -> int:
        return max_payload(pages)

    def send_setup(self, level: int, pages: int) -> ZstdSend:
        return ZstdSend(level, pages)

    def recv_setup(self, pages: int) -> ZstdRecv:
        return ZstdRecv(pages)


ZSTD = Zstd()
