"""Frames between the main process and its channel processes (ZeroMQ ROUTER <-> DEALER).

Offsets only, never page bytes: a channel reads and writes guest RAM in shared memory itself.

=========  ===========================================================  =========
message    frames                                                       direction
=========  ===========================================================  =========
READY      b"READY", be32 channel id                                    channel ->
JOB        b"JOB", be64 job id + be32 block + be32 flags, u32 page array  -> channel
           (save: page indices; restore: [start, end) pairs); flags:
           JOB_HASH: put each page's hash in the page hash table;
           JOB_MFD_PACKETS: the peer is mfd, packets of the size agreed
           (``mfd.protocol.peer``), else QEMU's
DIGEST     b"DIGEST", as JOB with [start, end) pairs: hash, move nothing  -> channel
DONE       b"DONE", be64 job id + be64 bytes moved + f64 seconds spent   channel ->
           hashing pages, u8 nonzero mask, chunk digests (save JOB: one
           mask byte per page of the job, 1 = written; restore JOB and
           DIGEST: 32 bytes per chunk)
SYNC       b"SYNC", as JOB with no pages (flags as JOB's): put a SYNC    -> channel
           packet on the connection (socket send channels), answered
           with DONE
SYNCED     b"SYNCED", be64 packet_num + f64 seconds spent hashing pages  channel ->
           since the last SYNC: reached a SYNC packet and waits (socket
           receive channels)
RELEASE    b"RELEASE": every channel reached its SYNC, go on             -> channel
QUIESCE    b"QUIESCE": read nothing more from the connection             -> channel
QUIESCED   b"QUIESCED": done; nothing more lands in RAM                  channel ->
CLOSED     b"CLOSED": the peer ended the connection at a packet boundary  channel ->
ERROR      b"ERROR", text (one line for an MfdError, else a traceback),   channel ->
           b"link" when the connection to the other host was lost
STOP       b"STOP"                                                       -> channel
=========  ===========================================================  =========
"""

from __future__ import annotations

import struct

import numpy as np

from mfd.errors import ProtocolError

READY = b"READY"
JOB = b"JOB"
DIGEST = b"DIGEST"
DONE = b"DONE"
SYNC = b"SYNC"
SYNCED = b"SYNCED"
RELEASE = b"RELEASE"
QUIESCE = b"QUIESCE"
QUIESCED = b"QUIESCED"
ERROR = b"ERROR"
STOP = b"STOP"
CLOSED = b"CLOSED"
JOB_HASH = 0x1
JOB_MFD_PACKETS = 0x2

_JOB = struct.Struct(">QII")
_DONE = struct.Struct(">QQd")
_READY = struct.Struct(">I")
_SYNCED = struct.Struct(">Qd")


def encode_ready(channel_id: int) -> list[bytes]:
    return [READY, _READY.pack(channel_id)]


def encode_job(job_id: int, block: int, pages: np.ndarray, kind: bytes = JOB,
               flags: int = 0) -> list[bytes]:
    return [kind, _JOB.pack(job_id, block, flags),
            np.ascontiguousarray(pages, dtype=np.uint32).data]


def decode_job(frames: list) -> tuple[int, int, np.ndarray, int]:
    if len(frames) != 3 or len(frames[1]) != _JOB.size:
        raise ProtocolError(f"malformed JOB message ({len(frames)} frames)")
    job_id, block, flags = _JOB.unpack(frames[1])
    return job_id, block, np.frombuffer(frames[2], dtype=np.uint32), flags


def encode_done(job_id: int, moved: int, nonzero: np.ndarray | None = None,
                digests: bytes = b"", hashing: float = 0.0) -> list[bytes]:
    mask = b"" if nonzero is None else np.ascontiguousarray(nonzero, dtype=np.uint8).data
    return [DONE, _DONE.pack(job_id, moved, hashing), mask, digests]


def decode_done(frames: list) -> tuple[int, int, float, np.ndarray, bytes]:
    """job id, bytes moved, seconds spent hashing pages, nonzero mask, chunk digests"""
    if len(frames) != 4 or len(frames[1]) != _DONE.size:
        raise ProtocolError(f"malformed DONE message ({len(frames)} frames)")
    job_id, moved, hashing = _DONE.unpack(frames[1])
    return (job_id, moved, hashing, np.frombuffer(frames[2], dtype=np.uint8).astype(bool),
            frames[3])


def decode_ready(frames: list) -> int:
    if len(frames) != 2 or len(frames[1]) != _READY.size:
        raise ProtocolError("malformed READY message")
    return _READY.unpack(frames[1])[0]


def encode_synced(packet_num: int, hashing: float) -> list[bytes]:
    return [SYNCED, _SYNCED.pack(packet_num, hashing)]


def decode_synced(frames: list) -> tuple[int, float]:
    """packet_num, seconds spent hashing pages since the last SYNC"""
    if len(frames) != 2 or len(frames[1]) != _SYNCED.size:
        raise ProtocolError("malformed SYNCED message")
    return _SYNCED.unpack(frames[1])
