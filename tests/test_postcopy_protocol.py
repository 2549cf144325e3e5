"""Postcopy's bytes: QEMU 10's as observed on the wire (shared/postcopy-facts.md section 8),
decoded from any split, and every refusal."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import livestream, postcopy, ram, returnpath, stream
from mfd.protocol.codec import Reader

MEM = 64 << 20
ADVISE = bytes.fromhex("08 0003 0010 0000000000001000 0000000000001000")
DISCARD = bytes.fromhex("08 0006 0016 00 03 6d656d 00 00000000015ab000 0000000002a55000")
PING = bytes.fromhex("08 0002 0004")
LISTEN = bytes.fromhex("08 0004 0000")
RUN = bytes.fromhex("08 0005 0000")


def ping(n: int) -> bytes:
    return PING + n.to_bytes(4, "big")


def package(*items: bytes) -> bytes:
    blob = b"".join(items)
    return bytes.fromhex("08 0007 0004") + len(blob).to_bytes(4, "big") + blob


def qemu_postcopy_stream(page: bytes = b"\x5a" * 4096) -> bytes:
    """The main channel of QEMU 10's postcopy, as observed (the device state left out)."""
    return (stream.encode_file_header() + stream.encode_configuration(stream.Configuration("none"))
            + bytes.fromhex("08 0001 0000") + ping(1) + ADVISE
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, 1, "ram", 0, 4)
            + ram.encode_mem_size(MEM) + ram.encode_block_entry("mem", MEM)
            + ram.encode_eos() + stream.encode_footer(1)
            + bytes.fromhex("08 000b 0000") + DISCARD + ping(2)
            + package(LISTEN, ping(3), RUN) + ping(4)
            + stream.encode_section_part(C.QEMU_VM_SECTION_END, 1)
            + ram.encode_page(0x3000000, page, "mem")
            + ram.encode_eos() + stream.encode_footer(1) + stream.encode_eof())


def events_of(data: bytes, cuts: list[int]) -> list:
    d = livestream.StreamDecoder()
    out: list = []
    at = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        for ev in d.feed(data[at:cut]):
            out.append(("Pages", ev.idstr, ev.pages.tolist(), bytes(ev.data[0]))
                       if isinstance(ev, livestream.Pages) else ev)
        at = cut
    d.close()
    return out


def test_golden_bytes_encode_as_qemu_wrote_them():
    assert postcopy.encode_advise() == ADVISE
    assert postcopy.encode_discards("mem", [(0x15AB000, 0x2A55000)]) == DISCARD
    assert postcopy.encode_bare(C.MIG_CMD_POSTCOPY_LISTEN) == LISTEN
    assert postcopy.encode_packaged(LISTEN + ping(3) + RUN) == package(LISTEN, ping(3), RUN)
    assert postcopy.encode_request(0x3000000, 0x1000, "mem") == \
        bytes.fromhex("0003 0010 0000000003000000 00001000 03 6d656d")
    assert postcopy.encode_request(0x30AA000, 0x1000, None) == \
        bytes.fromhex("0004 000c 00000000030aa000 00001000")


def test_discards_go_twelve_runs_a_command():
    runs = [(i * 0x2000, 0x1000) for i in range(25)]
    data = postcopy.encode_discards("mem", runs)
    r = Reader(data)
    got = []
    while r.remaining:
        cmd = stream.decode_command(r)
        got.append(postcopy.decode_discard(cmd.payload, {"mem": MEM}, "test"))
    assert [len(d.runs) for d in got] == [12, 12, 1]
    assert [run for d in got for run in d.runs] == runs


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(qemu_postcopy_stream())), max_size=8))
def test_any_split_gives_qemus_events_in_order(cuts):
    evs = events_of(qemu_postcopy_stream(), cuts)
    kinds = [type(e).__name__ if not isinstance(e, tuple) else e[0] for e in evs]
    assert kinds == ["Header", "ReturnPath", "Ping", "Advise", "Blocks", "SectionEnd",
                     "SwitchoverStart", "Discard", "Ping", "Listen", "Ping", "Run", "Ping",
                     "Pages", "SectionEnd", "Eof"]
    assert evs[3] == postcopy.Advise(0x1000, 0x1000)
    assert evs[7] == postcopy.Discard("mem", ((0x15AB000, 0x2A55000),))
    assert [e.value for e in evs if isinstance(e, livestream.Ping)] == [1, 2, 3, 4]
    assert evs[13] == ("Pages", "mem", [0x3000], b"\x5a" * 4096)


def _replace(old: bytes, new: bytes) -> bytes:
    data = qemu_postcopy_stream()
    assert data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.parametrize("data, match", [
    (_replace(ADVISE, bytes.fromhex("08 0003 0010 0000000000002000 0000000000001000")),
     "page sizes 0x2000"),
    (_replace(ADVISE, bytes.fromhex("08 0003 0000")), "dirty bitmaps only"),
    (_replace(DISCARD, DISCARD.replace(b"mem", b"mex")), "unknown block 'mex'"),
    (_replace(DISCARD, DISCARD[:-1] + b"\x01"), "not whole pages"),
    (_replace(DISCARD, DISCARD[:-8] + (MEM).to_bytes(8, "big")), "not whole pages"),
    (_replace(DISCARD, DISCARD[:5] + b"\x01" + DISCARD[6:]), "version 1"),
    (_replace(package(LISTEN, ping(3), RUN), bytes.fromhex("08 0007 0004 01000001")),
     "more than 16 MiB"),
    (_replace(package(LISTEN, ping(3), RUN),  # the package ends inside the PING
              bytes.fromhex("08 0007 0004 0000000b") + LISTEN + ping(3) + RUN),
     "crosses the end of the package"),
    (_replace(package(LISTEN, ping(3), RUN), LISTEN + RUN), "POSTCOPY_LISTEN"),
    (_replace(package(LISTEN, ping(3), RUN), package(RUN)), "POSTCOPY_RUN"),
    (_replace(ADVISE, b""), "PACKAGED|POSTCOPY_RAM_DISCARD"),
])
def test_refusals(data, match):
    with pytest.raises(ProtocolError, match=match):
        events_of(data, [])


@pytest.mark.parametrize("msg, last, match", [
    (postcopy.encode_request(0, 0x1000, None), None, "before any block"),
    (postcopy.encode_request(0, 0x1000, "mex"), None, "unknown block 'mex'"),
    (postcopy.encode_request(MEM, 0x1000, "mem"), None, "not whole pages"),
    (postcopy.encode_request(0x800, 0x1000, "mem"), None, "not whole pages"),
    (postcopy.encode_request(0, 0, "mem"), None, "not whole pages"),
    (returnpath.encode(returnpath.REQ_PAGES_ID, bytes(12) + b"\x05mem"), None, "idstr"),
])
def test_request_refusals(msg, last, match):
    (m,) = returnpath.ReturnPathDecoder().feed(msg)
    with pytest.raises(ProtocolError, match=match):
        postcopy.decode_request(m, {"mem": MEM}, last)


def test_requests_name_a_block_then_reuse_it():
    dec = returnpath.ReturnPathDecoder()
    a, b = dec.feed(postcopy.encode_request(0x3000000, 0x1000, "mem")
                    + postcopy.encode_request(0x30AA000, 0x2000, None))
    first = postcopy.decode_request(a, {"mem": MEM}, None)
    assert first == postcopy.PageRequest("mem", 0x3000000, 0x1000)
    assert postcopy.decode_request(b, {"mem": MEM}, first.idstr) == \
        postcopy.PageRequest("mem", 0x30AA000, 0x2000)
