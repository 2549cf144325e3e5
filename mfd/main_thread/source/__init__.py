"""The source of a live migration over TCP: QEMU's precopy with multifd, as processes.

What goes on the wire is QEMU's, byte for byte (``shared/qemu-wire.md``), so the
destination may be ``mfd incoming`` or a real QEMU (``-incoming tcp:...``)::

    connect   the main channel; N channel processes connect to the same address, each
              writes MultiFDInit_t (mfd's settings in its unused bytes)
    setup     stream: header, configuration, OPEN_RETURN_PATH, PING(1), PING(MFD_PING);
              ram START (MEM_SIZE, block list); SYNC on every channel + MULTIFD_FLUSH; EOS.
              The PONG to MFD_PING says who the destination is (``mfd.protocol.peer``).
    rounds    PART: pages to idle channels (without multifd: PAGE/ZERO/XBZRLE records on
              the main channel), SYNC ALL + MULTIFD_FLUSH at the end of every pass over RAM
              (legacy --multifd-flush-after-each-section: SYNC only, the destination syncs
              at EOS); EOS (to mfd: PING(MFD_ROUND_PING), whose PONG says how far behind
              the destination is); bitmap sync; convergence, auto-converge
    complete  stop the guest; SWITCHOVER_START; END: the final round; timer, globalstate
              (and to mfd: the guest's own state); EOF; vmdesc; to mfd: the page hashes
              (``mfd.shm.pagehash``: the channels hashed every page as they sent it)
    postcopy  instead of complete, when asked: the switch, the push, pause and recovery
    result    the return path: SHUT(0) -> completed, our guest quits; SHUT(1), a closed
              connection, or mfd's MFD_RESULT(failed) -> failed

Anything that goes wrong (the destination's failure, a lost connection, a dead channel,
cancel, the timeout, Ctrl-C) closes the connections and lets our guest run again: the
source stays authoritative until the destination has said SHUT(0).

The modules, each a collaborator the coordinator hands what it needs::

    migration.py   Migration: the coordinator (setup, rounds, complete or postcopy)
    session.py     Session: the status, the periodic checks and waits, the one error funnel,
                   the connections' end; Control: what the monitor thread and it share
    qmp.py         the monitor's handlers, talking to Control only
    channel.py     MainChannel: the stream out, the return path in, the destination's verdict
    ramstream.py   RamStream: the ram section on the main channel (the rounds' sink) and the
                   pages it carries itself (no multifd: PAGE/ZERO, XBZRLE)
    multifd.py     MultifdSender: pages to idle channels, flush and sync; the channels' start
    preempt.py     Preempt: postcopy-preempt's channel
    postcopy.py    Postcopy: the switch, the push, postcopy-paused and recovery
    switchover.py  Switchover: stop, the final round, the device state, the verdict
    verify.py      Verification: the page hash table, its cost and its comparison

The rounds themselves (bitmap sync, page search, convergence) are mfd.main_thread.precopy's,
shared with the file save.
"""
