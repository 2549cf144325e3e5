"""multifd compression methods: streams of packets, per-channel order, hostile payloads."""

from __future__ import annotations

import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard

from mfd.errors import ProtocolError
from mfd.protocol import multifd as M
from mfd.workers.methods import (
    MultiFDMethods,
    get_method,
    method_names,
    register_method,
)
from mfd.workers.methods.nocomp import NOCOMP
from mfd.workers.methods.zlib import zlib_compress_bound
from mfd.workers.methods.zstd import ZSTD, zstd_compress_bound

PAGE = 4096
COMPRESSED = ("zstd", "zlib")
WORDS = np.frombuffer(b"migration ram page block dirty bitmap channel multifd packet sync ",
                      dtype=np.uint8)


def pages(kind: str, n: int, seed: int) -> np.ndarray:
    """n pages (n, 4096) uint8 of one kind: random, zero or text-like."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    if kind == "zero":
        return np.zeros((n, PAGE), dtype=np.uint8)
    start = rng.integers(0, len(WORDS), n)[:, None]
    return WORDS[(start + np.arange(PAGE)[None, :]) % len(WORDS)]


def stream(seed: int = 0) -> list[np.ndarray]:
    """Packets of several sizes and kinds, as a channel would carry them."""
    spec = [("text", 128), ("random", 3), ("zero", 1), ("text", 17), ("random", 128),
            ("zero", 128), ("text", 1), ("random", 64)]
    out = []
    for i, (kind, n) in enumerate(spec):
        p = pages(kind, n, seed + i)
        if i % 3 == 0:  # and some packets of mixed pages
            p = np.concatenate([p[: n // 2], pages("random", n - n // 2, seed + 100 + i)])
        out.append(np.ascontiguousarray(p))
    return out


def recv(state, payload, n_bytes: int) -> bytes:
    out = bytearray(n_bytes)
    return bytes(state.recv(payload, memoryview(out)))


def payloads(name: str, packets, level: int = 1) -> list[bytes]:
    send = get_method(name).send_setup(level, 128)
    try:
        return [bytes(send.prepare([p])) for p in packets]
    finally:
        send.close()


# --- registry ---------------------------------------------------------------------------------


def test_registry():
    assert method_names() == ("none", "zstd", "zlib")
    for name, flag in (("none", M.MULTIFD_FLAG_NOCOMP), ("zstd", M.MULTIFD_FLAG_ZSTD),
                       ("zlib", M.MULTIFD_FLAG_ZLIB)):
        m: MultiFDMethods = get_method(name)
        assert (m.name, m.flag) == (name, flag)
    assert get_method("none").max_payload(128) == 512 * 1024
    assert [get_method(n).raw_pages for n in ("none", "zstd", "zlib")] == [True, False, False]
    assert get_method("zstd").max_payload(128) == zstd_compress_bound(512 * 1024) == 526336
    assert get_method("zlib").max_payload(128) == zlib_compress_bound(512 * 1024) == 524461


def test_register_duplicate_is_refused():
    with pytest.raises(ValueError, match="'zstd' is already registered"):
        register_method(ZSTD)
    clone = type(NOCOMP)(name="none2")  # a new name with none's flag
    with pytest.raises(ValueError, match="flag 0x0, already used by 'none'"):
        register_method(clone)
    assert method_names() == ("none", "zstd", "zlib")


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown multifd compression method 'lz4', expected "
                                         "one of none, zlib, zstd"):
        get_method("lz4")


# --- streams in order -------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPRESSED)
def test_stream_round_trip(name):
    packets = stream()
    m = get_method(name)
    send, rs = m.send_setup(1, 128), m.recv_setup(128)
    for p in packets:
        payload = send.prepare([p])
        assert len(payload) <= m.max_payload(128)
        assert recv(rs, payload, p.nbytes) == p.tobytes()
    send.close()
    rs.close()


@pytest.mark.parametrize("name,level", [("zstd", 0), ("zstd", 19), ("zlib", 0), ("zlib", 9)])
def test_levels(name, level):
    packets = stream(seed=7)[:4]
    rs = get_method(name).recv_setup(128)
    for p, payload in zip(packets, payloads(name, packets, level), strict=True):
        assert recv(rs, payload, p.nbytes) == p.tobytes()


@pytest.mark.parametrize("name", COMPRESSED)
def test_compression_actually_compresses(name):
    (payload,) = payloads(name, [pages("text", 128, 1)])
    assert len(payload) < 64 * 1024


def test_wire_format_is_one_stream_per_channel():
    """Like QEMU: a channel's payloads concatenated are ONE zstd frame / ONE zlib stream,
    never ended, which a plain streaming decompressor reads whole."""
    packets = stream(seed=3)
    whole = b"".join(p.tobytes() for p in packets)
    z = b"".join(payloads("zstd", packets))
    params = zstandard.get_frame_parameters(z)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert zstandard.ZstdDecompressor().decompressobj().decompress(z) == whole
    d = zlib.decompressobj()
    assert d.decompress(b"".join(payloads("zlib", packets))) == whole and not d.eof


@pytest.mark.parametrize("name", COMPRESSED)
def test_packet_without_normal_pages(name):
    """Zero-only packets have no payload and leave the stream untouched."""
    m = get_method(name)
    send, rs = m.send_setup(1, 128), m.recv_setup(128)
    p = pages("text", 4, 0)
    assert bytes(send.prepare([np.empty((0, PAGE), np.uint8)])) == b""
    rs.recv(b"", memoryview(bytearray()))
    assert recv(rs, send.prepare([p]), p.nbytes) == p.tobytes()
    with pytest.raises(ProtocolError, match="payload of 3 bytes for a packet without normal"):
        rs.recv(b"abc", memoryview(bytearray()))


# --- order and channel affinity ---------------------------------------------------------------


@pytest.mark.parametrize("name", COMPRESSED)
def test_second_packet_on_fresh_context_fails(name):
    """A payload depends on its channel's earlier packets. Packet 2 on a fresh context fails
    cleanly: the zstd frame header and the zlib header exist only in packet 1 (zstd reports
    "Unknown frame descriptor", zlib "incorrect header check"). The context is then broken.
    """
    packets = stream()
    p1, p2 = payloads(name, packets[:2])
    rs = get_method(name).recv_setup(128)
    with pytest.raises(ProtocolError, match=f"^{name}: corrupt payload"):
        recv(rs, p2, packets[1].nbytes)
    with pytest.raises(ProtocolError, match="context is unusable"):
        recv(rs, p1, packets[0].nbytes)


@pytest.mark.parametrize("name", COMPRESSED)
def test_skipped_packet_is_not_silently_ignored(name):
    """Skipping a packet mid-stream: the next one fails, or (when its back-references still
    land inside the history) decodes to wrong bytes. Either way the receiver must never skip
    or reorder a channel's packets; this documents that nothing in the payload detects it."""
    text = [pages("text", 8, s) for s in (1, 2, 3)]
    pl = payloads(name, text)
    rs = get_method(name).recv_setup(128)
    assert recv(rs, pl[0], text[0].nbytes) == text[0].tobytes()
    try:
        got = recv(rs, pl[2], text[2].nbytes)
    except ProtocolError:
        return
    assert got != text[2].tobytes()


# --- hostile payloads -------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPRESSED)
def test_truncated_payload(name):
    p = pages("text", 16, 0)
    (payload,) = payloads(name, [p])
    rs = get_method(name).recv_setup(128)
    with pytest.raises(ProtocolError, match=rf"^{name}: decompressed packet is \d+ bytes, "
                                            "expected 65536"):
        recv(rs, payload[:-8], p.nbytes)


@pytest.mark.parametrize("name", COMPRESSED)
def test_garbage_payload(name):
    garbage = np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    with pytest.raises(ProtocolError, match=f"^{name}: corrupt payload of 3000 bytes"):
        recv(get_method(name).recv_setup(128), garbage, 4 * PAGE)


@pytest.mark.parametrize("name", COMPRESSED)
def test_garbage_after_good_packet(name):
    packets = stream()[:1]
    (payload,) = payloads(name, packets)
    rs = get_method(name).recv_setup(128)
    recv(rs, payload, packets[0].nbytes)
    with pytest.raises(ProtocolError):
        recv(rs, b"\xff" * 200, PAGE)


@pytest.mark.parametrize("name", COMPRESSED)
def test_payload_decompresses_to_more_than_claimed(name):
    """Compress 2 pages, claim 1."""
    (payload,) = payloads(name, [pages("text", 2, 0)])
    with pytest.raises(ProtocolError, match=f"^{name}: decompressed packet is at least "
                                            r"\d+ bytes, expected 4096"):
        recv(get_method(name).recv_setup(128), payload, PAGE)


@pytest.mark.parametrize("name", COMPRESSED)
def test_decompression_bomb_is_stopped_with_bounded_memory(name):
    """64 MiB of zeros in one packet (a few KiB on the wire) claiming 128 pages."""
    big = bytes(64 << 20)
    if name == "zstd":
        c = zstandard.ZstdCompressor(level=1).compressobj()
        bomb = c.compress(big) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    else:
        c = zlib.compressobj(1)
        bomb = c.compress(big) + c.flush(zlib.Z_SYNC_FLUSH)
    del big
    assert len(bomb) < get_method(name).max_payload(128)
    rs = get_method(name).recv_setup(128)
    out = bytearray(128 * PAGE)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="decompressed packet is at least"):
            rs.recv(bomb, memoryview(out))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


@pytest.mark.parametrize("name", COMPRESSED)
def test_oversized_payload(name):
    m = get_method(name)
    with pytest.raises(ProtocolError, match=f"^{name}: payload is {m.max_payload(128) + 1} bytes, "
                                            f"expected at most {m.max_payload(128)}"):
        recv(m.recv_setup(128), bytes(m.max_payload(128) + 1), 128 * PAGE)


def test_zlib_stream_must_not_end():
    """QEMU's inflate loop refuses Z_STREAM_END; so does mfd."""
    p = pages("text", 1, 0)
    payload = zlib.compress(p.tobytes())  # Z_FINISH
    with pytest.raises(ProtocolError, match="stream ended inside a packet"):
        recv(get_method("zlib").recv_setup(128), payload, PAGE)


def test_zstd_refuses_huge_window():
    """A frame header asking for a 128 MiB window (level 22) is refused, not allocated."""
    c = zstandard.ZstdCompressor(level=22).compressobj()
    payload = c.compress(bytes(PAGE)) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with pytest.raises(ProtocolError, match="too much memory"):
        recv(get_method("zstd").recv_setup(128), payload, PAGE)


@pytest.mark.parametrize("name", COMPRESSED)
def test_closed_state_refuses(name):
    rs = get_method(name).recv_setup(128)
    rs.close()
    rs.close()
    with pytest.raises(ProtocolError, match="closed"):
        recv(rs, b"x", PAGE)
