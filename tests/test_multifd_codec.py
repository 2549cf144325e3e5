"""multifd socket codec: golden bytes built by hand, round trips, one test per refusal."""

from __future__ import annotations

import struct
import uuid as uuidlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfd.errors import ProtocolError
from mfd.protocol import multifd as M

PAGE = 4096
UUID = bytes(range(16))
OTHER_UUID = bytes(range(100, 116))
BLOCKS = {"pc.ram": 64 * PAGE, "vga.vram": 16 * PAGE, "tiny": 100}
WHERE = "channel 2"


def hand_init(magic=0x11223344, version=1, uid=UUID, chan=1) -> bytes:
    return struct.pack(">II16sB7x32x", magic, version, uid, chan)


def hand_packet(*, flags, pages_alloc=128, normal=(), zero=(), nps=0, num=0,
                ramblock=b"", page_count=128) -> bytes:
    """MultiFDPacket_t written field by field from the layout table, not from the encoder."""
    head = struct.pack(">IIIIIIQI", 0x11223344, 1, flags, pages_alloc, len(normal), nps, num,
                       len(zero))
    head += bytes(4 + 24)  # unused32, unused64[3]
    head += ramblock.ljust(256, b"\0")
    offs = b"".join(struct.pack(">Q", o) for o in (*normal, *zero))
    return head + offs.ljust(8 * page_count, b"\0")


def patched(raw: bytes, fmt: str, at: int, value) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


def decode(raw, *, comp=M.MULTIFD_FLAG_ZSTD, blocks=BLOCKS, **kw):
    return M.decode_packet(raw, blocks=blocks, compression_flag=comp, where=WHERE, **kw)


def data_packet(**kw) -> bytes:
    args = dict(flags=M.MULTIFD_FLAG_ZSTD, packet_num=9, ramblock="pc.ram",
                normal=np.array([0, 2 * PAGE], dtype=np.uint64),
                zero=np.array([PAGE], dtype=np.uint64), next_packet_size=100)
    args.update(kw)
    return M.encode_packet(**args)


# --- constants and golden bytes --------------------------------------------------------------


def test_constants():
    assert M.PACKET_SIZE == 320 + 8 * 128 == 1344
    assert M.INIT_SIZE == 64
    assert M.MULTIFD_FLAG_COMPRESSION_MASK == 0x3E
    assert M.packet_size(32) == 320 + 256


def test_init_golden():
    raw = M.encode_init(M.MultiFDInit(uuid=UUID, id=1))
    assert raw == hand_init()
    assert raw[:8] == bytes.fromhex("1122334400000001")
    assert raw[24] == 1 and raw[25:] == bytes(39)


def test_packet_golden():
    raw = data_packet(packet_num=0x0102030405060708)
    assert raw == hand_packet(flags=0x4, normal=(0, 2 * PAGE), zero=(PAGE,), nps=100,
                              num=0x0102030405060708, ramblock=b"pc.ram")
    # The first 36 bytes, spelled out: magic, version, flags, alloc, normal, nps, num, zero.
    assert raw[:36] == bytes.fromhex("11223344 00000001 00000004 00000080 00000002 00000064"
                                     "0102030405060708 00000001")
    assert raw[320:344] == bytes.fromhex("0000000000000000 0000000000002000 0000000000001000")
    assert len(raw) == 1344


def test_sync_packet_golden():
    raw = M.encode_packet(flags=M.MULTIFD_FLAG_SYNC, packet_num=5, ramblock="",
                          normal=np.empty(0, np.uint64), zero=np.empty(0, np.uint64),
                          next_packet_size=0)
    assert raw == hand_packet(flags=1, num=5)


# --- round trips -----------------------------------------------------------------------------


def test_init_round_trip():
    raw = M.encode_init(M.MultiFDInit(uuid=UUID, id=3))
    assert M.decode_init(raw, where=WHERE) == M.MultiFDInit(UUID, 3)


@given(data=st.data(), n_normal=st.integers(0, 128), comp=st.sampled_from(
    [M.MULTIFD_FLAG_NOCOMP, M.MULTIFD_FLAG_ZLIB, M.MULTIFD_FLAG_ZSTD]),
    sync=st.booleans(), num=st.integers(0, 2**64 - 1))
def test_packet_round_trip(data, n_normal, comp, sync, num):
    n_zero = data.draw(st.integers(0 if n_normal else 1, 128 - n_normal))
    pages = data.draw(st.lists(st.integers(0, 63), min_size=n_normal + n_zero,
                               max_size=n_normal + n_zero))
    offs = np.array(pages, dtype=np.uint64) * PAGE
    nps = n_normal * PAGE if comp == M.MULTIFD_FLAG_NOCOMP else (500 if n_normal else 0)
    flags = comp | (M.MULTIFD_FLAG_SYNC if sync else 0)
    raw = M.encode_packet(flags=flags, packet_num=num, ramblock="pc.ram",
                          normal=offs[:n_normal], zero=offs[n_normal:], next_packet_size=nps)
    p = decode(raw, comp=comp)
    assert (p.flags, p.pages_alloc, p.normal_pages, p.zero_pages, p.packet_num,
            p.next_packet_size, p.ramblock, p.sync) == \
        (flags, 128, n_normal, n_zero, num, nps, "pc.ram", sync)
    assert p.offsets.dtype == np.uint64
    np.testing.assert_array_equal(p.normal, offs[:n_normal])
    np.testing.assert_array_equal(p.zero, offs[n_normal:])
    assert p.payload_size == (nps if n_normal else 0)


def test_sync_packet_decodes_without_compression_bits():
    """10.x SYNC packets carry no compression bits; a zstd receiver must accept them."""
    raw = hand_packet(flags=M.MULTIFD_FLAG_SYNC, num=7, nps=123)  # stale nps: ignored
    p = decode(raw, comp=M.MULTIFD_FLAG_ZSTD)
    assert p.sync and p.normal_pages == p.zero_pages == 0 and p.ramblock == ""
    assert p.payload_size == 0 and len(p.offsets) == 0


def test_sync_packet_with_pages_is_accepted():
    """QEMU < 9.0 could send pages in the SYNC packet; they must still be applied."""
    raw = hand_packet(flags=M.MULTIFD_FLAG_SYNC | M.MULTIFD_FLAG_ZSTD, normal=(PAGE,), nps=50,
                      ramblock=b"pc.ram")
    p = decode(raw)
    assert p.sync and list(p.normal) == [PAGE] and p.payload_size == 50


def test_smaller_pages_alloc_and_memoryview_input():
    raw = hand_packet(flags=0x4, pages_alloc=16, normal=(PAGE,), nps=10, ramblock=b"pc.ram")
    p = decode(memoryview(raw))
    assert p.pages_alloc == 16 and list(p.normal) == [PAGE]


def test_offsets_are_read_only_copy():
    buf = bytearray(data_packet())
    p = decode(buf)
    struct.pack_into(">Q", buf, 320, 0x5000)  # the caller reuses its buffer
    assert list(p.offsets) == [0, 2 * PAGE, PAGE]
    with pytest.raises(ValueError):
        p.offsets[0] = 1


def test_ramblock_byte_255_is_forced_to_nul():
    """QEMU sets ramblock[255] = 0: a name filling all 256 bytes is read as 255 bytes."""
    name = b"a" * 256
    raw = hand_packet(flags=0x4, normal=(0,), nps=10, ramblock=name)
    p = decode(raw, blocks={"a" * 255: PAGE})
    assert p.ramblock == "a" * 255


def test_last_page_of_block_is_accepted():
    raw = hand_packet(flags=0x4, normal=(63 * PAGE,), zero=(63 * PAGE,), nps=10,
                      ramblock=b"pc.ram")
    assert list(decode(raw).offsets) == [63 * PAGE, 63 * PAGE]


def test_page_count_parameter():
    raw = M.encode_packet(flags=0x4, packet_num=1, ramblock="pc.ram",
                          normal=np.array([PAGE], np.uint64), zero=np.empty(0, np.uint64),
                          next_packet_size=10, page_count=32)
    assert len(raw) == M.packet_size(32)
    assert list(decode(raw, page_count=32).normal) == [PAGE]


def test_encode_refuses_bad_arguments():
    with pytest.raises(ValueError, match="exceed page_count"):
        data_packet(normal=np.arange(128, dtype=np.uint64) * PAGE)
    with pytest.raises(ValueError, match="idstr"):
        data_packet(ramblock="x" * 256)
    with pytest.raises(ValueError, match="uuid"):
        M.encode_init(M.MultiFDInit(uuid=b"short", id=0))


# --- decode_init refusals --------------------------------------------------------------------


def init_error(raw: bytes, channels=4) -> str:
    with pytest.raises(ProtocolError) as e:
        M.check_init(M.decode_init(raw, where=WHERE), channels=channels, uuid=UUID,
                     where=WHERE)
    msg = str(e.value)
    assert msg.startswith(WHERE + ": ")
    return msg


def test_init_wrong_length():
    assert "MultiFDInit is 63 bytes, expected 64" in init_error(hand_init()[:63])


def test_init_wrong_magic():
    assert "magic 0x5145564d, expected 0x11223344" in init_error(hand_init(magic=0x5145564D))


def test_init_wrong_version():
    assert "version 2, expected 1" in init_error(hand_init(version=2))


def test_init_uuid_mismatch():
    msg = init_error(hand_init(uid=OTHER_UUID))
    assert f"uuid {uuidlib.UUID(bytes=OTHER_UUID)}, expected {uuidlib.UUID(bytes=UUID)}" in msg


def test_init_id_equal_to_channels_is_refused():
    """QEMU only refuses id > channels; mfd also refuses id == channels."""
    assert "channel id 4, expected 0..3" in init_error(hand_init(chan=4), channels=4)
    assert "channel id 200" in init_error(hand_init(chan=200), channels=4)
    M.check_init(M.decode_init(hand_init(chan=3), where=WHERE), channels=4, uuid=UUID,
                 where=WHERE)


# --- decode_packet refusals ------------------------------------------------------------------


def packet_error(raw, **kw) -> str:
    with pytest.raises(ProtocolError) as e:
        decode(raw, **kw)
    msg = str(e.value)
    assert msg.startswith(WHERE + ": ")
    return msg


def test_packet_wrong_length():
    assert "packet is 1343 bytes, expected 1344" in packet_error(data_packet()[:-1])
    assert "packet is 1345 bytes" in packet_error(data_packet() + b"\0")


def test_packet_wrong_magic():
    assert "magic 0x11223345, expected 0x11223344" in \
        packet_error(patched(data_packet(), ">I", 0, 0x11223345))


def test_packet_wrong_version():
    assert "version 2, expected 1" in packet_error(patched(data_packet(), ">I", 4, 2))


def test_packet_device_state_not_supported():
    msg = packet_error(patched(data_packet(), ">I", 8, M.MULTIFD_FLAG_DEVICE_STATE))
    assert "device-state" in msg and "not supported" in msg


def test_packet_unknown_flag_bits():
    msg = packet_error(patched(data_packet(), ">I", 8, 0x4 | 0x100))
    assert "unknown bits 0x100" in msg and "not supported" in msg


def test_packet_pages_alloc_too_large():
    assert "pages_alloc 129, expected at most 128" in \
        packet_error(patched(data_packet(), ">I", 12, 129))


def test_packet_normal_exceeds_pages_alloc():
    raw = hand_packet(flags=0x4, pages_alloc=2, normal=(0, PAGE, 2 * PAGE), nps=10,
                      ramblock=b"pc.ram")
    assert "3 normal pages, expected at most pages_alloc 2" in packet_error(raw)


def test_packet_zero_exceeds_remaining():
    raw = hand_packet(flags=0x4, pages_alloc=3, normal=(0, PAGE), zero=(0, PAGE), nps=10,
                      ramblock=b"pc.ram")
    assert "2 zero pages, expected at most 1" in packet_error(raw)


def test_packet_compression_mismatch():
    msg = packet_error(data_packet(flags=M.MULTIFD_FLAG_ZLIB), comp=M.MULTIFD_FLAG_ZSTD)
    assert "compression flags 0x2 (zlib), expected 0x4 (zstd)" in msg
    msg = packet_error(data_packet(flags=M.MULTIFD_FLAG_QATZIP), comp=M.MULTIFD_FLAG_NOCOMP)
    assert "0x20 (qatzip), expected 0x0 (none)" in msg


def test_packet_ramblock_not_utf8():
    raw = hand_packet(flags=0x4, normal=(0,), nps=10, ramblock=b"pc.\xff")
    assert "ramblock b'pc.\\xff' is not UTF-8" in packet_error(raw)


def test_packet_unknown_block():
    assert "unknown ram block 'pc.rom'" in packet_error(data_packet(ramblock="pc.rom"))
    raw = hand_packet(flags=0x4, normal=(0,), nps=10, ramblock=b"")
    assert "unknown ram block ''" in packet_error(raw)


def test_packet_offset_not_aligned():
    raw = hand_packet(flags=0x4, normal=(0, PAGE + 8), nps=10, ramblock=b"pc.ram")
    msg = packet_error(raw)
    assert "normal page 1 offset 0x1008 in block 'pc.ram' is not aligned" in msg


def test_packet_offset_beyond_block():
    raw = hand_packet(flags=0x4, normal=(0,), zero=(PAGE, 64 * PAGE), nps=10,
                      ramblock=b"pc.ram")
    msg = packet_error(raw)
    assert "zero page 1 offset 0x40000 in block 'pc.ram' is beyond the block's last page" in msg
    assert "expected offset <= 0x3f000" in msg
    raw = hand_packet(flags=0x4, normal=(2**64 - PAGE,), nps=10, ramblock=b"pc.ram")
    assert "offset 0xfffffffffffff000" in packet_error(raw)


def test_packet_block_smaller_than_a_page():
    """QEMU's used_length - page_size would wrap; mfd refuses every offset."""
    raw = hand_packet(flags=0x4, normal=(0,), nps=10, ramblock=b"tiny")
    assert "less than a page" in packet_error(raw)


def test_packet_nocomp_payload_size_mismatch():
    raw = data_packet(flags=M.MULTIFD_FLAG_NOCOMP, next_packet_size=PAGE)
    msg = packet_error(raw, comp=M.MULTIFD_FLAG_NOCOMP)
    assert "next_packet_size 4096, expected 8192 (2 normal pages, no compression)" in msg


def test_packet_compressed_payload_without_normal_pages():
    raw = hand_packet(flags=0x4, zero=(0,), nps=10, ramblock=b"pc.ram")
    assert "next_packet_size 10 with no normal pages, expected 0" in packet_error(raw)


def test_packet_compressed_payload_too_large():
    msg = packet_error(data_packet(next_packet_size=2 * 512 * 1024 + 1))
    assert "next_packet_size 1048577, expected at most 1048576" in msg
