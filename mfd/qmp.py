"""The one QMP client: ``mfd qmp``, the bench's QEMU driver and the tests talk to a QMP
monitor, mfd's own (:mod:`mfd.monitor`, the server) or QEMU's ``-qmp``, through it::

    with QMPClient("/tmp/src.qmp") as qmp:      # connect, read the greeting, negotiate
        qmp.execute("query-migrate")             # the return value; QMP's error raises
        qmp.request("migrate_cancel")            # the reply as sent: {"return": ...} or
                                                 # {"error": {"class": ..., "desc": ...}}
        qmp.event()                              # the next event (events that came while
                                                 # a reply was awaited are kept for it)

    monitor_command("/tmp/src.qmp", "query-migrate")   # one whole exchange, the reply

Every wait is bounded by ``timeout`` seconds per call, and every failure is one line: a
:class:`QMPError` (an :class:`~mfd.errors.MfdError`), or one of its kinds a caller may tell
apart: nothing listens at the path (:class:`NoMonitor`: QEMU's driver waits for the socket to
appear), the monitor closed the connection (:class:`MonitorGone`: QEMU died), a command was
refused (:class:`CommandError`, with QMP's error class).

QEMU's own client library (PyPI ``qemu.qmp``) was weighed and works with mfd's monitor
(greeting, negotiation, commands, errors, events), but its synchronous API is the
``legacy`` shim kept for QEMU's iotests: its ``connect()`` has no timeout (a listener that
never greets hangs it for good), its other waits raise asyncio's bare ``TimeoutError``, and
it brings an event loop into programs that are synchronous. The bounded waits and one-line
errors mfd needs would be a wrapper around it as long as this module.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Any

import orjson

from mfd.errors import MfdError

MAX_EVENTS = 1024  # events kept for event(); beyond, the oldest drop (QEMU's, if unread)
_RECV = 65536


class QMPError(MfdError):
    """The monitor is not there, did not answer in time, or said something that is not
    QMP."""


class NoMonitor(QMPError):
    """Nothing listens at the path (no socket file, or its process has gone)."""


class MonitorGone(QMPError):
    """The monitor closed the connection (its process ended, or died)."""


class CommandError(QMPError):
    """The monitor answered a command with an error: ``qmp_class`` and ``desc`` are QMP's."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.qmp_class = error.get("class")
        self.desc = error.get("desc")
        super().__init__(f"{command}: {self.qmp_class}: {self.desc}")


def _why(e: OSError) -> str:
    return e.strerror or str(e)


class _Wait:
    """One call's bound: ``seconds`` from now."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self, path: str, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise QMPError(f"monitor {path} did not answer {what} within {self.seconds:g} s")
        return left


class QMPClient:
    """One connection to the QMP monitor at the unix socket ``path``, negotiated on
    construction (:attr:`greeting` is the monitor's). ``timeout``: how long each call may
    wait (connecting, greeting and negotiating count as one), unless the call says
    otherwise. Not thread-safe."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._buf = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            wait = _Wait(timeout)
            self._connect(wait)
            self.greeting = self._message(wait, "with its greeting")
            if "QMP" not in self.greeting:
                raise QMPError(f"monitor {path} greeted with {self.greeting!r:.80}, not QMP")
            reply = self._request({"execute": "qmp_capabilities"}, wait)
            if "error" in reply:
                raise QMPError(f"monitor {path} refused qmp_capabilities: {reply['error']}")
        except BaseException:
            self._sock.close()
            raise

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run ``command``; its return value. An error reply raises :class:`CommandError`."""
        reply = self.request(command, arguments, timeout)
        if "error" in reply:
            raise CommandError(command, reply["error"])
        return reply["return"]

    def request(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        """Run ``command``; its reply as sent (a QMP error is an answer, not a failure
        here)."""
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        return self._request(request, self._wait(timeout))

    def event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event, the oldest kept first."""
        if self.events:
            return self.events.popleft()
        return self._message(self._wait(timeout), "with an event")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the socket

    def _wait(self, timeout: float | None) -> _Wait:
        return _Wait(self.timeout if timeout is None else timeout)

    def _connect(self, wait: _Wait) -> None:
        self._sock.settimeout(wait.left(self.path, "the connection"))
        try:
            self._sock.connect(self.path)
        except FileNotFoundError:
            raise NoMonitor(f"no monitor at {self.path}") from None
        except ConnectionRefusedError:
            raise NoMonitor(f"monitor {self.path} refused the connection (its process has "
                            "gone?)") from None
        except TimeoutError:
            raise QMPError(f"monitor {self.path} did not accept the connection within "
                           f"{wait.seconds:g} s") from None
        except OSError as e:
            raise QMPError(f"cannot connect to monitor {self.path}: {_why(e)}") from None

    def _request(self, request: dict[str, Any], wait: _Wait) -> dict[str, Any]:
        what = repr(request["execute"])
        self._sock.settimeout(wait.left(self.path, what))
        try:
            self._sock.sendall(orjson.dumps(request) + b"\n")
        except TimeoutError:
            raise QMPError(f"monitor {self.path} did not take {what} within "
                           f"{wait.seconds:g} s") from None
        except OSError as e:
            raise MonitorGone(f"monitor {self.path} closed the connection "
                              f"({_why(e)})") from None
        while True:
            msg = self._message(wait, what)
            if "return" in msg or "error" in msg:
                return msg
            self.events.append(msg)

    def _message(self, wait: _Wait, what: str) -> dict[str, Any]:
        """The next message (a JSON object a line), within ``wait``."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end]).strip()
                del self._buf[: end + 1]
                if not line:
                    continue
                try:
                    msg = orjson.loads(line)
                except orjson.JSONDecodeError:
                    msg = None
                if not isinstance(msg, dict):
                    raise QMPError(f"monitor {self.path} sent {line[:80]!r}, not a QMP "
                                   "message")
                return msg
            self._sock.settimeout(wait.left(self.path, what))
            try:
                chunk = self._sock.recv(_RECV)
            except TimeoutError:
                continue  # wait.left raises: the deadline has passed
            except OSError as e:  # ECONNRESET: the monitor's process died
                raise MonitorGone(f"monitor {self.path} closed the connection before "
                                  f"answering {what} ({_why(e)})") from None
            if not chunk:
                raise MonitorGone(f"monitor {self.path} closed the connection before "
                                  f"answering {what}")
            self._buf += chunk


def monitor_command(path: str, command: str, arguments: dict[str, Any] | None = None,
                    timeout: float = 5.0) -> dict[str, Any]:
    """Run one command on the monitor at ``path``; its reply as sent (``{"return": ...}`` or
    ``{"error": {"class": ..., "desc": ...}}``), events skipped. Connecting (with the
    greeting and the negotiation) and the command may each take ``timeout`` seconds."""
    with QMPClient(path, timeout) as client:
        return client.request(command, arguments)
