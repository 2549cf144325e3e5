"""The end of a live migration: the guest stops, the last pages and the device state go,
and the destination gives its verdict.

::

    stop       the guest stops, the rate limit lifts, the final bitmap sync (status device)
    complete   SWITCHOVER_START; END: the final round; timer, globalstate (and to mfd: the
               guest's own state); EOF; vmdesc; then finish
    finish     to mfd: the page hashes (Verification); the return path: SHUT(0) ->
               completed; SHUT(1), a closed connection, or mfd's MFD_RESULT(failed) ->
               failed (postcopy comes here too, after its push)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mfd.errors import MfdError
from mfd.main_thread.pipeline import ChannelPool
from mfd.main_thread.precopy import Sink
from mfd.main_thread.source.session import Session
from mfd.main_thread.source.verify import Verification
from mfd.main_thread.state import MigrationStatus
from mfd.protocol import constants as C
from mfd.protocol import devices, stream

RESULT_TIMEOUT = 60.0  # the destination loads the device state, hashes its RAM, starts


class Switchover:
    def __init__(self, session: Session, verification: Verification, machine: str,
                 warn: Callable[[str], None]) -> None:
        self.session = session
        self.channel, self.precopy, self.stats = session.channel, session.precopy, session.stats
        self.verification = verification
        self.machine = machine
        self.warn = warn
        self.digests: dict[str, str] = {}

    def stop(self) -> dict | None:
        """The guest stops; returns its final status (None without a guest)."""
        status = self.precopy.stop()
        self.session.move(MigrationStatus.DEVICE)
        return status

    def complete(self, sink: Sink, pool: ChannelPool) -> None:
        """``migration_completion``: the final round and the device state."""
        status = self.stop()
        self.channel.send(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START)))
        pool.take_hashing()
        self.precopy.round(sink, final=True)
        hashing = pool.take_hashing()
        self.channel.send(self.device_state(status) + stream.encode_eof()
                          + stream.encode_vmdesc(devices.vmdesc_json(self.machine, ())))
        self.finish(hashing)

    def device_state(self, status: dict | None) -> bytes:
        """timer, globalstate and, to mfd, the guest's own state (its workload)."""
        runstate = "running" if self.precopy.was_running else "paused"
        guest = None
        if status is not None and self.channel.peer_mfd:
            guest = {"name": status["name"], "runstate": runstate,
                     "workload": status["workload"]}
        elif status is not None and status["workload"].get("kind") == "kvm":
            self.warn("the destination is QEMU: the guest's KVM vCPU state has no place in "
                      "QEMU's -machine none, only its RAM goes")
        return devices.encode_sections(runstate, guest)

    def finish(self, hashing: list[float]) -> None:
        """After EOF and the vmdesc: the page hashes to an mfd destination, its verdict.
        ``hashing``: seconds each channel spent hashing the final round."""
        sending = self.verification.send(self.warn)
        channel = self.channel
        self.session.wait(lambda: channel.shut is not None, RESULT_TIMEOUT, "say SHUT")
        channel.check()  # closed without a word: a lost link (postcopy resumes)
        if channel.shut != 0 or (channel.peer_mfd
                                 and channel.result.get("status") != "completed"):
            raise MfdError(channel.failed_why())
        self.stats.end_time = time.monotonic()
        self.digests = self.verification.digests()
        self.stats.verify_time = self.verification.seconds(hashing, sending)
        self.stats.remaining = 0
        self.session.move(MigrationStatus.COMPLETED)
