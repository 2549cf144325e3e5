"""Postcopy's urgent pages: a page the destination asks for goes at once, ahead of the push
and never held by max-postcopy-bandwidth's window (QEMU: the request posts
``rate_limit_sem``; with preempt the return-path thread sends the page itself), while its
bytes count in the window as every channel's do in QEMU."""

from __future__ import annotations

import select
import socket
import time

import pytest
from helpers import finish, start_migrate

from mfd.main_thread.convergence import BUFFER_DELAY, RateLimiter
from mfd.main_thread.source.ramstream import INLINE_PAGES
from mfd.protocol import livestream, postcopy, returnpath
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.workers.tcp import free_ports

SIZE = 16 << 20
LAST = SIZE // TARGET_PAGE_SIZE - 1  # the push reaches it last


def test_bytes_sent_while_the_limiter_waits_count_but_wait_for_nothing():
    limiter = RateLimiter(10_000)  # 1000 bytes a window
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        limiter.account(5000)  # an urgent page meanwhile: counted, not held

    limiter.wait = wait
    limiter.account(1000)  # the push fills its window: it waits, once
    assert len(waits) == 1 and not limiter.waiting
    assert limiter.used >= 5000, "what went during the wait is in the budget"
    limiter.wait = waits.append
    limiter.account(0)  # ... so the push's next turn waits for it
    assert waits[-1] >= 4 * BUFFER_DELAY


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_a_requested_page_goes_while_the_push_waits_for_its_window(guests, preempt):
    """A hand-made destination (QEMU's wire) asks for the block's last page once postcopy
    runs. The push, capped at 16 KB/s, waits about two minutes after its first batch; the
    page must come at once all the same (the socket's 30 s timeout fails a source that
    holds it behind the window), before the push sends more than that batch."""
    src, _ = guests.start("16M", "--dirty-rate", "200M", "--pattern", "sequential")
    time.sleep(0.3)  # every page written: the push's first batch is 2 MiB of data
    port = free_ports(1)
    listener = socket.create_server(("127.0.0.1", port))
    mig = start_migrate(port, "--guest", src, "--no-multifd", "--postcopy-ram",
                        "--postcopy-after", "0", "--max-postcopy-bandwidth", "16K",
                        *(["--postcopy-preempt"] if preempt else []))
    main_dec = livestream.StreamDecoder()
    preempt_dec = livestream.StreamDecoder("preempt channel", preempt={"mem": SIZE})
    try:
        with listener:
            listener.settimeout(30)
            conn, _ = listener.accept()
            conn.settimeout(30)
            sockets = {conn: main_dec}
            ran = asked = False
            pushed = 0  # pages the push sent after RUN, before the page asked for
            got = None
            while got is None:
                ready, _, _ = select.select([*sockets, listener] if asked and preempt
                                            and len(sockets) == 1 else list(sockets),
                                            [], [], 30)
                assert ready, f"no page {LAST} within 30 s of asking (the push: {pushed})"
                for s in ready:
                    if s is listener:
                        pc, _ = listener.accept()
                        sockets[pc] = preempt_dec
                        continue
                    data = s.recv(1 << 20)
                    assert data, "the source closed a channel"
                    for ev in sockets[s].feed(data):
                        if isinstance(ev, livestream.Ping):
                            conn.sendall(returnpath.encode_pong(ev.value))
                        elif isinstance(ev, livestream.Run):
                            ran = True
                        elif isinstance(ev, livestream.Pages | livestream.ZeroPages) and ran:
                            pages = ev.pages.tolist()
                            if LAST in pages:
                                got = "preempt" if s is not conn else "main"
                            else:
                                pushed += len(pages)
                    if ran and not asked:
                        conn.sendall(postcopy.encode_request(LAST * TARGET_PAGE_SIZE,
                                                             TARGET_PAGE_SIZE, "mem"))
                        asked = True
            for s in sockets:
                s.close()
        assert got == ("preempt" if preempt else "main")
        assert pushed <= INLINE_PAGES, "the push went on past its window"
    finally:
        mig.kill()
        finish(mig)
