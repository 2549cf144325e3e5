"""The one placer (``mfd.shm.placer``, DESIGN.md invariant 7): a page that appears twice in
one run ends with its later copy, as QEMU's loader; one hook keeps the receivedmap and the
page hashes of what was placed.

At unit level for both placers (the uffd one on a mapping of this process, placing pages
with UFFDIO_COPY, no fault needed), then once per path that places pages, each test failing
if its path breaks the rule: a live receive channel (QEMU's multifd packets by hand, without
and with compression), the main channel without multifd, a stream file, and lazy restore
(a page the guest's fault placed first, and wrote since, is left alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import finish, start_incoming, wait_listening
from netutil import FakeSource

import mfd
from mfd.main_thread import load
from mfd.main_thread.lazy import FileFaults
from mfd.main_thread.scanner import chunk_jobs
from mfd.protocol import constants as C
from mfd.protocol import devices, messages, multifd, ram, stream
from mfd.protocol import migration_file as mfile
from mfd.ramimage import generate
from mfd.shm.pagehash import PageHashes, hash_rows, table_size
from mfd.shm.placer import MappedPlacer, UffdPlacer, last_copies
from mfd.shm.ramblock import RAMBlock, attach
from mfd.shm.uffd import GuestRAM, UserfaultFd, open_uffd
from mfd.workers.file_channel import FileChannel, FileChannelConfig
from mfd.workers.methods import get_method
from mfd.workers.tcp import free_ports

PAGE = C.TARGET_PAGE_SIZE
PAGES = 512  # 4 digest chunks


def page(fill: int) -> np.ndarray:
    return np.full(PAGE, fill, dtype=np.uint8)


def rows(*fills: int) -> np.ndarray:
    return np.stack([page(f) for f in fills])


# ---------------------------------------------------------------------------- unit


def test_last_copies_keeps_each_page_once_with_its_later_copy():
    pages, order = last_copies(np.array([7, 3, 7, 5, 3]))
    assert pages.tolist() == [3, 5, 7] and order.tolist() == [4, 3, 2]
    ordered = np.array([1, 2, 9])  # as every sender but a hostile one: as they are
    assert last_copies(ordered)[0] is ordered and last_copies(ordered)[1] is None
    swapped = np.array([4, 9, 6])  # QEMU's zero pages swapped out: each once, sorted
    pages, order = last_copies(swapped)
    assert pages.tolist() == [4, 6, 9] and order.tolist() == [0, 2, 1]


def _hashes(tmp_path: Path) -> PageHashes:
    block = RAMBlock("mem", PAGES * PAGE, str(tmp_path / "ram"))
    table = tmp_path / "hashes"
    table.write_bytes(bytes(table_size([block])))
    return PageHashes(RAMBlock("pagehash", table_size([block]), str(table)), [block])


def test_mapped_placer_rule_zero_rule_and_hook(tmp_path):
    (tmp_path / "ram").write_bytes(b"")
    os.truncate(tmp_path / "ram", PAGES * PAGE)
    mapped = attach(RAMBlock("mem", PAGES * PAGE, str(tmp_path / "ram")), writable=True)
    received = np.zeros(PAGES, dtype=np.uint8)
    hashes = _hashes(tmp_path)
    placer = MappedPlacer([mapped], [received], hashes)
    placer.pages(0, np.array([3, 4, 3]), rows(1, 2, 3))
    ram = mapped.words.view(np.uint8)
    # QEMU's order (zero pages swapped out): each page at its offset, through the file
    placer.pages(0, np.array([12, 7, 8]), rows(4, 5, 6))
    assert ram[[12, 7, 8], 0].tolist() == [4, 5, 6]
    assert hashes.table[0][[7, 8, 12]].tolist() == hash_rows(rows(5, 6, 4)).tolist()
    assert ram[3, 0] == 3 and ram[4, 0] == 2, "the later copy of page 3"
    assert np.flatnonzero(received).tolist() == [3, 4, 7, 8, 12]
    assert hashes.table[0][[3, 4]].tolist() == hash_rows(rows(3, 2)).tolist()
    # zero pages: a page received before is cleared (and hashed again), others untouched
    placer.zero(0, np.array([4, 10]))
    assert not ram[4].any() and hashes.table[0][4] == 0 and received[10] == 1
    # the hook read back from RAM: what RAM holds, whatever the caller had
    ram[20] = 9
    placer.placed(0, np.array([20, 20]), None)
    assert hashes.table[0][20] == hash_rows(rows(9))[0] and received[20] == 1
    assert placer.take_hashing() > 0 and placer.take_hashing() == 0
    hashes.close()
    del ram
    mapped.close()


@contextlib.contextmanager
def registered():
    """A RAM file in /dev/shm, mapped here and registered with a new uffd: pages are placed
    with UFFDIO_COPY and read back through the file (a read through the mapping of a page
    not placed would wait for ever)."""
    with tempfile.NamedTemporaryFile(prefix="mfd-placer-test-", dir="/dev/shm") as f:
        f.truncate(PAGES * PAGE)
        mm = mmap.mmap(f.fileno(), PAGES * PAGE, mmap.MAP_SHARED)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        uffd = UserfaultFd(open_uffd())
        uffd.register(base, PAGES * PAGE)
        guest = GuestRAM(uffd, [base], [PAGES * PAGE])
        try:
            yield f.name, guest
        finally:
            guest.close()
            mm.close()


def read_page(path: str, n: int) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(os.pread(f.fileno(), PAGE, n * PAGE), dtype=np.uint8)


def test_uffd_placer_rule_and_a_page_placed_first_is_left_alone(tmp_path):
    received = np.zeros(PAGES, dtype=np.uint8)
    hashes = _hashes(tmp_path)
    with registered() as (shm_file, guest):
        placer = UffdPlacer(guest, [received], hashes)
        placer.pages(0, np.array([5, 6, 5]), rows(1, 2, 3))
        assert read_page(shm_file, 5)[0] == 3 and read_page(shm_file, 6)[0] == 2
        assert hashes.table[0][[5, 6]].tolist() == hash_rows(rows(3, 2)).tolist()
        # placed first (by a fault, received in an earlier run): the guest may have written
        # it since, a later copy leaves it alone, the rest of the run is placed
        placer.pages(0, np.array([6, 7]), rows(8, 9))
        assert read_page(shm_file, 6)[0] == 2 and read_page(shm_file, 7)[0] == 9
        placer.zero(0, np.array([7, 8]))
        assert read_page(shm_file, 7)[0] == 9 and received[8] == 1
        assert hashes.table[0][8] == 0
    hashes.close()


# ---------------------------------------------------------------------------- paths
# Each writes page P twice in one run, first FIRST then LATER bytes, and page P + 1 once.

P = 5
FIRST, OTHER, LATER = 0x11, 0x22, 0x33


def expected(size: int, *extra: tuple[int, int]) -> bytes:
    ram = np.zeros((size // PAGE, PAGE), dtype=np.uint8)
    for n, fill in ((P, LATER), (P + 1, OTHER), *extra):
        ram[n] = fill
    return ram.tobytes()


def _packet(compression: str, num: int, normal: list[int], fills: list[int], send) -> bytes:
    data = rows(*fills)
    payload = data.tobytes() if send is None else bytes(send.prepare([data]))
    return multifd.encode_packet(
        flags=get_method(compression).flag, packet_num=num, ramblock="mem",
        normal=np.array(normal, dtype=np.uint64) * PAGE, zero=np.empty(0, np.uint64),
        next_packet_size=len(payload)) + payload


def _sync(num: int) -> bytes:
    return multifd.encode_packet(flags=multifd.MULTIFD_FLAG_SYNC, packet_num=num,
                                 ramblock="", normal=np.empty(0, np.uint64),
                                 zero=np.empty(0, np.uint64), next_packet_size=0)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_live_receive_channel_keeps_the_later_copy(tmp_path, compression):
    """QEMU's wire by hand, one multifd channel: a packet of few runs (spliced, or placed
    by the placer when compressed) and one of many (read into the mapping), each naming a
    page twice with different bytes."""
    method = get_method(compression)
    send = None if method.raw_pages else method.send_setup(1, 128)
    size = 1 << 20
    many = [30 + 2 * i for i in range(20)]  # 20 runs, more than are spliced one by one
    port = free_ports(1)
    out = tmp_path / "out.bin"
    inc = start_incoming(port, "--image", f"mem={out}", "--multifd-channels", "1",
                         "--multifd-compression", compression)
    wait_listening(port)
    src = FakeSource(port, size)
    try:
        link = src.channel(multifd.encode_init(multifd.MultiFDInit(bytes(16), 0)) + _sync(0))
        src.start()
        link.sendall(_packet(compression, 1, [P, P + 1, P], [FIRST, OTHER, LATER], send)
                     + _packet(compression, 2, [*many, many[0]],
                               [*range(1, 21), 0x44], send) + _sync(3))
        assert src.main is not None
        src.main.sendall(
            ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID)
            + stream.encode_section_part(C.QEMU_VM_SECTION_END, devices.RAM_SECTION_ID)
            + ram.encode_multifd_flush() + ram.encode_eos()
            + stream.encode_footer(devices.RAM_SECTION_ID) + stream.encode_eof())
        for s in (link, src.main):
            s.shutdown(socket.SHUT_WR)
        rc, _, err = finish(inc)
    finally:
        src.close()
    assert rc == 0, err
    extra = [(n, i + 1) for i, n in enumerate(many[1:], start=1)]
    assert out.read_bytes() == expected(size, (many[0], 0x44), *extra)


def _stream(size: int) -> bytes:
    """QEMU's stream without multifd: after page 0 (named by its block), page P, page
    P + 1, page P again, one run of records continuing the block (one event)."""
    section = devices.RAM_SECTION_ID
    return (stream.encode_file_header()
            + stream.encode_configuration(stream.Configuration("none"))
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, section, "ram", 0, 4)
            + ram.encode_mem_size(size) + ram.encode_block_entry("mem", size)
            + ram.encode_eos() + stream.encode_footer(section)
            + stream.encode_section_part(C.QEMU_VM_SECTION_PART, section)
            + ram.encode_page(0, page(1), "mem")
            + ram.encode_page(P * PAGE, page(FIRST), None)
            + ram.encode_page((P + 1) * PAGE, page(OTHER), None)
            + ram.encode_page(P * PAGE, page(LATER), None)
            + ram.encode_eos() + stream.encode_footer(section)
            + stream.encode_section_part(C.QEMU_VM_SECTION_END, section)
            + ram.encode_eos() + stream.encode_footer(section) + stream.encode_eof())


def test_the_main_channel_without_multifd_keeps_the_later_copy(tmp_path):
    size = 1 << 20
    port = free_ports(1)
    out = tmp_path / "out.bin"
    inc = start_incoming(port, "--image", f"mem={out}")
    wait_listening(port)
    with socket.create_connection(("127.0.0.1", port)) as main:
        main.sendall(_stream(size))
        main.shutdown(socket.SHUT_WR)
        rc, _, err = finish(inc)
    assert rc == 0, err
    assert out.read_bytes() == expected(size, (0, 1))


def test_a_stream_file_keeps_the_later_copy(tmp_path):
    size = 1 << 20
    path = tmp_path / "twice.mig"
    path.write_bytes(_stream(size))
    out = tmp_path / "out.bin"
    mfd.restore(str(path), images={"mem": str(out)})
    assert out.read_bytes() == expected(size, (0, 1))


def test_lazy_restore_leaves_alone_a_page_its_fault_placed_first(tmp_path):
    """In this process: the guest (a thread) faults on a page, served from the file
    (``FileFaults``), and writes it; then a channel (``FileChannel``, lazy) loads every
    page of the file through the same uffd. The guest's write stays, every other page is
    the file's, and the chunk digests the channel returns match the file's trailer."""
    img = tmp_path / "img.bin"
    generate(str(img), PAGES * PAGE, seed=11)  # runs of data and of zeros (not in the file)
    data = np.frombuffer(img.read_bytes(), dtype=np.uint8).reshape(PAGES, PAGE)
    mig = tmp_path / "lazy.mig"
    mfd.save(str(mig), images={"mem": str(img)})
    n = int(np.flatnonzero(data[PAGES // 2 :].any(axis=1))[0]) + PAGES // 2  # in the file
    with load.OpenedFile(str(mig)) as opened, registered() as (shm_file, guest):
        (entry,) = opened.file.blocks
        faults = FileFaults(opened, guest)
        try:
            read = ctypes.create_string_buffer(PAGE)
            at = guest.address(0, n)
            thread = threading.Thread(target=ctypes.memmove, args=(read, at, PAGE))
            thread.start()  # blocks in the kernel (without the GIL) until P is placed
            while thread.is_alive():
                select.select([faults.fileno()], [], [], 0.1)
                faults.serve()
            thread.join()
            assert faults.count == 1 and read.raw == data[n].tobytes()
            ctypes.memmove(at, bytes([LATER]) * PAGE, PAGE)  # the guest writes it
            cfg = FileChannelConfig(
                channel_id=0, endpoint="", parent_pid=0, path=str(mig), saving=False,
                blocks=(RAMBlock("mem", PAGES * PAGE, shm_file),),
                pages_offsets=(entry.mapped_ram.pages_offset,), verify=True,
                uffd=guest.uffd.fileno(), bases=(guest.bases[0],))
            channel = FileChannel(cfg, None)
            check = load.ChunkCheck("mem", opened.file.trailer.blocks["mem"].chunks)
            try:
                for pairs in chunk_jobs(mfile.read_bitmap(opened.mm, entry)):
                    frames = channel.handle(messages.JOB, 0, 0, pairs, 0)
                    check.job_done(pairs, messages.decode_done(frames)[4])
            finally:
                channel.close()
            check.check()
            want = data.copy()
            want[n] = LATER
            assert Path(shm_file).read_bytes() == want.tobytes()
        finally:
            faults.fd, fd = -1, faults.fd  # the uffd is the test's to close (registered)
            os.close(fd)
