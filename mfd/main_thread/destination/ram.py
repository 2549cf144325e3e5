"""The RAM an incoming migration fills, and what says what arrived.

::

    blocks        the source's block list -> one unnamed file per block (``PendingRAM``:
                  held by descriptors only, a destination killed outright leaves nothing);
                  a block allocated ahead (``--prealloc``, before listening) is taken as
                  it is, if its size is the source's
    receivedmap   a byte per page, shared with the receive channels (``mfd.shm.receivedmap``)
    hashes        this end's page hash table (``mfd.shm.pagehash``): every process hashes
                  what it placed, compared with the source's at the end
    placer        the main channel's PAGE, ZERO and XBZRLE records (no multifd) go in
                  through ``mfd.shm.placer.MappedPlacer``, as the channels' pages do;
                  postcopy's through the guest's uffd (``faults``)
    link          at the commit each block gets its name (``target``)
"""

from __future__ import annotations

import mmap

import numpy as np

from mfd.errors import MfdError
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.ramruns import RunEvent
from mfd.shm import pagehash
from mfd.shm.placer import MappedPlacer
from mfd.shm.ramblock import SHM_DIR, MappedBlock, PendingRAM, RAMBlock, attach
from mfd.shm.receivedmap import ReceivedMap, map_size


class IncomingRAM:
    def __init__(self, directory: str, blocks: list[tuple[str, int]],
                 ahead: PendingRAM | None = None) -> None:
        """``blocks``: (idstr, used_length) as the source listed them; the RAM goes into
        ``directory`` (where it is named at the commit), the maps into /dev/shm; ``ahead``:
        the RAM allocated before the block list (``--prealloc``), taken over here."""
        self.files: list[PendingRAM] = []
        self.mapped: list[MappedBlock] = []
        self.receivedmap: ReceivedMap | None = None
        self.hashes: pagehash.PageHashes | None = None
        self.placer: MappedPlacer | None = None  # the main channel's, from start_placing
        try:
            self.pending = self._file(directory, blocks, ahead)
            self.blocks: list[RAMBlock] = self.pending.blocks
            self.index = {b.idstr: i for i, b in enumerate(self.blocks)}
            self.receivedmap_file = self._file(
                SHM_DIR, [("receivedmap", map_size(self.blocks))]).blocks[0]
            self.receivedmap = ReceivedMap(self.receivedmap_file, self.blocks)
            self.hash_file = self._file(
                SHM_DIR, [("pagehash", pagehash.table_size(self.blocks))]).blocks[0]
            self.hashes = pagehash.PageHashes(self.hash_file, self.blocks)
            self.mapped = [attach(b, writable=True) for b in self.blocks]
        except BaseException:
            self.close()
            raise

    def _file(self, directory: str, blocks: list[tuple[str, int]],
              ahead: PendingRAM | None = None) -> PendingRAM:
        self.files.append(PendingRAM(directory, blocks, ahead=ahead))
        return self.files[-1]

    @property
    def allocated(self) -> list[bool]:
        """Each block's RAM allocated ahead (``--prealloc``): written through its mapping."""
        return self.pending.allocated

    @property
    def received(self) -> list[np.ndarray]:
        assert self.receivedmap is not None
        return self.receivedmap.received

    def start_placing(self, verifying: bool) -> None:
        """The main channel's records go into RAM from now on (the receive channels', when
        there are some, are their own); hashed when ``verifying``."""
        self.placer = MappedPlacer(self.mapped, self.received,
                                   self.hashes if verifying else None, self.allocated)

    def place(self, ev: RunEvent) -> None:
        """PAGE, ZERO and XBZRLE records on the main stream (no multifd; XBZRLE: each
        delta applied onto its page)."""
        assert self.placer is not None
        self.placer.run(self.index[ev.idstr], ev, "main channel: ")

    def discard(self, idstr: str, runs: tuple[tuple[int, int], ...], verifying: bool) -> None:
        """POSTCOPY_RAM_DISCARD (before LISTEN): the pages are holes again (MADV_REMOVE
        punches the shared file) and not received."""
        i = self.index[idstr]
        assert self.hashes is not None
        for start, length in runs:
            self.mapped[i].mm.madvise(mmap.MADV_REMOVE, start, length)
            pages = slice(start // TARGET_PAGE_SIZE, (start + length) // TARGET_PAGE_SIZE)
            self.received[i][pages] = 0
            if verifying:
                self.hashes.table[i][pages] = 0

    def compare(self, theirs: dict[str, bytes]) -> None:
        """The source's page hashes against ours: equal, or one line on the first page
        that differs."""
        assert self.hashes is not None
        for b, ours in zip(self.blocks, self.hashes.table, strict=True):
            diff = pagehash.first_difference(theirs[b.idstr], ours)
            if diff is not None:
                count, page = diff
                raise MfdError(f"RAM differs from the source's at switchover: block "
                               f"{b.idstr!r}, {count} page(s), first at offset "
                               f"{page * TARGET_PAGE_SIZE:#x}")

    def close(self) -> None:
        self.placer = None
        for m in self.mapped:
            m.close()
        self.mapped = []
        if self.receivedmap is not None:
            self.receivedmap.close()
            self.receivedmap = None
        if self.hashes is not None:
            self.hashes.close()
            self.hashes = None
        for f in self.files:
            f.close()
        self.files = []
