"""mfd's Python API: the functions the CLI is a thin layer over.

    >>> import mfd
    >>> mfd.save("vm.mig", images={"mem": "ram.bin"})          # parallel mapped-ram save
    >>> mfd.restore("vm.mig", images={"mem": "out.bin"},        # any number of channels
    ...             options=mfd.RestoreOptions(multifd_channels=4))
    >>> mfd.inspect("vm.mig")["ram_blocks"]
    >>> mfd.incoming("tcp://0.0.0.0:4444", guest="vm1")       # destination (blocks until done)
    >>> mfd.migrate("tcp://dst:4444", guest="vm0")             # live migration, 2 channels
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson

from mfd.describe import describe
from mfd.errors import MfdError
from mfd.main_thread import load as loader
from mfd.main_thread.destination.faults import receive_uffd
from mfd.main_thread.destination.qmp import QmpHandlers
from mfd.main_thread.destination.session import Incoming, IncomingResult
from mfd.main_thread.lazy import FileFaults
from mfd.main_thread.precopy import Progress
from mfd.main_thread.save import FileSaver
from mfd.main_thread.source.migration import Migration
from mfd.main_thread.stats import MigrationStats
from mfd.options import (
    IncomingOptions,
    MigrateOptions,
    MigrationParameters,
    RestoreOptions,
    SaveOptions,
    check_ram,
)
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.migration_file import MigrationFile
from mfd.shm import control
from mfd.shm.ramblock import RAMBlock


@dataclass(frozen=True)
class PrecopyResult:
    """What a save or a migration did, with ``query-migrate``'s figures."""

    status: str
    total_time_ms: float
    downtime_ms: float | None
    setup_time_ms: float
    rounds: int
    transferred: int
    normal_pages: int
    zero_pages: int
    cpu_throttle_percentage: int
    digests: dict[str, str]  # blake3 per block (file: of the trailer; migration: both ends)
    query_migrate: dict = field(repr=False)
    round_log: list[dict] = field(repr=False, default_factory=list)

    @staticmethod
    def fields_of(stats: MigrationStats, digests: dict[str, str],
                  query: dict | None = None) -> dict:
        return {"status": stats.status, "total_time_ms": stats.total_time_ms,
                "downtime_ms": stats.downtime_ms, "setup_time_ms": stats.setup_time * 1000,
                "rounds": stats.dirty_sync_count, "transferred": stats.transferred,
                "normal_pages": stats.normal, "zero_pages": stats.duplicate,
                "cpu_throttle_percentage": stats.cpu_throttle_percentage, "digests": digests,
                "query_migrate": query if query is not None else stats.query_migrate(),
                "round_log": stats.rounds}


@dataclass(frozen=True)
class SaveResult(PrecopyResult):
    path: str = ""


@dataclass(frozen=True)
class MigrateResult(PrecopyResult):
    uri: str = ""


@dataclass(frozen=True)
class RestoreResult:
    path: str
    blocks: dict[str, str]  # idstr -> where the RAM went (image path or shm path)
    seconds: float
    bytes_read: int
    verified: bool  # blake3 digests matched mfd's trailer
    guest: str | None = None
    digests: dict[str, str] = field(default_factory=dict)  # blake3 per block, when verified
    # lazy restore: seconds from the start until the guest ran, and until all RAM was in;
    # faults served from the file meanwhile
    running_after: float | None = None
    faults: int = 0
    exits_before_loaded: int | None = None  # a KVM guest's exits when the last page was in


def image_blocks(images: dict[str, str]) -> list[RAMBlock]:
    out = []
    for name, path in images.items():
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise MfdError(f"image {name}={path}: {e.strerror}") from None
        if size == 0 or size % TARGET_PAGE_SIZE:
            raise MfdError(f"image {name}={path}: size {size} is not a positive multiple of "
                           f"{TARGET_PAGE_SIZE}")
        out.append(RAMBlock(name, size, path))
    return out


def guest_blocks(status: dict) -> list[RAMBlock]:
    return [RAMBlock(b["idstr"], int(b["used_length"]), b["path"]) for b in status["blocks"]]


@contextlib.contextmanager
def _source(images: dict[str, str] | None, guest: str | None
            ) -> Iterator[tuple[list[RAMBlock], control.GuestClient | None]]:
    """The RAM a save or migration reads: raw images, or a running guest's blocks (and a
    client to drive the guest, closed at the end)."""
    if images is not None:
        yield image_blocks(images), None
        return
    assert guest is not None
    with control.GuestClient(guest) as client:
        yield guest_blocks(client.query()), client


def save(path: str, *, images: dict[str, str] | None = None, guest: str | None = None,
         params: MigrationParameters | None = None, options: SaveOptions | None = None,
         progress: Progress | None = None) -> SaveResult:
    """Save raw images or a running guest's RAM to ``path`` in QEMU's mapped-ram format."""
    params, options = params or MigrationParameters(), options or SaveOptions()
    check_ram("save", images, guest)
    params.check(mapped_ram=True)
    options.check()
    with _source(images, guest) as (blocks, client):
        saver = FileSaver(path, blocks, params, options, client, progress)
        stats = saver.run()
    return SaveResult(**PrecopyResult.fields_of(stats, {k: v.blake3 for k, v in
                                                         saver.digests.items()}), path=path)


def _fresh_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse and zeroed: restore relies on zeroed RAM
    finally:
        os.close(fd)


def restore(path: str, *, images: dict[str, str] | None = None, guest: str | None = None,
            options: RestoreOptions | None = None) -> RestoreResult:
    """Restore a migration file (mapped-ram or stream, QEMU's or mfd's) into raw images or
    into a new, stopped guest (:class:`RestoreOptions`: channels, offset, a lazy restore).
    Nothing the user had is touched unless the restore succeeds: images are written to
    temporary files renamed into place at the end."""
    options = options or RestoreOptions()
    check_ram("restore", images, guest)
    options.check(guest=guest is not None)
    start = time.monotonic()
    lazy, run_exits = options.lazy, options.x.run_exits
    with loader.OpenedFile(path, options.offset) as opened:
        mf = opened.file
        if images is not None:
            return _restore_images(opened, images, options)
        assert guest is not None
        if lazy and not mf.mapped_ram:
            raise MfdError(f"{path}: a lazy restore reads pages where they are: it needs a "
                           "mapped-ram file, not a stream")
        argv = ["--name", guest, "--stopped"]
        workload = (mf.trailer.guest or {}).get("workload") if mf.trailer else None
        if workload:  # mfd's own file: the guest goes on as it was (either kind)
            argv += ["--x-resume", orjson.dumps(workload).decode()]
        for b in mf.blocks:
            argv += ["--block", f"{b.idstr}={b.used_length}"]
        client = control.start_guest_daemon(argv, guest)
        faults = None
        running_after = None
        try:
            # nothing may read the guest's RAM before a lazy restore registers it
            described = client.execute("describe")
            targets = {b.idstr: b for b in guest_blocks(described)}
            if lazy:
                faults = FileFaults(opened, receive_uffd(client, mf.blocks))
                client.execute("postcopy-run", workload=described["workload"],
                               run=run_exits is None)
                if run_exits is not None:
                    client.execute("run-exits", count=run_exits)
                running_after = time.monotonic() - start
            result = loader.load(opened, targets, options.multifd_channels, options.direct_io,
                                 faults, options.x)
            if faults is not None:  # every page is in: unregistered, the guest's uffd goes
                exits = client.execute("describe")["workload"].get("exits")
                faults.close()
                client.execute("postcopy-end")
        except BaseException:
            with contextlib.suppress(MfdError):
                client.quit()
            raise
        finally:
            if faults is not None:
                faults.close()
            client.close()
        return RestoreResult(path, {k: v.path for k, v in targets.items()},
                             time.monotonic() - start if lazy else result.seconds,
                             result.bytes_read, result.verified, guest,
                             _verified_digests(mf, result.verified), running_after,
                             faults.count if faults else 0, exits if faults else None)


def _restore_images(opened: loader.OpenedFile, images: dict[str, str],
                    options: RestoreOptions) -> RestoreResult:
    sizes = {b.idstr: b.used_length for b in opened.file.blocks}
    temps = {name: f"{p}.mfd-restore-{os.getpid()}" for name, p in images.items()}
    targets = {name: RAMBlock(name, sizes.get(name, 0), t) for name, t in temps.items()}
    loader.check_targets(opened.file, targets)
    created: list[str] = []
    try:
        for t in targets.values():
            try:
                _fresh_file(t.path, t.used_length)
            except OSError as e:
                raise MfdError(f"cannot create {t.path}: {e.strerror}") from None
            created.append(t.path)
        result = loader.load(opened, targets, options.multifd_channels, options.direct_io,
                             x=options.x)
        for name, t in targets.items():
            os.replace(t.path, images[name])
        created.clear()
    finally:
        for p in created:
            with contextlib.suppress(OSError):
                os.unlink(p)
    return RestoreResult(opened.path, dict(images), result.seconds, result.bytes_read,
                         result.verified, digests=_verified_digests(opened.file, result.verified))


def _verified_digests(mf: MigrationFile, verified: bool) -> dict[str, str]:
    """What the restored RAM was checked against: the trailer's blake3 per block."""
    if not verified or mf.trailer is None:
        return {}
    return {idstr: d.blake3 for idstr, d in mf.trailer.blocks.items()}


def _monitored(path: str | None, handlers, run):
    """``run()`` with a QMP-style monitor at ``path``: QEMU's MIGRATION event for every
    status the migration goes through (setup, active, device, completed / failed /
    cancelled), watched every 50 ms by a thread so the migration loop knows nothing of it."""
    if path is None:
        return run()
    from mfd.monitor import MonitorServer

    with MonitorServer(path, handlers) as server:
        done = threading.Event()
        last: list[str] = []

        def emit_changes() -> None:
            status = handlers.query_migrate()["status"]
            if not last or status != last[-1]:
                last.append(status)
                server.emit("MIGRATION", {"status": status})

        def watch() -> None:
            while not done.wait(0.05):
                emit_changes()

        watcher = threading.Thread(target=watch, name="mfd-migration-events", daemon=True)
        watcher.start()
        try:
            return run()
        finally:
            done.set()
            watcher.join()
            emit_changes()


def migrate(uri: str, *, images: dict[str, str] | None = None, guest: str | None = None,
            params: MigrationParameters | None = None, options: MigrateOptions | None = None,
            progress: Progress | None = None, monitor: str | None = None,
            warn: Callable[[str], None] | None = None) -> MigrateResult:
    """Live-migrate a running guest (or raw images) to ``mfd incoming`` or a QEMU
    ``-incoming`` at ``uri`` (``tcp:HOST:PORT``). On success the guest runs on the
    destination and is gone here; on failure or cancel it keeps running here and
    :class:`MfdError` says why. ``warn``: what mfd could not do with a QEMU destination."""
    params, options = params or MigrationParameters(), options or MigrateOptions()
    check_ram("migrate", images, guest)
    params.check(mapped_ram=False)
    options.check()  # before any file or guest is looked at
    with _source(images, guest) as (blocks, client):
        mig = Migration(uri, blocks, params, options, client, progress, warn,
                        monitored=monitor is not None)
        _monitored(monitor, mig.qmp, mig.run)
    return MigrateResult(**PrecopyResult.fields_of(mig.stats, mig.digests,
                                                   mig.qmp.query_migrate()), uri=uri)


def incoming(listen: str, *, images: dict[str, str] | None = None, guest: str | None = None,
             options: IncomingOptions | None = None, monitor: str | None = None,
             warn=None) -> IncomingResult:
    """Wait at ``listen`` (``tcp:HOST:PORT``) for one migration from mfd or QEMU; its RAM
    goes to a new guest (named ``guest``, default ``vm0``) that runs once the RAM is
    verified (an mfd source) or loaded (QEMU), or to raw image files."""
    options = options or IncomingOptions()
    check_ram("incoming", images, guest, required=False)
    options.check(images)
    inc = Incoming(listen, images=images, guest=guest, options=options, warn=warn)
    return _monitored(monitor, QmpHandlers(inc.control), inc.run)


def inspect(path: str, offset: int = 0) -> dict[str, object]:
    """The structure of any QEMU migration file (QEMU's own, libvirt's, compressed)."""
    with loader.OpenedFile(path, offset) as opened:
        opened.parse_all()
        return describe(opened.file, opened.mm, opened.header)
