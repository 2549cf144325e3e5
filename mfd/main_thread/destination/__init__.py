"""The destination of a live migration: ``mfd incoming --listen tcp:HOST:PORT``.

The source may be ``mfd migrate`` or a real QEMU (``migrate uri=tcp:HOST:PORT``): the wire
is QEMU's (``shared/qemu-wire.md``)::

    one port   the main channel (QEVM) and N multifd channels (MultiFDInit), told apart by
               their first bytes (accept); strangers get a warning line
    stream     read as it arrives by the sans-I/O decoder (streams), each event handed to
               the session's handler for its type (session): OPEN_RETURN_PATH, PING ->
               PONG; ram START: the block list -> unnamed RAM, receivedmap, a paused guest
               on that RAM or image files (ram, target); the first sync point: N receive
               channels, each handed its connection (channels); MULTIFD_FLUSH (legacy:
               EOS) -> recv sync: every channel reached its SYNC, then all are released
               (invariant 2); ZERO/PAGE/XBZRLE records (no multifd): placed by the main
               process (``mfd.shm.placer.MappedPlacer``); device sections: globalstate's
               runstate, an mfd source's guest state; postcopy: the guest runs on a uffd
               that asks for what it lacks (postcopy, faults)
    complete   EOF, vmdesc; from an mfd source its page hashes, compared page by page with
               ours (``mfd.shm.pagehash``: each process hashed every page it placed, as it
               placed it): equal -> the RAM gets its names, the guest takes it and runs (as
               QEMU's runstate says, unless --stopped)
    result     on the return path (if the source opened it): MFD_RESULT to an mfd source,
               then SHUT(0); SHUT(1) on failure

The modules::

    session    Incoming: the coordinator, its status, the event -> handler table, the
               one error funnel
    loop       the one wait, and the one periodic check after it
    accept     connections sorted by their first bytes
    channels   the multifd channels: adoption, start, sync points
    streams    the main channel (events, return path) and postcopy-preempt's
    ram        the RAM being received, its receivedmap and page hashes
    postcopy   postcopy's commands (ADVISE .. RESUME), the pause, postcopy-preempt
    faults     from LISTEN: the guest's uffd, its faults asked for, pages placed through it
    target     image files or a guest: the commit, and what a failure removes
    qmp        the monitor's commands, through a lock-guarded Control

What the source does not say (channels, compression, flush mode, uuid) comes from the
options, with QEMU's names and defaults; an mfd source says it in its MultiFDInit and
options that were not given follow it. Until the result nothing has a name: a destination
that fails removes its guest and its RAM, and one killed outright leaves nothing behind
(the RAM is held only by descriptors).
"""
