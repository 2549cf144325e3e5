"""TLS on every migration connection, as QEMU's ``tls-creds-x509`` does it.

QEMU wraps the main channel, each multifd channel and the postcopy-preempt channel in a
``QIOChannelTLS`` (GnuTLS) when ``tls-creds`` is set: the source is the TLS client and checks
the destination's certificate against ``ca-cert.pem`` and against ``tls-hostname`` (else the
host of the URI); the destination is the server and, with ``verify-peer`` (QEMU's default),
asks for a client certificate from the same CA and, with ``tls-authz``, checks the
certificate's distinguished name. The credentials are a directory with QEMU's file names
(:data:`FILES`). TLS 1.3 only: QEMU 10 with GnuTLS negotiates it, and mfd refuses less.

A send channel (``mfd.workers.socket_channel.SendChannel``) does its TLS itself, in its own
process (:func:`open_client`), as QEMU's channel threads do theirs: it only writes, header
and pages straight from guest memory into OpenSSL (one ``SSL_write`` per buffer, no copy on
the way), and ends with :func:`goodbye`. Every other connection runs its TLS in a process
forked from its owner, the relay: it does the handshake (in parallel for every connection),
then moves bytes between the TLS connection and a socketpair whose other end its owner (a
main process; on a destination, the receive channel it hands the connection to) reads and
writes exactly as it would a plain TCP connection: sendmsg, recvmsg_into, splice into guest
RAM, poll. Python's ``ssl`` cannot hand a TLS session to another process, and this kernel
has no kernel TLS (``CONFIG_TLS`` unset), while a destination sorts its connections in the
main process by their first bytes, which TLS hides, and configures its receive channels
from what the first MultiFDInit says: without the relay, it would decrypt every channel in
the main process. The cost is one copy of each byte through the socketpair (measured in
``mfd bench migrate --tls``).

The first byte the owner reads from the socketpair is the handshake's result: 0, then the
plaintext; or 1, then one line saying why, and the end.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import select
import signal
import socket
import ssl
import time
from dataclasses import dataclass

from mfd.errors import MfdError, UsageError
from mfd.sysutil import default_signals, set_process_name

HANDSHAKE_S = 5.0  # a peer silent for this long in the handshake is refused
LINGER_S = 1.0  # after the owner closed: how long the relay waits for the peer's end
CA, CRL = "ca-cert.pem", "ca-crl.pem"
SERVER = ("server-cert.pem", "server-key.pem")
CLIENT = ("client-cert.pem", "client-key.pem")
FILES = (CA, *SERVER, *CLIENT)  # QEMU's names (crypto/tlscredsx509.h)
OK, FAILED = b"\x00", b"\x01"
BUFFER = 1 << 18  # bytes moved per read of either side
RELAY_NAME = "mfd-tls-relay"  # a relay's name in ps and top (its command line is its owner's)
_QEVM = b"QEVM"
_HANDSHAKE_RECORD = 0x16


@dataclass(frozen=True)
class TLSOptions:
    """QEMU's ``tls-creds`` (a directory here), ``tls-hostname``, ``verify-peer`` and
    ``tls-authz`` (the distinguished names allowed, as QEMU's GnuTLS prints them:
    ``O=mfd,CN=mfd-client``)."""

    creds: str
    hostname: str | None = None  # the client's name for the server (else the URI's host)
    verify_peer: bool = True
    authz: tuple[str, ...] = ()


def tls_parameters(opts: TLSOptions | None) -> dict[str, str]:
    """QEMU's ``query-migrate-parameters`` members for TLS (strings, empty when unset;
    tls-authz: the names allowed, separated by ``;``)."""
    if opts is None:
        return {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}
    return {"tls-creds": opts.creds, "tls-hostname": opts.hostname or "",
            "tls-authz": ";".join(opts.authz)}


# ------------------------------------------------------------------ credentials


def context(opts: TLSOptions, server: bool) -> ssl.SSLContext:
    """The endpoint's SSL context, from QEMU's files in ``opts.creds``."""
    def path(name: str) -> str:
        return os.path.join(opts.creds, name)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(path(CA))
    if os.path.exists(path(CRL)):
        ctx.load_verify_locations(path(CRL))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    cert, key = SERVER if server else CLIENT
    if server or os.path.exists(path(cert)):  # a client certificate is optional (QEMU's)
        ctx.load_cert_chain(path(cert), path(key))
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED if opts.verify_peer else ssl.CERT_NONE
        # no session tickets: a QEMU multifd channel never reads its connection, and the
        # tickets left unread there make its close a reset, which loses the last packets
        ctx.num_tickets = 0
    elif not opts.verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check(opts: TLSOptions, server: bool) -> None:
    """Refuse unusable credentials at start, in one line, as QEMU refuses to create the
    ``tls-creds-x509`` object: files missing or unreadable, a key that does not match, this
    end's own certificate not valid now."""
    if not os.path.isdir(opts.creds):
        raise MfdError(f"--tls-creds {opts.creds}: not a directory")
    need = [CA, *(SERVER if server else ())]
    if not server and os.path.exists(os.path.join(opts.creds, CLIENT[0])):
        need.append(CLIENT[1])
    for name in need:
        if not os.path.isfile(os.path.join(opts.creds, name)):
            raise MfdError(f"--tls-creds {opts.creds}: no {name} (QEMU's file names: "
                           f"{', '.join(FILES)})")
    if opts.authz and not server:
        raise UsageError("--tls-authz checks the source's certificate: it belongs to the "
                         "destination (mfd incoming)")
    if opts.authz and not opts.verify_peer:
        raise UsageError("--tls-authz needs the client's certificate: not with "
                         "--no-tls-verify-peer")
    cert, key = SERVER if server else CLIENT
    for name in (cert, CA):  # each file on its own: OpenSSL's word for a bad one is obscure
        if os.path.exists(os.path.join(opts.creds, name)):
            _check_cert(os.path.join(opts.creds, name))
    if os.path.exists(os.path.join(opts.creds, key)):
        _check_key(os.path.join(opts.creds, key))
    try:
        context(opts, server)
    except (ssl.SSLError, OSError) as e:
        why = _reason(e)
        if "key values mismatch" in why:
            why = f"{key} is not the key of {cert}"
        raise MfdError(f"--tls-creds {opts.creds}: {why}") from None


def _check_key(path: str) -> None:
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            serialization.load_pem_private_key(f.read(), None)
    except (ValueError, TypeError, OSError):
        raise MfdError(f"{path}: not an unencrypted PEM private key") from None


def _check_cert(path: str) -> None:
    """A PEM certificate, valid now."""
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (ValueError, OSError):
        raise MfdError(f"{path}: not a PEM certificate") from None
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        raise MfdError(f"{path}: the certificate expired on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise MfdError(f"{path}: the certificate is not valid before "
                         f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


# ------------------------------------------------------------------ owners' side

_relays: list[int] = []  # this process's relays (pids) not reaped yet


def _spawn(net: socket.socket, opts: TLSOptions, server: bool) -> socket.socket:
    """The relay for ``net`` (which it takes over); the owner's end of the socketpair. The
    relay is forked from its owner, which has ``ssl`` loaded already: a fresh interpreter
    (``python -m``) cost 0.06-0.13 CPU-s to start here, more than a relay moving a GiB of
    zstd pages spends; a fork, a few milliseconds. The child keeps only its two sockets,
    never runs its owner's code or finalizers, and leaves with ``os._exit``."""
    _relays[:] = [pid for pid in _relays if not _reaped(pid)]
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        pid = os.fork()
    except OSError as e:
        for s in (ours, theirs, net):
            s.close()
        raise MfdError(f"cannot start a TLS relay: {e.strerror}") from None
    if pid == 0:
        status = 1
        try:
            gc.freeze()  # no finalizer of an owner's object runs here
            # only its own sockets: another connection ends when its owner closes it
            keep = sorted({0, 1, 2, net.fileno(), theirs.fileno()})
            for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")], strict=True):
                os.closerange(low + 1, high)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the owner closes its end
            default_signals()
            set_process_name(RELAY_NAME)
            status = _serve(net, theirs, opts, server)
        finally:
            os._exit(status)
    net.close()
    theirs.close()
    _relays.append(pid)
    return ours


def _reaped(pid: int, timeout: float = 0.0) -> bool:
    """Whether relay ``pid`` ended within ``timeout`` seconds (then it is reaped)."""
    try:
        if timeout > 0:
            ended = os.pidfd_open(pid)
            try:
                select.select([ended], [], [], timeout)
            finally:
                os.close(ended)
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except (ChildProcessError, ProcessLookupError):  # (reaped by someone else)
        return True


def wait_relays(timeout: float = LINGER_S + 1) -> None:
    """Reap this process's relays once their connections are closed (each ends then), killing
    any still there after ``timeout``: their CPU time is counted as this process's
    children's, and none is left behind."""
    deadline = time.monotonic() + timeout
    for pid in _relays:
        if not _reaped(pid, max(deadline - time.monotonic(), 0.01)):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    _relays.clear()


def client(net: socket.socket, opts: TLSOptions, peer: str) -> socket.socket:
    """TLS over the connected ``net`` to ``peer`` (for messages): the plaintext end, once the
    handshake succeeded (non-blocking, as ``tcp.connect`` returns sockets)."""
    plain = _spawn(net, opts, server=False)
    plain.settimeout(HANDSHAKE_S + 10)  # the relay's handshake (it has its own deadline)
    try:
        status = plain.recv(1)
        if status != OK:
            why = failure(plain) if status == FAILED else "the TLS relay ended"
            raise MfdError(f"TLS with {peer}: {why}")
    except TimeoutError:
        plain.close()
        raise MfdError(f"TLS with {peer}: the TLS relay did not answer") from None
    except BaseException:
        plain.close()
        raise
    plain.setblocking(False)
    return plain


def open_client(net: socket.socket, opts: TLSOptions, peer: str) -> ssl.SSLSocket:
    """TLS over the connected ``net`` to ``peer``, in this process: the handshake, then the
    TLS socket (non-blocking), for a connection this end only writes (a send channel's:
    ``mfd.workers.tcp.send_all``, then :func:`goodbye`)."""
    try:
        return _handshake(net, opts, server=False)
    except (_Refused, ssl.SSLError, OSError) as e:
        net.close()
        raise MfdError(f"TLS with {peer}: {_reason(e)}") from None


def goodbye(tls: ssl.SSLSocket) -> None:
    """The end of a connection of :func:`open_client`, as the relay ends one: our
    close_notify (QEMU's multifd "bye": a QEMU destination takes a channel that ends without
    one for a truncated stream), our FIN, then whatever the peer still sends, until its end
    or :data:`LINGER_S`: a socket closed with unread bytes resets the connection, and a reset
    drops what the kernel had not sent yet. The socket is closed. Never raises."""
    deadline = time.monotonic() + LINGER_S
    with contextlib.suppress(OSError, ValueError):
        while time.monotonic() < deadline:
            try:
                tls.unwrap()  # sends close_notify; returns once the peer's came too
                break
            except ssl.SSLWantReadError:
                break  # ours is out, theirs is still to come
            except ssl.SSLWantWriteError:  # (a peer that does not read: up to the deadline)
                select.select([], [tls], [], max(deadline - time.monotonic(), 0))
        tls.shutdown(socket.SHUT_WR)  # (plain from here: the TLS object is dropped)
        while select.select([tls], [], [], max(deadline - time.monotonic(), 0))[0]:
            if not tls.recv(BUFFER):
                break
    tls.close()


def server(net: socket.socket, opts: TLSOptions) -> socket.socket:
    """TLS over the accepted ``net``: the plaintext end at once (non-blocking); its first
    byte says how the handshake went (OK, or FAILED and :func:`failure`)."""
    plain = _spawn(net, opts, server=True)
    plain.setblocking(False)
    return plain


def failure(plain: socket.socket) -> str:
    """Why the handshake failed: what the relay sent after FAILED (at once, then it
    closed)."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := plain.recv(4096):
            data += chunk
    return data.decode("utf-8", "replace").strip() or "the TLS relay ended"


# ------------------------------------------------------------------ the relay process


class _Refused(Exception):
    pass


def _reason(e: BaseException) -> str:
    """One line for a TLS failure."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        return "the peer closed the connection during the TLS handshake (does it use TLS, " \
               "and accept this end's certificate?)"
    if isinstance(e, ssl.SSLError):
        why = (e.reason or str(e)).lower().replace("_", " ")
        if "alert" in why:
            return f"the peer refused the handshake ({why})"
        return why
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def _wait(sock: socket.socket, write: bool, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([] if write else [sock], [sock] if write else [], [],
                                      left)[0 if not write else 1]:
        raise _Refused(f"no TLS handshake within {HANDSHAKE_S:g} s (the peer stopped "
                       "answering)")


def _first_bytes(net: socket.socket, deadline: float) -> None:
    """A server checks the peer's first bytes: a TLS handshake record, not a migration
    stream without TLS or anything else (OpenSSL's own word for it is obscure)."""
    _wait(net, False, deadline)
    head = net.recv(4, socket.MSG_PEEK)
    if head and head[0] != _HANDSHAKE_RECORD:
        if head == _QEVM[:len(head)]:
            raise _Refused("the peer sends a migration stream without TLS (the source has "
                           "no --tls-creds / tls-creds)")
        raise _Refused(f"the peer does not start a TLS handshake (it sent {head.hex()})")


def _handshake(net: socket.socket, opts: TLSOptions, server: bool) -> ssl.SSLSocket:
    deadline = time.monotonic() + HANDSHAKE_S
    net.setblocking(False)
    if server:
        _first_bytes(net, deadline)
    tls = context(opts, server).wrap_socket(
        net, server_side=server, do_handshake_on_connect=False,
        server_hostname=None if server else opts.hostname)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            _wait(tls, False, deadline)
        except ssl.SSLWantWriteError:
            _wait(tls, True, deadline)
    if tls.version() != "TLSv1.3":  # (the context allows nothing else)
        raise _Refused(f"{tls.version()} negotiated, TLSv1.3 required")
    if server and opts.authz:
        dn = _peer_dn(tls)
        if dn not in opts.authz:
            raise _Refused(f"the client certificate {dn!r} is not in --tls-authz")
    return tls


def _peer_dn(tls: ssl.SSLSocket) -> str:
    from cryptography import x509

    der = tls.getpeercert(binary_form=True)
    if der is None:
        raise _Refused("--tls-authz needs a client certificate (and --tls-verify-peer)")
    return distinguished_name(x509.load_der_x509_certificate(der).subject)


def distinguished_name(name) -> str:
    """A certificate's subject as QEMU's tls-authz sees it: GnuTLS's compatible form, the
    RDNs in certificate order (``O=mfd,CN=mfd-client``; RFC 4514 reverses them)."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


def _relay(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    """Move bytes both ways until both directions ended. Each direction reads its source
    only once what it read before has all been written (bounded memory, back-pressure both
    ways), and neither direction's wait blocks the other."""
    plain.setblocking(False)
    down = bytearray(BUFFER)  # TLS -> plaintext
    up = bytearray(BUFFER)  # plaintext -> TLS
    down_view = up_view = memoryview(b"")
    tls_in = plain_in = True  # the sides still readable
    tls_out = plain_out = True  # our close_notify not sent yet; plaintext not shut yet
    linger = 0.0
    while True:
        if tls_in and not down_view:
            mv, n = memoryview(down), 0
            try:  # a read returns one record (<= 16 KiB): gather several
                while n < BUFFER - (1 << 14):
                    got = tls.recv_into(mv[n:])
                    if got == 0:
                        tls_in = False
                        break
                    n += got
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # with or without close_notify
                tls_in = False
            down_view = mv[:n]
        if down_view:
            with contextlib.suppress(BlockingIOError):
                down_view = down_view[plain.send(down_view):]
        if not tls_in and not down_view and plain_out:
            plain_out = False
            with contextlib.suppress(OSError):
                plain.shutdown(socket.SHUT_WR)
        if plain_in and not up_view:
            try:
                n = plain.recv_into(up)
            except BlockingIOError:
                n = -1
            if n == 0:
                plain_in = False
            elif n > 0:
                up_view = memoryview(up)[:n]
        if up_view:
            with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                tls.send(up_view)  # all or nothing (OpenSSL retries with the same buffer)
                up_view = memoryview(b"")
        if not plain_in and not up_view and tls_out:
            tls_out = False
            try:  # our close_notify (QEMU's multifd "bye")
                tls.unwrap()
                tls_in = False  # theirs had come too: TLS is over (and the socket plain)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # theirs is still to come
            except OSError:
                tls_in = False
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_WR)
            linger = time.monotonic() + LINGER_S  # the peer's last bytes, then its end
        if not tls_out and ((not tls_in and not down_view) or time.monotonic() > linger):
            return
        if tls_in and not down_view and tls.pending():
            continue
        r = [s for s, want in ((tls, tls_in and not down_view),
                               (plain, plain_in and not up_view)) if want]
        w = [s for s, want in ((plain, bool(down_view)), (tls, bool(up_view))) if want]
        select.select(r, w, [], 0.1 if not tls_out else 1.0)


def _serve(net: socket.socket, plain: socket.socket, opts: TLSOptions, server: bool) -> int:
    """The relay's life: the handshake, its result on ``plain``, then the bytes both ways;
    its exit status."""
    try:
        tls = _handshake(net, opts, server)
    except (_Refused, ssl.SSLError, OSError) as e:
        with contextlib.suppress(OSError):
            plain.sendall(FAILED + _reason(e).encode())
        return 1
    plain.sendall(OK)
    try:
        _relay(tls, plain)
    except OSError:  # either side broke (or its owner left): the other sees a reset
        for s in (tls, plain):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        return 1
    return 0
