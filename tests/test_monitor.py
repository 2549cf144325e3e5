"""The QMP-style monitor over real unix sockets, with a fake migration behind it.

Every read has a deadline: a missing reply fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Any

import orjson
import pytest

import mfd
from mfd.errors import MfdError
from mfd.monitor import MAX_CLIENTS, MAX_INPUT, MonitorServer
from mfd.qmp import monitor_command

WAIT = 5.0  # longest wait for anything the server should send; never reached when it works
QUIET = 0.2  # how long "nothing arrives" is watched


class FakeMigration:
    """MonitorHandlers that records every call; ``fail[name]`` makes that method raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, Exception] = {}
        self.parameters: dict[str, Any] = {"max-bandwidth": 0, "multifd-channels": 2}
        self.capabilities = [{"capability": "auto-converge", "state": False}]
        self.gate: threading.Event | None = None  # query_migrate waits for it when set
        self.on_cancel: Any = None  # called by migrate_cancel

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def query_migrate(self) -> dict[str, Any]:
        self._call("query_migrate")
        if self.gate is not None:
            self.gate.wait(WAIT)
        return {"status": "active", "ram": {"transferred": 4096, "total": 1 << 20}}

    def query_migrate_parameters(self) -> dict[str, Any]:
        self._call("query_migrate_parameters")
        return self.parameters

    def query_migrate_capabilities(self) -> list[dict[str, Any]]:
        self._call("query_migrate_capabilities")
        return self.capabilities

    def migrate_set_parameters(self, args: dict[str, Any]) -> None:
        self._call("migrate_set_parameters", args)

    def migrate_set_capabilities(self, capabilities: list[dict[str, Any]]) -> None:
        self._call("migrate_set_capabilities", capabilities)

    def migrate_cancel(self) -> None:
        self._call("migrate_cancel")
        if self.on_cancel is not None:
            self.on_cancel()


class Client:
    """A raw QMP client: bytes in, one parsed JSON line out, every read bounded."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else orjson.dumps(data) + b"\n")

    def _line(self, timeout: float) -> bytes | None:
        """The next line, or None if the server closed the connection first."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def message(self, timeout: float = WAIT) -> dict[str, Any]:
        try:
            line = self._line(timeout)
        except TimeoutError:
            raise AssertionError(f"no message within {timeout} s") from None
        assert line is not None, "the server closed the connection"
        assert line.endswith(b"\r"), "QEMU ends every message with \\r\\n"
        msg = orjson.loads(line)
        assert isinstance(msg, dict)
        return msg

    def nothing(self, wait: float = QUIET) -> None:
        try:
            line = self._line(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {line!r}")

    def closed(self, timeout: float = WAIT) -> int:
        """Read until the server closes the connection; return how many messages came first."""
        n = 0
        while True:
            try:
                line = self._line(timeout)
            except TimeoutError:
                raise AssertionError(f"still open after {timeout} s") from None
            if line is None:
                return n
            n += 1

    def negotiate(self) -> Client:
        assert "QMP" in self.message()
        self.send({"execute": "qmp_capabilities"})
        assert self.message() == {"return": {}}
        return self

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                **members: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": command, **members}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(request)
        return self.message()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sock_dir():
    # Not tmp_path: a unix socket path has at most 107 bytes, and pytest's can be longer.
    d = tempfile.mkdtemp(prefix="mfdmon-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake() -> FakeMigration:
    return FakeMigration()


@pytest.fixture
def monitor(sock_dir, fake):
    m = MonitorServer(os.path.join(sock_dir, "m.qmp"), fake)
    m.start()
    yield m
    m.close()
    assert not m.running


@pytest.fixture
def connect(monitor):
    """``connect()`` opens a raw client to the monitor; all are closed after the test."""
    clients: list[Client] = []

    def _connect(negotiate: bool = True) -> Client:
        c = Client(monitor.path)
        clients.append(c)
        return c.negotiate() if negotiate else c

    yield _connect
    for c in clients:
        c.close()


def _error(desc: str, qmp_class: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": qmp_class, "desc": desc}}


NEGOTIATE = _error("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")


# ----------------------------------------------------------------------- protocol


def test_greeting_and_negotiation(connect, fake):
    c = connect(negotiate=False)
    assert c.message() == {"QMP": {
        "version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
                    "package": f"mfd {mfd.__version__}"},
        "capabilities": []}}
    assert c.execute("query-migrate") == NEGOTIATE
    assert c.execute("no-such-command") == NEGOTIATE  # as QEMU: negotiation comes first
    assert c.execute("qmp_capabilities", {"enable": ["oob"]}) == _error(
        "Capability 'oob' not available")
    assert c.execute("qmp_capabilities") == {"return": {}}
    assert c.execute("qmp_capabilities") == _error(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    assert c.execute("query-migrate")["return"]["status"] == "active"
    assert fake.calls == [("query_migrate",)]


def test_each_command(monitor, connect, fake):
    assert monitor_command(monitor.path, "query-migrate") == {
        "return": {"status": "active", "ram": {"transferred": 4096, "total": 1 << 20}}}
    assert monitor_command(monitor.path, "query-migrate-parameters") == {
        "return": fake.parameters}
    assert monitor_command(monitor.path, "query-migrate-capabilities") == {
        "return": fake.capabilities}
    c = connect()
    assert c.execute("migrate-set-parameters", {"max-bandwidth": 1000}) == {"return": {}}
    assert c.execute("migrate-set-parameters", {}) == {"return": {}}
    caps = [{"capability": "auto-converge", "state": True},
            {"capability": "mapped-ram", "state": False}]
    assert c.execute("migrate-set-capabilities", {"capabilities": caps}) == {"return": {}}
    assert c.execute("migrate_cancel") == {"return": {}}
    assert fake.calls == [
        ("query_migrate",), ("query_migrate_parameters",), ("query_migrate_capabilities",),
        ("migrate_set_parameters", {"max-bandwidth": 1000}), ("migrate_set_parameters", {}),
        ("migrate_set_capabilities", caps), ("migrate_cancel",)]
    names = {x["name"] for x in c.execute("query-commands")["return"]}
    assert names == {"qmp_capabilities", "query-commands", "query-migrate",
                     "query-migrate-parameters", "query-migrate-capabilities",
                     "migrate-set-parameters", "migrate-set-capabilities", "migrate_cancel",
                     "migrate-start-postcopy", "migrate", "migrate-recover"}
    # postcopy's: refused where the handlers have no such thing (tests/test_postcopy.py
    # drives them on real migrations), and their arguments checked as QEMU does
    assert c.execute("migrate-start-postcopy")["error"]["class"] == "GenericError"
    assert c.execute("migrate", {"uri": "tcp:h:1"})["error"]["desc"].startswith(
        "migrate: a migration is in progress here")
    assert c.execute("migrate", {"uri": 5})["error"]["desc"] == \
        "Invalid parameter type for 'uri', expected: string"
    assert c.execute("migrate-recover", {"uri": "tcp:h:1"})["error"]["class"] == "GenericError"


def test_id_is_echoed(connect):
    c = connect(negotiate=False)
    assert "QMP" in c.message()
    assert c.execute("query-migrate", id=7) == {**NEGOTIATE, "id": 7}
    assert c.execute("qmp_capabilities", id="neg") == {"return": {}, "id": "neg"}
    assert c.execute("migrate_cancel", id={"n": [1, 2]}) == {"return": {}, "id": {"n": [1, 2]}}
    assert c.execute("nope", id=None) == {
        **_error("The command nope has not been found", "CommandNotFound"), "id": None}
    assert c.execute("migrate_cancel", {"x": 1}, id=3) == {
        **_error("Parameter 'x' is unexpected"), "id": 3}


def test_unknown_command(connect):
    c = connect()
    assert c.execute("migrate-pause") == _error("The command migrate-pause has not been "
                                                "found", "CommandNotFound")
    assert c.execute("query-migrate")["return"]["status"] == "active"


@pytest.mark.parametrize(("data", "desc"), [
    (b'{"execute": }\n', "JSON parse error, "),
    (b"garbage\n", "JSON parse error, "),
    (b"}\n", "JSON parse error, "),
    (b'{"execute": "query-migrate"\xff}\n', "JSON parse error, "),
    (b"42\n", "QMP input must be a JSON object"),
    (b'"query-migrate"\n', "QMP input must be a JSON object"),
    (b'[{"execute": "query-migrate"}]', "QMP input must be a JSON object"),
    (b'{"id": 1}', "QMP input lacks member 'execute'"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "query-migrate", "arguments": []}',
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": "query-migrate", "foo": 1}', "QMP input member 'foo' is unexpected"),
])
def test_malformed_input_gets_an_error_and_the_connection_stays(connect, fake, data, desc):
    c = connect()
    c.send(data)
    reply = c.message()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc)
    c.nothing()  # exactly one reply
    assert c.execute("query-migrate")["return"]["status"] == "active"
    assert fake.calls == [("query_migrate",)]


@pytest.mark.parametrize(("command", "arguments", "desc"), [
    ("migrate_cancel", {"now": True}, "Parameter 'now' is unexpected"),
    ("query-migrate", {"x": 1}, "Parameter 'x' is unexpected"),
    ("qmp_capabilities", {"foo": 1}, "Capabilities negotiation is already complete, "
                                     "command ignored"),
    ("migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
    ("migrate-set-capabilities", {"capabilities": 1},
     "Invalid parameter type for 'capabilities', expected: array"),
    ("migrate-set-capabilities", {"capabilities": [1]},
     "Invalid parameter type for 'capabilities[0]', expected: object"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "auto-converge"}]},
     "Parameter 'capabilities[0].state' is missing"),
    ("migrate-set-capabilities",
     {"capabilities": [{"capability": "auto-converge", "state": True},
                       {"capability": "x", "state": 1}]},
     "Invalid parameter type for 'capabilities[1].state', expected: boolean"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": 5, "state": True}]},
     "Invalid parameter type for 'capabilities[0].capability', expected: string"),
    ("migrate-set-capabilities",
     {"capabilities": [{"capability": "x", "state": True, "y": 0}]},
     "Parameter 'capabilities[0].y' is unexpected"),
    ("migrate-set-capabilities", {"capabilities": [], "z": 0}, "Parameter 'z' is unexpected"),
])
def test_arguments_are_checked_before_the_handler(connect, fake, command, arguments, desc):
    """QEMU's texts (QAPI's visitor); the handler only ever sees well-formed arguments."""
    c = connect()
    reply = c.execute(command, arguments)
    assert reply["error"]["desc"] == desc
    assert fake.calls == []


def test_split_input(connect, fake):
    """A request cut anywhere, even inside a string and after a backslash, is one request."""
    c = connect()
    request = (b'{"execute": "migrate-set-parameters", "id": "a\\"}",'
               b' "arguments": {"tls-hostname": "x}{\\\\\\"[", "n": [1, {"m": 2}]}}')
    # every cut next to a quote, a backslash or a brace, where a framing bug would show
    cuts = sorted({i + d for i, ch in enumerate(request) if ch in b'\\"{}[]' for d in (0, 1)}
                  - {0, len(request)})
    for cut in cuts:
        fake.calls.clear()
        c.send(request[:cut])
        time.sleep(0.005)  # two reads on the server side
        c.send(request[cut:])
        assert c.message() == {"return": {}, "id": 'a"}'}, cut
        assert fake.calls == [("migrate_set_parameters",
                               {"tls-hostname": 'x}{\\"[', "n": [1, {"m": 2}]})]
    c.nothing()
    for b in request:  # one byte at a time
        c.send(bytes([b]))
    assert c.message()["id"] == 'a"}'


def test_batched_input(connect):
    """Several requests per read, with or without newlines between them, answered in order."""
    c = connect()
    c.send(b'{"execute": "query-migrate", "id": 1}{"execute": "migrate_cancel", "id": 2}\n'
           b'\n  {"execute": "nope", "id": 3}\r\n{"execute": "query-commands", "id": 4}'
           b'{"execute": "query-migrate-parameters", "id": 5}')
    assert [c.message()["id"] for _ in range(5)] == [1, 2, 3, 4, 5]
    c.nothing()


def test_half_closed_client_gets_its_replies(monitor):
    """``printf ... | socat - UNIX-CONNECT:...``: requests, then EOF, then the replies."""
    c = Client(monitor.path)
    c.send(b'{"execute": "qmp_capabilities"}{"execute": "query-migrate"}')
    c.sock.shutdown(socket.SHUT_WR)
    assert "QMP" in c.message()
    assert c.message() == {"return": {}}
    assert c.message()["return"]["status"] == "active"
    assert c.closed() == 0
    c.close()


def test_handler_errors_become_replies(monitor, connect, fake):
    c = connect()
    fake.fail["query_migrate"] = MfdError("no migration is running")
    assert c.execute("query-migrate") == _error("no migration is running")
    fake.fail["migrate_cancel"] = RuntimeError("a bug")
    assert c.execute("migrate_cancel", id=1) == {
        **_error("internal error: RuntimeError: a bug"), "id": 1}
    fake.parameters = {"bad": object()}  # not JSON
    reply = c.execute("query-migrate-parameters", id=2)
    assert reply["id"] == 2 and reply["error"]["desc"].startswith(
        "internal error: cannot encode the reply")
    del fake.fail["query_migrate"]
    assert c.execute("query-migrate")["return"]["status"] == "active"
    assert monitor.running


# ----------------------------------------------------------------------- many clients


def test_two_clients_at_once(connect, fake):
    a, b = connect(), connect()
    b.send(b'{"execute": "query-migrate", "id": "b"')  # b stalls mid-request
    for i in range(20):
        assert a.execute("migrate_cancel", id=i) == {"return": {}, "id": i}
    b.send(b"}")
    assert b.message()["id"] == "b"
    assert a.execute("query-migrate", id="a")["id"] == "a"


def test_client_that_does_not_read_does_not_block_others(connect):
    """Its requests wait while its replies pile up; the others are served; nothing is lost."""
    slow, fast = connect(), connect()
    n = 5000  # replies far beyond the socket buffers and the monitor's output mark
    sender = threading.Thread(target=slow.send, daemon=True, args=(b"".join(
        orjson.dumps({"execute": "query-migrate", "id": i}) for i in range(n)),))
    sender.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    for i in range(50):
        assert fast.execute("migrate_cancel", id=i)["id"] == i
    assert time.monotonic() - t0 < 2.0
    assert [slow.message()["id"] for _ in range(n)] == list(range(n))
    sender.join(WAIT)


def test_clients_that_vanish_abruptly(monitor, connect):
    rst = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends a reset
    half = Client(monitor.path)
    half.send(b'{"execute": "qmp_capabilities"}{"execute": "query-mig')
    half.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
    half.close()
    gone = Client(monitor.path)
    gone.send(b'{"execute": "qmp_capabilities"}'
              + b'{"execute": "query-migrate"}' * 2000)  # replies it will never read
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
    gone.close()
    quiet = Client(monitor.path)
    quiet.close()
    c = connect()
    assert c.execute("query-migrate")["return"]["status"] == "active"
    assert monitor.running


@pytest.mark.parametrize("head", [b'{"execute": "', b"not json and no newline "])
def test_oversized_input_disconnects(connect, head):
    big, other = connect(), connect()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):  # hung up mid-way
        big.send(head + b"a" * (MAX_INPUT + (1 << 20)))
        big.sock.settimeout(WAIT)
        big.sock.sendall(b"a" * (4 << 20))
    big.closed()
    assert other.execute("query-migrate")["return"]["status"] == "active"


def test_a_large_request_under_the_bound_is_fine(connect, fake):
    c = connect()
    value = "x" * (MAX_INPUT // 2)
    assert c.execute("migrate-set-parameters", {"note": value}) == {"return": {}}
    assert fake.calls == [("migrate_set_parameters", {"note": value})]


def test_too_many_clients(monitor, connect):
    clients = [connect() for _ in range(MAX_CLIENTS)]
    extra = Client(monitor.path)
    assert extra.message() == _error(f"too many monitor clients ({MAX_CLIENTS})")
    assert extra.closed() == 0
    extra.close()
    clients[0].close()
    clients[1].execute("query-migrate")  # served; and a slot is free again
    deadline = time.monotonic() + WAIT
    while True:  # the server notices the close on its next select
        late = Client(monitor.path)
        if "QMP" in late.message():
            late.close()
            break
        late.close()
        assert time.monotonic() < deadline


# ----------------------------------------------------------------------- events


def test_events_reach_negotiated_clients_only(monitor, connect):
    a, b = connect(), connect(negotiate=False)
    assert "QMP" in b.message()
    before = time.time()
    monitor.emit("MIGRATION", {"status": "active"})
    ev = a.message()
    assert ev["event"] == "MIGRATION" and ev["data"] == {"status": "active"}
    ts = ev["timestamp"]
    assert set(ts) == {"seconds", "microseconds"}
    assert int(before) <= ts["seconds"] <= time.time() and 0 <= ts["microseconds"] < 1_000_000
    b.nothing()
    b.send({"execute": "qmp_capabilities"})
    assert b.message() == {"return": {}}  # the earlier event was not kept for it
    monitor.emit("MIGRATION", {"status": "completed"})
    assert b.message()["data"] == {"status": "completed"}
    assert a.message()["data"] == {"status": "completed"}


def test_emit_from_many_threads(monitor, connect):
    c = connect()

    def emitter(t: int) -> None:
        for i in range(100):
            monitor.emit("T", {"t": t, "i": i})

    threads = [threading.Thread(target=emitter, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    seen: dict[int, list[int]] = {t: [] for t in range(4)}
    for _ in range(400):
        d = c.message()["data"]
        seen[d["t"]].append(d["i"])
    assert all(v == list(range(100)) for v in seen.values())  # each thread's order kept


def test_monitor_command_skips_events(monitor):
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            monitor.emit("MIGRATION_PASS", {"pass": 1})
            time.sleep(0.0005)

    t = threading.Thread(target=chatter, daemon=True)
    t.start()
    try:
        for _ in range(20):
            assert "return" in monitor_command(monitor.path, "query-migrate")
    finally:
        stop.set()
        t.join(WAIT)


def test_emit_never_blocks_on_a_busy_monitor(monitor, connect, fake):
    """While a handler takes its time, emit() stays instant and nothing is lost."""
    c = connect()
    fake.gate = threading.Event()
    c.send({"execute": "query-migrate", "id": "slow"})
    deadline = time.monotonic() + WAIT
    while not fake.calls:  # until the monitor thread is inside query_migrate
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t0 = time.monotonic()
    for i in range(500):
        monitor.emit("MIGRATION_PASS", {"pass": i})
    assert time.monotonic() - t0 < 0.5
    fake.gate.set()
    assert c.message()["id"] == "slow"
    assert [c.message()["data"]["pass"] for _ in range(500)] == list(range(500))


def test_client_that_reads_no_events_is_cut_off(monitor, connect):
    """Events pile up for a client that never reads, up to MAX_OUTPUT; then it is dropped,
    and a client that reads keeps getting every event."""
    reader, stuck = connect(), connect()
    blob = "y" * 8192
    n = 0
    for _ in range(25):  # 25 x 128 KiB: beyond the socket buffer plus MAX_OUTPUT
        for _ in range(16):
            monitor.emit("BIG", {"blob": blob, "i": n})
            n += 1
        for i in range(n - 16, n):
            assert reader.message()["data"]["i"] == i
    got = stuck.closed()
    assert 0 < got < n
    assert reader.execute("query-migrate")["return"]["status"] == "active"


# ----------------------------------------------------------------------- lifetime


def test_close_removes_the_socket_and_ends_the_thread(sock_dir, fake):
    path = os.path.join(sock_dir, "m.qmp")
    m = MonitorServer(path, fake)
    m.emit("EARLY", {})  # not started: dropped, no error
    m.start()
    assert m.running and os.path.exists(path)
    c = Client(path).negotiate()
    m.emit("MIGRATION", {"status": "completed"})
    t0 = time.monotonic()
    m.close()
    assert time.monotonic() - t0 < 2.0
    assert not m.running and not os.path.exists(path)
    assert c.message()["data"] == {"status": "completed"}  # sent before the close
    assert c.closed() == 0
    c.close()
    m.close()  # idempotent
    m.emit("LATE", {})  # dropped
    with pytest.raises(MfdError, match="already started"):
        m.start()
    with pytest.raises(MfdError, match=r"^no monitor at "):
        monitor_command(path, "query-migrate")


def test_context_manager(sock_dir, fake):
    path = os.path.join(sock_dir, "m.qmp")
    with MonitorServer(path, fake) as m:
        assert monitor_command(path, "migrate_cancel") == {"return": {}}
    assert not m.running and not os.path.exists(path)


def test_close_from_a_handler(monitor, connect, fake):
    """migrate_cancel tearing the migration down closes the monitor from its own thread."""
    fake.on_cancel = monitor.close
    c = connect()
    assert c.execute("migrate_cancel") == {"return": {}}
    assert c.closed() == 0
    deadline = time.monotonic() + WAIT
    while monitor.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not os.path.exists(monitor.path)


def test_live_socket_is_refused(monitor, fake):
    with pytest.raises(MfdError, match="is in use by another process") as e:
        MonitorServer(monitor.path, fake).start()
    assert "\n" not in str(e.value)
    assert monitor_command(monitor.path, "query-migrate")["return"]["status"] == "active"


def test_live_foreign_listener_is_refused(sock_dir, fake):
    path = os.path.join(sock_dir, "m.qmp")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(1)
    try:
        with pytest.raises(MfdError, match="is in use by another process"):
            MonitorServer(path, fake).start()
        assert os.path.exists(path)
    finally:
        other.close()


def test_stale_socket_is_replaced(sock_dir, fake):
    path = os.path.join(sock_dir, "m.qmp")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.listen(1)
    dead.close()  # as a killed process leaves it: the file stays, nobody listens
    with pytest.raises(MfdError, match=r"refused the connection"):
        monitor_command(path, "query-migrate")
    with MonitorServer(path, fake):
        assert monitor_command(path, "query-migrate")["return"]["status"] == "active"
    assert not os.path.exists(path)


def test_a_file_that_is_not_a_socket_is_left_alone(sock_dir, fake):
    path = os.path.join(sock_dir, "m.qmp")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(MfdError, match="exists and is not a socket"):
        MonitorServer(path, fake).start()
    with open(path) as f:
        assert f.read() == "keep me"


def test_close_leaves_a_successors_socket(sock_dir, fake):
    path = os.path.join(sock_dir, "m.qmp")
    first = MonitorServer(path, fake)
    first.start()
    os.unlink(path)  # someone cleaned up, and a new monitor took the path
    with MonitorServer(path, fake):
        first.close()
        assert monitor_command(path, "query-migrate")["return"]["status"] == "active"


def test_unusable_path_is_one_line(sock_dir, fake):
    for path in (os.path.join(sock_dir, "missing", "m.qmp"), "/tmp/" + "x" * 200):
        with pytest.raises(MfdError, match="cannot create monitor socket") as e:
            MonitorServer(path, fake).start()
        assert "\n" not in str(e.value)


def test_monitor_command_times_out(sock_dir):
    """A listener that never greets: one clear line after the timeout, not a hang."""
    path = os.path.join(sock_dir, "silent.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(1)
    try:
        t0 = time.monotonic()
        with pytest.raises(MfdError, match=r"did not answer with its greeting within 0\.3 s"):
            monitor_command(path, "query-migrate", timeout=0.3)
        assert time.monotonic() - t0 < 2.0
    finally:
        silent.close()
