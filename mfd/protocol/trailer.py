"""mfd's trailer: integrity digests, page counts and guest state, after QEMU's EOF/vmdesc.

QEMU ignores bytes after its stream, so a file with a trailer stays loadable by QEMU. The
trailer is written last, after the bitmaps and an fsync: its presence means the save
completed. It is found from the end of the file::

    body (JSON) | be64 body_len | blake3(body) (32 bytes) | magic b"MFDTRLR1"
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import blake3
import orjson

from mfd.errors import ProtocolError

MAGIC = b"MFDTRLR1"
TRAILER_VERSION = 1
_TAIL = struct.Struct(">Q32s8s")  # body_len, digest, magic
TAIL_SIZE = _TAIL.size


@dataclass(frozen=True)
class BlockDigest:
    """What the saved RAM of one block must hash to, and how its pages were stored."""

    blake3: str
    normal_pages: int
    zero_pages: int


@dataclass(frozen=True)
class Trailer:
    tool: str
    blocks: dict[str, BlockDigest]
    stream_end: int  # absolute offset where QEMU's stream ended (= start of the trailer)
    guest: dict[str, object] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = orjson.dumps({
            "version": TRAILER_VERSION,
            "tool": self.tool,
            "stream_end": self.stream_end,
            "blocks": {k: vars(v) for k, v in self.blocks.items()},
            "guest": self.guest,
            **self.extra,
        }, option=orjson.OPT_SORT_KEYS)
        return body + _TAIL.pack(len(body), blake3.blake3(body).digest(), MAGIC)


def has_trailer(tail: bytes) -> bool:
    """``tail`` = the file's last bytes (at least TAIL_SIZE)."""
    return len(tail) >= TAIL_SIZE and tail[-len(MAGIC):] == MAGIC


def decode_trailer(buf, file_size: int) -> Trailer:
    """Decode the trailer at the end of ``buf`` (a buffer of the whole file)."""
    if file_size < TAIL_SIZE:
        raise ProtocolError("mfd trailer: file too short")
    body_len, digest, magic = _TAIL.unpack_from(buf, file_size - TAIL_SIZE)
    assert magic == MAGIC
    start = file_size - TAIL_SIZE - body_len
    if start < 0:
        raise ProtocolError(f"mfd trailer: body length {body_len} runs before the file start")
    body = bytes(buf[start : file_size - TAIL_SIZE])
    if blake3.blake3(body).digest() != digest:
        raise ProtocolError(f"mfd trailer at offset {start:#x} is corrupt (digest mismatch)")
    try:
        doc = orjson.loads(body)
        if doc["version"] != TRAILER_VERSION:
            raise ProtocolError(f"mfd trailer version {doc['version']}, expected "
                                f"{TRAILER_VERSION}")
        blocks = {k: BlockDigest(str(v["blake3"]), int(v["normal_pages"]),
                                 int(v["zero_pages"])) for k, v in doc["blocks"].items()}
        trailer = Trailer(str(doc["tool"]), blocks, int(doc["stream_end"]), doc.get("guest"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"mfd trailer at offset {start:#x} is malformed: {e}") from None
    if trailer.stream_end != start:
        raise ProtocolError(f"mfd trailer says the stream ends at {trailer.stream_end:#x} "
                            f"but the trailer starts at {start:#x}")
    return trailer
