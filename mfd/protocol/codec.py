"""Byte cursor for decoding and a builder for encoding QEMU's big-endian stream fields.

Pure: a :class:`Reader` walks any buffer (bytes, memoryview, mmap) and never calls I/O. Every
read checks the length first and raises :class:`ProtocolError` naming the absolute offset,
so a truncated or corrupt file produces one clear line instead of a struct.error.
"""

from __future__ import annotations

import struct

from mfd.errors import ProtocolError, Truncated

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """A cursor over ``buf``; ``base`` is the absolute offset of ``buf[0]`` (for messages)."""

    __slots__ = ("_end", "base", "buf", "pos", "what")

    def __init__(self, buf, pos: int = 0, *, base: int = 0, end: int | None = None,
                 what: str = "stream") -> None:
        self.buf = buf
        self._end = len(buf) if end is None else end
        self.pos = pos
        self.base = base
        self.what = what

    @property
    def offset(self) -> int:
        """Absolute offset of the cursor."""
        return self.base + self.pos

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def error(self, message: str, at: int | None = None) -> ProtocolError:
        where = self.base + (self.pos if at is None else at)
        return ProtocolError(f"{self.what} at offset {where:#x}: {message}")

    def need(self, n: int, field: str) -> None:
        if n > self._end - self.pos:
            where = self.base + self.pos
            left = max(self._end - self.pos, 0)
            raise Truncated(f"{self.what} at offset {where:#x}: truncated: {field} needs {n} "
                            f"bytes, only {left} left", missing=n - left)

    def take(self, n: int, field: str) -> memoryview:
        self.need(n, field)
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def peek_u8(self, field: str) -> int:
        self.need(1, field)
        return self.buf[self.pos]

    def u8(self, field: str) -> int:
        self.need(1, field)
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def _unpack(self, st: struct.Struct, field: str) -> int:
        self.need(st.size, field)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def be16(self, field: str) -> int:
        return self._unpack(_U16, field)

    def be32(self, field: str) -> int:
        return self._unpack(_U32, field)

    def be64(self, field: str) -> int:
        return self._unpack(_U64, field)

    def counted_str(self, field: str) -> str:
        """u8 length + bytes, no NUL: QEMU's qemu_get_counted_string."""
        n = self.u8(f"{field} length")
        raw = bytes(self.take(n, field))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{field} is not text: {raw[:32]!r}", at=self.pos - n) from None

    def expect(self, value: int, expected: int, field: str, at: int) -> None:
        if value != expected:
            raise self.error(f"{field} is {value:#x}, expected {expected:#x}", at=at)

    def seek(self, pos: int, field: str) -> None:
        if not 0 <= pos <= self._end:
            raise self.error(f"{field} {self.base + pos:#x} is outside the stream "
                             f"(ends at {self.base + self._end:#x})")
        self.pos = pos


class Writer:
    """Appends QEMU stream fields to a bytearray."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> Writer:
        self.buf += _U8.pack(v)
        return self

    def be16(self, v: int) -> Writer:
        self.buf += _U16.pack(v)
        return self

    def be32(self, v: int) -> Writer:
        self.buf += _U32.pack(v)
        return self

    def be64(self, v: int) -> Writer:
        self.buf += _U64.pack(v)
        return self

    def raw(self, b: bytes) -> Writer:
        self.buf += b
        return self

    def counted_str(self, s: str) -> Writer:
        raw = s.encode("utf-8")
        if len(raw) > 255:
            raise ValueError(f"string longer than 255 bytes: {s[:40]!r}...")
        self.buf += _U8.pack(len(raw)) + raw
        return self

    def getvalue(self) -> bytes:
        return bytes(self.buf)
