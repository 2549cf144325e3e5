"""XBZRLE: the encoder and decoder against golden bytes and QEMU's C loop, round trips
(hypothesis), the decoder's refusals, and QEMU's cache rules (``mfd.main_thread.xbzrle``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfd.errors import ProtocolError
from mfd.main_thread.xbzrle import XbzrleCache
from mfd.protocol import xbzrle

PAGE = 4096


def qemu_encode(old: bytes, new: bytes, dlen: int = PAGE) -> bytes | int:
    """``xbzrle_encode_buffer`` transcribed byte by byte (the test's oracle, slow): the
    delta, 0 for an unchanged page, -1 on overflow (its checks where QEMU has them)."""
    def uleb(n: int) -> bytes:
        return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])

    d, i, out, slen = 0, 0, bytearray(), len(new)
    while i < slen:
        if d + 2 > dlen:
            return -1
        zrun = 0
        while i < slen and old[i] == new[i]:
            zrun, i = zrun + 1, i + 1
        if zrun == slen:
            return 0
        if i == slen:
            return bytes(out)
        out += uleb(zrun)
        d += len(uleb(zrun))
        if d + 2 > dlen:
            return -1
        start = i
        while i < slen and old[i] != new[i]:
            i += 1
        out += uleb(i - start)
        d += len(uleb(i - start))
        if d + (i - start) > dlen:
            return -1
        out += new[start:i]
        d += i - start
    return bytes(out)


def encode_one(old: bytes, new: bytes) -> bytes | int:
    lengths, data, starts = xbzrle.encode(np.frombuffer(old, np.uint8).reshape(1, PAGE),
                                          np.frombuffer(new, np.uint8).reshape(1, PAGE))
    n = int(lengths[0])
    return data[starts[0] : starts[0] + n].tobytes() if n > 0 else n


def changed(old: bytes, at: dict[int, int]) -> bytes:
    b = bytearray(old)
    for i, v in at.items():
        b[i] = v
    return bytes(b)


ZERO = bytes(PAGE)


# ---------------------------------------------------------------------------- golden bytes


@pytest.mark.parametrize(("at", "delta"), [
    ({1000: 7}, "e8070107"),  # zrun 1000 = e8 07, one byte
    ({0: 1, 1: 2, 2: 3}, "0003010203"),  # the only empty zero run: the first
    ({4094: 0xAA, 4095: 0xBB}, "fe1f02aabb"),  # up to the page's end: no tail run
    ({0: 0xAA, 1: 0xBB, 100: 0xCC}, "0002aabb6201cc"),
    ({127: 9}, "7f0109"), ({128: 9}, "80010109"),  # one- and two-byte numbers
])
def test_golden_deltas(at, delta):
    new = changed(ZERO, at)
    assert encode_one(ZERO, new) == bytes.fromhex(delta) == qemu_encode(ZERO, new)
    page = np.zeros((1, PAGE), dtype=np.uint8)
    d = np.frombuffer(bytes.fromhex(delta), np.uint8)
    xbzrle.decode_into(page, np.array([0]), d, np.array([0]), np.array([len(d)]))
    assert page.tobytes() == new


def test_unchanged_and_overflow():
    assert encode_one(ZERO, ZERO) == xbzrle.UNCHANGED == qemu_encode(ZERO, ZERO)
    assert encode_one(ZERO, b"\x01" * PAGE) == xbzrle.OVERFLOW == qemu_encode(
        ZERO, b"\x01" * PAGE)


def pairs_page(pairs: int, tail: bool) -> bytes:
    """``pairs`` runs (1 equal byte, 1 changed byte: 3 delta bytes each) from the page's
    start, then the rest changed (no tail) or equal (a tail run)."""
    b = bytearray(PAGE)
    for k in range(pairs):
        b[2 * k + 1] = 1
    if not tail:
        b[2 * pairs :] = b"\x02" * (PAGE - 2 * pairs)
    return bytes(b)


@pytest.mark.parametrize("pairs", [1363, 1364, 1365])
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "notail"])
def test_overflow_at_the_edge_as_qemu(pairs, tail):
    """Around 4096 bytes of delta, with and without a last equal run: QEMU gives up at
    ``dlen`` - 2 before skipping the tail, at ``dlen`` otherwise; mfd says the same."""
    new = pairs_page(pairs, tail)
    assert encode_one(ZERO, new) == qemu_encode(ZERO, new)


# ---------------------------------------------------------------------------- round trips


@st.composite
def page_pairs(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, PAGE, dtype=np.uint8)
    new = old.copy()
    kind = draw(st.sampled_from(["few", "runs", "dense", "same", "edges"]))
    if kind == "few":
        new[rng.integers(0, PAGE, draw(st.integers(1, 16)))] ^= 0xFF
    elif kind == "runs":
        for _ in range(draw(st.integers(1, 40))):
            a = int(rng.integers(0, PAGE))
            new[a : a + int(rng.integers(1, 300))] += 1
    elif kind == "dense":
        mask = rng.random(PAGE) < draw(st.floats(0.2, 0.9))
        new[mask] += 1
    elif kind == "edges":
        new[: draw(st.integers(1, 8))] += 1
        new[PAGE - draw(st.integers(1, 8)) :] += 1
    return old.tobytes(), new.tobytes()


@settings(max_examples=150, deadline=None)
@given(st.lists(page_pairs(), min_size=1, max_size=12))
def test_a_batch_encodes_as_qemu_and_decodes_back(pages):
    old = np.frombuffer(b"".join(o for o, _ in pages), np.uint8).reshape(-1, PAGE)
    new = np.frombuffer(b"".join(n for _, n in pages), np.uint8).reshape(-1, PAGE)
    lengths, data, starts = xbzrle.encode(old, new)
    for i, (o, n) in enumerate(pages):
        want = qemu_encode(o, n)
        got = int(lengths[i])
        if isinstance(want, int):
            assert got == want
        else:
            assert data[starts[i] : starts[i] + got].tobytes() == want
    sent = np.flatnonzero(lengths > 0)
    ram = old.copy()
    xbzrle.decode_into(ram, sent, data, starts[sent], lengths[sent])
    assert (ram[sent] == new[sent]).all()
    untouched = np.flatnonzero(lengths <= 0)
    assert (ram[untouched] == old[untouched]).all()


def test_records_on_the_wire():
    """``save_xbzrle_page``'s record: header, ENCODING_FLAG_XBZRLE, be16 length, delta; the
    first names the block, the next CONTINUE it."""
    d = np.frombuffer(bytes.fromhex("e8070107" "0003010203"), np.uint8)
    out = xbzrle.encode_records(np.array([0x1000, 0x5000]), np.array([4, 5]),
                                np.array([0, 4]), d, "mem")
    assert out == bytes.fromhex("0000000000001040" "036d656d" "01" "0004" "e8070107"
                                "0000000000005060" "01" "0005" "0003010203")


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("delta", "why"), [
    ("ff1f02aabb", "a run past the page"),  # zrun 4095 + 2 changed bytes
    ("8080", "a number longer than two bytes"),
    ("0000", "an empty changed run"),
    ("0001aa0001bb", "an empty zero run after the first"),
    ("0005aa", "a run past the delta"),
    ("0001aa05", "a pair cut short"),
])
def test_the_decoder_refuses(delta, why):
    page = np.zeros((2, PAGE), dtype=np.uint8)
    good = bytes.fromhex("0001aa")
    d = np.frombuffer(good + bytes.fromhex(delta), np.uint8)
    with pytest.raises(ProtocolError, match=r"block 'mem': XBZRLE page at 0x1000: its "
                       r"XBZRLE delta does not decode"):
        xbzrle.decode_into(page, np.array([0, 1]), d, np.array([0, 3]),
                           np.array([3, len(d) - 3]), "block 'mem': XBZRLE page")
    assert not page.any(), f"{why}: nothing written, not even the good delta"


# ---------------------------------------------------------------------------- the cache


def rows(*fills: int) -> np.ndarray:
    return np.array([np.full(PAGE, f, dtype=np.uint8) for f in fills])


def sent(batch) -> tuple[list[int], list[int]]:
    return batch.whole.tolist(), batch.encoded.tolist()


def test_cache_rules():
    c = XbzrleCache(4 * PAGE)  # 4 slots: pages 0 and 4 share slot 0
    a = np.array([0, PAGE, 2 * PAGE], dtype=np.int64)
    # a miss goes whole, and into the cache
    assert sent(c.encode(a, rows(1, 2, 3), 1, False)) == ([0, 1, 2], [])
    assert c.counters.cache_miss == 3 and c.counters.pages == 0
    # hits: changed pages as deltas, an unchanged one not at all; the cache takes them
    new = rows(1, 2, 3)
    new[0, 5] = 9
    new[2, :] = 7  # every byte: overflow, sent whole
    b = c.encode(a, new, 2, False)
    assert sent(b) == ([2], [0]) and b.lengths.tolist() == [3]  # 05 01 09
    assert c.counters.pages == 3 and c.counters.overflow == 1
    again = new.copy()
    again[0, 5] = 10
    b = c.encode(a[:1], again[:1], 3, False)
    assert b.data[b.starts[0] : b.starts[0] + b.lengths[0]].tobytes() == bytes.fromhex(
        "05010a"), "the delta from what went last, not from the first copy"
    # a zero page goes into the cache: the next delta is from zeros
    c.zero_pages(a[1:2], 3)
    z = np.zeros((1, PAGE), dtype=np.uint8)
    z[0, 0] = 1
    b = c.encode(a[1:2], z, 3, False)
    assert b.lengths.tolist() == [3]


def test_a_fresh_page_keeps_its_slot_and_the_last_stage_changes_nothing():
    c = XbzrleCache(4 * PAGE)
    p0, p4 = np.array([0]), np.array([4 * PAGE])
    c.encode(p0, rows(1), 1, False)
    # page 4 (slot 0) misses while page 0 was used within 2 syncs: not inserted
    c.encode(p4, rows(4), 2, False)
    assert c.addr[0] == 0
    c.encode(p4, rows(4), 3, False)  # now page 0 is stale: page 4 takes the slot
    assert c.addr[0] == 4 * PAGE
    # the last stage: a miss is not inserted, a hit does not update the cache
    c.encode(p0, rows(1), 9, True)
    assert c.addr[0] == 4 * PAGE
    c.encode(p4, rows(5), 9, True)
    assert (c.data[0] == 4).all()
    # two pages of one batch in one slot: in order, as QEMU's loop (the first inserted,
    # the second then refused: the first is fresh)
    c2 = XbzrleCache(4 * PAGE)
    b = c2.encode(np.array([0, 4 * PAGE], dtype=np.int64), rows(1, 2), 1, False)
    assert sent(b) == ([0, 1], []) and c2.addr[0] == 0 and (c2.data[0] == 1).all()
