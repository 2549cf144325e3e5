"""What every mode of one benchmark run shares: the settings, the image, the work directories
(one on the disk measured, one in /dev/shm), what to clean up, and notes for the report."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from mfd.bench import image as img
from mfd.bench.env import free_bytes, fs_of, mem_available, require_room
from mfd.bench.options import Settings
from mfd.bench.runs import Cleanup, RunProgress, log
from mfd.errors import UsageError
from mfd.units import human

MiB = 1 << 20


@dataclass
class Workspace:
    settings: Settings
    cleanup: Cleanup
    progress: RunProgress
    qemu_ok: bool
    notes: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    diskdir: str = ""
    shmdir: str = ""
    image: img.Image | None = None

    @property
    def size(self) -> int:
        assert self.image is not None
        return self.image.size

    @property
    def qemu_timeout(self) -> float:
        """How long one QMP wait on QEMU may take: a QEMU that moves less than 10 MiB/s is
        stuck, and its config fails with a line instead of holding up the run (direct-io
        saves of 2 GiB take ~10 s here)."""
        return max(60.0, self.size / (10 * MiB))

    def disk(self, name: str) -> str:
        return os.path.join(self.diskdir, name)

    def shm(self, name: str) -> str:
        return os.path.join(self.shmdir, name)

    def check_room(self, size: int) -> None:
        """Disk: the image + two restore sources + a save target + the dd copy. /dev/shm and
        memory: a source and a destination RAM (QEMU allocates the holes it reads), or the
        memcpy's two copies."""
        s = self.settings
        nonzero = 1.0 - s.zero if s.image is None else 1.0
        disk_modes = {"save", "restore"} & set(s.modes)
        checks = []
        if disk_modes:
            need = int(size * (1 + 4 * nonzero) + 512 * MiB)
            checks.append((s.workdir_parent, free_bytes(s.workdir_parent), need,
                           "the image, two restore sources, a save target and the dd copy"))
        checks.append(("/dev/shm", free_bytes("/dev/shm"), int(size * 2.2 + 256 * MiB),
                       "source and destination RAM"))
        checks.append(("memory", mem_available(), int(size * 2.2 + 512 * MiB),
                       "the same, or the memcpy's two copies"))
        self.setup["room"] = [{"place": p, "free": f, "need": n} for p, f, n, _ in checks]
        require_room(checks, "Use --dir on a larger disk or a smaller --size.")

    def prepare(self) -> None:
        """The work directories and the image."""
        s = self.settings
        size = s.size if s.image is None else os.path.getsize(s.image)
        try:
            os.makedirs(s.workdir_parent, exist_ok=True)
        except OSError as e:
            raise UsageError(f"mfd bench: --dir {s.workdir_parent}: {e.strerror}") from None
        self.check_room(size)
        self.diskdir = tempfile.mkdtemp(prefix="mfd-bench-", dir=s.workdir_parent)
        self.cleanup.add_path(self.diskdir)
        self.shmdir = tempfile.mkdtemp(prefix="mfd-bench-", dir="/dev/shm")
        self.cleanup.add_path(self.shmdir)
        if "," in self.diskdir + self.shmdir:
            raise RuntimeError(f"QEMU's options cannot hold ',': {self.diskdir}")
        fs = fs_of(self.diskdir)
        self.setup.update(diskdir=self.diskdir, disk_fs=fs, shmdir=self.shmdir)
        if fs["fstype"] in ("tmpfs", "ramfs") and {"save", "restore"} & set(s.modes):
            self.notes.append(f"WARNING: the work dir {self.diskdir} is on {fs['fstype']}, "
                              "not a disk: the disk is not being measured.")
        log(f"work dirs {self.diskdir} ({fs['fstype']} on {fs['device']}) and {self.shmdir}")
        if s.image is not None:
            self.image = img.from_dump(s.image)
        else:
            self.image = img.generate(self.disk("image.ram"), size, zero=s.zero,
                                      random=s.random, seed=s.seed, sync=True)
        self.setup["image"] = {"path": self.image.path, "size": self.image.size,
                               "blake3": self.image.blake3, **self.image.info}
        log(f"image {human(self.size)}: {self.image.info['pages']}, "
            f"{human(self.image.info['allocated'])} allocated")

    def guest_ram(self, name: str, ram: str = "sparse") -> str:
        """A fresh copy of the image in /dev/shm, as a source guest's RAM for one run."""
        assert self.image is not None
        return self.image.copy(self.shm(name), ram=ram)

    def fresh_ram(self, name: str) -> str:
        """A fresh zeroed RAM file in /dev/shm (a destination)."""
        return img.zeroed(self.shm(name), self.size)
