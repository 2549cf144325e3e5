"""Lazy restore: the guest runs from a mapped-ram file before its RAM is read.

Beyond QEMU (whose "fast snapshot load" does this with one loader and no multifd)::

    guest      started stopped; opens its userfaultfd, registers its RAM, hands the fd
               here (as for postcopy's LISTEN), then runs at once
    faults     served here, by the main process: a page the file has is read from its slot
               (pages_offset + page * page_size) and placed with UFFDIO_COPY, one it has not
               (bitmap clear) is mapped as a zero page
    channels   meanwhile load every page the file has, in parallel, each reading a job into
               its own buffer and placing it with UFFDIO_COPY through the inherited uffd
               (a page a fault placed first is left alone: the guest may have written it)

Both place through ``mfd.shm.placer.UffdPlacer``.
    end        unregistered; the guest closes its uffd; its RAM is whole

Pages are only ever placed atomically: nothing writes the running guest's RAM through a
mapping.
"""

from __future__ import annotations

import os

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import migration_file as mfile
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.shm.placer import UffdPlacer
from mfd.shm.uffd import GuestRAM


class FileFaults:
    """The running guest's faults, served from the file."""

    def __init__(self, opened, ram: GuestRAM) -> None:
        mf: mfile.MigrationFile = opened.file
        self.ram = ram
        self.bits = [mfile.read_bitmap(opened.mm, b) for b in mf.blocks]
        self.slots = [b.mapped_ram.pages_offset for b in mf.blocks]  # type: ignore[union-attr]
        self.fd = os.open(opened.path, os.O_RDONLY)
        self.placer = UffdPlacer(ram, [np.zeros(len(bits), dtype=np.uint8)
                                       for bits in self.bits], None)
        self.page = np.empty((1, TARGET_PAGE_SIZE), dtype=np.uint8)
        self.count = 0

    def fileno(self) -> int:
        return self.ram.uffd.fileno()

    def serve(self) -> None:
        for fault in self.ram.uffd.faults():
            block, page = self.ram.locate(fault.address)
            pages = np.array([page])
            self.count += 1
            if not self.bits[block][page]:
                self.placer.zero(block, pages)
                continue
            at = self.slots[block] + page * TARGET_PAGE_SIZE
            if os.preadv(self.fd, [memoryview(self.page).cast("B")], at) != TARGET_PAGE_SIZE:
                raise ProtocolError(f"short read of page {page} at {at:#x} (file "
                                    "truncated?)")
            self.placer.pages(block, pages, self.page)

    def close(self) -> None:
        """All RAM is in (or the restore failed): the guest's RAM unregistered (a thread
        blocked on a page the file does not hold maps it itself), the file closed; once."""
        if self.fd >= 0:
            self.ram.close()
            os.close(self.fd)
            self.fd = -1
