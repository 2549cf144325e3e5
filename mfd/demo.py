"""``mfd demo``: a guest that keeps writing, moved while it runs, with sensible defaults.

The guest has 1 GiB of RAM, half of its pages holding data (it has been busy), and keeps
writing (100 MiB/s, hotset). Five shapes, one per place the demo runs::

    mfd demo                      both ends on this machine: the guest, ``mfd incoming`` as a
                                  separate process (the destination host), 4 channels on
                                  loopback, a live view; both ends' digests side by side
    mfd demo --connect URI        node A of the two-node demo: the guest, migrated to URI
    mfd demo --listen URI         node B: the destination; its guest runs and reports
    mfd demo --save FILE          node A of the file scenario: a live, parallel mapped-ram save
    mfd demo --restore FILE       node B of the file scenario: restore, resume, report

Every shape ends with what a migration engineer looks at: total time, downtime, rounds,
bytes and throughput; a verification line per RAM block (the blake3 of its content at
switchover, computed by the end that prints it); and the guest going on writing where it
runs now. A source whose migration fails says why and keeps its guest running.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import orjson

from mfd import api
from mfd.errors import MfdError
from mfd.options import IncomingOptions, MigrateOptions, MigrationParameters, RestoreOptions
from mfd.progress import LiveView, shown
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.ramimage import generate
from mfd.shm import control, kvm
from mfd.shm.kvmguest import DATA
from mfd.sysutil import python_m
from mfd.units import human
from mfd.workers.tcp import free_ports
from mfd.workers.tls import TLSOptions

Say = Callable[[str], None]
REPORT_EVERY = 5.0  # seconds between the lines of a guest that runs on after the demo


def start_guest(name: str, ram: int, dirty_rate: int, say: Say, use_kvm: bool) -> None:
    """A guest that has been busy: half of its pages hold data before it starts writing
    (a KVM guest's: above its program and page tables)."""
    argv = ["--name", name, "--ram", str(ram), "--dirty-rate", str(dirty_rate), "--pattern",
            "hotset", "--stopped"]
    g = control.start_guest_daemon([*argv, "--kvm"] if use_kvm else argv, name)
    with g:
        (block,) = g.query()["blocks"]
        generate(block["path"], ram, zero=0.5, random=0.5, create=False,
                 first_page=DATA // TARGET_PAGE_SIZE if use_kvm else 0)
        g.cont()
    what = "a KVM vCPU" if use_kvm else "the built-in workload"
    say(f"guest {name}: {human(ram)} of RAM (half of it data), {what} dirtying "
        f"{human(dirty_rate)}/s (hotset)")


def kvm_default(choice: bool | None, say: Say) -> bool:
    """--kvm / --no-kvm, or KVM where it works here (said when it does not)."""
    if choice is not None:
        return choice
    why = kvm.unavailable()
    if why:
        say(f"no KVM here ({why}): the built-in guest instead")
    return why is None


def report(res: api.PrecopyResult, say: Say) -> None:
    secs = res.total_time_ms / 1000
    verify = res.query_migrate.get("x-verify-time")  # a migration's: both ends' page hashes
    say(f"completed in {secs:.2f} s: {res.rounds} rounds, {human(res.transferred)} "
        f"transferred ({res.transferred / secs / (1 << 20):.0f} MiB/s), "
        f"{res.normal_pages} pages sent, {res.zero_pages} zero, downtime "
        f"{res.downtime_ms:.0f} ms"
        f"{'' if verify is None else f' (of which verifying RAM {verify} ms)'}, "
        f"final throttle {res.cpu_throttle_percentage}%")


def verification(digests: dict[str, str], say: Say, how: str,
                 theirs: dict[str, str] | None = None) -> bool:
    """One line per block: its digest (a live migration's: blake3 of the block's page hash
    table at switchover; a file's: of its chunk digests), and how (or against what) it was
    checked.
    With ``theirs`` (the other end's digests) the line compares them itself."""
    ok = theirs is None or theirs == digests
    for idstr, digest in digests.items():
        other = "" if theirs is None else (
            f" {'==' if theirs.get(idstr) == digest else '!='} {theirs.get(idstr, '?')}")
        say(f"verification: block {idstr!r} blake3 {digest}{other} {how}: "
            f"{'OK' if ok else 'MISMATCH'}")
    return ok


def keep_running(name: str, where: str, seconds: float, say: Say,
                 every: float = REPORT_EVERY) -> dict:
    """Report the guest ``name`` every ``every`` seconds for ``seconds`` (at least once)."""
    deadline = time.monotonic() + seconds
    with control.GuestClient(name) as g:
        status = g.query()
        while True:
            before, t0 = status["pages-written"], time.monotonic()
            time.sleep(max(min(every, deadline - t0), 0.3))  # at least one look
            status = g.query()
            say(f"guest {name} is {status['status']} {where} "
                f"({status['pages-written'] - before} pages written in "
                f"{time.monotonic() - t0:.1f} s)")
            if time.monotonic() >= deadline:
                return status


def run(ram: int, dirty_rate: int, params: MigrationParameters, say: Say,
        view: LiveView | None = None, use_kvm: bool = False,
        postcopy: bool = False, tls: str | None = None) -> dict:
    """Both ends on this machine; the destination is a separate ``mfd incoming`` process
    (``tls``: the x509 directory both ends use)."""
    pid = os.getpid()
    src, dst = f"demo-src-{pid}", f"demo-dst-{pid}"
    incoming = None
    try:
        start_guest(src, ram, dirty_rate, say, use_kvm)
        port = free_ports(1)
        uri = f"tcp://127.0.0.1:{port}"
        command, env = python_m("mfd", "incoming", "--listen", uri, "--guest", dst, "--json",
                                *(["--postcopy-ram"] if postcopy else []),
                                *(["--tls-creds", tls] if tls else []))
        incoming = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        say(f"destination: mfd incoming --listen {uri} --guest {dst} (pid {incoming.pid})")
        res = _migrate(uri, src, params, say, view, postcopy, TLSOptions(tls) if tls else None)
        out, err = incoming.communicate(timeout=60)
        if incoming.returncode != 0:
            raise MfdError(f"destination: {err.strip().splitlines()[-1] if err else '?'}")
        theirs = orjson.loads(out)["digests"]
        report(res, say)
        ok = verification(res.digests, say, "at the source == at the destination", theirs)
        keep_running(dst, "at the destination", 0.3, say)
        say(f"the source's guest {src} is gone")
        if not ok:
            raise MfdError("demo: RAM differs between the two ends")
        return {"migrate": res.query_migrate, "digests": res.digests,
                "destination_digests": theirs, "ok": ok, "guest": dst}
    finally:
        if incoming is not None and incoming.poll() is None:
            incoming.kill()
            incoming.wait()
        for name in (src, dst):
            control.release(name)


def source(uri: str, name: str, ram: int, dirty_rate: int, params: MigrationParameters,
           say: Say, view: LiveView | None, run_after: float, use_kvm: bool,
           postcopy: bool = False, tls: TLSOptions | None = None) -> dict:
    """Node A: start the guest, migrate it to ``uri``. On failure the guest keeps running
    here; it is reported for ``run_after`` seconds before the failure is raised."""
    try:
        start_guest(name, ram, dirty_rate, say, use_kvm)
        try:
            res = _migrate(uri, name, params, say, view, postcopy, tls)
        except MfdError as e:
            say(f"migration failed: {e}")
            keep_running(name, "here, at the source", run_after, say)
            raise
        report(res, say)
        verification(res.digests, say, "at the source, found equal by the destination")
        say(f"guest {name} now runs at {uri}; it is gone from here")
        return {"migrate": res.query_migrate, "digests": res.digests}
    finally:
        control.release(name)


def destination(listen: str, name: str, say: Say, run_after: float, timeout: float | None,
                monitor: str | None, postcopy: bool = False,
                tls: TLSOptions | None = None) -> dict:
    """Node B: receive one migration into the guest ``name``, then let it run and report."""
    say(f"waiting for a migration at {listen}" + (" (TLS, the source's certificate checked)"
                                                   if tls else ""))
    try:
        res = api.incoming(listen, guest=name, monitor=monitor,
                           options=IncomingOptions(timeout=timeout, postcopy_ram=postcopy,
                                                   tls=tls))
        say("incoming migration completed")
        if res.postcopy:
            pc = res.postcopy
            say(f"postcopy: the guest ran here before its RAM had arrived; it asked for "
                f"{pc['postcopy-requests']} page(s), {pc['postcopy-latency'] / 1e6:.2f} ms "
                "from fault to page on average")
        verification(res.digests, say, "at the destination, found equal by the source")
        status = keep_running(name, "here, at the destination", run_after, say)
        return {"incoming": vars(res), "guest": status}
    finally:
        control.release(name)


def save(path: str, name: str, ram: int, dirty_rate: int, params: MigrationParameters,
         say: Say, view: LiveView | None, use_kvm: bool) -> dict:
    """Node A of the file scenario: a live save of a running guest, in parallel."""
    try:
        start_guest(name, ram, dirty_rate, say, use_kvm)
        say(f"saving to {path} over {params.multifd_channels} channels (mapped-ram)")
        with shown(view) as progress:
            res = api.save(path, guest=name, params=params, progress=progress)
        report(res, say)
        verification(res.digests, say, "saved in the file's trailer")
        return {"save": res.query_migrate, "digests": res.digests}
    finally:
        control.release(name)


def restore(path: str, name: str, channels: int, say: Say, run_after: float) -> dict:
    """Node B of the file scenario: restore into a new guest, resume it, report it."""
    try:
        say(f"restoring {path} over {channels} channels")
        res = api.restore(path, guest=name, options=RestoreOptions(multifd_channels=channels))
        say(f"restored {human(res.bytes_read)} in {res.seconds:.2f} s "
            f"({res.bytes_read / max(res.seconds, 1e-9) / (1 << 20):.0f} MiB/s)")
        if not res.verified:
            raise MfdError(f"{path} has no mfd trailer: nothing to verify the RAM against")
        verification(res.digests, say, "restored, equal to the file's trailer")
        with control.GuestClient(name) as g:
            g.cont()
        status = keep_running(name, "here, after the restore", run_after, say)
        return {"restore": vars(res), "guest": status}
    finally:
        control.release(name)


POSTCOPY_AFTER = 1.0  # seconds of precopy before the postcopy scenario switches


def _migrate(uri: str, guest: str, params: MigrationParameters, say: Say,
             view: LiveView | None, postcopy: bool = False,
             tls: TLSOptions | None = None) -> api.MigrateResult:
    if tls is not None:
        say(f"every connection TLS 1.3, the destination's certificate checked against "
            f"{tls.creds}/ca-cert.pem")
    if postcopy:  # QEMU's postcopy: the main channel only (no multifd with postcopy)
        say(f"migrating to {uri}: {POSTCOPY_AFTER:g} s of precopy, then postcopy (the "
            "guest runs there at once, its missing pages fetched as it touches them)")
        with shown(view) as progress:
            res = api.migrate(uri, guest=guest, params=params, progress=progress,
                              options=MigrateOptions(multifd=False, postcopy=True,
                                                     postcopy_after=POSTCOPY_AFTER, tls=tls))
        say(f"postcopy: {res.query_migrate['ram']['postcopy-requests']} page(s) the "
            "destination's guest asked for first")
        return res
    say(f"migrating to {uri} over {params.multifd_channels} channels (compression "
        f"{params.multifd_compression}, downtime limit {params.downtime_limit} ms)")
    with shown(view) as progress:
        return api.migrate(uri, guest=guest, params=params, progress=progress,
                           options=MigrateOptions(tls=tls))
