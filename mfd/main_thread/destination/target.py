"""Where the received RAM goes: image files, or a guest that takes it and runs.

::

    directory where the unnamed RAM is made (and ``--prealloc``'s, before listening)
    prepare   the block list arrived and its RAM was made: the images match it; a guest
              (the ``mfd guest`` daemon) starts, stopped, on that RAM
    commit    every page arrived (and was verified): each block gets its name (an image's
              path, atomically; a guest's /dev/shm name), the guest takes it and runs as
              the source's runstate says (unless --stopped); after postcopy it runs already
    discard   the migration failed: the guest goes (killed if postcopy ran it: it may be
              blocked on a page that will not come); nothing was named
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from mfd.errors import MfdError
from mfd.shm import control
from mfd.shm.ramblock import SHM_DIR, RAMBlock, shm_path

Link = Callable[[int, str], None]  # gives block i its name (``PendingRAM.link``)


class Images:
    """RAM into raw image files, one per block (``--image idstr=path``)."""

    name: str | None = None  # no guest
    client: control.GuestClient | None = None

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths

    def directory(self) -> str:
        """Where the unnamed RAM goes: the images' directory (a link cannot cross file
        systems)."""
        dirs = {os.path.dirname(os.path.abspath(p)) for p in self.paths.values()}
        if len(dirs) != 1:
            raise MfdError("all --image files must be in one directory")
        return dirs.pop()

    def prepare(self, blocks: list[RAMBlock]) -> None:
        names = [b.idstr for b in blocks]
        if set(names) != set(self.paths):
            raise MfdError(f"the source's RAM blocks {names} do not match the images given "
                           f"({sorted(self.paths)})")

    def commit(self, blocks: list[RAMBlock], link: Link, run: bool | None,
               said: dict | None) -> dict[str, str]:
        """Each image appears whole or not at all (linked beside it, then renamed)."""
        named: list[str] = []
        try:
            for i, b in enumerate(blocks):
                final = self.paths[b.idstr]
                tmp = f"{final}.mfd-incoming-{os.getpid()}"
                link(i, tmp)
                named.append(tmp)
                os.replace(tmp, final)
                named.remove(tmp)
            return dict(self.paths)
        finally:
            _unlink(named)

    def discard(self, hung_pid: int | None) -> None:
        pass


class Guest:
    """RAM for a new guest (``--guest NAME``, default vm0), started stopped at setup."""

    def __init__(self, name: str | None) -> None:
        self.name = name or "vm0"
        self.client: control.GuestClient | None = None

    def directory(self) -> str:
        return SHM_DIR

    def prepare(self, blocks: list[RAMBlock]) -> None:
        argv = ["--name", self.name, "--stopped"]
        for b in blocks:
            argv += ["--attach", f"{b.idstr}={b.path}"]
        self.client = control.start_guest_daemon(argv, self.name)

    def workload(self, said: dict | None) -> dict:
        """What the guest goes on with: the source's (an mfd source says it), else its own."""
        assert self.client is not None
        return (said or {}).get("workload") or self.client.query()["workload"]

    def commit(self, blocks: list[RAMBlock], link: Link, run: bool | None,
               said: dict | None) -> dict[str, str]:
        """The guest takes its named RAM and goes on with ``said`` (an mfd source's guest
        state) or its own workload, running if ``run``; ``run`` None: it runs already
        (postcopy)."""
        assert self.client is not None
        named: list[str] = []
        try:
            paths = {}
            for i, b in enumerate(blocks):
                paths[b.idstr] = shm_path(self.name, b.idstr)
                link(i, paths[b.idstr])
                named.append(paths[b.idstr])
            if run is None:
                self.client.execute("commit", blocks=paths)
            else:
                self.client.execute("commit", blocks=paths, workload=self.workload(said),
                                    run=run)
            named.clear()  # the guest owns them now
            self.client.close()
            self.client = None
            return paths
        finally:
            _unlink(named)

    def discard(self, hung_pid: int | None) -> None:
        """``hung_pid``: the guest's process when postcopy ran it on RAM that never all
        arrived (the source still holds all of it): it may be blocked on a page that will
        not come."""
        if hung_pid is not None:
            with contextlib.suppress(OSError):
                os.kill(hung_pid, signal.SIGKILL)
        if self.client is not None:
            with contextlib.suppress(MfdError):
                self.client.quit()
            self.client.close()
            self.client = None


def _unlink(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)
