"""The main channel between the two hosts: QEMU's stream bytes plus mfd's few control messages.

The stream is QEMU's precopy stream with multifd (file header, configuration, the ram
section with MEM_SIZE + block list, MULTIFD_FLUSH, EOS, device sections, EOF): the same bytes
a file holds, split into ZeroMQ messages that each hold whole records. Around it, mfd adds
what QEMU's return path and management layer would do (JSON bodies, one frame each)::

    source -> destination   HELLO    {mfd, uuid, channels, compression, ...} first message
    destination -> source   READY    {} the block list is accepted, RAM and channels wait
    source -> destination   STREAM   stream bytes (whole records)
    source -> destination   DIGESTS  {blocks: [idstr...]} + one frame of chunk digests per
                                     block: the RAM content at switchover (after EOF)
    destination -> source   RESULT   {status: "completed", ...} the guest runs there now
    either way              ERROR    {error: "..."} the sender gave up (failed/cancelled)
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from mfd.errors import ProtocolError
from mfd.options import COMPRESSION, ZERO_PAGE_DETECTION
from mfd.protocol import multifd
from mfd.protocol.constants import TARGET_PAGE_SIZE

HELLO = b"HELLO"
READY = b"READY"
STREAM = b"STREAM"
DIGESTS = b"DIGESTS"
RESULT = b"RESULT"
ERROR = b"ERROR"
PROTOCOL = 1


@dataclass(frozen=True)
class Hello:
    uuid: bytes
    channels: int
    compression: str
    zero_page_detection: str
    flush_after_each_section: bool
    guest: str | None  # the source guest's name (the destination's default name)

    def encode(self) -> list[bytes]:
        return [HELLO, orjson.dumps({
            "mfd": PROTOCOL, "uuid": self.uuid.hex(), "channels": self.channels,
            "compression": self.compression, "zero-page-detection": self.zero_page_detection,
            "flush-after-each-section": self.flush_after_each_section,
            "page-size": TARGET_PAGE_SIZE, "guest": self.guest})]


def _body(frames: list, kind: bytes, nframes: int = 2) -> dict:
    if len(frames) != nframes:
        raise ProtocolError(f"main channel: {kind.decode()} message of {len(frames)} frames, "
                            f"expected {nframes}")
    try:
        body = orjson.loads(frames[1])
    except orjson.JSONDecodeError:
        raise ProtocolError(f"main channel: {kind.decode()} body is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"main channel: {kind.decode()} body is not a JSON object")
    return body


def _field(body: dict, name: str, kind: type | tuple, what: str) -> object:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"main channel: {what}: field {name!r} is {value!r}")
    return value


def decode_hello(frames: list) -> Hello:
    if not frames or frames[0] != HELLO:
        got = bytes(frames[0][:16]) if frames else b""
        raise ProtocolError(f"main channel: expected HELLO from an mfd source, got {got!r}")
    body = _body(frames, HELLO)
    if body.get("mfd") != PROTOCOL:
        raise ProtocolError(f"main channel: mfd protocol {body.get('mfd')!r}, this mfd "
                            f"speaks {PROTOCOL}")
    if body.get("page-size") != TARGET_PAGE_SIZE:
        raise ProtocolError(f"main channel: page size {body.get('page-size')!r}, expected "
                            f"{TARGET_PAGE_SIZE}")
    uuid = str(_field(body, "uuid", str, "HELLO"))
    try:
        raw = bytes.fromhex(uuid)
    except ValueError:
        raw = b""
    if len(raw) != multifd.UUID_SIZE:
        raise ProtocolError(f"main channel: HELLO uuid {uuid!r} is not 16 bytes of hex")
    channels = int(_field(body, "channels", int, "HELLO"))  # type: ignore[arg-type]
    if not 1 <= channels <= 255:
        raise ProtocolError(f"main channel: HELLO asks for {channels} channels (1..255)")
    compression = _field(body, "compression", str, "HELLO")
    if compression not in COMPRESSION:
        raise ProtocolError(f"main channel: unknown compression {compression!r}")
    zpd = _field(body, "zero-page-detection", str, "HELLO")
    if zpd not in ZERO_PAGE_DETECTION:
        raise ProtocolError(f"main channel: unknown zero-page-detection {zpd!r}")
    guest = body.get("guest")
    if guest is not None and not isinstance(guest, str):
        raise ProtocolError("main channel: HELLO guest name is not text")
    return Hello(raw, channels, str(compression), str(zpd),
                 bool(_field(body, "flush-after-each-section", bool, "HELLO")), guest)


def encode_json(kind: bytes, body: dict) -> list[bytes]:
    return [kind, orjson.dumps(body)]


def decode_json(frames: list, kind: bytes) -> dict:
    return _body(frames, kind)


def encode_error(text: str) -> list[bytes]:
    return encode_json(ERROR, {"error": text})


def error_text(frames: list) -> str:
    try:
        return str(_body(frames, ERROR).get("error", "?"))
    except ProtocolError:
        return "(unreadable error message)"


def encode_digests(tables: dict[str, bytes]) -> list[bytes]:
    return [DIGESTS, orjson.dumps({"blocks": list(tables)}), *tables.values()]


def decode_digests(frames: list, chunks: dict[str, int]) -> dict[str, bytes]:
    """``chunks``: idstr -> number of digest chunks the destination expects per block."""
    if len(frames) < 2:
        raise ProtocolError("main channel: DIGESTS message without a body")
    body = _body(frames[:2], DIGESTS)
    names = body.get("blocks")
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(chunks):
        raise ProtocolError(f"main channel: DIGESTS for blocks {names!r}, expected "
                            f"{sorted(chunks)}")
    if len(frames) != 2 + len(names):
        raise ProtocolError("main channel: DIGESTS frame count does not match its blocks")
    out = {}
    for name, table in zip(names, frames[2:], strict=True):
        if len(table) != chunks[name] * 32:
            raise ProtocolError(f"main channel: DIGESTS for {name!r} has {len(table)} bytes, "
                                f"expected {chunks[name] * 32}")
        out[name] = bytes(table)
    return out
