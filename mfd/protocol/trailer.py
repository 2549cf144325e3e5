"""mfd's trailer: integrity digests, page counts and guest state, after QEMU's EOF/vmdesc.

QEMU ignores bytes after its stream, so a file with a trailer stays loadable by QEMU. The
trailer is written last, after the bitmaps and an fsync: its presence means the save
completed. It is found from the end of the file::

    body (JSON) | be64 body_len | blake3(body) (32 bytes) | magic b"MFDTRLR1"

Digests are per chunk of 128 pages (512 KiB of RAM, aligned: one full multifd packet):
blake3 over the data of the chunk's pages whose ``file_bmap`` bit is set, in page order.
Restored RAM starts zeroed and clear-bit pages are never touched (invariant 5), so the chunk
digests and the bitmap fix the whole block; corrupting either changes a digest. Chunks rather
than one hash per block let each channel hash exactly what it has just written or read, in
parallel and while the data is in its cache, instead of the main process reading (and
faulting in) all of RAM again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import blake3
import numpy as np
import orjson

from mfd.errors import ProtocolError
from mfd.protocol import constants as C

MAGIC = b"MFDTRLR1"
TRAILER_VERSION = 1
_TAIL = struct.Struct(">Q32s8s")  # body_len, digest, magic
TAIL_SIZE = _TAIL.size
CHUNK_PAGES = C.MULTIFD_PAGE_COUNT  # pages per digest chunk: one full packet, 512 KiB
DIGEST_SIZE = 32
EMPTY_DIGEST = blake3.blake3(b"").digest()  # a chunk with no page in the file


def num_chunks(num_pages: int) -> int:
    return -(-num_pages // CHUNK_PAGES)


def run_chunks(runs: np.ndarray) -> np.ndarray:
    """The chunk of each run; runs never cross a chunk boundary (see ``chunk_jobs``)."""
    return runs[:, 0] // CHUNK_PAGES


def job_digests(pairs: np.ndarray, digests: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A job's chunks (sorted, unique) and the digests a channel returned for them, one
    DIGEST_SIZE row per chunk; ``pairs`` are the job's flat [start, end) pages."""
    chunks = np.unique(run_chunks(pairs.reshape(-1, 2)))
    rows = np.frombuffer(digests, dtype=np.uint8)
    if len(rows) != len(chunks) * DIGEST_SIZE:
        raise ProtocolError(f"a channel returned {len(rows)} bytes of digests for "
                            f"{len(chunks)} chunks")
    return chunks, rows.reshape(-1, DIGEST_SIZE)


def chunk_digests(ram: memoryview, runs: np.ndarray, page_size: int) -> bytes:
    """blake3 of each chunk's runs of pages in ``ram``, 32 bytes per chunk in run order.

    ``runs`` is an (n, 2) array of [start, end) pages, sorted, each within one chunk; no runs
    give one digest, of nothing (EMPTY_DIGEST).
    """
    out = bytearray()
    h = blake3.blake3()
    chunk = int(runs[0, 0]) // CHUNK_PAGES if len(runs) else 0
    for start, end in runs.tolist():  # per run (a few per chunk), never per page
        if start // CHUNK_PAGES != chunk:
            out += h.digest()
            h, chunk = blake3.blake3(), start // CHUNK_PAGES
        h.update(ram[start * page_size : end * page_size])
    return bytes(out + h.digest())


def blake3_of(chunks: bytes) -> str:
    """One name for a block's content: blake3 over its chunk digests."""
    return blake3.blake3(chunks).hexdigest()


@dataclass(frozen=True)
class BlockDigest:
    """What one block's saved pages hash to, chunk by chunk, and how its pages were stored."""

    chunks: bytes  # DIGEST_SIZE bytes per chunk of CHUNK_PAGES pages
    normal_pages: int
    zero_pages: int

    @property
    def blake3(self) -> str:
        return blake3_of(self.chunks)

    def to_json(self) -> dict[str, object]:
        return {"chunk_pages": CHUNK_PAGES, "chunks": self.chunks.hex(),
                "normal_pages": self.normal_pages, "zero_pages": self.zero_pages}


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
            "blocks": {k: v.to_json() for k, v in self.blocks.items()},
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
        blocks = {k: _block_digest(v) for k, v in doc["blocks"].items()}
        trailer = Trailer(str(doc["tool"]), blocks, int(doc["stream_end"]), doc.get("guest"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"mfd trailer at offset {start:#x} is malformed: {e}") from None
    for name, d in trailer.blocks.items():
        if len(d.chunks) % DIGEST_SIZE:
            raise ProtocolError(f"mfd trailer at offset {start:#x}: block {name!r} has "
                                f"{len(d.chunks)} bytes of chunk digests, not a multiple of "
                                f"{DIGEST_SIZE}")
    if trailer.stream_end != start:
        raise ProtocolError(f"mfd trailer says the stream ends at {trailer.stream_end:#x} "
                            f"but the trailer starts at {start:#x}")
    return trailer


def _block_digest(doc: dict) -> BlockDigest:
    if doc["chunk_pages"] != CHUNK_PAGES:
        raise ValueError(f"chunk_pages {doc['chunk_pages']}, expected {CHUNK_PAGES}")
    return BlockDigest(bytes.fromhex(doc["chunks"]), int(doc["normal_pages"]),
                       int(doc["zero_pages"]))


def whole_chunks(pages: np.ndarray, num_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Which packets of a job (its pages cut into packets of CHUNK_PAGES) are each exactly
    one whole chunk: (packet indices, their chunks). A channel hashes such a packet as it
    sends or places it, and the main process knows which digests it gets back."""
    n = len(pages)
    starts = np.arange(0, n, CHUNK_PAGES)
    if n == 0:
        return starts, starts
    lens = np.minimum(CHUNK_PAGES, n - starts)
    firsts = pages[starts].astype(np.int64)
    lasts = pages[starts + lens - 1].astype(np.int64)
    chunks = firsts // CHUNK_PAGES
    ok = ((firsts % CHUNK_PAGES == 0) & (lasts - firsts + 1 == lens)
          & (lens == np.minimum(CHUNK_PAGES, num_pages - chunks * CHUNK_PAGES)))
    return np.flatnonzero(ok), chunks[ok]
