"""Test-only behaviour, in one frozen object passed whole from the CLI's hidden ``--x-*``
options (QEMU's prefix for what is not a stable interface) to every layer that acts on it.

Each hook disables one mechanism or injects one fault, so that a test can show the
mechanism bites (DESIGN.md section 3: a test of an invariant must fail when it is broken).
``NO_HOOKS``, the default everywhere, changes nothing. Product code never prints about a
hook: what a hook did is for the test to know from the hook itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from mfd.protocol.peer import MFD_PACKET_PAGES

# faults a receive channel injects, each of which verification must catch: one byte of
# the page flipped; the page's content placed at the next page's offset (the previous one's
# at a block's end) and the page left zero; the packet's pages received and thrown away
FAULTS = ("corrupt", "misplace", "drop")


@dataclass(frozen=True)
class XHooks:
    # channel i sleeps channel_delays[i] seconds per packet (receive) or per job (file)
    channel_delays: tuple[float, ...] = ()
    skip_sync: bool = False  # destination: channels ignore SYNC packets, no recv sync
    skip_round_sync: bool = False  # source / save: no sync at the end of a round
    ignore_dirty_log: bool = False  # source / save: the guest's dirty log is never read
    # a receive channel damages (FAULTS) every packet that has this page of the first block
    fault: tuple[str, int] | None = None
    # lazy restore: the new guest runs this many exits, then parks (a KVM guest; the test
    # knows how far it got when the last page came in)
    run_exits: int | None = None
    # the guest (mfd guest --x-no-manual-protect / --x-no-kick): a KVM guest reads its dirty
    # log the way kernels without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 do; a stop waits for the
    # vCPU's next exit instead of kicking it out (the bench measures what the kick buys)
    no_manual_protect: bool = False
    no_kick: bool = False

    def delay(self, channel: int) -> float:
        return self.channel_delays[channel] if channel < len(self.channel_delays) else 0.0

    def damaged(self, pages: int) -> range | tuple[int, ...]:
        """The pages of the first block (of ``pages`` pages) that ``fault`` damages: the
        page itself, and the one a misplaced page went to; for "drop", any page that can
        share a packet with it (a packet between two mfd ends: MFD_PACKET_PAGES)."""
        assert self.fault is not None
        kind, page = self.fault
        if kind == "misplace":
            return (page, page + 1 if page + 1 < pages else page - 1)
        if kind == "drop":
            reach = MFD_PACKET_PAGES - 1
            return range(max(0, page - reach), min(pages, page + reach + 1))
        return (page,)


NO_HOOKS = XHooks()
