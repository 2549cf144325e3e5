"""multifd compression methods: one ops table per method, like QEMU's ``MultiFDMethods``.

Mirrors ``migration/multifd.h: MultiFDMethods`` and ``multifd_register_ops`` with the
methods of ``multifd-nocomp.c``, ``multifd-zstd.c`` and ``multifd-zlib.c``. Worker loops call
only this table; they never branch on the method's name::

    send channel                                   receive channel (same id)
    ------------                                   -------------------------
    st = get_method(name).send_setup(level)        rs = get_method(name).recv_setup()
    for each packet with normal pages:             for each packet, in arrival order:
        payload = st.prepare(pages)  ──socket──>       rs.recv(payload, out)  # -> guest RAM
        header.next_packet_size = len(payload)
    st.close()                                     rs.close()

Contract:

- ``prepare(pages)`` takes the packet's normal pages, contiguous (``n * 4096`` bytes, in
  offset order) and returns the payload to send after the header. Zero pages never reach
  a method, and a packet without normal pages has no payload (``prepare`` is not called,
  or returns ``b""`` for empty input).
- ``recv(payload, out)`` fills ``out`` (exactly ``normal_pages * 4096`` writable bytes) from
  one packet's payload. A payload that decodes to more or fewer bytes, is corrupt or is
  longer than ``max_payload`` raises :class:`ProtocolError` (prefixed with the method name;
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

    def prepare(self, pages: memoryview | np.ndarray) -> bytes | memoryview:
        """The payload for one packet's normal pages (``multifd_send_prepare`` hook)."""
        ...

    def close(self) -> None:
        """``send_cleanup``."""
        ...


class RecvState(Protocol):
    """One receive channel's decompression context."""

    def recv(self, payload: bytes | memoryview, out: memoryview) -> memoryview:
        """One packet's pages (``recv`` hook): ``out``, decoded into, or, for a method whose
        payload already is the pages (none), the payload itself, checked, not copied."""
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

    @property
    def max_payload(self) -> int:
        """Largest next_packet_size the receiver accepts (a full packet, compressBound)."""
        ...

    def send_setup(self, level: int) -> SendState:
        """A send channel's context; ``level`` was range-checked in ``options.py``."""
        ...

    def recv_setup(self) -> RecvState:
        """A receive channel's context."""
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
