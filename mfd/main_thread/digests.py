"""Which chunk digests of mfd's file trailer are current: the save's side of hashing while
writing.

A file channel that writes a packet that is exactly one whole chunk hashes it right there
(the data is in its cache) and returns the digest; any other job touching a chunk makes
that chunk's digest stale. At completion only the chunks that are not current are hashed
again (DIGEST jobs), so saving a stopped guest hashes nothing twice. (A live migration
compares page hashes instead, ``mfd.shm.pagehash``: a guest writing at random would leave
nearly every chunk stale at switchover.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mfd.main_thread.pipeline import ChannelPool, OnDone
from mfd.main_thread.scanner import chunk_jobs
from mfd.protocol import messages, trailer
from mfd.shm.ramblock import RAMBlock


class ChunkTable:
    def __init__(self, blocks: list[RAMBlock]) -> None:
        self.blocks = blocks
        empty = np.frombuffer(trailer.EMPTY_DIGEST, dtype=np.uint8)
        self.table = [np.tile(empty, (trailer.num_chunks(b.num_pages), 1)) for b in blocks]
        self.current = [np.zeros(trailer.num_chunks(b.num_pages), dtype=bool) for b in blocks]

    def stale(self, block: int, pages: np.ndarray) -> None:
        """These pages changed (or were sent again): their chunks need hashing again."""
        self.current[block][np.asarray(pages) // trailer.CHUNK_PAGES] = False

    def hashed(self, block: int, chunks: np.ndarray, digests: bytes) -> None:
        rows = np.frombuffer(digests, dtype=np.uint8)
        if len(rows) != len(chunks) * trailer.DIGEST_SIZE:
            raise ValueError(f"{len(rows)} bytes of digests for {len(chunks)} chunks")
        self.table[block][chunks] = rows.reshape(-1, trailer.DIGEST_SIZE)
        self.current[block][chunks] = True

    def job_done(self, block: int, pages: np.ndarray, digests: bytes) -> None:
        """A job's pages went out; its whole-chunk packets came back hashed."""
        self.stale(block, pages)
        if digests:
            _, chunks = trailer.whole_chunks(pages, self.blocks[block].num_pages)
            self.hashed(block, chunks, digests)

    def complete(self, pool: ChannelPool,
                 pages_of: Callable[[int, np.ndarray], np.ndarray] | None = None) -> None:
        """Hash every chunk that is not current, in DIGEST jobs of whole chunks.
        ``pages_of(block, pages)`` narrows the pages hashed (a bool per page; default all)."""
        for i, current in enumerate(self.current):
            if current.all():
                continue
            pages = np.repeat(~current, trailer.CHUNK_PAGES)[: self.blocks[i].num_pages]
            if pages_of is not None:
                pages = pages_of(i, pages)
            for pairs in chunk_jobs(pages):
                pool.send(i, pairs, self._into(i, pairs), messages.DIGEST)
        pool.sync()

    def _into(self, block: int, pairs: np.ndarray) -> OnDone:
        def on_done(_moved: int, _mask: np.ndarray, digests: bytes) -> None:
            chunks, rows = trailer.job_digests(pairs, digests)
            self.table[block][chunks] = rows
            self.current[block][chunks] = True
        return on_done

    def tables(self) -> dict[str, bytes]:
        return {b.idstr: t.tobytes() for b, t in zip(self.blocks, self.table, strict=True)}

