"""Talking to a running guest: its control socket, a client, and starting one in the background.

Every call is bounded: a guest that does not answer within ``timeout`` is reported as a
:class:`GuestError`, never waited on forever.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import numpy as np
import orjson
import zmq

from mfd.errors import GuestError
from mfd.sysutil import python_m

DEFAULT_TIMEOUT = 10.0


def run_dir() -> str:
    """Where control sockets live; MFD_RUN_DIR lets tests and users keep guests apart."""
    return os.environ.get("MFD_RUN_DIR", "/tmp/mfd-run")


def socket_path(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise GuestError(f"invalid guest name {name!r}")
    return os.path.join(run_dir(), f"{name}.sock")


class GuestClient:
    """Request/reply to one guest. Not thread-safe; one per process is plenty."""

    def __init__(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.path = socket_path(name)
        if not os.path.exists(self.path):
            raise GuestError(f"no guest named {name!r} (no control socket at {self.path})")
        self.timeout = timeout
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(f"ipc://{self.path}")
        return self.sock

    def request(self, cmd: str, *payload: bytes, **arguments) -> list[bytes]:
        sock = self._socket()
        sock.send_multipart([orjson.dumps({"execute": cmd, "arguments": arguments}),
                             *payload])
        if not sock.poll(self.timeout * 1000):
            self.close()  # a REQ socket without its reply is stuck; start over next time
            raise GuestError(f"guest {self.name!r} did not answer {cmd!r} within "
                             f"{self.timeout:g} s (is it running?)")
        frames = sock.recv_multipart()
        head = orjson.loads(frames[0])
        if "error" in head:
            raise GuestError(f"guest {self.name!r}: {head['error']}")
        return [frames[0], *frames[1:]]

    def execute(self, cmd: str, **arguments) -> dict:
        return orjson.loads(self.request(cmd, **arguments)[0])["return"]

    def query(self) -> dict:
        return self.execute("query")

    def stop(self) -> dict:
        return self.execute("stop")

    def cont(self) -> dict:
        return self.execute("cont")

    def set_throttle(self, pct: int) -> dict:
        return self.execute("set-throttle", percentage=pct)

    def quit(self) -> None:
        """Ask the guest to quit; return once it has unlinked its RAM and its socket."""
        self.execute("quit")
        self.close()
        deadline = time.monotonic() + self.timeout
        while os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.005)

    def harvest(self) -> tuple[dict, list[np.ndarray]]:
        """The guest's dirty log since the last harvest, as bmap words per block (cleared)."""
        frames = self.request("harvest")
        status = orjson.loads(frames[0])["return"]
        return status, [np.frombuffer(f, dtype="<u8") for f in frames[1:]]

    def clear_log(self, block: int, first_page: int, words: np.ndarray) -> None:
        """Manual dirty log protect: these pages (bmap words from ``first_page``, a multiple
        of 64) are about to be read; log their next writes again."""
        self.request("clear", np.ascontiguousarray(words, dtype="<u8").tobytes(), block=block,
                     **{"first-page": first_page})

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def __enter__(self) -> GuestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_alive(name: str, timeout: float = 1.0) -> bool:
    try:
        with GuestClient(name, timeout) as g:
            g.execute("describe")  # never reads guest RAM (see Guest.command)
        return True
    except GuestError:
        return False


def start_guest_daemon(argv: list[str], name: str, timeout: float = 30.0) -> GuestClient:
    """Start ``mfd guest`` with ``argv`` in its own session; return once it answers."""
    os.makedirs(run_dir(), exist_ok=True)
    log = os.path.join(run_dir(), f"{name}.log")
    command, env = python_m("mfd", "guest", *argv)
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            why = lines[-1].removeprefix("mfd: ") if lines else f"exit status {proc.returncode}"
            raise GuestError(f"guest {name!r} failed to start: {why}")
        if is_alive(name, timeout=0.5):
            return GuestClient(name)
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise GuestError(f"guest {name!r} did not come up within {timeout:g} s")


def release(name: str) -> None:
    """Quit the guest ``name`` if it still runs, and remove its log: what a program that
    started a guest for a while (the demo, the benchmark) leaves behind is nothing."""
    with contextlib.suppress(GuestError), GuestClient(name, timeout=5.0) as g:
        g.quit()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir(), f"{name}.log"))
