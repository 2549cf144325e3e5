"""Live migration over TCP loopback: real processes on both ends, real sockets, real guests.

Converging guests (with and without auto-converge), every compression method and sync mode
end to end, round order with a slow receive channel (and the proof that the test bites when
the receiver's sync is off), hostile handshakes and packets, and the failures of DESIGN.md's
invariant 7: whatever breaks, the source's guest keeps running and the destination never
reports success nor leaves anything in /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from helpers import (
    children,
    cmdline,
    finish,
    hostile_source,
    one_line,
    run_mfd,
    running,
    shm_entries,
    start_incoming,
    start_migrate,
    until,
)
from netutil import FakeSource, Relay

import mfd
from mfd.errors import MfdError
from mfd.options import MigrationParameters
from mfd.protocol import multifd
from mfd.qmp import MonitorGone, QMPClient, monitor_command
from mfd.ramimage import generate
from mfd.shm import control
from mfd.workers.tcp import free_ports


def image_incoming(tmp_path: Path, size: int, seed: int, *args: str
                   ) -> tuple[Path, Path, int, subprocess.Popen]:
    """A generated source image, and `mfd incoming` listening to write it to a new one."""
    img = tmp_path / "src.bin"
    generate(str(img), size, seed=seed)
    out = tmp_path / "dst.bin"
    port = free_ports(1)
    inc = start_incoming(port, "--image", f"mem={out}", *args)
    return img, out, port, inc


# ---------------------------------------------------------------------------- success


def test_live_migration_of_a_writing_guest(guests):
    """The link outruns the guest: it converges, RAM is equal at switchover, the guest runs
    on the destination and is gone at the source."""
    src, _ = guests.start("64M", "--dirty-rate", "30M", "--pattern", "hotset")
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--json")
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", guest=src,
                      params=MigrationParameters(multifd_channels=4))
    rc, out, err = finish(inc)
    assert rc == 0, err
    assert res.status == "completed" and res.rounds >= 2
    assert res.downtime_ms is not None and res.downtime_ms > 0
    assert res.query_migrate["ram"]["normal"] > 0
    assert orjson.loads(out)["digests"] == res.digests  # both ends hashed the same RAM
    assert not os.path.exists(control.socket_path(src))  # the source guest is gone
    assert running(dst)
    with control.GuestClient(dst) as g:
        status = g.query()
    assert status["workload"]["pattern"] == "hotset"  # the guest's own state came along
    assert status["blocks"][0]["path"].startswith("/dev/shm/mfd-")


@pytest.mark.parametrize("compression,extra", [
    ("none", {}),
    ("zstd", {}),
    ("zlib", {}),
    ("zstd", {"zero_page_detection": "legacy"}),
    ("none", {"zero_page_detection": "none"}),
    ("zlib", {"flush": True}),
])
def test_image_migration_end_to_end(tmp_path, compression, extra):
    """Every compression method, zero-page mode and sync mode moves an image exactly."""
    img, out, port, inc = image_incoming(tmp_path, 8 << 20, seed=3)
    params = MigrationParameters(multifd_channels=3, multifd_compression=compression,
                                 zero_page_detection=extra.get("zero_page_detection",
                                                               "multifd"))
    opts = mfd.MigrateOptions(flush_after_each_section=extra.get("flush", False))
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", images={"mem": str(img)}, params=params,
                      options=opts)
    rc, _, err = finish(inc)
    assert rc == 0, err
    assert res.status == "completed"
    assert out.read_bytes() == img.read_bytes()
    if compression != "none":
        assert res.transferred < (8 << 20) * 0.8


@pytest.mark.slow
def test_auto_converge_throttles_in_qemus_steps(guests):
    """A guest dirtying faster than the (rate-limited) link converges only because the
    throttle rises: 20, 30, 40 ... as QEMU's cpu-throttle-initial/-increment."""
    src, _ = guests.start("48M", "--dirty-rate", "40M", "--pattern", "random")
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst)
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", guest=src, params=MigrationParameters(
        multifd_channels=2, max_bandwidth=20 << 20, auto_converge=True),
        options=mfd.MigrateOptions(timeout=90))
    rc, _, err = finish(inc)
    assert rc == 0, err
    steps = sorted({r["throttle"] for r in res.round_log} | {res.cpu_throttle_percentage})
    assert steps[-1] >= 20, res.round_log
    assert all(s == 0 or (s >= 20 and (s - 20) % 10 == 0) for s in steps), steps
    assert running(dst)


# 512 pages rewritten about a hundred times a second, half of the writes zeroing a page, and
# receive channel 0 slow to place each packet: a page it holds from round N is sent again in
# round N+1, often on the other channel. The receiver's sync keeps round N+1 from landing
# before it; with the sync off, the stale copy lands last and RAM differs at switchover.
ZEROING = ["--dirty-rate", "200M", "--pattern", "random", "--zero-fraction", "0.5"]


def _migrate_slow_receiver(guests, *incoming_args: str) -> bool:
    src, _ = guests.start("2M", *ZEROING)
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--x-channel-delay", "0.2", *incoming_args)
    try:
        mfd.migrate(f"tcp:127.0.0.1:{port}", guest=src,
                    params=MigrationParameters(multifd_channels=2, downtime_limit=2000))
    except MfdError as e:
        assert "RAM differs from the source's at switchover" in str(e), e
        rc, _, err = finish(inc)
        assert rc == 1 and "RAM differs" in one_line(err)
        assert running(src)
        return False
    rc, _, err = finish(inc)
    assert rc == 0, err
    return True


@pytest.mark.slow
def test_round_order_with_a_slow_receive_channel(guests):
    assert _migrate_slow_receiver(guests)


@pytest.mark.slow
def test_round_order_bites_without_the_receivers_sync(guests):
    assert not all(_migrate_slow_receiver(guests, "--x-skip-sync") for _ in range(5))


# ---------------------------------------------------------------------------- hostile peers


def _init(uuid=bytes(16), ident=0, magic=0x11223344, version=1) -> bytes:
    return struct.pack(">II16sB", magic, version, uuid, ident).ljust(64, b"\0")


# (a channel refused or missing is noticed after the 5 s grace for channels to come: slow)
@pytest.mark.parametrize("inits,channels,expect", [
    pytest.param([_init(magic=0xDEADBEEF)], 1, "opened 0 multifd channel(s)",
                 marks=pytest.mark.slow),  # refused, then missing
    pytest.param([_init(version=2)], 1, "opened 0 multifd channel(s)", marks=pytest.mark.slow),
    ([_init(uuid=b"\x22" * 16)], 1, "uuid 22222222-"),
    ([_init(ident=5)], 1, "channel id 5, expected 0..0"),
    ([_init(ident=1)], 1, "channel id 1, expected 0..0"),  # QEMU 10: SIGSEGV
    ([_init(ident=0), _init(ident=0)], 2, "duplicate"),
    pytest.param([b"garbage!"], 1, "opened 0 multifd channel(s)", marks=pytest.mark.slow),
    pytest.param([_init(ident=0)], 2, "opened 1 multifd channel(s), this destination expects 2",
                 marks=pytest.mark.slow),
])
def test_hostile_handshake(tmp_path, inits, channels, expect):
    def act(src: FakeSource) -> None:
        for init in inits:
            src.channel(init)
        src.start()

    hostile_source(act, expect, channels, tmp_path=tmp_path)


def _header(*, flags=0, alloc=128, normal=0, size=0, num=1, zero=0, block=b"mem",
            offsets=()) -> bytes:
    head = struct.pack(">IIIIIIQI", 0x11223344, 1, flags, alloc, normal, size, num, zero)
    body = head.ljust(64, b"\0") + block.ljust(256, b"\0")
    body += b"".join(struct.pack(">Q", o) for o in offsets)
    return body.ljust(multifd.PACKET_SIZE, b"\0")


@pytest.mark.parametrize("compression,packet,expect", [
    ("none", [_header(alloc=129)], "pages_alloc"),
    ("none", [_header(normal=129, size=129 * 4096)], "normal"),
    ("none", [_header(normal=1, size=4096, offsets=[1 << 20]), bytes(4096)], "offset"),
    ("none", [_header(normal=1, size=4096, block=b"nope", offsets=[0]), bytes(4096)],
     "nope"),
    ("none", [_header(normal=1, size=4096, offsets=[0]), bytes(100)], "middle"),
    ("none", [_header(flags=4, normal=1, size=4096, offsets=[0]), bytes(4096)], "zstd"),
    ("zstd", [_header(flags=4, normal=1, size=8 << 20, offsets=[0]), bytes(8 << 20)],
     "next_packet_size"),
    ("zstd", [_header(flags=4, normal=1, size=64, offsets=[0]), os.urandom(64)], "zstd"),
])
def test_hostile_packet(tmp_path, compression, packet, expect):
    def act(src: FakeSource) -> None:
        link = src.channel(_init())
        src.start()
        with contextlib.suppress(OSError):  # the destination may hang up first
            link.sendall(b"".join(packet))
            link.shutdown(socket.SHUT_WR)

    hostile_source(act, expect, compression=compression, tmp_path=tmp_path)


def test_strangers_are_refused_and_the_migration_still_works(tmp_path):
    """Raw TCP garbage, a connection that says nothing, and a second main channel on the
    port: one warning line each, no crash; a real migration goes on and succeeds."""
    img, out, port, inc = image_incoming(tmp_path, 4 << 20, seed=5)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64))
        s.settimeout(5)
        with pytest.raises((ConnectionError, TimeoutError, OSError)):
            while s.recv(100):
                pass
    silent = socket.create_connection(("127.0.0.1", port))
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", images={"mem": str(img)},
                      params=MigrationParameters(multifd_channels=2))
    silent.close()
    rc, _, err = finish(inc)
    assert rc == 0 and res.status == "completed", err
    assert "refused a connection from 127.0.0.1" in err and "neither a main channel" in err
    assert out.read_bytes() == img.read_bytes()


@pytest.mark.slow
def test_a_silent_connection_is_dropped(tmp_path):
    """QEMU 10 freezes its main loop on a connection that sends nothing; mfd drops it."""
    _, _, port, inc = image_incoming(tmp_path, 1 << 20, seed=5)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(15)
        assert s.recv(10) == b""  # closed by the destination
    inc.send_signal(signal.SIGTERM)
    _, _, err = finish(inc)
    assert "it sent 0 byte(s) in 5 s" in err


# ---------------------------------------------------------------------------- failures


NEVER_CONVERGES = ["--max-bandwidth", "8M", "--multifd-channels", "2"]


class Running:
    """A migration that cannot converge (the guest outruns the rate limit), in flight."""

    def __init__(self, guests, *migrate_args: str, relay: bool = False,
                 incoming_args: tuple[str, ...] = ()) -> None:
        self.src, _ = guests.start("32M", "--dirty-rate", "40M", "--pattern", "random")
        self.before = shm_entries()
        self.port = free_ports(1)
        self.inc = start_incoming(self.port, "--guest", f"{self.src}d", *incoming_args)
        guests.adopt(f"{self.src}d")
        target = self.port
        self.relay = None
        if relay:
            target = free_ports(1)
            self.relay = Relay(target, self.port, 1)
        self.mig = start_migrate(target, "--guest", self.src, *NEVER_CONVERGES, *migrate_args)
        # in flight: both ends have their channels
        until(lambda: len(self.channels(self.mig.pid)) == 2,
              lambda: self.mig.stderr.read() if self.mig.poll() is not None else "no channels")
        until(lambda: len(self.channels(self.inc.pid)) == 2, "no channels at the destination")
        time.sleep(0.5)

    @staticmethod
    def channels(pid: int) -> list[int]:
        """Forked channel processes (same command line as their parent; not the guest)."""
        mine = cmdline(pid)
        return [c for c in children(pid) if cmdline(c) == mine]

    def source_fails(self, expect: str, rc_expected: int = 1) -> str:
        """The source gives up by itself (bounded: a hang fails the test) with one line."""
        rc, _, err = finish(self.mig, 30)
        assert rc == rc_expected, err
        line = one_line(err)
        assert expect in line, line
        assert running(self.src), "the source guest must keep running"
        return line

    def destination_fails(self) -> None:
        rc, out, err = finish(self.inc, 30)
        assert rc != 0 and "completed" not in out
        assert one_line(err).startswith("mfd: incoming migration"), err
        assert not os.path.exists(control.socket_path(f"{self.src}d"))
        assert shm_entries() <= self.before, "the destination left RAM in /dev/shm"


@pytest.mark.slow
def test_destination_killed(guests):
    r = Running(guests)
    r.inc.send_signal(signal.SIGKILL)
    r.source_fails("migration failed")
    r.inc.wait()
    # the pending guest died with it; its RAM had no name
    until(lambda: not control.is_alive(f"{r.src}d"), "the pending guest lives on", 10)
    assert shm_entries() <= r.before


@pytest.mark.slow
def test_source_channel_killed(guests):
    r = Running(guests)
    os.kill(r.channels(r.mig.pid)[0], signal.SIGKILL)
    r.source_fails("channel")
    r.destination_fails()


@pytest.mark.slow
def test_destination_channel_killed(guests):
    r = Running(guests)
    os.kill(r.channels(r.inc.pid)[1], signal.SIGKILL)
    r.source_fails("migration failed")
    r.destination_fails()


@pytest.mark.slow
def test_connection_cut(guests):
    r = Running(guests, relay=True)
    assert r.relay is not None
    r.relay.cut()
    r.source_fails("lost")
    r.destination_fails()


@pytest.mark.slow
def test_migrate_cancel_through_the_monitor(guests, tmp_path):
    path = f"/tmp/mfdmon-{os.getpid()}-{time.monotonic_ns()}.sock"
    dest = f"{path}.dest"
    r = Running(guests, "--monitor", path, incoming_args=("--monitor", dest))
    q = monitor_command(dest, "query-migrate")["return"]
    assert q["status"] == "active"
    assert monitor_command(dest, "query-migrate-parameters")["return"][
        "multifd-channels"] == 2
    q = monitor_command(path, "query-migrate")["return"]
    assert q["status"] == "active" and q["ram"]["total"] == 32 << 20
    params = monitor_command(path, "query-migrate-parameters")["return"]
    assert params["multifd-channels"] == 2 and params["max-bandwidth"] == 8 << 20
    assert "return" in monitor_command(path, "migrate-set-parameters",
                                       {"downtime-limit": 250})
    assert monitor_command(path, "query-migrate-parameters")["return"] \
        .get("downtime-limit") in (250, 300)  # applied at the next tick
    events = QMPClient(path)  # QEMU's MIGRATION events, as a QMP client sees them
    assert "return" in monitor_command(path, "migrate_cancel")
    r.source_fails("migration cancelled: cancelled by migrate_cancel")
    seen = _read_events(events)
    assert seen and seen[-1] == "cancelled", seen
    r.destination_fails()
    assert not os.path.exists(path) and not os.path.exists(dest)


def _read_events(client: QMPClient) -> list[str]:
    """MIGRATION statuses until a final one (or the monitor closes), each within 10 s."""
    seen: list[str] = []
    with client:
        while not seen or seen[-1] not in ("completed", "failed", "cancelled"):
            try:
                msg = client.event(timeout=10)
            except MonitorGone:
                break
            if msg["event"] == "MIGRATION":
                seen.append(msg["data"]["status"])
    return seen


@pytest.mark.parametrize(("sig", "says", "rc"), [(signal.SIGINT, "interrupted", 130),
                                                 (signal.SIGTERM, "terminated (SIGTERM)", 143)])
@pytest.mark.slow
def test_ctrl_c_or_sigterm(guests, sig, says, rc):
    """Ctrl-C, or SIGTERM as from `docker stop`: cancelled, the guest runs on, one line."""
    r = Running(guests)
    r.mig.send_signal(sig)
    r.source_fails(says, rc_expected=rc)
    r.destination_fails()


@pytest.mark.slow
def test_timeout_cancels(guests):
    r = Running(guests, "--timeout", "3")
    r.source_fails("did not complete within 3 s")
    r.destination_fails()


@pytest.mark.slow
def test_timeout_cancels_without_multifd(guests):
    """The main channel carries the pages, paced by the rate limiter (the socket never
    blocks): --timeout still cancels, within a batch."""
    src, _ = guests.start("32M", "--dirty-rate", "40M", "--pattern", "random")
    port = free_ports(1)
    inc = start_incoming(port, "--guest", f"{src}d")
    guests.adopt(f"{src}d")
    mig = start_migrate(port, "--guest", src, "--no-multifd", *NEVER_CONVERGES, "--timeout",
                        "3")
    rc, _, err = finish(mig, 20)
    assert rc == 1 and "did not complete within 3 s" in one_line(err), err
    assert running(src)
    assert finish(inc)[0] == 1


def test_no_destination():
    """Nobody listening: one line, bounded."""
    port = free_ports(1)
    p = run_mfd("migrate", f"tcp:127.0.0.1:{port}", "--image", "mem=/dev/null", timeout=60)
    assert p.returncode == 1
    assert "image" in one_line(p.stderr) or "reach" in one_line(p.stderr)
