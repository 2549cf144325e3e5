"""The main channel's pure pieces: the live stream decoder (message by message), zero records,
HELLO and DIGESTS, against bytes built by hand."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import devices, livestream, mainchannel, ram, stream


def _setup(blocks=(("mem", 1 << 20),)) -> bytes:
    return (stream.encode_file_header() + stream.encode_configuration(stream.Configuration("none"))
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, 1, "ram", 0, 4)
            + ram.encode_mem_size(sum(s for _, s in blocks))
            + b"".join(ram.encode_block_entry(n, s) for n, s in blocks))


def _end_ram() -> bytes:
    return ram.encode_eos() + stream.encode_footer(1)


def test_zero_records_golden_bytes():
    got = ram.encode_zero_records(np.array([0x1000, 0x5000]))
    want = struct.pack(">QB", 0x1000 | 0x22, 0) + struct.pack(">QB", 0x5000 | 0x22, 0)
    assert got == want


def test_a_whole_stream_message_by_message():
    d = livestream.LiveStreamDecoder()
    ev = d.feed(_setup((("mem", 1 << 20), ("rom", 8192))) + ram.encode_multifd_flush())
    assert ev == [livestream.Blocks([("mem", 1 << 20), ("rom", 8192)]), livestream.Flush()]
    ev = d.feed(_end_ram())  # the section's EOS in a message of its own
    assert ev == [livestream.SectionEnd(False)]
    part = (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
            + ram.encode_zero_page(0x3000, "mem")
            + ram.encode_zero_records(np.array([0x4000, 0x9000, 0xF000])))
    ev = d.feed(part)  # records may end a message without ending the section
    assert [type(e) for e in ev] == [livestream.ZeroPages, livestream.ZeroPages]
    assert ev[0].pages.tolist() == [3] and ev[1].pages.tolist() == [4, 9, 15]
    page = bytes(range(256)) * 16
    ev = d.feed(ram.encode_page(0x1000, page, "rom") + ram.encode_multifd_flush() + _end_ram())
    assert ev == [livestream.Page("rom", 1, page), livestream.Flush(),
                  livestream.SectionEnd(False)]
    ev = d.feed(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START))
                + stream.encode_section_part(C.QEMU_VM_SECTION_END, 1) + _end_ram()
                + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, 4, "mfd-guest", 0, 1)
                + devices.encode_guest({"name": "vm0"}) + stream.encode_footer(4)
                + stream.encode_eof())
    assert ev[0] == livestream.SectionEnd(True)
    assert ev[1].state.fields == {"guest": {"name": "vm0"}}
    assert ev[2] == livestream.Eof() and d.done
    with pytest.raises(ProtocolError, match="after EOF"):
        d.feed(b"\0")


@pytest.mark.parametrize("tail,match", [
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
     + ram.encode_zero_page(1 << 20, "mem"), "past the end"),
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
     + ram.encode_zero_page(0, "mem") + ram.encode_zero_records(np.array([0, 1 << 20])),
     "past the end"),
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 1)
     + ram.encode_zero_page(0, "nope"), "unknown block"),
    (stream.encode_section_part(C.QEMU_VM_SECTION_PART, 7), "never started"),
    (stream.encode_eof(), "EOF before the RAM section's END"),
    (stream.encode_command(stream.Command(3)), "not supported"),
    (b"\x42", "unexpected byte"),
])
def test_decoder_refusals(tail, match):
    d = livestream.LiveStreamDecoder()
    d.feed(_setup() + _end_ram())
    with pytest.raises(ProtocolError, match=match):
        d.feed(tail)


def test_decoder_refuses_mapped_ram():
    cfg = stream.encode_configuration(stream.Configuration("none", ("mapped-ram",)))
    with pytest.raises(ProtocolError, match="mapped-ram"):
        livestream.LiveStreamDecoder().feed(stream.encode_file_header() + cfg)


def test_hello_round_trip_and_refusals():
    h = mainchannel.Hello(b"\x01" * 16, 4, "zstd", "multifd", False, "vm0")
    assert mainchannel.decode_hello(h.encode()) == h
    good = orjson.loads(h.encode()[1])
    for change, match in [({"mfd": 2}, "protocol"), ({"channels": 0}, "channels"),
                          ({"channels": True}, "channels"), ({"uuid": "xy"}, "uuid"),
                          ({"compression": "lz4"}, "compression"),
                          ({"page-size": 65536}, "page size")]:
        with pytest.raises(ProtocolError, match=match):
            mainchannel.decode_hello([b"HELLO", orjson.dumps(good | change)])
    with pytest.raises(ProtocolError, match="not JSON"):
        mainchannel.decode_hello([b"HELLO", b"{"])
    with pytest.raises(ProtocolError, match="expected HELLO"):
        mainchannel.decode_hello([b"STREAM", b""])


def test_digests_round_trip_and_refusals():
    frames = mainchannel.encode_digests({"mem": bytes(64), "rom": bytes(32)})
    assert mainchannel.decode_digests(frames, {"mem": 2, "rom": 1}) == \
        {"mem": bytes(64), "rom": bytes(32)}
    with pytest.raises(ProtocolError, match="expected 64"):
        mainchannel.decode_digests(frames, {"mem": 2, "rom": 2})
    with pytest.raises(ProtocolError, match="blocks"):
        mainchannel.decode_digests(frames, {"mem": 2})
