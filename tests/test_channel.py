"""The channel-process skeleton (``mfd.workers.channel``): whatever the kind, a failure
reaches the main process as one report: one line for an MfdError, the last line of the
traceback of a bug, the link-lost flag for a lost connection; a kind that fails while it is
built says so too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mfd.errors import BrokenPipeline, ProtocolError
from mfd.main_thread.pipeline import ChannelPool
from mfd.protocol import messages
from mfd.workers.channel import Channel, Link, run_channel
from mfd.workers.tcp import LinkLost

FAILURES = {
    "protocol": ProtocolError("bad bytes at offset 0x10"),
    "link": LinkLost("channel 0: connection lost (Connection reset by peer)"),
    "bug": KeyError("no such thing"),
}


@dataclass(frozen=True)
class Config:
    channel_id: int
    failure: str
    at_start: bool = False
    endpoint: str = ""
    parent_pid: int = 0


class Failing(Channel):
    def __init__(self, cfg: Config, link: Link) -> None:
        super().__init__(link)
        if cfg.at_start:
            raise FAILURES[cfg.failure]
        self.failure = cfg.failure

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray,
               flags: int) -> list:
        if self.failure == "none":
            return messages.encode_done(job_id, len(pages))
        raise FAILURES[self.failure]


def failing_main(cfg: Config) -> None:
    run_channel(cfg, Failing)


def test_a_job_done_then_stop():
    done = []
    with ChannelPool([Config(0, "none")], failing_main) as pool:
        pool.send(0, np.arange(3, dtype=np.uint32), lambda moved, _m, _d: done.append(moved))
        pool.sync()
    assert done == [3]


@pytest.mark.parametrize("failure,says,link", [
    ("protocol", "channel 0 failed: bad bytes at offset 0x10", False),
    ("link", "channel 0 failed: connection lost (Connection reset by peer)", True),
    ("bug", "channel 0 failed: KeyError: 'no such thing'", False),
])
def test_one_report_for_every_kind_of_failure(failure, says, link):
    with ChannelPool([Config(0, failure)], failing_main) as pool, \
            pytest.raises(BrokenPipeline) as failed:
        pool.send(0, np.arange(3, dtype=np.uint32))
        pool.sync()
    assert str(failed.value) == says and failed.value.link_lost == link


def test_a_channel_that_fails_as_it_is_built():
    with pytest.raises(BrokenPipeline, match=r"^a channel failed: bad bytes at offset 0x10$"):
        ChannelPool([Config(0, "protocol", at_start=True)], failing_main)
