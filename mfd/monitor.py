"""A QMP-style monitor for a running migration: JSON on a unix socket, with QEMU's names.

People who drive QEMU with ``socat`` or qmp-shell style scripts drive mfd the same way. A
background thread in the migration's main process serves any number of clients; the migration
itself only ever calls :meth:`MonitorServer.emit`, which never blocks::

    clients (socat, scripts, mfd.qmp's client)
        |  unix socket: a stream of JSON requests, one JSON reply per line
        v
    monitor thread: one selector over the listener, the clients and a wake pipe
        |  frame, parse, check, dispatch
        v
    MonitorHandlers (the migration's state, called on the monitor thread)

    migration --emit()--> event queue --wake pipe--> monitor thread --> negotiated clients

Protocol (mirrors QEMU 10's ``monitor/qmp.c`` and ``qapi/qmp-dispatch.c``, including the
error texts, checked against ``qemu-system-x86_64 -qmp``):

* On connect the server sends a greeting::

      {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
                           "package": "mfd 0.1.0"}, "capabilities": []}}

* The client sends ``{"execute": "qmp_capabilities"}`` first. Until then every other command
  gets ``{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation
  with 'qmp_capabilities'"}}`` and no events are sent to it.
* A request is ``{"execute": NAME, "arguments": {...}, "id": ANY}``; ``arguments`` and ``id``
  are optional and ``id`` is echoed in the reply. A reply is ``{"return": ...}`` or
  ``{"error": {"class": CLASS, "desc": TEXT}}``, one JSON object per line, ended by ``\\r\\n``
  as QEMU ends them. Malformed JSON or a request that is not an object gets a
  ``GenericError`` reply and the connection stays open.
* Requests may be split anywhere across reads or arrive several per read, with or without
  newlines between them: framing counts braces outside strings, as QEMU's json-streamer does
  (QEMU's legacy Python client sends no newline). Top-level text that does not start with
  ``{`` or ``[`` runs to the end of its line and gets one error reply.
* Commands: ``qmp_capabilities``, ``query-commands``, ``query-migrate``,
  ``query-migrate-parameters``, ``query-migrate-capabilities``, ``migrate-set-parameters``
  (the arguments are the parameters, QEMU's names), ``migrate-set-capabilities``
  (``{"capabilities": [{"capability": "auto-converge", "state": true}]}``),
  ``migrate_cancel``. An unknown one gets ``CommandNotFound`` "The command X has not been found".
* Events go to negotiated clients only::

      {"event": "MIGRATION", "data": {"status": "active"},
       "timestamp": {"seconds": 1700000000, "microseconds": 123456}}

* Bounds, so no client can make the monitor (or the migration) wait or buffer without end:
  a client with more than 1 MiB of input that is not yet a whole request, or more than 1 MiB
  of replies and events it does not read, is disconnected; while 64 KiB of its replies are
  unread its further requests wait. At most 32 clients at once. The socket is created mode
  0600: whoever can connect can cancel the migration.

Example::

    $ socat - UNIX-CONNECT:/tmp/mfd-run/migrate.qmp
    {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, ...
    {"execute": "qmp_capabilities"}
    {"return": {}}
    {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 104857600}}
    {"return": {}}
    {"execute": "query-migrate", "id": 1}
    {"return": {"status": "active", "total-time": 1234, "ram": {...}}, "id": 1}

or from a script: ``mfd.qmp.monitor_command("/tmp/mfd-run/migrate.qmp", "query-migrate")``
(:mod:`mfd.qmp` is the client; this module is the server).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from mfd import __version__
from mfd.errors import MfdError

MAX_INPUT = 1 << 20  # bytes of one client's input that are not yet a whole request
MAX_OUTPUT = 1 << 20  # bytes of replies and events one client has left unread
OUTPUT_HIGH = 64 << 10  # a client's next requests wait while this much of its output is unread
MAX_CLIENTS = 32  # connections at once: the migration needs its file descriptors more
MAX_EVENTS = 1024  # events queued while the monitor thread is busy; beyond, the oldest drop
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the monitor thread (a handler may be running)
_RECV = 65536
_ENCODE = orjson.OPT_SERIALIZE_NUMPY  # counters may be numpy integers
_NEGOTIATE = "Expecting capabilities negotiation with 'qmp_capabilities'"


class MonitorHandlers(Protocol):
    """What the monitor asks of a migration. Every method runs on the monitor thread.

    Keep them short and thread-safe (read a snapshot under the migration's lock, or hand a
    request over): while one runs, no client is served. Raise :class:`MfdError` with one line
    to refuse (it becomes the ``desc`` of a ``GenericError`` reply); any other exception is
    reported as an internal error to the client and never ends the monitor.
    """

    def query_migrate(self) -> dict[str, Any]:
        """QEMU's ``query-migrate`` reply (``MigrationStats.query_migrate()``)."""
        ...

    def query_migrate_parameters(self) -> dict[str, Any]:
        """QEMU's ``query-migrate-parameters`` (``MigrationParameters.to_qmp()``)."""
        ...

    def query_migrate_capabilities(self) -> list[dict[str, Any]]:
        """``[{"capability": "auto-converge", "state": false}, ...]``."""
        ...

    def migrate_set_parameters(self, args: dict[str, Any]) -> None:
        """Apply parameters named as QEMU names them (``max-bandwidth``); check every value."""
        ...

    def migrate_set_capabilities(self, capabilities: list[dict[str, Any]]) -> None:
        """Apply ``[{"capability": str, "state": bool}, ...]`` (shapes already checked)."""
        ...

    def migrate_cancel(self) -> None:
        """Ask the migration to cancel; return without waiting for it to stop."""
        ...

    def migrate_start_postcopy(self) -> None:
        """Switch to postcopy at the end of the current round (a source with postcopy-ram)."""
        ...


class _QmpError(Exception):
    """A request refused before reaching a handler; ``qmp_class`` is QEMU's ErrorClass."""

    def __init__(self, desc: str, qmp_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.qmp_class = qmp_class


def _error(desc: str, qmp_class: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": qmp_class, "desc": desc}}


def _encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message, option=_ENCODE) + b"\r\n"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


# ----------------------------------------------------------------------- framing


class _JsonStream:
    """Cuts a byte stream into top-level JSON texts, as QEMU's json-streamer does.

    A text starting with ``{`` or ``[`` ends where its braces and brackets balance outside
    strings; anything else runs to the end of its line. Each byte is scanned once, however
    the stream was split (the regexes jump between the bytes that matter).
    """

    _STRUCTURE = re.compile(rb'[{}\[\]"]')
    _STRING = re.compile(rb'["\\]')
    _TEXT = re.compile(rb"[^ \t\r\n]")  # JSON's whitespace between texts

    def __init__(self) -> None:
        self.buf = bytearray()  # bytes received and not yet returned by next()
        self._pos = 0  # where scanning resumes inside the current text
        self._depth = 0  # open braces and brackets of the current text
        self._in_string = False  # the scan stopped inside a JSON string

    def feed(self, data: bytes) -> None:
        self.buf += data

    def pending(self) -> int:
        return len(self.buf)

    def next(self) -> bytes | None:
        """The next whole text, or None until more bytes arrive."""
        buf = self.buf
        if self._depth == 0:
            m = self._TEXT.search(buf)
            if m is None:
                buf.clear()
                return None
            del buf[: m.start()]
            if buf[0] not in b"{[":
                end = buf.find(b"\n")
                if end < 0:
                    return None
                text = bytes(buf[:end])
                del buf[: end + 1]
                return text
            self._pos = 0
        while True:
            if self._in_string:
                m = self._STRING.search(buf, self._pos)
                if m is None:
                    self._pos = max(self._pos, len(buf))  # keep the skip past a trailing backslash
                    return None
                if m.group() == b"\\":
                    self._pos = m.end() + 1  # past the escaped byte, perhaps not received yet
                    continue
                self._in_string = False
            else:
                m = self._STRUCTURE.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    return None
                c = m.group()
                if c == b'"':
                    self._in_string = True
                elif c in (b"{", b"["):
                    self._depth += 1
                else:
                    self._depth -= 1
            self._pos = m.end()
            if self._depth == 0:
                text = bytes(buf[: self._pos])
                del buf[: self._pos]
                self._pos = 0
                return text


# ----------------------------------------------------------------------- commands


class _Client:
    """One connection; owned by the monitor thread from accept to close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stream = _JsonStream()
        self.out = bytearray()  # encoded replies and events not yet sent
        self.negotiated = False  # qmp_capabilities done: commands and events allowed
        self.eof = False  # the peer sends no more: close once its replies are out
        self.mask = selectors.EVENT_READ  # what the selector waits for on this socket
        self.closed = False


_Command = Callable[[MonitorHandlers, _Client, dict[str, Any]], Any]


def _no_arguments(args: dict[str, Any]) -> None:
    if args:
        raise _QmpError(f"Parameter '{next(iter(args))}' is unexpected")


def _expect(value: object, kind: type, what: str, name: str) -> None:
    if not isinstance(value, kind):
        raise _QmpError(f"Invalid parameter type for '{name}', expected: {what}")


def _qmp_capabilities(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    if c.negotiated:
        raise _QmpError("Capabilities negotiation is already complete, command ignored",
                        "CommandNotFound")
    enable = args.get("enable", [])
    _expect(enable, list, "array", "enable")
    if enable:  # the greeting offers no capability (no out-of-band execution)
        _expect(enable[0], str, "string", "enable[0]")
        raise _QmpError(f"Capability '{enable[0]}' not available")
    _no_arguments({k: v for k, v in args.items() if k != "enable"})
    c.negotiated = True
    return {}


def _query_commands(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    _no_arguments(args)
    return [{"name": name} for name in _COMMANDS]


def _query_migrate(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    _no_arguments(args)
    return h.query_migrate()


def _query_migrate_parameters(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    _no_arguments(args)
    return h.query_migrate_parameters()


def _query_migrate_capabilities(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    _no_arguments(args)
    return h.query_migrate_capabilities()


def _migrate_set_parameters(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    return h.migrate_set_parameters(args)  # names and values are the handler's to check


def _migrate_set_capabilities(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    """Checks the shape as QAPI's visitor would; which capabilities exist is the handler's."""
    if "capabilities" not in args:
        raise _QmpError("Parameter 'capabilities' is missing")
    caps = args["capabilities"]
    _expect(caps, list, "array", "capabilities")
    for i, cap in enumerate(caps):
        where = f"capabilities[{i}]"
        _expect(cap, dict, "object", where)
        for member, kind, what in (("capability", str, "string"), ("state", bool, "boolean")):
            if member not in cap:
                raise _QmpError(f"Parameter '{where}.{member}' is missing")
            _expect(cap[member], kind, what, f"{where}.{member}")
        extra = [k for k in cap if k not in ("capability", "state")]
        if extra:
            raise _QmpError(f"Parameter '{where}.{extra[0]}' is unexpected")
    _no_arguments({k: v for k, v in args.items() if k != "capabilities"})
    return h.migrate_set_capabilities(caps)


def _migrate_cancel(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    _no_arguments(args)
    return h.migrate_cancel()


def _migrate_start_postcopy(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    _no_arguments(args)
    start = getattr(h, "migrate_start_postcopy", None)
    if start is None:
        raise MfdError("migrate-start-postcopy: this end is not a migration's source")
    return start()


def _migrate(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    """QEMU's ``migrate``: here only to resume a postcopy-paused migration."""
    uri, resume = args.get("uri"), args.get("resume", False)
    _expect(uri, str, "string", "uri")
    _expect(resume, bool, "boolean", "resume")
    _no_arguments({k: v for k, v in args.items() if k not in ("uri", "resume")})
    start = getattr(h, "migrate_resume", None)
    if not resume or start is None:
        raise MfdError("migrate: a migration is in progress here (only resume=true, on a "
                       "source in postcopy-paused)")
    return start(uri)


def _migrate_recover(h: MonitorHandlers, c: _Client, args: dict[str, Any]) -> Any:
    uri = args.get("uri")
    _expect(uri, str, "string", "uri")
    _no_arguments({k: v for k, v in args.items() if k != "uri"})
    recover = getattr(h, "migrate_recover", None)
    if recover is None:
        raise MfdError("migrate-recover: this end is not a migration's destination")
    return recover(uri)


_COMMANDS: dict[str, _Command] = {
    "qmp_capabilities": _qmp_capabilities,
    "query-commands": _query_commands,
    "query-migrate": _query_migrate,
    "query-migrate-parameters": _query_migrate_parameters,
    "query-migrate-capabilities": _query_migrate_capabilities,
    "migrate-set-parameters": _migrate_set_parameters,
    "migrate-set-capabilities": _migrate_set_capabilities,
    "migrate_cancel": _migrate_cancel,
    "migrate-start-postcopy": _migrate_start_postcopy,
    "migrate": _migrate,
    "migrate-recover": _migrate_recover,
}


# ----------------------------------------------------------------------- server


def _clear_stale(path: str) -> None:
    """Remove a socket file left by a process that is gone; refuse a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise MfdError(f"monitor path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nobody listens: stale
    except (TimeoutError, BlockingIOError):  # a listener with a full backlog is alive
        raise MfdError(f"monitor socket {path} is in use by another process") from None
    except OSError as e:
        raise MfdError(f"cannot check monitor socket {path}: {_why(e)}") from None
    else:
        raise MfdError(f"monitor socket {path} is in use by another process")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class MonitorServer:
    """Serves the monitor at ``path`` on a background thread until :meth:`close`.

    The thread owns the listener, the selector and every client; other threads reach it only
    through the event queue and the wake pipe (both guarded by ``_lock``).
    """

    def __init__(self, path: str, handlers: MonitorHandlers) -> None:
        self.path = path
        self.handlers = handlers
        self._greeting = _encode({"QMP": {
            "version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
                        "package": f"mfd {__version__}"},
            "capabilities": [],
        }})
        self._lock = threading.Lock()  # guards the fields below; pairs with emit() and close()
        self._events: deque[bytes] = deque(maxlen=MAX_EVENTS)
        self._wake_r = -1  # wake pipe: a byte written wakes the monitor thread's select()
        self._wake_w = -1
        self._stopping = False  # set by close() or by the thread's exit; emit() drops events
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        # Owned by the monitor thread once started:
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._clients: set[_Client] = set()

    # ------------------------------------------------------------------- public

    def start(self) -> None:
        """Create the socket and start serving; raise MfdError if ``path`` is taken."""
        with self._lock:
            if self._thread is not None or self._closed:
                raise MfdError(f"monitor {self.path} was already started")
        _clear_stale(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
        except OSError as e:
            listener.close()
            raise MfdError(f"cannot create monitor socket {self.path}: {_why(e)}") from None
        fds: list[int] = []
        try:
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o600)  # before listen(): until then every connect is refused
            listener.listen(16)
            listener.setblocking(False)
            fds.extend(os.pipe())
            for fd in fds:
                os.set_blocking(fd, False)
            selector = selectors.DefaultSelector()
            selector.register(listener, selectors.EVENT_READ)
            selector.register(fds[0], selectors.EVENT_READ)
        except BaseException:
            listener.close()
            for fd in fds:
                os.close(fd)
            self._unlink()
            raise
        self._listener, self._selector = listener, selector
        self._wake_r, self._wake_w = fds
        thread = threading.Thread(target=self._serve, daemon=True,
                                  name=f"mfd-monitor {os.path.basename(self.path)}")
        with self._lock:
            self._thread = thread
        thread.start()

    def close(self) -> None:
        """Stop serving, remove the socket file, wait for the thread (bounded). Idempotent.

        Events already emitted and replies already made are sent if the client's socket takes
        them without blocking. Safe to call from a handler (then it does not wait).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None and not self._stopping:
                self._stopping = True
                self._poke()
        self._unlink()  # first, so new clients fail at once instead of waiting in the backlog
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_TIMEOUT)  # a handler that never returns keeps it (a daemon)

    @property
    def running(self) -> bool:
        """True while the monitor thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Send a QMP event to every negotiated client; callable from any thread, never blocks.

        Dropped when the monitor is not running. ``data`` must be JSON-serializable (a
        TypeError here is the caller's bug).
        """
        now = time.time()
        seconds = int(now)
        line = _encode({"event": event, "data": data,
                        "timestamp": {"seconds": seconds,
                                      "microseconds": int((now - seconds) * 1e6)}})
        with self._lock:
            if self._stopping or self._wake_w < 0:
                return
            self._events.append(line)
            self._poke()

    def __enter__(self) -> MonitorServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- any thread

    def _poke(self) -> None:
        """Wake the monitor thread. Caller holds ``_lock`` (so the pipe cannot close under us)."""
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes it
            os.write(self._wake_w, b"\0")

    def _unlink(self) -> None:
        """Remove the socket file if it is still the one we bound (not a successor's)."""
        if self._ident is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)

    # ------------------------------------------------------------------- monitor thread

    def _serve(self) -> None:
        selector, listener = self._selector, self._listener
        assert selector is not None and listener is not None
        try:
            while not self._stopping:
                for key, mask in selector.select():
                    if self._stopping:
                        break
                    if key.fileobj is listener:
                        self._accept()
                    elif key.fileobj == self._wake_r:
                        self._wake()
                    else:
                        client: _Client = key.data
                        try:
                            self._service(client, mask)
                        except Exception:  # a bug in this module costs one connection only
                            self._drop(client)
        finally:
            with contextlib.suppress(Exception):
                self._wake()  # last events (e.g. MIGRATION completed) and replies, best effort
            for client in list(self._clients):
                self._drop(client)
            selector.close()
            listener.close()
            with self._lock:
                self._stopping = True
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError:  # EMFILE and friends: the connection waits in the backlog
                time.sleep(0.05)  # without spinning while the process is short of descriptors
                return
            sock.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                with contextlib.suppress(OSError):
                    sock.send(_encode(_error(f"too many monitor clients ({MAX_CLIENTS})")),
                              socket.MSG_NOSIGNAL)
                sock.close()
                continue
            client = _Client(sock)
            self._clients.add(client)
            self._selector.register(sock, client.mask, client)
            client.out += self._greeting
            self._progress(client)

    def _wake(self) -> None:
        """Drain the wake pipe and hand queued events to negotiated clients."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._lock:
            events = list(self._events)
            self._events.clear()
        if not events:
            return
        for client in list(self._clients):
            if client.negotiated and not client.closed:
                for line in events:
                    client.out += line
                self._progress(client)

    def _service(self, client: _Client, mask: int) -> None:
        if client.closed:  # dropped earlier in this round of select()
            return
        if mask & selectors.EVENT_READ:
            try:
                data = client.sock.recv(_RECV)
            except BlockingIOError:
                data = None
            except OSError:  # ECONNRESET: the client went away abruptly
                self._drop(client)
                return
            if data == b"":
                client.eof = True
            elif data:
                client.stream.feed(data)
        self._progress(client)

    def _progress(self, client: _Client) -> None:
        """Answer the client's whole requests and send its output, as far as neither blocks.

        Requests wait while OUTPUT_HIGH bytes of output are unsent, so a client that does not
        read its replies stops being served instead of growing our buffer.
        """
        while True:
            while len(client.out) < OUTPUT_HIGH:
                text = client.stream.next()
                if text is None:
                    break
                client.out += self._handle(client, text)
            backed_up = len(client.out) >= OUTPUT_HIGH
            if not self._send(client):
                return
            if not (backed_up and len(client.out) < OUTPUT_HIGH):
                break
        backed_up = len(client.out) >= OUTPUT_HIGH
        if len(client.out) > MAX_OUTPUT:
            self._drop(client)  # it reads neither replies nor events
            return
        if not backed_up and client.stream.pending() > MAX_INPUT:
            self._drop(client)  # one request larger than any real one
            return
        if client.eof and not backed_up and not client.out:
            self._drop(client)  # all answered (what is left is half a request)
            return
        mask = 0 if client.eof or backed_up else selectors.EVENT_READ
        if client.out:
            mask |= selectors.EVENT_WRITE
        assert mask, "a client the selector would never wake"
        if mask != client.mask:
            assert self._selector is not None
            self._selector.modify(client.sock, mask, client)
            client.mask = mask

    def _send(self, client: _Client) -> bool:
        """Send what the socket takes now; False if the client is gone (and dropped)."""
        while client.out:
            try:
                n = client.sock.send(client.out, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError:  # EPIPE, ECONNRESET
                self._drop(client)
                return False
            del client.out[:n]
        return True

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self._clients.discard(client)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        client.sock.close()

    def _handle(self, client: _Client, text: bytes) -> bytes:
        """One request's encoded reply."""
        try:
            request = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            return _encode(_error(f"JSON parse error, {e}"))
        if not isinstance(request, dict):
            return _encode(_error("QMP input must be a JSON object"))
        reply = self._execute(client, request)
        if "id" in request:
            reply["id"] = request["id"]
        try:
            return _encode(reply)
        except orjson.JSONEncodeError as e:  # a handler returned something JSON cannot hold
            reply = _error(f"internal error: cannot encode the reply: {e}")
            if "id" in request:
                reply["id"] = request["id"]
            return _encode(reply)

    def _execute(self, client: _Client, request: dict[str, Any]) -> dict[str, Any]:
        """Mirrors ``qmp_dispatch``: check the members, then negotiation, then the command."""
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    return _error("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return _error("QMP input member 'arguments' must be an object")
            elif key != "id":
                return _error(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            return _error("QMP input lacks member 'execute'")
        name = request["execute"]
        if not client.negotiated and name != "qmp_capabilities":
            return _error(_NEGOTIATE, "CommandNotFound")
        command = _COMMANDS.get(name)
        if command is None:
            return _error(f"The command {name} has not been found", "CommandNotFound")
        try:
            result = command(self.handlers, client, request.get("arguments", {}))
        except _QmpError as e:
            return _error(str(e), e.qmp_class)
        except MfdError as e:
            return _error(str(e))
        except Exception as e:  # a handler's bug: one reply, never the end of the monitor
            return _error(f"internal error: {type(e).__name__}: {e}")
        return {"return": {} if result is None else result}
