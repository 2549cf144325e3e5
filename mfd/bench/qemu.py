"""Drive a real QEMU over QMP, for interoperability tests and benchmarks.

The reimplementation in :mod:`mfd` must read what QEMU writes and write what QEMU reads. The
only trustworthy oracle for that is QEMU itself, so this module starts
``qemu-system-x86_64 -machine none`` with its RAM backed by a file we prepare, and drives
``migrate`` / ``migrate-incoming`` to ``file:`` URIs. Because the RAM backend is
``memory-backend-file,share=on``, the guest RAM *is* that file: a test fills it before a save
and compares it after a restore, without any guest code running (``-S``, no vCPU).

For live migrations (TCP) QEMU must also run a guest, since its dirty log only sees what its
own vCPUs write: ``QemuMachine(..., machine="pc", accel="tcg", boot=IMAGE, paused=False)``
boots a raw disk image (e.g. :mod:`mfd.bench.bootsector`'s) with COM1 going to a file in the
machine's work directory (:meth:`QemuMachine.serial_text`). ``start_migrate`` /
``start_migrate_incoming`` return at once so that both ends of a QEMU-to-QEMU migration can be
driven from one thread; ``wait_migration`` then polls to the end.

Everything here is bounded. Each wait has a deadline, a QEMU that dies (QEMU 10.0.2 can SIGSEGV
on truncated mapped-ram files when multifd is on) is noticed through the QMP socket closing and
reported with its exit signal and stderr tail, and each QEMU process, QMP socket directory and
/dev/shm copy is removed in ``finally`` blocks.

QMP goes through :mod:`mfd.qmp`, the client ``mfd qmp`` and the tests use too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from mfd.qmp import CommandError, MonitorGone, NoMonitor, QMPClient, QMPError

__all__ = [
    "QemuError",
    "QemuMachine",
    "qemu_binary",
    "qemu_restore",
    "qemu_save",
    "qemu_version",
]

QEMU_NAME = "qemu-system-x86_64"
MIN_VERSION = (9, 0, 0)  # mapped-ram appeared in QEMU 9.0
MAX_BANDWIDTH = 1 << 40  # 1 TiB/s: QEMU's default 128 MiB/s limit also throttles file saves
POLL_INTERVAL = 0.002  # query-migrate poll period, as in the reference measurements
STDERR_TAIL_BYTES = 4096
STDERR_TAIL_LINES = 20
QUIT_TIMEOUT = 5.0  # for a graceful "quit" before we escalate to SIGTERM / SIGKILL
KILL_TIMEOUT = 5.0
TMP_PREFIX = "mfd-qemu-"


class QemuError(Exception):
    """QEMU refused a command, a migration failed, QEMU died, or a deadline passed.

    The message is meant to be read by a human: it names what was being done, carries QMP's
    ``desc`` / ``error-desc``, and ends with the tail of QEMU's stderr (where QEMU prints the
    specific reason, e.g. ``Partial read of size ...``; ``error-desc`` alone is often just
    ``load of migration failed: Input/output error``).
    """

    def __init__(self, message: str, *, query_migrate: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        #: The final ``query-migrate`` result when a migration failed, else None.
        self.query_migrate = query_migrate


# --------------------------------------------------------------------------- binary discovery


@functools.cache
def _probe() -> tuple[str, tuple[int, int, int]] | None:
    """Find qemu-system-x86_64 and parse ``--version`` once; tests call this at import time."""
    path = shutil.which(QEMU_NAME)
    if path is None:
        return None
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if m is None:
        return None
    return path, (int(m[1]), int(m[2]), int(m[3] or 0))


def qemu_version() -> tuple[int, int, int] | None:
    """Version of the qemu-system-x86_64 on PATH (any version), or None if absent/unparsable."""
    probe = _probe()
    return None if probe is None else probe[1]


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64 if it is new enough for mapped-ram (>= 9.0), else None."""
    probe = _probe()
    if probe is None or probe[1] < MIN_VERSION:
        return None
    return probe[0]


# --------------------------------------------------------------------------- helpers


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running but closed the QMP connection"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _file_uri(path: str, offset: int) -> str:
    """``file:`` URI for QEMU; QEMU splits options at commas, so a comma in the path can't work."""
    if "," in path:
        raise ValueError(f"QEMU file: URIs cannot contain ',': {path!r}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return f"file:{path},offset={offset}" if offset else f"file:{path}"


def _shm_dir() -> str | None:
    """tmpfs for the RAM copy, like real guest RAM; fall back to the default temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


class _Resources:
    """Everything a QemuMachine owns, kept apart from it so a weakref finalizer can release it.

    If a caller forgets ``close()`` (or the interpreter exits), the finalizer still kills QEMU
    and removes the socket directory, instead of leaking a paused QEMU holding a big mapping.
    """

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        self.log: Any = None  # binary file object receiving QEMU's stderr

    def release(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=KILL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
            # SIGKILL cannot be ignored; this wait reaps the zombie.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_TIMEOUT)
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.close()
            self.log = None
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the machine


class QemuMachine:
    """A QEMU whose main RAM block (``mem``) is the file ``ram_path``.

    ``ram_path`` must already exist with exactly ``size`` bytes: QEMU maps it ``share=on``, so
    its bytes are the guest RAM both for a save (fill it first) and a restore (read it after).
    With ``incoming=True`` QEMU starts with ``-incoming defer`` so capabilities can be set
    before ``migrate-incoming``. ``timeout`` bounds startup, every QMP reply, and (by default)
    every migration.

    By default this is a paused ``-machine none``: RAM and nothing else. Other options:

    - ``machine="pc"`` (with ``accel="tcg"``, ``boot=`` a raw disk image, ``paused=False``)
      runs a real guest. The RAM is still ``-machine pc,memory-backend=mem``: the block is
      named ``mem`` (the name ``pc.ram`` is only used when QEMU creates the backend itself from
      ``-m``; ``Unknown ramblock "pc.ram"`` is what a ``-m`` source gets from us). The blocks
      a ``pc`` guest migrates, in stream order (QEMU 10.0.2, 64 MiB, ``mfd inspect``; machine
      ``pc-i440fx-10.0``): ``mem`` 0x4000000, ``/rom@etc/acpi/tables`` 0x20000, ``pc.bios``
      0x40000, ``pc.rom`` 0x20000, ``/rom@etc/table-loader`` 0x1000, ``/rom@etc/acpi/rsdp``
      0x1000 (used lengths; MEM_SIZE 0x4082000). Only ``mem`` is our file. Both ends of a
      migration need the same machine, hence the same options (the same ``boot`` image may
      be given to both: an incoming QEMU takes no write lock on it before the switchover,
      observed). For a machine other than ``none``, COM1 (port 0x3f8) is written to a file
      in the work directory: :meth:`serial_text`.
    - ``paused=False`` drops ``-S``: the guest runs at once; for an incoming machine it runs
      on after the migration (``paused=True`` leaves it ``paused`` instead).
    - ``trace``: QEMU trace events (e.g. ``postcopy_place_page``) logged to
      ``trace_path`` in the work directory, each line ``pid@seconds.microseconds:event ...``.
    - ``uuid`` is QEMU's ``-uuid`` (multifd channels carry it, the destination checks it);
      ``globals`` are ``-global`` options, e.g.
      ``"migration.multifd-flush-after-each-section=on"``.
    - ``prealloc=True``: the backend's ``prealloc=on``, every page of the RAM allocated (and
      zeroed where it was a hole) before QMP answers; ``cpu``: QEMU and every thread it
      starts run on that CPU only (``taskset``).

    Use as a context manager; ``close()`` is idempotent.
    """

    def __init__(
        self,
        ram_path: str,
        size: int,
        *,
        incoming: bool = False,
        machine: str = "none",
        timeout: float = 60.0,
        accel: str | None = None,
        boot: str | None = None,
        paused: bool = True,
        uuid: str | None = None,
        globals: Sequence[str] = (),  # shadows the builtin: named after -global
        prealloc: bool = False,
        cpu: int | None = None,
        trace: Sequence[str] = (),
    ) -> None:
        binary = qemu_binary()
        if binary is None:
            raise QemuError(f"{QEMU_NAME} >= {'.'.join(map(str, MIN_VERSION))} not found on PATH")
        ram_path = os.path.abspath(ram_path)
        try:
            actual = os.stat(ram_path).st_size
        except OSError as e:
            raise QemuError(f"RAM backing file {ram_path!r} is not usable: {e}") from e
        if actual != size:
            # QEMU would silently grow/ignore it; a size mismatch is always a caller bug here.
            raise QemuError(f"RAM backing file {ram_path!r} has {actual} bytes, expected {size}")
        if boot is not None:
            boot = os.path.abspath(boot)
            if not os.path.isfile(boot):
                raise QemuError(f"boot image {boot!r} is not a file")
        for option in (ram_path, boot, machine, accel, uuid):
            if option is not None and "," in option:
                raise ValueError(f"QEMU options cannot contain ',': {option!r}")

        self.ram_path = ram_path
        self.size = size
        self.incoming = incoming
        self.timeout = timeout
        self._closed = False
        self._pending: str | None = None  # what start_migrate* started, for wait_migration

        workdir = tempfile.mkdtemp(prefix=TMP_PREFIX)
        self._res = _Resources(workdir)
        self._finalizer = weakref.finalize(self, self._res.release)
        self.qmp_path = os.path.join(workdir, "qmp.sock")
        self.stderr_path = os.path.join(workdir, "stderr.log")
        # -machine none has no ISA bus, so no COM1 to connect
        self.serial_path = os.path.join(workdir, "serial.log") if machine != "none" else None
        self.trace_path = os.path.join(workdir, "trace.log")
        self.argv = [
            *(["taskset", "-c", str(cpu)] if cpu is not None else []),
            binary,
            "-machine", f"{machine},memory-backend=mem",
            "-object", f"memory-backend-file,id=mem,size={size},mem-path={ram_path},share=on"
                       + (",prealloc=on" if prealloc else ""),
            "-nodefaults",
            "-display", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if paused:
            self.argv.append("-S")
        if accel is not None:
            self.argv += ["-accel", accel]
        if boot is not None:
            self.argv += ["-drive", f"file={boot},format=raw,if=ide", "-boot", "order=c"]
        if self.serial_path is not None:
            self.argv += ["-serial", f"file:{self.serial_path}"]
        if uuid is not None:
            self.argv += ["-uuid", uuid]
        for prop in globals:
            self.argv += ["-global", prop]
        if trace:  # QEMU's trace events, each line stamped pid@seconds.microseconds
            self.argv += ["-msg", "timestamp=on", "-D", self.trace_path]
            self.argv += [a for event in trace for a in ("-trace", event)]
        if incoming:
            self.argv += ["-incoming", "defer"]

        try:
            self._res.log = open(self.stderr_path, "wb")  # noqa: SIM115 - owned by _Resources
            self._res.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._res.log,
                close_fds=True,
            )
            self._connect(time.monotonic() + timeout)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------- context manager

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """PID of the QEMU process (for diagnostics, e.g. strace), None once closed."""
        proc = self._res.proc
        return None if proc is None else proc.pid

    # ----------------------------------------------------------------------- diagnostics

    def stderr_tail(self) -> str:
        """Last lines of QEMU's stderr; QEMU reports load errors there, not over QMP."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - STDERR_TAIL_BYTES))
                data = f.read()
        except OSError:
            return ""
        lines = data.decode("utf-8", "replace").strip().splitlines()
        return "\n".join(lines[-STDERR_TAIL_LINES:])

    def serial_text(self) -> str:
        """Everything the guest wrote to COM1 so far: "" for ``-machine none``, before the
        first character, and after ``close()`` (the file goes with the work directory)."""
        if self.serial_path is None:
            return ""
        try:
            with open(self.serial_path, "rb") as f:
                return f.read().decode("latin-1")
        except FileNotFoundError:
            return ""

    def query_status(self) -> str:
        """The run state from ``query-status``: ``prelaunch``, ``running``, ``paused``,
        ``inmigrate``, ``postmigrate``, ``finish-migrate``, ..."""
        return str(self.qmp("query-status")["status"])

    def _error(self, message: str, **kwargs: Any) -> QemuError:
        tail = self.stderr_tail()
        if tail:
            message += f"\n--- QEMU stderr (tail) ---\n{tail}"
        return QemuError(message, **kwargs)

    def _died(self, context: str) -> QemuError:
        """QEMU closed the socket: wait (bounded) for its exit status so we can name a signal."""
        proc = self._res.proc
        rc = None
        if proc is not None:
            try:
                rc = proc.wait(timeout=KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                rc = None
        return self._error(f"QEMU {_describe_exit(rc)} while {context}")

    # ----------------------------------------------------------------------- QMP plumbing

    def _connect(self, deadline: float) -> None:
        """Connect once QEMU has created the socket; QEMU may also die first (bad options)."""
        proc = self._res.proc
        assert proc is not None
        while True:
            if proc.poll() is not None:
                raise self._error(f"QEMU {_describe_exit(proc.returncode)} during startup")
            try:
                self._res.qmp = QMPClient(self.qmp_path, max(deadline - time.monotonic(), 0.1))
                return
            except NoMonitor:
                if time.monotonic() >= deadline:
                    raise self._error(f"QMP socket {self.qmp_path} did not appear within "
                                      f"{self.timeout:g} s") from None
                time.sleep(0.005)
            except MonitorGone as e:
                raise self._died("waiting for the QMP greeting") from e
            except QMPError as e:
                raise self._error(str(e)) from e

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command and return its ``return`` value.

        Argument names are passed verbatim (QMP mostly uses hyphens, so pass them as
        ``**{"exit-on-error": False}``). Asynchronous events arriving before the reply are
        skipped. A QMP ``error`` reply raises :class:`QemuError` with QMP's ``desc``.
        """
        client = self._res.qmp
        if client is None:
            raise QemuError(f"QEMU machine is closed (QMP {command})")
        try:
            return client.execute(command, arguments or None, self.timeout)
        except CommandError as e:
            raise self._error(f"QMP {command} failed: {e.desc}") from None
        except MonitorGone as e:  # QEMU is gone, or crashed mid-reply
            raise self._died(f"waiting for the reply to QMP {command}") from e
        except QMPError as e:
            raise self._error(str(e)) from e

    # ----------------------------------------------------------------------- migration

    def set_migration(
        self,
        *,
        mapped_ram: bool = False,
        multifd_channels: int = 0,
        direct_io: bool = False,
        multifd_compression: str = "none",
        zstd_level: int | None = None,
        zlib_level: int | None = None,
        return_path: bool = False,
        zero_page_detection: str | None = None,
        postcopy: bool = False,
        preempt: bool = False,
        xbzrle: bool = False,
        max_bandwidth: int = MAX_BANDWIDTH,
    ) -> None:
        """Set the capabilities and parameters for the next migrate / migrate-incoming.

        ``multifd`` is enabled iff ``multifd_channels > 0``; over TCP that is multifd with N
        channels to the same port (``mapped_ram`` is for ``file:`` URIs only, QEMU refuses it
        on a socket). ``max-bandwidth`` is always raised to 1 TiB/s, since QEMU's 128 MiB/s
        default would otherwise dominate every timing. ``direct-io`` is only sent when true,
        so QEMU 9.0 (which lacks it) still works. Both sides of a migration must use the same
        ``mapped_ram``; QEMU checks it on load. ``return_path`` is the ``return-path``
        capability (the source then waits for the destination's SHUT); ``zero_page_detection``
        (``none``, ``legacy``, ``multifd``) is only sent when given; ``postcopy`` is the
        ``postcopy-ram`` capability (RAM in a tmpfs file, as userfaultfd needs), ``preempt``
        ``postcopy-preempt``, ``xbzrle`` the ``xbzrle`` capability (its cache at QEMU's
        default size). ``max_bandwidth``: a cap in bytes per second instead of 1 TiB/s.
        """
        if multifd_channels < 0:
            raise ValueError(f"multifd_channels must be >= 0, got {multifd_channels}")
        multifd = multifd_channels > 0
        self.qmp(
            "migrate-set-capabilities",
            capabilities=[
                {"capability": "mapped-ram", "state": mapped_ram},
                {"capability": "multifd", "state": multifd},
                {"capability": "return-path", "state": return_path},
                {"capability": "postcopy-ram", "state": postcopy},
                {"capability": "postcopy-preempt", "state": preempt},
                {"capability": "xbzrle", "state": xbzrle},
            ],
        )
        params: dict[str, Any] = {"max-bandwidth": max_bandwidth}
        if multifd:
            params["multifd-channels"] = multifd_channels
        if multifd or multifd_compression != "none":
            params["multifd-compression"] = multifd_compression
        if zstd_level is not None:
            params["multifd-zstd-level"] = zstd_level
        if zlib_level is not None:
            params["multifd-zlib-level"] = zlib_level
        if direct_io:
            params["direct-io"] = True
        if zero_page_detection is not None:
            params["zero-page-detection"] = zero_page_detection
        self.qmp("migrate-set-parameters", **params)

    def set_tls(self, creds: str, *, server: bool, verify_peer: bool = True,
                hostname: str | None = None, authz: str | None = None) -> None:
        """TLS on the next migration (``tls-creds-x509`` over the x509 files in ``creds``,
        made with ``object-add``: no QEMU option escaping), ``tls-hostname`` for a client
        and, for a server, ``tls-authz`` through an ``authz-simple`` allowing ``authz``."""
        self.qmp("object-add", **{"qom-type": "tls-creds-x509", "id": "mfd-tls",
                                  "dir": os.path.abspath(creds),
                                  "endpoint": "server" if server else "client",
                                  "verify-peer": verify_peer})
        params: dict[str, Any] = {"tls-creds": "mfd-tls"}
        if hostname is not None:
            params["tls-hostname"] = hostname
        if authz is not None:
            self.qmp("object-add", **{"qom-type": "authz-simple", "id": "mfd-authz",
                                      "identity": authz})
            params["tls-authz"] = "mfd-authz"
        self.qmp("migrate-set-parameters", **params)

    def start_migrate(self, uri: str) -> None:
        """Start saving to ``uri`` (``file:/path``, ``tcp:HOST:PORT``) and return at once;
        :meth:`wait_migration` waits for the end. Raises :class:`QemuError` if QEMU refuses."""
        self.qmp("migrate", uri=uri)
        self._pending = f"migrate to {uri}"

    def start_migrate_incoming(self, uri: str) -> None:
        """Start loading from ``uri`` into this ``incoming=True`` machine and return at once
        (for ``tcp:`` QEMU is listening when this returns); :meth:`wait_migration` waits.

        ``exit-on-error`` is false so a failed load leaves QEMU alive to report ``error-desc``
        over QMP instead of just exiting. QEMU may still crash on malformed input; that is
        reported as :class:`QemuError` naming the signal.
        """
        if not self.incoming:
            raise QemuError("migrate-incoming needs a QemuMachine started with incoming=True")
        self.qmp("migrate-incoming", uri=uri, **{"exit-on-error": False})
        self._pending = f"migrate-incoming from {uri}"

    def wait_migration(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the migration :meth:`start_migrate` / :meth:`start_migrate_incoming` began;
        return the final ``query-migrate``. Raises :class:`QemuError` (with ``query_migrate``)
        if it failed or was cancelled, and cancels it if ``timeout`` (default: the machine's)
        passes first."""
        return self._wait_migration(self._pending or "migration", timeout)

    def _wait_migration(self, what: str, timeout: float | None) -> dict[str, Any]:
        """Poll query-migrate every 2 ms until a final state; cancel and raise at the deadline."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                info = self.qmp("query-migrate")
            except QemuError as e:  # typically QEMU crashed mid-load: say what it was doing
                raise QemuError(f"{what}: {e}") from e
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                desc = info.get("error-desc", "QEMU gave no error-desc")
                raise self._error(f"{what} {status}: {desc}", query_migrate=info)
            if time.monotonic() >= deadline:
                with contextlib.suppress(QemuError):
                    self.qmp("migrate_cancel")
                raise self._error(
                    f"{what} did not finish within {limit:g} s (last status {status!r})",
                    query_migrate=info,
                )
            time.sleep(POLL_INTERVAL)

    def migrate(self, uri: str, timeout: float | None = None) -> dict[str, Any]:
        """Save RAM and device state to ``uri`` (e.g. ``file:/path``); return final query-migrate.

        Raises :class:`QemuError` if QEMU refuses the URI/caps, the migration fails (with its
        ``error-desc``), QEMU dies, or ``timeout`` (default: the machine's) passes.
        """
        self.start_migrate(uri)
        return self.wait_migration(timeout)

    def migrate_incoming(self, uri: str, timeout: float | None = None) -> dict[str, Any]:
        """Load from ``uri`` into this ``incoming=True`` machine; return final query-migrate.

        See :meth:`start_migrate_incoming` for how failures are reported.
        """
        self.start_migrate_incoming(uri)
        return self.wait_migration(timeout)

    # ----------------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Ask QEMU to quit, then SIGTERM / SIGKILL at deadlines; always reap and clean up."""
        if self._closed:
            return
        self._closed = True
        proc = self._res.proc
        if proc is not None and proc.poll() is None and self._res.qmp is not None:
            saved = self.timeout
            self.timeout = QUIT_TIMEOUT
            try:
                # QEMU may close the socket before or after replying; either is fine.
                with contextlib.suppress(QemuError):
                    self.qmp("quit")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=QUIT_TIMEOUT)
            finally:
                self.timeout = saved
        self._finalizer()


# --------------------------------------------------------------------------- save / restore


def qemu_save(
    image_path: str,
    mig_path: str,
    *,
    mapped_ram: bool = True,
    multifd_channels: int = 0,
    direct_io: bool = False,
    offset: int = 0,
) -> dict[str, Any]:
    """Let QEMU save the RAM image ``image_path`` as a migration file ``mig_path``.

    The image is copied into a fresh tmpfs file first: QEMU maps its RAM file shared, so using
    the caller's file directly would risk it, and tmpfs behaves like real guest RAM.

    Returns ``{"seconds": wall time from QMP migrate to completed, "query_migrate": final}``.
    """
    size = os.path.getsize(image_path)
    uri = _file_uri(os.path.abspath(mig_path), offset)
    fd, ram_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".ram", dir=_shm_dir())
    try:
        with os.fdopen(fd, "wb") as dst, open(image_path, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        with QemuMachine(ram_path, size) as m:
            m.set_migration(
                mapped_ram=mapped_ram, multifd_channels=multifd_channels, direct_io=direct_io
            )
            t0 = time.perf_counter()
            info = m.migrate(uri)
            seconds = time.perf_counter() - t0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ram_path)
    return {"seconds": seconds, "query_migrate": info}


def qemu_restore(
    mig_path: str,
    ram_out_path: str,
    size: int,
    *,
    mapped_ram: bool = True,
    multifd_channels: int = 0,
    offset: int = 0,
) -> dict[str, Any]:
    """Let QEMU load the migration file ``mig_path``; the restored RAM ends up in ``ram_out_path``.

    ``ram_out_path`` is (re)created zero-filled with ``size`` bytes, because a mapped-ram load
    never touches pages whose bitmap bit is clear: it relies on fresh, zeroed RAM.

    Returns ``{"seconds": wall time from QMP migrate-incoming to completed, "query_migrate":
    final}``. Raises :class:`QemuError` on any failure, including QEMU crashing on a bad file.
    """
    uri = _file_uri(os.path.abspath(mig_path), offset)
    with open(ram_out_path, "wb") as f:  # truncates: stale bytes would survive the load
        os.ftruncate(f.fileno(), size)
    with QemuMachine(ram_out_path, size, incoming=True) as m:
        m.set_migration(mapped_ram=mapped_ram, multifd_channels=multifd_channels)
        t0 = time.perf_counter()
        info = m.migrate_incoming(uri)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "query_migrate": info}
