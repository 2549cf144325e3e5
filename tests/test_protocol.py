"""Pure codecs: round trips (hypothesis), golden bytes from QEMU's files, validation."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mfd
from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import devices, livestream, mapped_ram, migration_file, ram, stream, trailer
from mfd.protocol.codec import Reader

idstrs = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                 max_size=40)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(machine=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
       caps=st.lists(st.sampled_from(C.VALIDATED_CAPABILITIES), unique=True),
       bits=st.none() | st.integers(10, 16), uuid=st.none() | st.binary(min_size=16,
                                                                         max_size=16))
def test_configuration_round_trip(machine, caps, bits, uuid):
    cfg = stream.Configuration(machine, tuple(caps), bits, uuid)
    raw = stream.encode_configuration(cfg)
    r = Reader(raw)
    assert stream.decode_configuration(r) == cfg
    assert r.remaining == 0


@given(kind=st.sampled_from([C.QEMU_VM_SECTION_START, C.QEMU_VM_SECTION_FULL]),
       sid=u32, idstr=idstrs, inst=u32, ver=u32)
def test_section_start_round_trip(kind, sid, idstr, inst, ver):
    raw = stream.encode_section_start(kind, sid, idstr, inst, ver)
    hdr = stream.decode_section_header(Reader(raw))
    assert (hdr.type, hdr.section_id, hdr.idstr, hdr.instance_id, hdr.version_id) == \
        (kind, sid, idstr, inst, ver)


@given(kind=st.sampled_from([C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END]), sid=u32)
def test_section_part_and_footer_round_trip(kind, sid):
    raw = stream.encode_section_part(kind, sid) + stream.encode_footer(sid)
    r = Reader(raw)
    hdr = stream.decode_section_header(r)
    assert (hdr.type, hdr.section_id) == (kind, sid)
    stream.decode_footer(r, sid, "x")
    with pytest.raises(ProtocolError, match="names section"):
        stream.decode_footer(Reader(stream.encode_footer(sid ^ 1)), sid, "x")


@given(cmd=st.integers(1, 11), payload=st.binary(max_size=64))
def test_command_round_trip(cmd, payload):
    c = stream.Command(cmd, payload)
    assert stream.decode_command(Reader(stream.encode_command(c))) == c


@given(version=st.integers(0, 1), bitmap=st.integers(0, 2**40),
       pages=st.integers(0, 2**40).map(lambda x: x * C.TARGET_PAGE_SIZE))
def test_mapped_ram_header_round_trip(version, bitmap, pages):
    hdr = mapped_ram.MappedRamHeader(version, C.TARGET_PAGE_SIZE, bitmap, pages)
    raw = hdr.encode()
    assert len(raw) == C.MAPPED_RAM_HDR_SIZE
    assert mapped_ram.decode_header(Reader(raw), "mem") == hdr


@pytest.mark.parametrize("field,value,message", [
    ("version", 2, "version 2 not supported"),
    ("page_size", 8192, "page_size 8192"),
    ("pages_offset", 0x100001, "not page aligned"),
])
def test_mapped_ram_header_refused(field, value, message):
    good = dict(version=1, page_size=4096, bitmap_offset=0x81, pages_offset=0x100000)
    raw = mapped_ram.MappedRamHeader(**{**good, field: value}).encode()
    with pytest.raises(ProtocolError, match=message):
        mapped_ram.decode_header(Reader(raw, base=0x65), "mem")


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_bitmap_words_round_trip(bits):
    arr = np.array(bits)
    words = mapped_ram.bits_to_words(arr)
    assert words.nbytes == mapped_ram.bitmap_size(len(arr))
    assert (mapped_ram.words_to_bits(words.tobytes(), len(arr)) == arr).all()
    runs = mapped_ram.set_runs(arr)
    assert (mapped_ram.page_runs(np.flatnonzero(arr)) == runs).all()
    assert sum(int(e - s) for s, e in runs) == arr.sum()


def test_bitmap_ignores_bits_past_the_block():
    words = np.array([0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF], dtype="<u8")
    assert mapped_ram.words_to_bits(words.tobytes(), 66).sum() == 66


@given(addr=st.integers(0, 255).map(lambda x: x * C.TARGET_PAGE_SIZE),
       seed=st.binary(min_size=1, max_size=64), named=st.booleans(), zero=st.booleans())
def test_page_records_round_trip(addr, seed, named, zero):
    data = (seed * (C.TARGET_PAGE_SIZE // len(seed) + 1))[: C.TARGET_PAGE_SIZE]
    idstr = "pc.ram" if named else None
    raw = ram.encode_zero_page(addr, idstr) if zero else ram.encode_page(addr, data, idstr)
    blocks = {"pc.ram": 256 * C.TARGET_PAGE_SIZE}
    rec = ram.decode_record(Reader(raw, base=100), blocks, "pc.ram")
    assert rec.addr == addr and rec.idstr == "pc.ram"
    if zero:
        assert rec.flags & ~C.RAM_SAVE_FLAG_CONTINUE == C.RAM_SAVE_FLAG_ZERO
    else:
        start = rec.data_offset - 100
        assert raw[start : start + C.TARGET_PAGE_SIZE] == data


def test_page_record_validation():
    blocks = {"mem": 2 * C.TARGET_PAGE_SIZE}
    with pytest.raises(ProtocolError, match="past the end of block"):
        ram.decode_record(Reader(ram.encode_zero_page(2 * C.TARGET_PAGE_SIZE, "mem")), blocks,
                          None)
    with pytest.raises(ProtocolError, match="unknown block"):
        ram.decode_record(Reader(ram.encode_zero_page(0, "mex")), blocks, None)
    with pytest.raises(ProtocolError, match="CONTINUE but no block"):
        ram.decode_record(Reader(ram.encode_zero_page(0, None)), blocks, None)
    with pytest.raises(ProtocolError, match="fill byte"):
        ram.decode_record(Reader(ram.encode_zero_page(0, "mem")[:-1] + b"\x07"), blocks, None)
    with pytest.raises(ProtocolError, match="truncated"):
        ram.decode_record(Reader(ram.encode_page(0, bytes(4096), "mem")[:-1]), blocks, None)


@given(blocks=st.dictionaries(idstrs, st.tuples(st.binary(max_size=4).map(lambda b: b * 32),
                                                u64, st.integers(0, 99)), max_size=4),
       guest=st.none() | st.fixed_dictionaries({"name": st.text(max_size=8)}),
       end=st.integers(0, 2**40))
def test_trailer_round_trip(blocks, guest, end):
    t = trailer.Trailer("mfd test", {k: trailer.BlockDigest(*v) for k, v in blocks.items()},
                        end, guest)
    raw = b"x" * end if end < 64 else b""
    buf = raw + t.encode()
    if not raw:  # stream_end must equal where the trailer starts
        t = trailer.Trailer(t.tool, t.blocks, 0, guest)
        buf = t.encode()
    assert trailer.has_trailer(buf[-trailer.TAIL_SIZE:])
    assert trailer.decode_trailer(buf, len(buf)) == t


def test_trailer_corruption_is_caught():
    buf = bytearray(trailer.Trailer("mfd", {}, 0).encode())
    buf[3] ^= 1
    with pytest.raises(ProtocolError, match="corrupt"):
        trailer.decode_trailer(bytes(buf), len(buf))


# ------------------------------------------------------------------ QEMU's own bytes


def _open(path):
    f = open(path, "rb")  # noqa: SIM115 - closed with the mapping below
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    f.close()
    return m


def test_golden_prefix_of_case1(reference):
    """mfd's encoders produce QEMU's bytes, field by field, up to the first pages region."""
    raw = reference["case1_mapped-ram.mig"].read_bytes()
    cfg = stream.Configuration("none", ("mapped-ram",))
    head = (stream.encode_file_header() + stream.encode_configuration(cfg)
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, 1, "ram", 0, 4)
            + ram.encode_mem_size(16 << 20))
    assert raw[: len(head)] == head
    (lay,) = mapped_ram.layout_blocks([("mem", 16 << 20)], len(head))
    assert (lay.entry_offset, lay.header_offset, lay.header.bitmap_offset,
            lay.header.pages_offset) == (0x59, 0x65, 0x81, 0x100000)
    entry = ram.encode_block_entry("mem", 16 << 20) + lay.header.encode()
    assert raw[0x59 : 0x81] == entry


def test_golden_tail_of_case1(reference):
    """The completion sections, EOF and vmdesc exactly as QEMU 10 wrote them."""
    raw = reference["case1_mapped-ram.mig"].read_bytes()
    tail = (stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START))
            + stream.encode_section_part(C.QEMU_VM_SECTION_END, 1) + ram.encode_eos()
            + stream.encode_footer(1)
            + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, 0, "timer", 0, 2)
            + devices.encode_timer() + stream.encode_footer(0)
            + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, 3, "globalstate", 0, 1)
            + devices.encode_globalstate("prelaunch") + stream.encode_footer(3)
            + stream.encode_eof() + stream.encode_vmdesc(devices.vmdesc_json("none",
                                                                              ("mapped-ram",))))
    assert raw[0x110001F:] == tail


def test_golden_vmdesc_of_stream_file(reference):
    mf = migration_file.parse(_open(reference["case3_stream.mig"]))
    assert mf.vmdesc == devices.vmdesc_json("none", ())


@pytest.mark.parametrize("case,popcount,size", [
    ("case1_mapped-ram.mig", 2080, 16 << 20),
    ("case2_mapped-ram_multifd4.mig", 2080, 16 << 20),
    ("case4_mapped-ram_multifd2_16M8K.mig", 2082, (16 << 20) + 8192),
])
def test_parse_reference_mapped_ram(reference, case, popcount, size):
    m = _open(reference[case])
    mf = migration_file.parse(m)
    assert mf.mapped_ram and mf.configuration.machine == "none"
    (b,) = mf.blocks
    assert (b.idstr, b.used_length, b.entry_offset, b.header_offset) == ("mem", size, 0x59, 0x65)
    assert b.mapped_ram == mapped_ram.MappedRamHeader(1, 4096, 0x81, 0x100000)
    assert migration_file.read_bitmap(m, b).sum() == popcount
    assert mf.record_counts == {"MEM_SIZE": 1, "EOS": 3, "SECTION_PART": 1, "SECTION_END": 1}
    assert [d.idstr for d in mf.devices] == ["timer", "globalstate"]
    assert mf.devices[1].fields["runstate"] == "prelaunch"
    assert mf.stream_end == mf.file_size and mf.trailer is None
    assert [c.name for _, c in mf.commands] == ["SWITCHOVER_START"]


def test_parse_reference_stream(reference):
    mf = migration_file.parse(_open(reference["case3_stream.mig"]))
    assert not mf.mapped_ram
    assert mf.record_counts["PAGE"] == 2080 and mf.record_counts["ZERO"] == 2016
    (b,) = mf.blocks
    assert (b.page_state == migration_file.PAGE_DATA).sum() == 2080
    assert (b.page_state == migration_file.PAGE_ZERO).sum() == 2016
    assert len(mf.vmdesc) == 823 and mf.stream_end == mf.file_size


def test_stream_file_pages_are_read_in_place(reference):
    """The file's stream is decoded where it lies: page data are views of the mapping, at
    the offsets the events say (the restore copies from there)."""
    m = _open(reference["case3_stream.mig"])
    whole = np.frombuffer(m, dtype=np.uint8)
    dec = livestream.StreamDecoder("migration file", file=True)
    seen = 0
    for ev in dec.decode_all(m):
        if isinstance(ev, livestream.Pages):
            assert np.shares_memory(ev.data, whole)
            for i, off in enumerate(ev.offsets.tolist()):
                assert m[off : off + C.TARGET_PAGE_SIZE] == ev.data[i].tobytes()
            seen += len(ev.pages)
    del ev, whole
    assert seen == 2080 and dec.done and dec.offset == len(m)
    state = migration_file.parse(m).blocks[0].page_state
    assert (state == migration_file.PAGE_DATA).sum() == 2080
    m.close()


def _stream_file(records: bytes) -> bytes:
    return (stream.encode_file_header() + stream.encode_configuration(stream.Configuration("pc"))
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, 2, "ram", 0, 4)
            + ram.encode_mem_size(1 << 20) + ram.encode_block_entry("mem", 1 << 20)
            + ram.encode_eos() + stream.encode_footer(2)
            + stream.encode_section_part(C.QEMU_VM_SECTION_END, 2) + records
            + ram.encode_eos() + stream.encode_footer(2) + stream.encode_eof())


def test_stream_file_keeps_each_pages_last_record(tmp_path):
    """A round may send a page again within one run of CONTINUE records: the later copy
    wins, in the parse's page states and in what a restore writes, a zero record included."""
    def page(n: int, fill: int, idstr: str | None = None) -> bytes:
        return ram.encode_page(n << 12, bytes([fill]) * C.TARGET_PAGE_SIZE, idstr)
    records = (page(0, 1, "mem") + b"".join(page(n, 1) for n in range(1, 40))
               + page(3, 2) + page(4, 2) + page(3, 3)
               + ram.encode_zero_records(np.array([4 << 12, 50 << 12])))
    raw = _stream_file(records)
    mf = migration_file.parse(raw)
    state = mf.blocks[0].page_state
    assert state[4] == state[50] == migration_file.PAGE_ZERO
    assert (state == migration_file.PAGE_DATA).sum() == 39
    assert state[51] == migration_file.PAGE_ABSENT
    assert mf.record_counts == {"MEM_SIZE": 1, "EOS": 2, "SECTION_END": 1, "PAGE": 43,
                                "ZERO": 2}
    (tmp_path / "f.mig").write_bytes(raw)
    mfd.restore(str(tmp_path / "f.mig"), images={"mem": str(tmp_path / "mem.bin")})
    got = np.fromfile(tmp_path / "mem.bin", dtype=np.uint8).reshape(-1, C.TARGET_PAGE_SIZE)
    assert (got[[0, 1, 2, 5, 39]] == 1).all() and (got[3] == 3).all()
    assert not got[4].any() and not got[40:].any()


def test_a_refused_stream_file_leaves_its_mapping_closable(reference, tmp_path):
    """The error must not hold the parse's frames: their page views would pin the mmap,
    which the restore closes while it handles the error (load.OpenedFile)."""
    raw = reference["case3_stream.mig"].read_bytes()
    for k in range(1, 8):
        cut = tmp_path / "cut.mig"
        cut.write_bytes(raw[: len(raw) * k // 8 + 3 * k])
        m = _open(cut)
        try:
            migration_file.parse(m)
        except ProtocolError as e:
            assert "truncated" in str(e)
            m.close()  # BufferError if a view of the mapping is still held
        else:
            pytest.fail("a cut file was parsed")
