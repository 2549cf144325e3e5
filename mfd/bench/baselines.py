"""The physical limits every figure is held against, measured in the same run.

* ``dd bs=1M conv=fsync`` of the image to the same disk (a save's limit);
* a cold ``dd`` read of the image from that disk (a cold restore's limit);
* memcpy of the image in memory (a warm restore's limit);
* TCP loopback moving as many bytes over 1, 2, 4 ... connections (a migration's limit).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from typing import Any

import numpy as np

from mfd.bench.image import Image
from mfd.bench.runs import one_line, unlink

MiB = 1 << 20
TCP_CHUNK = 4 * MiB


def sh(argv: list[str]) -> float:
    """Run a command, return its wall time; raise with its stderr tail if it fails."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        tail = p.stderr.strip().splitlines()
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: "
                           f"{tail[-1] if tail else ''}")
    return dt


def evict(path: str) -> None:
    """Drop ``path`` from the page cache: fsync (only clean pages can go), then DONTNEED."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Read ``path`` once so it is in the page cache."""
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def dd_write(image: Image, target: str) -> dict[str, Any]:
    unlink(target)
    os.sync()
    try:
        dt = sh(["dd", f"if={image.path}", f"of={target}", "bs=1M", "conv=fsync",
                 "status=none"])
    finally:
        unlink(target)
    return {"seconds": dt}


def dd_read_cold(path: str) -> dict[str, Any]:
    os.sync()
    evict(path)
    return {"seconds": sh(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])}


def memcpy(image: Image) -> dict[str, Any]:
    """The image (read into memory, untimed) copied once into memory already faulted in."""
    src = np.fromfile(image.path, dtype=np.uint8)
    dst = np.ones_like(src)
    t0 = time.perf_counter()
    np.copyto(dst, src)
    dt = time.perf_counter() - t0
    ok = bool(dst[:: 4096 * 97].tobytes() == src[:: 4096 * 97].tobytes())
    del src, dst
    if not ok:
        raise RuntimeError("memcpy copy differs")
    return {"seconds": dt}


def tcp(size: int, conns: int) -> dict[str, Any]:
    """``size`` bytes over ``conns`` loopback connections, one sender and one receiver thread
    each (the GIL is released in the system calls); timed from the moment all threads are
    ready until every byte has arrived."""
    share = [size // conns + (i < size % conns) for i in range(conns)]
    payload = memoryview(np.random.default_rng(0).integers(0, 256, TCP_CHUNK,
                                                           dtype=np.uint8).tobytes())
    errors: list[BaseException] = []
    socks: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=conns) as server:
        server.settimeout(30)
        port = server.getsockname()[1]
        for _ in range(conns):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            socks.append(server.accept()[0])
    for so in socks:
        so.settimeout(120)
    ready = threading.Barrier(2 * conns + 1, timeout=60)

    def send(sock: socket.socket, n: int) -> None:
        try:
            ready.wait()
            while n > 0:
                k = min(n, TCP_CHUNK)
                sock.sendall(payload[:k])
                n -= k
        except BaseException as e:
            errors.append(e)

    def recv(sock: socket.socket, n: int) -> None:
        view = memoryview(bytearray(TCP_CHUNK))
        try:
            ready.wait()
            while n > 0:
                got = sock.recv_into(view, min(n, TCP_CHUNK))
                if not got:
                    raise ConnectionError(f"peer closed with {n} bytes to go")
                n -= got
        except BaseException as e:
            errors.append(e)

    threads = []
    for i in range(conns):
        threads.append(threading.Thread(target=send, args=(socks[2 * i], share[i])))
        threads.append(threading.Thread(target=recv, args=(socks[2 * i + 1], share[i])))
    try:
        for t in threads:
            t.start()
        ready.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
    finally:
        for so in socks:
            so.close()
        for t in threads:
            t.join(timeout=10)
    if errors:
        raise RuntimeError(f"TCP loopback: {one_line(errors[0])}")
    return {"seconds": dt, "bytes": size}
