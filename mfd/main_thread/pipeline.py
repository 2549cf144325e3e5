"""The main process's side of the channels: spawn, credit-based dispatch, sync, shutdown.

Mirrors QEMU's ``multifd_send`` / ``multifd_send_sync_main`` with processes instead of
threads::

    ChannelPool.send(job)        wait for an idle channel (channels_ready), hand it the job
                                 (pending_job = true); a busy channel never gets a second one
    ChannelPool.sync()           wait until every channel is idle again (SYNC LOCAL)
    on_done(job, moved, mask)    called in order of completion, in the main process only

A channel that dies (its ``sentinel`` becomes readable) or reports an ERROR breaks the pool:
the first error wins, the pool raises :class:`BrokenPipeline` and refuses further work.
Shutdown order: one STOP per live channel, join with a deadline, terminate stragglers,
close the socket with LINGER 0, terminate the context, remove the socket directory.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import zmq

from mfd.errors import BrokenPipeline
from mfd.protocol import messages

START_TIMEOUT = 60.0
JOIN_TIMEOUT = 5.0

OnDone = Callable[[Any, int, np.ndarray], None]


class ChannelPool:
    def __init__(self, configs: list[Any], target: Callable[[Any], None],
                 on_done: OnDone) -> None:
        """``configs[i]`` is channel i's frozen config; it gets ``endpoint`` filled in."""
        self.on_done = on_done
        self.broken: BrokenPipeline | None = None
        self.tmpdir = tempfile.mkdtemp(prefix="mfd-ch-")
        endpoint = f"ipc://{self.tmpdir}/main.sock"
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(endpoint)
        mp = multiprocessing.get_context("spawn")
        self.procs = [mp.Process(target=target, args=(replace(cfg, endpoint=endpoint),),
                                 name=f"mfd-channel-{i}", daemon=True)
                      for i, cfg in enumerate(configs)]
        self.idle: deque[bytes] = deque()
        self.channel_of: dict[bytes, int] = {}
        self.inflight: dict[int, tuple[bytes, Any]] = {}
        self.next_job = 0
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        try:
            for p in self.procs:
                p.start()
                self.poller.register(p.sentinel, zmq.POLLIN)
            deadline = time.monotonic() + START_TIMEOUT
            while len(self.channel_of) < len(self.procs):
                if time.monotonic() > deadline:
                    raise BrokenPipeline(f"channels did not start within {START_TIMEOUT:g} s")
                self._pump(500)
        except BaseException:
            self.close()
            raise

    @property
    def channels(self) -> int:
        return len(self.procs)

    def send(self, block: int, pages: np.ndarray, context: Any = None) -> None:
        """``multifd_send``: hand a JOB (pages of one block) to an idle channel."""
        self._check()
        while not self.idle:
            self._pump(None)
        ident = self.idle.popleft()
        job_id = self.next_job
        self.next_job += 1
        self.inflight[job_id] = (ident, context)
        self.router.send_multipart([ident, *messages.encode_job(job_id, block, pages)],
                                   copy=False)

    def sync(self) -> None:
        """Return when every channel has finished all work handed to it."""
        self._check()
        while self.inflight:
            self._pump(None)

    def _check(self) -> None:
        if self.broken is not None:
            raise self.broken

    def _fail(self, error: BrokenPipeline) -> BrokenPipeline:
        if self.broken is None:  # first error wins
            self.broken = error
        return self.broken

    def _pump(self, timeout_ms: int | None) -> None:
        events = dict(self.poller.poll(timeout_ms))
        if self.router in events:
            while True:
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._message(frames[0], frames[1:])
        for i, p in enumerate(self.procs):
            if p.sentinel in events:
                p.join(0)
                raise self._fail(BrokenPipeline(
                    f"channel {i} died unexpectedly (exit status {p.exitcode})"))

    def _message(self, ident: bytes, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == messages.READY:
            self.channel_of[ident] = messages.decode_ready(frames)
            self.idle.append(ident)
        elif kind == messages.DONE:
            job_id, moved, mask = messages.decode_done(frames)
            owner, context = self.inflight.pop(job_id)
            assert owner == ident
            self.idle.append(ident)
            self.on_done(context, moved, mask)
        elif kind == messages.ERROR:
            text = frames[1].decode(errors="replace").strip().splitlines()
            ch = self.channel_of.get(ident, "?")
            raise self._fail(BrokenPipeline(f"channel {ch} failed: {text[-1] if text else '?'}"))
        else:
            raise self._fail(BrokenPipeline(f"unexpected message {kind[:16]!r} from a channel"))

    def close(self) -> None:
        """STOP live channels, join with a deadline, terminate stragglers, release sockets."""
        for ident in list(self.channel_of):
            with contextlib.suppress(zmq.ZMQError):
                self.router.send_multipart([ident, messages.STOP], zmq.NOBLOCK)
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in self.procs:
            if p.pid is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join()
        self.router.close(0)
        self.ctx.term()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> ChannelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pids(pool: ChannelPool) -> list[int]:
    """Channel process ids (tests kill one to check failure handling)."""
    return [p.pid for p in pool.procs if p.pid is not None and p.pid != os.getpid()]
