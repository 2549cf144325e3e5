"""What mfd adds to QEMU's protocol between two mfd ends, and how each end finds out.

Nothing here is configured: each end learns by itself whether its peer is mfd or QEMU, and
a QEMU peer never receives a byte it would refuse::

    source -> destination  PING(MFD_PING) on the main channel, after OPEN_RETURN_PATH and
                           QEMU's own PING(1). QEMU answers any PING with a PONG of the
                           same value; an mfd destination answers PONG(MFD_PONG) instead.
    source -> destination  bytes 32..63 of every MultiFDInit (unused by QEMU, zeros from a
                           QEMU source): "mfd" 1, channels, compression, flush mode, so an
                           mfd destination adopts what it was not told.
    source -> destination  after EOF and the vmdesc, to an mfd destination only: the RAM
                           digests at switchover (the DIGESTS record below), compared there.
    destination -> source  MFD_RESULT on the return path before SHUT, to an mfd source only:
                           {"status": "completed" | "failed", "error", "digest"} (JSON).

The source's guest state (``mfd-guest``: the workload and a KVM vCPU) goes as a device
section only to an mfd destination; QEMU refuses sections it does not know.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

from mfd.errors import ProtocolError
from mfd.protocol.codec import Reader
from mfd.protocol.multifd import COMPRESSION_NAMES, INIT_SIZE

MFD_PING = 0x6D666401  # "mfd" 1
MFD_PONG = 0x6D666402

_MARK = b"mfd\x01"
_SETTINGS = struct.Struct(">4sBBB")
_COMPRESSION = {name: bits for bits, name in COMPRESSION_NAMES.items()}

DIGESTS_MAGIC = b"MFDD"
DIGESTS_MAX = 64 << 20  # digests of 32 bytes per 512 KiB chunk: 64 MiB covers 1 PiB of RAM


@dataclass(frozen=True)
class ChannelSettings:
    """What an mfd source's MultiFDInit says of its multifd setup."""

    channels: int
    compression: str
    flush_after_each_section: bool


def encode_settings(s: ChannelSettings) -> bytes:
    """The 32 unused bytes of MultiFDInit."""
    raw = _SETTINGS.pack(_MARK, s.channels, _COMPRESSION[s.compression],
                         int(s.flush_after_each_section))
    return raw.ljust(INIT_SIZE - 32, b"\0")


def decode_settings(unused: bytes) -> ChannelSettings | None:
    """None for a QEMU source (zeros); garbage after mfd's mark is a protocol error."""
    if not unused.startswith(_MARK):
        return None
    _, channels, bits, flush = _SETTINGS.unpack_from(unused)
    if bits not in COMPRESSION_NAMES or flush > 1 or channels < 1:
        raise ProtocolError(f"MultiFDInit: mfd settings {unused[:8].hex()} make no sense")
    return ChannelSettings(channels, COMPRESSION_NAMES[bits], bool(flush))


def encode_digests(tables: dict[str, bytes]) -> bytes:
    """MFDD, be32 length + JSON {block: chunks}, then the tables in that order."""
    head = orjson.dumps({name: len(t) // 32 for name, t in tables.items()})
    body = b"".join(tables.values())
    return DIGESTS_MAGIC + struct.pack(">I", len(head)) + head + struct.pack(">I", len(body)) \
        + body


def decode_digests(r: Reader, chunks: dict[str, int]) -> dict[str, bytes]:
    """``chunks``: the number of digests each block must have (from its size)."""
    at = r.pos
    if bytes(r.take(4, "mfd digests magic")) != DIGESTS_MAGIC:
        raise r.error("expected mfd's RAM digests after the vmdesc", at=at)
    n = r.be32("mfd digests header length")
    if n > 1 << 20:
        raise r.error(f"mfd digests header of {n} bytes", at=at)
    try:
        head = orjson.loads(bytes(r.take(n, "mfd digests header")))
    except orjson.JSONDecodeError:
        raise r.error("mfd digests header is not JSON", at=at) from None
    if head != chunks:
        raise r.error(f"mfd digests for {head!r}, expected {chunks!r}", at=at)
    size = r.be32("mfd digests length")
    if size != 32 * sum(chunks.values()) or size > DIGESTS_MAX:
        raise r.error(f"mfd digests of {size} bytes, expected {32 * sum(chunks.values())}",
                      at=at)
    body = bytes(r.take(size, "mfd digests"))
    out, pos = {}, 0
    for name, count in head.items():  # the sender's order
        out[name] = body[pos : pos + 32 * count]
        pos += 32 * count
    return out


def encode_result(status: str, error: str | None = None,
                  digests: dict[str, str] | None = None) -> bytes:
    body = {"status": status}
    if error is not None:
        body["error"] = error[:4000]
    if digests is not None:
        body["digests"] = digests
    return orjson.dumps(body)


def decode_result(data: bytes) -> dict:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("return path: MFD_RESULT is not JSON") from None
    if not isinstance(body, dict) or body.get("status") not in ("completed", "failed"):
        raise ProtocolError(f"return path: MFD_RESULT {body!r}")
    return body
