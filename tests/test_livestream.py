"""The wire's pure pieces: the stream decoder fed any split of the bytes (QEMU's recorded
main channels and hand-made streams), the return path, and what mfd adds between mfd ends."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from helpers import SHARED
from hypothesis import given, settings
from hypothesis import strategies as st

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import devices, livestream, multifd, peer, ram, returnpath, stream
from mfd.protocol.codec import Reader

SAMPLES = SHARED / "wire-samples"


def _setup(blocks=(("mem", 1 << 20),), extra: bytes = b"") -> bytes:
    return (stream.encode_file_header() + stream.encode_configuration(stream.Configuration("none"))
            + extra
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, 1, "ram", 0, 4)
            + ram.encode_mem_size(sum(s for _, s in blocks))
            + b"".join(ram.encode_block_entry(n, s) for n, s in blocks))


def _end_ram() -> bytes:
    return ram.encode_eos() + stream.encode_footer(1)


def _summary(events) -> list:
    """Events as comparable values (page data as bytes)."""
    out = []
    for e in events:
        if isinstance(e, livestream.Pages | livestream.ZeroPages):
            for i, page in enumerate(e.pages.tolist()):  # runs may split differently
                data = bytes(e.data[i]) if isinstance(e, livestream.Pages) else None
                out.append((type(e).__name__, e.idstr, page, data))
        else:
            out.append(e)
    return out


def _decode(data: bytes, cuts: list[int]) -> tuple[list, livestream.StreamDecoder]:
    d = livestream.StreamDecoder()
    events = []
    at = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events += _summary(d.feed(data[at:cut]))
        at = cut
    return events, d


def test_zero_records_golden_bytes():
    got = ram.encode_zero_records(np.array([0x1000, 0x5000]))
    want = struct.pack(">QB", 0x1000 | 0x22, 0) + struct.pack(">QB", 0x5000 | 0x22, 0)
    assert got == want


@pytest.mark.parametrize("name", ["main-nocomp.bin", "main-return-path.bin",
                                  "main-flush-each-section.bin"])
def test_qemu_main_channels_decode(name):
    """What QEMU 10 put on its main channel, whole: every event in order, then done."""
    events, d = _decode((SAMPLES / name).read_bytes(), [])
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Header" and kinds[-2:] == ["Eof", "Vmdesc"] and d.done
    assert events[kinds.index("Blocks")] == livestream.Blocks([("mem", 64 << 20)])
    devs = [e.state.idstr for e in events if isinstance(e, livestream.Device)]
    assert devs == ["timer", "globalstate"]
    if name == "main-return-path.bin":
        assert kinds[1:3] == ["ReturnPath", "Ping"] and events[2] == livestream.Ping(1)
    flushes = kinds.count("Flush")
    assert flushes == (0 if "flush-each" in name else 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1200), max_size=40), st.sampled_from([
    "main-nocomp.bin", "main-return-path.bin", "main-flush-each-section.bin"]))
def test_any_split_of_qemu_bytes_gives_the_same_events(cuts, name):
    data = (SAMPLES / name).read_bytes()
    assert _decode(data, cuts)[0] == _decode(data, [])[0]


def _hand_stream() -> bytes:
    """Pages and zero pages on the main channel (no multifd), two blocks, a device mfd
    cannot parse after RAM, a vmdesc."""
    page = bytes(range(256)) * 16
    pages = b"".join(ram.encode_page(a, bytes([a >> 12]) * 4096, None if a else "mem")
                     for a in range(0, 5 << 12, 1 << 12))
    return (_setup((("mem", 1 << 20), ("rom", 8192)),
                   stream.encode_command(stream.Command(C.MIG_CMD_OPEN_RETURN_PATH))
                   + stream.encode_command(stream.Command(C.MIG_CMD_PING, b"\0\0\0\1")))
            + _end_ram()
            + stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1) + pages
            + ram.encode_zero_page(0x9000, "mem")
            + ram.encode_zero_records(np.array([0xA000, 0xB000]))
            + ram.encode_page(0x1000, page, "rom") + _end_ram()
            + stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START))
            + stream.encode_section_part(C.QEMU_VM_SECTION_END, 1) + _end_ram()
            + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, 5, "cpu", 0, 9)
            + b"\x7e\x00\x00\x00\x05\x42" + bytes(40) + stream.encode_footer(5)
            + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, 3, "globalstate", 0, 1)
            + devices.encode_globalstate("running") + stream.encode_footer(3)
            + stream.encode_eof() + stream.encode_vmdesc(b"{}"))


def test_a_hand_made_stream_with_pages_and_an_unknown_device():
    events, d = _decode(_hand_stream(), [])
    assert d.done
    pages = [(e[1], e[2], e[3][:1]) for e in events if isinstance(e, tuple) and e[3]]
    assert pages == [("mem", p, bytes([p])) for p in range(5)] + [("rom", 1, b"\0")]
    zeros = [e[2] for e in events if isinstance(e, tuple) and e[3] is None]
    assert zeros == [9, 10, 11]
    assert livestream.Skipped("cpu") in events  # its bytes held a false footer
    assert any(isinstance(e, livestream.Device) and e.state.fields["runstate"] == "running"
               for e in events)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 22000), max_size=30))
def test_any_split_of_a_hand_made_stream_gives_the_same_events(cuts):
    data = _hand_stream()
    assert _decode(data, cuts)[0] == _decode(data, [])[0]


def test_an_mfd_source_is_known_by_its_ping_and_sends_page_hashes_after_the_vmdesc():
    tables = {"mem": bytes(range(256)) * 8}  # 8 bytes for each of 256 pages
    data = (_setup((("mem", 1 << 20),), stream.encode_command(stream.Command(
        C.MIG_CMD_PING, peer.MFD_PING.to_bytes(4, "big")))) + _end_ram()
            + stream.encode_section_part(C.QEMU_VM_SECTION_END, 1) + _end_ram()
            + stream.encode_eof() + stream.encode_vmdesc(b"{}"))
    d = livestream.StreamDecoder()
    d.feed(data)
    assert d.mfd_source and not d.done  # the page hashes are still owed
    with pytest.raises(ProtocolError, match="after EOF"):
        d.close()
    ev = d.feed(b"".join(peer.encode_hashes(tables)))
    assert ev == [livestream.Hashes(tables)] and d.done


def test_a_qemu_source_may_close_after_eof_without_a_vmdesc():
    d = livestream.StreamDecoder()
    d.feed(_setup() + _end_ram() + stream.encode_section_part(C.QEMU_VM_SECTION_END, 1)
           + _end_ram() + stream.encode_eof())
    d.close()
    assert d.done


@pytest.mark.parametrize("tail,match", [
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
     + ram.encode_zero_page(1 << 20, "mem"), "past the end"),
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
     + ram.encode_zero_page(0, "mem") + ram.encode_zero_records(np.array([0, 1 << 20])),
     "past the end"),
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
     + ram.encode_page(0, bytes(4096), "mem") + ram.encode_page(0, bytes(4096), None)
     + struct.pack(">Q", (1 << 20) | 0x28) + bytes(4096), "past the end"),
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
     + ram.encode_zero_page(0, "nope"), "unknown block"),
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 7), "never started"),
    (stream.encode_eof(), "EOF before the RAM section's END"),
    (stream.encode_command(stream.Command(3)), "not one mfd takes"),
    (stream.encode_section_start(C.QEMU_VM_SECTION_FULL, 5, "cpu", 0, 1), "before the RAM"),
    (b"\x42", "unexpected byte"),
])
def test_decoder_refusals(tail, match):
    d = livestream.StreamDecoder()
    d.feed(_setup() + _end_ram())
    with pytest.raises(ProtocolError, match=match):
        d.feed(tail)


def test_a_stream_cut_short_is_refused_at_close():
    d = livestream.StreamDecoder()
    d.feed(_setup()[:-3])
    with pytest.raises(ProtocolError, match="before the end of the migration stream"):
        d.close()


def test_decoder_refuses_mapped_ram():
    cfg = stream.encode_configuration(stream.Configuration("none", ("mapped-ram",)))
    with pytest.raises(ProtocolError, match="mapped-ram"):
        livestream.StreamDecoder().feed(stream.encode_file_header() + cfg + b"\0")


def test_return_path_as_qemu_wrote_it_and_refusals():
    data = (SAMPLES / "return-path-dst-to-src.bin").read_bytes()
    d = returnpath.ReturnPathDecoder()
    msgs = [m for b in data for m in d.feed(bytes([b]))]  # one byte at a time
    assert [(m.name, m.value) for m in msgs] == [("PONG", 1), ("SHUT", 0)]
    assert data == returnpath.encode_pong(1) + returnpath.encode_shut(0)
    with pytest.raises(ProtocolError, match="not one QEMU sends"):
        returnpath.ReturnPathDecoder().feed(returnpath.encode(returnpath.MFD_RESULT, b"{}"))
    with pytest.raises(ProtocolError, match="SHUT of 2 bytes"):
        returnpath.ReturnPathDecoder().feed(returnpath.encode(returnpath.SHUT, b"\0\0"))
    mfd = returnpath.ReturnPathDecoder()
    mfd.mfd = True
    body = peer.encode_result("failed", "RAM differs")
    (msg,) = mfd.feed(returnpath.encode(returnpath.MFD_RESULT, body))
    assert peer.decode_result(msg.data) == {"status": "failed", "error": "RAM differs"}


@pytest.mark.parametrize("verify", [True, False])
def test_mfd_settings_ride_in_multifd_init_unused_bytes(verify):
    s = peer.ChannelSettings(4, "zstd", True, verify)
    raw = multifd.encode_init(multifd.MultiFDInit(bytes(16), 3, peer.encode_settings(s)))
    init = multifd.decode_init(raw, where="test")
    assert peer.decode_settings(init.unused) == s
    qemu = multifd.decode_init(multifd.encode_init(multifd.MultiFDInit(bytes(16), 0)),
                               where="test")
    assert peer.decode_settings(qemu.unused) is None  # zeros: a QEMU source


def test_page_hashes_round_trip_and_refusals():
    tables = {"mem": bytes(range(16)), "rom": bytes(8)}
    raw = b"".join(peer.encode_hashes(tables))
    assert peer.decode_hashes(Reader(raw), {"mem": 2, "rom": 1}) == tables
    assert peer.decode_hashes(Reader(raw), {"rom": 1, "mem": 2}) == tables
    with pytest.raises(ProtocolError, match="hashes for"):
        peer.decode_hashes(Reader(raw), {"mem": 2, "rom": 2})
    with pytest.raises(ProtocolError, match="expected mfd's page hashes"):
        peer.decode_hashes(Reader(b"QEVM" + raw[4:]), {"mem": 2, "rom": 1})
    with pytest.raises(ProtocolError, match="truncated"):
        peer.decode_hashes(Reader(raw[:-1]), {"mem": 2, "rom": 1})
    # none at all: the source does not verify (mfd migrate --no-verify)
    assert peer.decode_hashes(Reader(b"".join(peer.encode_hashes({}))), {"mem": 2}) == {}


def _long_runs() -> bytes:
    """Runs of 40 ZERO and 40 PAGE records, each followed by another record: the numpy
    look-ahead must stop where a run stops."""
    zeros = ram.encode_zero_page(0, "mem") + ram.encode_zero_records(
        np.arange(1, 41, dtype=np.int64) * 4096)
    pages = ram.encode_page(41 << 12, bytes(4096), None) + b"".join(
        ram.encode_page(a << 12, bytes([a]) * 4096, None) for a in range(42, 82))
    return (_setup() + _end_ram() + stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
            + zeros + pages + ram.encode_zero_page(200 << 12, None) + _end_ram())


def test_long_runs_end_where_they_end():
    events, _ = _decode(_long_runs(), [])
    pages = [e[2] for e in events if isinstance(e, tuple)]
    assert pages == [*range(82), 200]
    assert events[-1] == livestream.SectionEnd(False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 170000), max_size=20))
def test_any_split_of_long_runs_gives_the_same_events(cuts):
    data = _long_runs()
    assert _decode(data, cuts)[0] == _decode(data, [])[0]
