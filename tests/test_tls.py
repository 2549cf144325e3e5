"""TLS on every migration connection (``mfd.workers.tls``), as QEMU's ``tls-creds-x509``.

mfd -> mfd with and without multifd; real QEMU 10 -> mfd and mfd -> QEMU with x509
credentials made by ``mfd tls-certs``, multifd off / 1 / 2 / 4, compression none / zstd, RAM
compared byte for byte; then every refusal: one line on each end within seconds, nothing
written where the RAM would go, the source's guest running on.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    IMAGE_SIZE,
    POSTCOPY_LINK,
    QMP_TIMEOUT,
    WAIT,
    Mfd,
    assert_same_ram,
    mfd_status,
    needs_qemu,
    only_line,
    postcopy_pair,
    resumed_to_the_end,
    run_mfd,
    running,
    source_copy,
    start_mfd,
    start_migrate,
    until,
    wait_listening,
    zero_file,
)
from netutil import Relay

from mfd import tlscerts
from mfd.bench.qemu import QemuMachine
from mfd.qmp import monitor_command
from mfd.workers import tcp
from mfd.workers.tcp import free_ports
from mfd.workers.tls import (
    HANDSHAKE_S,
    LINGER_S,
    OK,
    RELAY_NAME,
    TLSOptions,
    goodbye,
    open_client,
    wait_relays,
)
from mfd.workers.tls import server as tls_server

REFUSED_WITHIN = HANDSHAKE_S + 10  # a refusal shows on both ends within this


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("tls") / "creds"
    r = run_mfd("tls-certs", str(d), "--host", "127.0.0.1", "--host", "localhost")
    assert r.returncode == 0, r.stderr
    return str(d)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Certificates for the same names from another CA."""
    d = tmp_path_factory.mktemp("tls") / "other"
    tlscerts.make(str(d), ["127.0.0.1"])
    return str(d)


@pytest.fixture(scope="module")
def expired(tmp_path_factory: pytest.TempPathFactory, creds: str) -> str:
    """Certificates from the same CA that expired yesterday (valid for a day from 2 days
    ago)."""
    d = tmp_path_factory.mktemp("tls") / "expired"
    d.mkdir()
    for name in ("ca-cert.pem", "ca-key.pem"):
        (d / name).write_bytes((Path(creds) / name).read_bytes())
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    tlscerts.make(str(d), ["127.0.0.1"], days=1, start=start)
    return str(d)


def tls(creds: str) -> list[str]:
    return ["--tls-creds", creds]


# ---------------------------------------------------------------------------- mfd <-> mfd


@pytest.mark.parametrize("multifd", [
    ["--multifd-channels", "1"],
    pytest.param(["--multifd-channels", "4"], marks=pytest.mark.slow),
    pytest.param(["--no-multifd"], marks=pytest.mark.slow),
], ids=["1ch", "4ch", "nomultifd"])
def test_mfd_to_mfd_with_tls(tmp_path: Path, creds: str, image: Path, multifd) -> None:
    out, qmp = tmp_path / "out.bin", str(tmp_path / "dst.qmp")
    port = free_ports(1)
    with Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--image", f"mem={out}",
             "--json", "--monitor", qmp, *tls(creds), "--tls-authz", "O=mfd,CN=mfd-client"
             ) as inc:
        wait_listening(port, inc.alive)
        params = monitor_command(qmp, "query-migrate-parameters", None, 5.0)["return"]
        assert params["tls-creds"] == creds and params["tls-authz"] == "O=mfd,CN=mfd-client"
        r = run_mfd("migrate", f"tcp:127.0.0.1:{port}", "--image", f"mem={image}", "--json",
                    *multifd, *tls(creds))
        assert r.returncode == 0, r.stderr
        res = inc.completed()
    assert res["verified"]
    assert_same_ram(image, out)


# ---------------------------------------------------------------------------- QEMU <-> mfd

# multifd channels (0: off) and compression: each value of each at least once
CASES = [(0, "none"), (1, "zstd"), (2, "none"), (4, "zstd")]


@needs_qemu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}ch-{c[1]}")
@pytest.mark.slow
def test_qemu_to_mfd_with_tls(tmp_path: Path, creds: str, image: Path, case) -> None:
    ch, comp = case
    out, port = tmp_path / "out.bin", free_ports(1)
    multifd = ["--multifd-channels", str(ch), "--multifd-compression", comp] if ch else []
    with Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--image", f"mem={out}",
             "--json", "--timeout", str(WAIT), *multifd, *tls(creds)) as inc, \
            QemuMachine(str(source_copy(image, tmp_path)), IMAGE_SIZE, timeout=QMP_TIMEOUT) as q:
        wait_listening(port, inc.alive)
        q.set_migration(multifd_channels=ch, multifd_compression=comp)
        q.set_tls(creds, server=False)
        q.start_migrate(f"tcp:127.0.0.1:{port}")
        assert q.wait_migration(WAIT)["status"] == "completed"
        assert inc.completed()["status"] == "completed"
    assert_same_ram(image, out)


@needs_qemu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}ch-{c[1]}")
@pytest.mark.slow
def test_mfd_to_qemu_with_tls(tmp_path: Path, creds: str, image: Path, case) -> None:
    ch, comp = case
    ram, port = zero_file(tmp_path / "dst.bin", IMAGE_SIZE), free_ports(1)
    multifd = ["--multifd-channels", str(ch), "--multifd-compression", comp] if ch else \
        ["--no-multifd"]
    with QemuMachine(str(ram), IMAGE_SIZE, incoming=True, timeout=QMP_TIMEOUT) as q:
        q.set_migration(multifd_channels=ch, multifd_compression=comp)
        q.set_tls(creds, server=True, authz="O=mfd,CN=mfd-client")  # verify-peer: QEMU's default
        q.start_migrate_incoming(f"tcp:127.0.0.1:{port}")
        r = run_mfd("migrate", f"tcp:127.0.0.1:{port}", "--image", f"mem={image}", "--json",
                    *multifd, *tls(creds), timeout=WAIT)
        assert r.returncode == 0, r.stderr
        assert q.wait_migration(WAIT)["status"] == "completed"
    assert_same_ram(image, ram)


# ---------------------------------------------------------------------------- refusals


class Destination:
    """``mfd incoming`` writing an image, its stderr in a file the test reads while it runs
    (a refused connection is one warning line; it listens on for a real source)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = free_ports(1)
        self.out = tmp_path / "out.bin"
        self.err_path = tmp_path / "incoming.err"
        with open(self.err_path, "w") as err:
            self.p = start_mfd("incoming", "--listen", f"tcp:127.0.0.1:{self.port}", "--image",
                               f"mem={self.out}", "--timeout", "60", *args,
                               stdout=subprocess.DEVNULL, stderr=err)
        wait_listening(self.port, lambda: self.p.poll() is None)

    def says(self, text: str, within: float = REFUSED_WITHIN) -> str:
        """The one line that says ``text``, once it is there."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            lines = self.err_path.read_text().splitlines()
            hits = [line for line in lines if text in line]
            if hits:
                assert "Traceback" not in self.err_path.read_text()
                return hits[0]
            time.sleep(0.05)
        raise AssertionError(f"the destination did not say {text!r}: "
                             f"{self.err_path.read_text()}")

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            self.p.wait(10)
        assert not self.out.exists(), "nothing may be written where the RAM would go"


def refused(guests, tmp_path: Path, dst_args: list[str], src_args: list[str],
            dst_says: str, src_says: str) -> None:
    src, _ = guests.start("64M", "--dirty-rate", "20M")
    dst = Destination(tmp_path, *dst_args)
    try:
        r = run_mfd("migrate", f"tcp:127.0.0.1:{dst.port}", "--guest", src, *src_args,
                    timeout=REFUSED_WITHIN + 10)
        assert r.returncode == 1 and src_says in only_line(r.stderr), r.stderr
        dst.says(dst_says)
        assert running(src), "the source's guest runs on"
    finally:
        dst.close()


def test_a_source_without_tls_is_refused(guests, tmp_path, creds):
    refused(guests, tmp_path, tls(creds), [],
            "TLS: the peer sends a migration stream without TLS", "migration failed")


@pytest.mark.slow
def test_a_tls_source_is_refused_by_a_destination_without_tls(guests, tmp_path, creds):
    refused(guests, tmp_path, [], tls(creds),
            "it starts a TLS handshake, and this destination has no TLS",
            "the peer closed the connection during the TLS handshake")


@pytest.mark.slow
def test_a_destination_from_an_unknown_ca_is_refused(guests, tmp_path, creds, other_ca):
    refused(guests, tmp_path, tls(creds), tls(other_ca), "TLS: the peer refused the "
            "handshake", "certificate verify failed")


@pytest.mark.slow
def test_a_wrong_host_name_is_refused(guests, tmp_path, creds):
    refused(guests, tmp_path, tls(creds), [*tls(creds), "--tls-hostname", "wrong.example"],
            "TLS: the peer refused the handshake",
            "certificate verify failed: Hostname mismatch")


@pytest.mark.slow
def test_a_client_certificate_outside_tls_authz_is_refused(guests, tmp_path, creds):
    refused(guests, tmp_path, [*tls(creds), "--tls-authz", "O=mfd,CN=someone-else"],
            tls(creds), "the client certificate 'O=mfd,CN=mfd-client' is not in --tls-authz",
            "migration failed")


@pytest.mark.slow
def test_a_client_certificate_from_an_unknown_ca_is_refused(guests, tmp_path, creds,
                                                            other_ca):
    """The destination checks the source's certificate (verify-peer): another CA's is
    refused, though the source trusts the destination (its CA file is the right one)."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("client-cert.pem", "client-key.pem"):
        (mixed / name).write_bytes((Path(other_ca) / name).read_bytes())
    (mixed / "ca-cert.pem").write_bytes((Path(creds) / "ca-cert.pem").read_bytes())
    refused(guests, tmp_path, tls(creds), tls(str(mixed)),
            "TLS: certificate verify failed: unable to get local issuer certificate",
            "migration failed")


@pytest.mark.slow
def test_expired_certificates(guests, tmp_path, creds, expired):
    """An end refuses its own expired certificate at start (as QEMU refuses to create the
    tls-creds-x509 object); a destination refuses a peer's expired one."""
    src, _ = guests.start("64M", "--dirty-rate", "20M")
    r = run_mfd("migrate", "tcp:127.0.0.1:9", "--guest", src, *tls(expired))
    assert r.returncode == 1 and "client-cert.pem: the certificate expired on" in \
        only_line(r.stderr), r.stderr
    r = run_mfd("incoming", "--listen", "tcp:127.0.0.1:9", "--image", "mem=/nonexistent",
                *tls(expired))
    assert r.returncode == 1 and "server-cert.pem: the certificate expired on" in \
        only_line(r.stderr), r.stderr
    assert running(src)
    dst = Destination(tmp_path, *tls(creds))
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(os.path.join(creds, "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(expired, "client-cert.pem"),
                            os.path.join(expired, "client-key.pem"))
        with socket.create_connection(("127.0.0.1", dst.port)) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.settimeout(REFUSED_WITHIN)
            with pytest.raises((ssl.SSLError, ConnectionError)):  # its alert, or the close
                s.sendall(b"QEVM")
                s.recv(1)
        dst.says("TLS: certificate verify failed: certificate has expired")
    finally:
        dst.close()


@pytest.mark.slow
def test_a_peer_that_stops_mid_handshake(guests, tmp_path, creds):
    """Half a ClientHello, then silence: the destination gives up after HANDSHAKE_S; a
    destination that never answers a source's ClientHello, likewise."""
    dst = Destination(tmp_path, *tls(creds))
    try:
        with socket.create_connection(("127.0.0.1", dst.port)) as s:
            s.sendall(bytes.fromhex("1603010200010001fc0303"))
            dst.says(f"TLS: no TLS handshake within {HANDSHAKE_S:g} s")
    finally:
        dst.close()
    src, _ = guests.start("64M", "--dirty-rate", "20M")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        t0 = time.monotonic()
        r = run_mfd("migrate", f"tcp:127.0.0.1:{silent.getsockname()[1]}", "--guest", src,
                    *tls(creds), timeout=REFUSED_WITHIN + 10)
    assert r.returncode == 1 and f"no TLS handshake within {HANDSHAKE_S:g} s" in \
        only_line(r.stderr), r.stderr
    assert time.monotonic() - t0 < REFUSED_WITHIN
    assert running(src)


@pytest.mark.slow
def test_garbage_instead_of_a_client_hello(guests, tmp_path, creds, image):
    """One line for the stranger; the destination listens on and a real source's TLS
    migration then completes."""
    port = free_ports(1)
    out = tmp_path / "out.bin"
    with Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--image", f"mem={out}",
             "--json", "--timeout", str(WAIT), *tls(creds)) as inc:
        wait_listening(port, inc.alive)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(bytes(range(7, 200)))
            time.sleep(1.0)
        r = run_mfd("migrate", f"tcp:127.0.0.1:{port}", "--image", f"mem={image}",
                    "--multifd-channels", "2", *tls(creds))
        assert r.returncode == 0, r.stderr
        inc.completed()
    assert "TLS: the peer does not start a TLS handshake (it sent 0708090a)" in inc.err, \
        inc.err
    assert "Traceback" not in inc.err
    assert_same_ram(image, out)


def test_a_send_channels_tls_in_its_own_process(creds):
    """A send channel's TLS (``tls.open_client``): the handshake and every SSL_write in this
    process, buffers of any shape sent whole (a header, then pages from a mapping: many
    records each), then close_notify and the end (``tls.goodbye``). Its peer here is a
    relay forked from this process: it keeps none of this process's other sockets (their
    peers see their end when this process closes them), and ps names it."""
    other, other_peer = socket.socketpair()  # a connection of this process, unrelated
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    plain = tls_server(accepted, TLSOptions(creds))
    assert len(relays()) == 1
    other.close()
    other_peer.settimeout(5)
    assert other_peer.recv(1) == b""  # the relay holds no copy of it
    other_peer.close()

    pages = np.random.default_rng(1).integers(0, 2**63, (640, 512), dtype=np.uint64)
    buffers = [b"header" * 224, pages[:500], pages[500:501], memoryview(pages[501:]).cast("B")]
    received = bytearray()

    def read() -> None:  # the plaintext the relay decrypted, to its end
        plain.setblocking(True)
        while chunk := plain.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    sock = open_client(conn, TLSOptions(creds, hostname="127.0.0.1"), "the test")
    assert isinstance(sock, ssl.SSLSocket) and sock.version() == "TLSv1.3"
    assert tcp.send_all(sock, buffers) == 1344 + pages.nbytes
    t0 = time.monotonic()
    goodbye(sock)  # close_notify: the relay ends the plaintext
    reader.join(10)
    assert not reader.is_alive()
    assert time.monotonic() - t0 <= LINGER_S + 0.5
    assert bytes(received) == OK + b"header" * 224 + pages.tobytes()
    plain.close()
    wait_relays()
    assert not relays()


def relays() -> list[int]:
    """This process's TLS relays (children named so)."""
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, ppid = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")")[1].split()[1]
        if name == RELAY_NAME and int(ppid) == os.getpid():
            mine.append(int(pid))
    return mine


def test_bad_credentials_and_options_are_refused(tmp_path, creds):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(creds):
        (bad / name).write_bytes((Path(creds) / name).read_bytes())
    listen = ["incoming", "--listen", "tcp:127.0.0.1:9", "--image", "mem=/x", "--tls-creds",
              str(bad)]
    (bad / "server-key.pem").write_bytes((Path(creds) / "client-key.pem").read_bytes())
    r = run_mfd(*listen)
    assert r.returncode == 1 and "server-key.pem is not the key of server-cert.pem" in \
        only_line(r.stderr), r.stderr
    (bad / "server-key.pem").write_text("garbage\n")
    r = run_mfd(*listen)
    assert r.returncode == 1 and "server-key.pem: not an unencrypted PEM private key" in \
        only_line(r.stderr), r.stderr
    (bad / "ca-cert.pem").write_text("garbage\n")
    r = run_mfd("migrate", "tcp:127.0.0.1:9", "--image", "mem=/x", "--tls-creds", str(bad))
    assert r.returncode == 1 and "ca-cert.pem: not a PEM certificate" in only_line(r.stderr), \
        r.stderr
    for args, says in ((["migrate", "tcp:127.0.0.1:9", "--image", "mem=/x", "--tls-hostname",
                         "h"], "--tls-hostname goes with --tls-creds"),
                       (["incoming", "--listen", "tcp:127.0.0.1:9", "--tls-authz", "CN=x"],
                        "--tls-authz goes with --tls-creds"),
                       (["incoming", "--listen", "tcp:127.0.0.1:9", "--tls-creds",
                         str(tmp_path)], "no ca-cert.pem")):
        r = run_mfd(*args)
        assert r.returncode != 0 and says in only_line(r.stderr), r.stderr


@pytest.mark.slow
def test_postcopy_preempt_over_tls_cut_and_recovered(guests, tmp_path, creds):
    """Postcopy with preempt over TLS (the preempt channel is the next connection after the
    main channel once its handshake is done), the link cut mid-postcopy, then recovered:
    the resume's new connections are TLS too, and RAM ends equal."""
    src_qmp, dst_qmp = str(tmp_path / "src.qmp"), str(tmp_path / "dst.qmp")
    src, dst, port, inc = postcopy_pair(guests, "--monitor", dst_qmp, "--postcopy-preempt",
                                        *tls(creds))
    relay_port = free_ports(1)
    relay = Relay(relay_port, port, 1)
    mig = start_migrate(relay_port, "--guest", src, "--no-multifd", "--postcopy-ram",
                        "--postcopy-preempt", "--postcopy-after", "0.5", *POSTCOPY_LINK,
                        "--max-postcopy-bandwidth", "4M", "--monitor", src_qmp, *tls(creds),
                        "--tls-hostname", "127.0.0.1")
    try:
        until(lambda: mfd_status(dst_qmp) == "postcopy-active", "the guest did not run")
        until(lambda: len(relay.accepted) >= 2, "no preempt channel")
        time.sleep(0.5)
        relay.cut()
        until(lambda: mfd_status(src_qmp) == "postcopy-paused", "the source did not pause")
        until(lambda: mfd_status(dst_qmp) == "postcopy-paused", "the destination did not pause")
        assert monitor_command(src_qmp, "query-migrate-parameters", None, 5.0)["return"][
            "tls-hostname"] == "127.0.0.1"
        resumed_to_the_end(src_qmp, port, mig, inc, dst)
    finally:
        relay.cut()
