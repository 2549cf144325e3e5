"""The built-in guest: a process that owns RAM blocks in /dev/shm and keeps writing them.

::

    mfd guest --name vm0 ...                 GuestClient (main process, CLI)
      SharedRAM (creates, unlinks)   <--REQ/REP over ipc://<run dir>/vm0.sock-->
      Workload.tick() every 10 ms of run time   query, stop, cont, quit, harvest,
      private dirty log                          set-throttle, get-state

Throttle follows QEMU's cpu-throttle (``cpu_throttle_thread``): for each 10 ms timeslice the
guest runs, it sleeps ``pct / (1 - pct)`` timeslices. Sleeps are polls on the control socket,
so commands (stop, harvest) are served at once, even while throttled.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass

import numpy as np
import orjson
import zmq

from mfd.errors import MfdError
from mfd.shm import control
from mfd.shm.kvmguest import KvmState, KvmWorkload
from mfd.shm.ramblock import MappedBlock, RAMBlock, SharedRAM, attach
from mfd.shm.uffd import UserfaultFd, open_uffd
from mfd.shm.workload import Workload, WorkloadState
from mfd.sysutil import set_parent_death_signal
from mfd.xhooks import NO_HOOKS, XHooks

TIMESLICE = 0.010  # QEMU's CPU_THROTTLE_TIMESLICE_NS


@dataclass(frozen=True)
class GuestConfig:
    name: str
    blocks: tuple[tuple[str, int], ...]
    workload: WorkloadState
    start_stopped: bool = False
    # an incoming migration's guest: RAM it does not own yet (unnamed, see PendingRAM); it
    # dies with the process that started it until that process says "commit"
    attached: tuple[RAMBlock, ...] = ()
    kvm: bool = False  # a KVM vCPU runs the guest (kvmguest.py), not the built-in workload
    resume: dict | None = None  # a saved workload state (either kind) to go on from
    x: XHooks = NO_HOOKS  # test-only: no_manual_protect, no_kick


def workload_from(mapped: list[MappedBlock], state: dict) -> Workload | KvmWorkload:
    """A saved or migrated workload goes on where it stopped, whichever kind it is."""
    if state.get("kind") == "kvm":
        return KvmWorkload(mapped, KvmState.from_json(state), fresh=False)
    return Workload(mapped, WorkloadState(**state))


class _Quit(Exception):
    pass


def throttle_sleep(pct: int) -> float:
    """Seconds to sleep after one timeslice of run time at ``pct`` percent throttle."""
    if pct <= 0:
        return 0.0
    ratio = pct / 100.0
    return ratio / (1.0 - ratio) * TIMESLICE


class Guest:
    def __init__(self, cfg: GuestConfig) -> None:
        self.cfg = cfg
        self.running = not cfg.start_stopped
        self.throttle = 0
        self.uffd: UserfaultFd | None = None  # postcopy: missing pages come through it
        self.started = time.monotonic()

    def boot(self, ram: SharedRAM) -> None:
        """Map the RAM and make the workload (a KVM guest's VM), before the guest says it
        is up: a guest that cannot run fails here, with nothing announced."""
        mapped = self.mapped = [attach(b, writable=True) for b in ram.blocks]
        self.ram = ram
        cfg = self.cfg
        try:
            if cfg.resume is not None:
                self.workload = workload_from(mapped, cfg.resume)
            elif cfg.kvm:
                w = cfg.workload
                self.workload = KvmWorkload(mapped, KvmState(w.dirty_rate, w.pattern, w.seed,
                                                             not cfg.x.no_manual_protect),
                                            fresh=True, kick=not cfg.x.no_kick)
            else:
                self.workload = Workload(mapped, cfg.workload)
        except BaseException:
            for m in mapped:
                m.close()
            raise

    def serve(self, sock: zmq.Socket) -> None:
        mapped = self.mapped
        if self.running:
            self.workload.start()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_run = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                ticking = self.running and not self.workload.runs_itself
                wait = max(0.0, next_run - now) if ticking else None
                if wait is None or wait > 0:
                    events = dict(poller.poll(None if wait is None else wait * 1000))
                    if sock in events:
                        self.handle(sock)
                    continue
                self.workload.tick(TIMESLICE)
                # run one timeslice, then the throttle's sleep; don't catch up after a stall
                next_run = max(next_run + TIMESLICE, now) + throttle_sleep(self.throttle)
        except _Quit:
            pass
        finally:
            self.workload.close()
            self.postcopy_end()
            for m in mapped:
                m.close()

    def handle(self, sock: zmq.Socket) -> None:
        frames = sock.recv_multipart()
        try:
            req = orjson.loads(frames[0])
            cmd = req["execute"]
            args = req.get("arguments", {})
        except (orjson.JSONDecodeError, KeyError, TypeError):
            sock.send(orjson.dumps({"error": "malformed request"}))
            return
        if cmd == "clear" and len(frames) == 2:  # manual protect: a chunk about to be sent
            try:
                self.workload.clear(int(args["block"]), int(args["first-page"]),
                                    np.frombuffer(frames[1], dtype="<u8"))
            except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
                sock.send(orjson.dumps({"error": f"clear: {e}"}))
                return
            sock.send(orjson.dumps({"return": {}}))
            return
        if cmd in ("commit", "postcopy-run"):
            try:
                if cmd == "commit":
                    self.commit(args)
                else:
                    self.take_workload(args)
            except (ValueError, TypeError, KeyError, MfdError) as e:
                sock.send(orjson.dumps({"error": f"{cmd}: {e}"}))
                return
            sock.send(orjson.dumps({"return": self.status()}))
            return
        if cmd == "harvest":
            words = self.workload.harvest()
            sock.send_multipart([orjson.dumps({"return": self.status()}), *words])
            return
        try:
            reply = self.command(cmd, args)
        except _Quit:
            sock.send(orjson.dumps({"return": {}}))
            raise
        except (ValueError, TypeError, KeyError) as e:
            reply = {"error": f"{cmd}: {e}"}
        sock.send(orjson.dumps(reply))

    def command(self, cmd: str, args: dict) -> dict:
        if cmd == "query":
            return {"return": self.status()}
        if cmd == "describe":  # what query says without reading RAM (a KVM guest's counter
            # is in RAM: read before a lazy restore registers it, a hole would be allocated
            # as a zero page that the file's page could then never replace)
            return {"return": {"name": self.cfg.name, "pid": os.getpid(),
                               "workload": self.workload.state.to_json(),
                               "blocks": self._blocks()}}
        if cmd == "stop":
            self.running = False
            self.workload.stop()
        elif cmd == "cont":
            self.running = True
            self.workload.start()
        elif cmd == "run-exits" and isinstance(self.workload, KvmWorkload):
            self.running = True  # until the vCPU parks after that many exits
            self.workload.run_exits(int(args["count"]))
        elif cmd == "postcopy-listen":
            self.postcopy_listen(str(args["socket"]))
        elif cmd == "postcopy-end":
            self.postcopy_end()
        elif cmd == "set-throttle":
            pct = int(args["percentage"])
            if not 0 <= pct <= 99:
                raise ValueError(f"throttle {pct}% outside 0..99")
            self.throttle = pct
            self.workload.set_throttle(pct)
        elif cmd == "quit":
            raise _Quit
        else:
            return {"error": f"unknown command {cmd!r}"}
        return {"return": self.status()}

    def commit(self, args: dict) -> None:
        """The incoming migration succeeded: own the now named RAM, outlive the process
        that started us, take the source guest's workload state, and run."""
        named = args["blocks"]
        blocks = [RAMBlock(b.idstr, b.used_length, str(named[b.idstr]))
                  for b in self.ram.blocks]
        for b in blocks:
            if not os.path.exists(b.path):
                raise MfdError(f"{b.path} does not exist")
        self.ram.take(blocks)
        set_parent_death_signal(0)
        if "workload" in args:  # (postcopy: it runs already)
            self.take_workload(args)

    def take_workload(self, args: dict) -> None:
        """The source guest's workload state: go on from it (and run, unless told not to).
        Postcopy's RUN comes before the RAM is whole and named: then a stop of the
        incoming migration kills this process (nothing serves its missing pages any more,
        and a thread blocked on one never returns to Python to handle a gentler signal)."""
        if self.uffd is not None:
            set_parent_death_signal(signal.SIGKILL)
        self.workload.close()
        self.workload = workload_from(self.mapped, args["workload"])
        self.workload.set_throttle(0)
        self.running = bool(args.get("run", True))
        if self.running:
            self.workload.start()

    def postcopy_listen(self, path: str) -> None:
        """Postcopy's LISTEN: register this process's mappings of the RAM for missing
        pages (a uffd serves the mm of the process that made it, and only faults through
        its mappings: the vCPU's and the workload's) and hand the uffd, with where each
        block is mapped here, to the incoming migration at ``path``, which places the pages.
        The fd stays open here until postcopy ends: closing the last one would turn every
        missing page into a zero page."""
        if self.uffd is not None:
            raise ValueError("postcopy is listening already")
        fd = open_uffd()
        try:
            uffd = UserfaultFd(fd)
            bases = [m.address for m in self.mapped]
            for m, base in zip(self.mapped, bases, strict=True):
                uffd.register(base, m.block.used_length)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5.0)
                sock.connect(path)
                socket.send_fds(sock, [orjson.dumps(bases)], [fd])
        except BaseException:
            os.close(fd)
            raise
        self.uffd = uffd

    def postcopy_end(self) -> None:
        """Every page has arrived: the uffd may go, and this process lives on as before
        (an incoming migration's guest still dies with it until it commits)."""
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
            set_parent_death_signal(signal.SIGTERM if self.cfg.attached else 0)

    def runstate(self) -> str:
        """QEMU's run states: a KVM vCPU that hit an exit it cannot handle is stopped for
        good ("internal-error"), one that parked by itself (run-exits) is paused."""
        if self.workload.error:
            return "internal-error"
        return "running" if self.running and not self.workload.parked else "paused"

    def status(self) -> dict:
        return {
            "name": self.cfg.name,
            "pid": os.getpid(),
            "status": self.runstate(),
            "cpu-throttle-percentage": self.throttle,
            # a KVM guest's counter is in RAM: while pages still come through the uffd, its
            # page may be one the caller has yet to place (it would wait for itself)
            "pages-written": self.workload.pages_written if self.uffd is None else None,
            "workload": self.workload.state.to_json(),
            "blocks": self._blocks(),
        }

    def _blocks(self) -> list[dict]:
        return [{"idstr": b.idstr, "used_length": b.used_length, "path": b.path}
                for b in self.ram.blocks]


def run_guest(cfg: GuestConfig, on_ready=None) -> None:
    """Create the RAM, serve until quit, SIGTERM or Ctrl-C; always unlink what it created."""
    path = control.socket_path(cfg.name)
    if control.is_alive(cfg.name):
        raise MfdError(f"a guest named {cfg.name!r} is already running")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def _term(signum, frame):  # SIGTERM ends like Ctrl-C: through the finally below
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    if cfg.attached:
        parent = os.getppid()
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:  # the incoming migration died before we could watch it
            return
    try:
        with (SharedRAM.attached(list(cfg.attached)) if cfg.attached
              else SharedRAM(cfg.name, list(cfg.blocks))) as ram:
            if os.path.exists(path):
                os.unlink(path)  # stale socket of a guest that died
            sock.bind(f"ipc://{path}")
            try:
                guest = Guest(cfg)
                guest.boot(ram)
                if on_ready is not None:
                    on_ready(ram)
                guest.serve(sock)
            except KeyboardInterrupt:
                pass
            finally:
                ram.close()  # RAM first: a client that sees the socket gone may rely on it
                if os.path.exists(path):
                    os.unlink(path)
    finally:
        sock.close(0)
        ctx.term()
