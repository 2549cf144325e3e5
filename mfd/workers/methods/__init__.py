"""multifd compression methods: one ops table per method, like QEMU's ``MultiFDMethods``.

Mirrors ``migration/multifd.h: MultiFDMethods`` and ``multifd_register_ops`` with the
methods of ``multifd-nocomp.c``, ``multifd-zstd.c`` and ``multifd-zlib.c``. Worker loops call
only this table; they never branch on the method's name, only on what it declares::

    send channel                                   receive channel (same id)
    ------------                                   -------------------------
    raw_pages (none): the normal pages themselves, from guest memory to guest memory
    sendmsg(header, pages in RAM)    ──socket──>   splice / recvmsg_into straight into RAM

    otherwise (zstd, zlib): a payload each channel's own stream encodes and decodes
    st = m.send_setup(level, pages)                rs = m.recv_setup(pages)
    for each packet with normal pages:             for each packet, in arrival order:
        payload = st.prepare(runs)  ──socket──>        rs.recv(payload, out)  # -> a buffer
        header.next_packet_size = len(payload)         (then placed: mfd.shm.placer)
    st.close()                                     rs.close()

``pages``: the most pages a packet of the channel holds (QEMU's 128, or the larger packet two
mfd ends agree on, ``mfd.protocol.peer``); buffers and bounds are sized for it.

Contract:

- ``raw_pages`` True: the payload is the packet's normal pages as they are, in payload
  order (QEMU's multifd-nocomp writev()s and readv()s iovs of guest pages). The channels move
  them between RAM and the connection without a copy in between, so the method has no
  channel state: ``send_setup`` and ``recv_setup`` are for methods without raw pages only.
- ``prepare(runs)`` takes the packet's normal pages as a list of buffers of whole pages
  (runs of consecutive pages where they are in guest RAM, in offset order) and returns the
  payload to send after the header (it may be a view of the state's own buffer, valid until
  the next call). Zero pages never reach a method, and a packet without normal pages has no
  payload (``prepare`` is not called, or returns ``b""`` for empty input).
- ``recv(payload, out)`` fills ``out`` (exactly ``normal_pages * 4096`` writable bytes) from
  one packet's payload. A payload that decodes to more or fewer bytes, is corrupt or is
  longer than ``max_payload(pages)`` raises :class:`ProtocolError` (prefixed with the method name;
  the worker adds its channel). No input can make it allocate more than a bounded amount.
  After an error the state is broken and refuses further packets.
- ``close()`` releases the context; calling it twice is harmless.

Why the states are per channel and streaming: as in QEMU, zstd and zlib keep ONE
compression stream per channel for the whole migration, flushed (not ended) at the end of
each packet, so later packets reuse the history of earlier ones. A payload is therefore
decodable only by the same channel's decompression stream, after every earlier packet of
that channel, in order: the receiver must keep channel affinity and must not reorder or
skip a channel's packets (skipping one makes the next fail or decode to garbage).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mfd.workers.methods.nocomp import NOCOMP
from mfd.workers.methods.zlib import ZLIB
from mfd.workers.methods.zstd import ZSTD


class SendState(Protocol):
    """One send channel's compression context (QEMU's ``p->compress_data``)."""

    def prepare(self, runs: list[memoryview | np.ndarray]) -> bytes | memoryview:
        """The payload for one packet's normal pages (``multifd_send_prepare`` hook)."""
        ...

    def close(self) -> None:
        """``send_cleanup``."""
        ...


class RecvState(Protocol):
    """One receive channel's decompression context."""

    def recv(self, payload: bytes | memoryview, out: memoryview) -> memoryview:
        """One packet's pages (``recv`` hook), decoded into ``out``, which it returns."""
        ...

    def close(self) -> None:
        """``recv_cleanup``."""
        ...


class MultiFDMethods(Protocol):
    """The ops table of one multifd-compression method."""

    @property
    def name(self) -> str:
        """``multifd-compression`` value: "none", "zstd", "zlib"."""
        ...

    @property
    def flag(self) -> int:
        """The MULTIFD_FLAG_* compression bits this method puts in (and expects on) packets."""
        ...

    def max_payload(self, pages: int) -> int:
        """Largest next_packet_size the receiver accepts for packets of ``pages`` pages (a
        full packet, compressBound)."""
        ...

    @property
    def raw_pages(self) -> bool:
        """The payload is the normal pages themselves: channels send them from guest memory
        and receive them straight into RAM; no channel state (QEMU's multifd-nocomp)."""
        ...

    def send_setup(self, level: int, pages: int) -> SendState:
        """A send channel's context (not raw_pages); ``level`` was range-checked in
        ``options.py``."""
        ...

    def recv_setup(self, pages: int) -> RecvState:
        """A receive channel's context (not raw_pages)."""
        ...


_METHODS: dict[str, MultiFDMethods] = {}


def register_method(method: MultiFDMethods) -> None:
    """``multifd_register_ops``: one table per name and per flag."""
    if method.name in _METHODS:
        raise ValueError(f"multifd method {method.name!r} is already registered")
    for other in _METHODS.values():
        if other.flag == method.flag:
            raise ValueError(f"multifd method {method.name!r} uses flag {method.flag:#x}, "
                             f"already used by {other.name!r}")
    _METHODS[method.name] = method


def get_method(name: str) -> MultiFDMethods:
    """The table registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown multifd compression method {name!r}, expected one of "
                         f"{', '.join(sorted(_METHODS))}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


for _m in (NOCOMP, ZSTD, ZLIB):
    register_method(_m)
del _m
