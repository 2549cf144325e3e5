"""The return path: what a destination sends back on the main channel's socket.

Mirrors ``migrate_send_rp_message`` and ``source_return_path_thread``
(``migration/migration.c``): each message is be16 type, be16 length, then the data. QEMU's
source opens it with OPEN_RETURN_PATH (capability ``return-path`` or postcopy); its
destination answers every PING with a PONG and ends with SHUT (0: loaded, else failed).
Pure: bytes in, messages out, any split of the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mfd.errors import ProtocolError
from mfd.protocol import peer

SHUT = 1
PONG = 2
REQ_PAGES_ID = 3
REQ_PAGES = 4
RECV_BITMAP = 5
RESUME_ACK = 6
SWITCHOVER_ACK = 7
# mfd's own, sent only to a source that said it is mfd (``mfd.protocol.peer``): the
# destination's verdict with the reason, as JSON
MFD_RESULT = 0x6D66

NAMES = {SHUT: "SHUT", PONG: "PONG", REQ_PAGES_ID: "REQ_PAGES_ID", REQ_PAGES: "REQ_PAGES",
         RECV_BITMAP: "RECV_BITMAP", RESUME_ACK: "RESUME_ACK",
         SWITCHOVER_ACK: "SWITCHOVER_ACK", MFD_RESULT: "MFD_RESULT"}
# the lengths QEMU's source insists on (rp_cmd_args); -1: any
_LENGTHS = {SHUT: 4, PONG: 4, REQ_PAGES_ID: -1, REQ_PAGES: 12, RECV_BITMAP: -1,
            RESUME_ACK: 4, SWITCHOVER_ACK: 0}
_HDR = struct.Struct(">HH")
_U32 = struct.Struct(">I")
MAX_DATA = 0xFFFF
MAX_BITMAP = 1 << 32  # a block of 128 TiB


@dataclass(frozen=True)
class Message:
    type: int
    data: bytes

    @property
    def value(self) -> int:
        """SHUT's status, PONG's value."""
        return _U32.unpack(self.data)[0]

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type {self.type:#06x}")


def encode_resume_ack() -> bytes:
    return encode(RESUME_ACK, _U32.pack(1))


def encode(kind: int, data: bytes = b"") -> bytes:
    if len(data) > MAX_DATA:
        raise ValueError(f"return path message of {len(data)} bytes")
    return _HDR.pack(kind, len(data)) + data


def encode_shut(status: int) -> bytes:
    return encode(SHUT, _U32.pack(status))


def encode_pong(value: int) -> bytes:
    return encode(PONG, _U32.pack(value))


class ReturnPathDecoder:
    """Messages from the destination as bytes arrive. ``mfd``: the destination said it is
    mfd, so its MFD_RESULT is expected; from QEMU any type outside QEMU's is refused."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.offset = 0
        self.mfd = False

    def _recv_bitmap_size(self, size: int) -> int:
        """RECV_BITMAP's whole size: its name, be64 n, n bytes, be64 end mark; -1 until
        they are all here."""
        at = _HDR.size + size
        if len(self.buf) < at + 8:
            return -1
        n = struct.unpack_from(">Q", self.buf, at)[0]
        if n > MAX_BITMAP:
            raise ProtocolError(f"return path at offset {self.offset:#x}: RECV_BITMAP of {n} "
                                "bytes")
        whole = size + 8 + n + 8
        return whole if len(self.buf) >= _HDR.size + whole else -1

    def feed(self, data: bytes) -> list[Message]:
        self.buf += data
        out = []
        while len(self.buf) >= _HDR.size:
            kind, size = _HDR.unpack_from(self.buf)
            known = _LENGTHS.get(kind)
            if kind == MFD_RESULT and self.mfd:
                known = -1
            if known is None:
                raise ProtocolError(f"return path at offset {self.offset:#x}: message type "
                                    f"{kind:#06x} is not one QEMU sends")
            if known >= 0 and size != known:
                raise ProtocolError(f"return path at offset {self.offset:#x}: "
                                    f"{NAMES[kind]} of {size} bytes, expected {known}")
            if len(self.buf) < _HDR.size + size:
                break
            if kind == RECV_BITMAP:  # the bitmap follows outside the length
                size = self._recv_bitmap_size(size)
                if size < 0:
                    break
            msg = Message(kind, bytes(self.buf[_HDR.size : _HDR.size + size]))
            if kind == PONG and msg.value == peer.MFD_PONG:
                self.mfd = True  # its MFD_RESULT may follow in these very bytes
            out.append(msg)
            del self.buf[: _HDR.size + size]
            self.offset += _HDR.size + size
        return out
