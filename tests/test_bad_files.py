"""Bad files: every corruption of qemu-observed.md, and an mfd save killed with SIGKILL.

For each corrupted file, ``mfd restore BAD --image mem=OUT`` and ``mfd inspect BAD`` (run as a
user runs them) must exit 1 with one clear line on stderr, never hang, and leave nothing
behind: no OUT, no temporary image beside it, nothing in /dev/shm or in TMPDIR. The
corruptions QEMU accepts by design (bytes it never reads) must restore the exact image.

Base files: an mfd-written mapped-ram file of 64 MiB + 40 KiB (16394 pages, so the last bitmap
word is partly used), and QEMU 10's reference files (mapped-ram case 1, stream case 3).
Offsets come from ``mfd.inspect`` of the good file, so the cases follow the layout.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REFERENCE, alive, descendants, shm_entries, start_mfd, until, unzstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfd
from mfd.describe import describe
from mfd.errors import ProtocolError
from mfd.options import SaveOptions
from mfd.protocol import migration_file
from mfd.ramimage import generate

PAGE = 4096
MFD_SIZE = (64 << 20) + (40 << 10)  # 16394 pages: the last bitmap word has 54 spare bits
TIMEOUT = 60

# ------------------------------------------------------------------------------ base files


@dataclass(frozen=True)
class Base:
    mig: Path
    image: Path
    good: bytes
    lay: dict  # mfd.inspect() of the good file

    @property
    def blk(self) -> dict:
        return self.lay["ram_blocks"][0]

    @property
    def hdr(self) -> dict:
        return self.blk["mapped_ram_header"]

    def section(self, kind: str, idstr: str | None = None) -> int:
        return next(s["offset"] for s in self.lay["sections"]
                    if s["type"] == kind and s["idstr"] == idstr)


class Bases:
    """Built on first use: the mfd file always, QEMU's only if shared/reference is there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, Base] = {}
        self.scratches: dict[str, bytearray] = {}

    def _make(self, name: str) -> Base:
        if name == "mfd":
            img, mig = self.root / "mfd.img", self.root / "mfd.mig"
            generate(str(img), MFD_SIZE, seed=3)
            mfd.save(str(mig), images={"mem": str(img)})
        elif name in WRAPPED:
            inner, wrap = WRAPPED[name]
            img, mig = self[inner].image, self.root / f"{name}.mig"
            mig.write_bytes(wrap(self[inner]))
        elif name == "libvirt-sparse":  # mapped-ram offsets are positions in the whole file
            img, mig = self["mfd"].image, self.root / f"{name}.mig"
            header = libvirt_header(6, data_len=PAGE - LIBVIRT_HEADER)
            mig.write_bytes(header)
            mfd.save(str(mig), images={"mem": str(img)}, options=SaveOptions(offset=len(header)))
        else:
            if not REFERENCE.is_dir():
                pytest.skip(f"no QEMU reference files at {REFERENCE}")
            img = self.root / "ram_16M_seed1.bin"
            if not img.exists():
                unzstd(REFERENCE / "ram_16M_seed1.bin.zst", img)
            src = {"qemu-mr": "case1_mapped-ram.mig", "qemu-stream": "case3_stream.mig"}[name]
            mig = unzstd(REFERENCE / f"{src}.zst", self.root / src)
        good = name != "zstd-mapped-ram"  # mfd refuses it: there is no layout to show
        return Base(mig, img, mig.read_bytes(), mfd.inspect(str(mig)) if good else {})

    def scratch(self, name: str) -> bytearray:
        """A mutable copy of a base file, for in-place changes that are undone after use."""
        if name not in self.scratches:
            self.scratches[name] = bytearray(self[name].good)
        return self.scratches[name]

    def __getitem__(self, name: str) -> Base:
        if name not in self.cache:
            self.cache[name] = self._make(name)
        return self.cache[name]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("bases"))


# ------------------------------------------------------------------------------ wrappers
# What libvirt and users put around QEMU's stream: libvirt's save header (made here byte for
# byte as libvirt's virQEMUSaveDataWrite writes it; tests/test_libvirt.py has real ones) and
# compression.

LIBVIRT_HEADER = 92
DOMAIN_XML = (b"<domain type='qemu'><name>bad-files</name><memory unit='KiB'>16384</memory>"
              b"<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")


def libvirt_header(fmt: int, *, data_len: int = 0, order: str = "<",
                   magic: bytes = b"LibvirtQemudSave") -> bytes:
    """Header + XML + padding (libvirt pads 64 KiB: ``data_len`` 0; or exactly data_len)."""
    xml = DOMAIN_XML + b"\0"
    data_len = data_len or len(xml) + (64 << 10)
    return (magic + struct.pack(f"{order}5I", 2, data_len, 1, fmt, 0) + bytes(56)
            + xml + bytes(data_len - len(xml)))


def compress(kind: str, data: bytes) -> bytes:
    if kind in ("zstd", "lzop"):
        if shutil.which(kind) is None:
            pytest.skip(f"no {kind} here (.ci/setup installs it)")
        return subprocess.run([kind, "-c", "-q"], input=data, check=True,
                              capture_output=True).stdout
    return {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}[kind](data)


# base name -> (the base it wraps, how)
WRAPPED: dict[str, tuple[str, Callable[[Base], bytes]]] = {
    "libvirt-stream": ("qemu-stream", lambda b: libvirt_header(0) + b.good),
    "libvirt-stream-be": ("qemu-stream", lambda b: libvirt_header(0, order=">") + b.good),
    "libvirt-zstd": ("qemu-stream", lambda b: libvirt_header(5) + compress("zstd", b.good)),
    "libvirt-xz": ("qemu-stream", lambda b: libvirt_header(3) + compress("xz", b.good)),
    "zstd-stream": ("qemu-stream", lambda b: compress("zstd", b.good)),
    "gzip-stream": ("qemu-stream", lambda b: compress("gzip", b.good)),
    "bzip2-stream": ("qemu-stream", lambda b: compress("bzip2", b.good)),
    "lzop-stream": ("qemu-stream", lambda b: compress("lzop", b.good)),
    "zstd-mapped-ram": ("mfd", lambda b: compress("zstd", b.good)),
}

# ------------------------------------------------------------------------------ corruptions

Corrupt = Callable[[bytes, Base], bytes]


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def put(buf: bytes, at: int, new: bytes) -> bytes:
    return buf[:at] + new + buf[at + len(new):]


def flip(buf: bytes, at: int) -> bytes:
    return put(buf, at, bytes([buf[at] ^ 0x5A]))


def garbage(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def cut(at: Callable[[Base], int]) -> Corrupt:
    return lambda good, b: good[: at(b)]


def patch(at: Callable[[Base], int], new: bytes | Callable[[Base], bytes]) -> Corrupt:
    return lambda good, b: put(good, at(b), new(b) if callable(new) else new)


# field offsets in a file, from its layout
def hdr_field(name: str) -> Callable[[Base], int]:
    rel = {"version": 0, "page_size": 4, "bitmap_offset": 12, "pages_offset": 20}[name]
    return lambda b: b.blk["header_offset"] + rel


def used_length_at(b: Base) -> int:
    return b.blk["entry_offset"] + 1 + len(b.blk["idstr"])


def mem_size_at(b: Base) -> int:
    return b.blk["entry_offset"] - 8


def bitmap_end(b: Base) -> int:
    return b.hdr["bitmap_offset"] + b.blk["bitmap_size"]


def pages_end(b: Base) -> int:
    return b.hdr["pages_offset"] + b.blk["used_length"]


def caps_at(b: Base) -> int:
    return b.good.index(b"\x0amapped-ram", 0, 0x100)


def first_set_page(b: Base) -> int:
    bm = b.good[b.hdr["bitmap_offset"] : bitmap_end(b)]
    return next(i for i in range(len(bm) * 8) if bm[i >> 3] >> (i & 7) & 1)


def first_clear_page(b: Base) -> int:
    bm = b.good[b.hdr["bitmap_offset"] : bitmap_end(b)]
    return next(i for i in range(b.blk["num_pages"]) if not bm[i >> 3] >> (i & 7) & 1)


def clear_bit(good: bytes, b: Base) -> bytes:
    i = first_set_page(b)
    at = b.hdr["bitmap_offset"] + i // 8
    return put(good, at, bytes([good[at] & ~(1 << (i & 7))]))


def set_spare_bits(good: bytes, b: Base) -> bytes:
    n = b.blk["num_pages"]
    last = bitmap_end(b) - 8
    word = int.from_bytes(good[last : last + 8], "little")
    word |= ((1 << 64) - 1) & ~((1 << (n % 64)) - 1)
    return put(good, last, word.to_bytes(8, "little"))


def set_all_bits(good: bytes, b: Base) -> bytes:
    return put(good, b.hdr["bitmap_offset"], b"\xff" * b.blk["bitmap_size"])


def stale_slot(good: bytes, b: Base) -> bytes:
    """A zero page's slot holds junk: its bit is clear, so nobody may read it."""
    return put(good, b.hdr["pages_offset"] + first_clear_page(b) * PAGE, garbage(PAGE, 7))


def rename_block(good: bytes, b: Base) -> bytes:
    return put(good, b.blk["entry_offset"] + 1, b"mex")


def shrink_block(good: bytes, b: Base) -> bytes:
    """used_length and MEM_SIZE both one page less: consistent, but the stream then resumes
    inside the last page's slot."""
    good = put(good, used_length_at(b), be64(b.blk["used_length"] - PAGE))
    return put(good, mem_size_at(b), be64((b.lay["mem_size"] - PAGE) | 4))


def first_record(b: Base) -> int:
    """Stream format: the first page record, right after the PART section header."""
    return b.section("SECTION_PART") + 5


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    corrupt: Corrupt
    message: str = ""  # a word the error line must contain (case-insensitive)
    inspect_ok: bool = False  # the stream itself is valid: only restore can tell
    xfail: str = ""

    def param(self):
        name = f"{self.base}-{self.id}"
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        if name not in FAST:
            marks.append(pytest.mark.slow)
        return pytest.param(self, id=name, marks=marks)


# The fast tier's sample: a few refusals of each kind of file and one harmless change; the
# full suite runs every case.
FAST = {"mfd-empty", "mfd-cut-in-bitmap", "mfd-page-data-flipped", "qemu-mr-bitmap-offset-0",
        "qemu-stream-record-flags-bad", "libvirt-stream-data-len-0", "zstd-stream-byte-flipped",
        "mfd-spare-bits-of-last-word-set"}


def named_cuts() -> list[Case]:
    points: dict[str, Callable[[Base], int]] = {
        "in-magic": lambda b: 2,
        "after-file-header": lambda b: 8,
        "in-configuration": lambda b: 0x0C,
        "in-capabilities": lambda b: caps_at(b) + 4,
        "after-configuration": lambda b: b.section("SECTION_START", "ram"),
        "in-section-start": lambda b: b.section("SECTION_START", "ram") + 6,
        "in-mem-size": lambda b: mem_size_at(b) + 3,
        "in-block-entry": lambda b: b.blk["entry_offset"] + 2,
        "in-mapped-ram-header": lambda b: b.blk["header_offset"] + 10,
        "in-bitmap": lambda b: b.hdr["bitmap_offset"] + 1000,
        "after-bitmap": bitmap_end,
        "at-pages-offset": lambda b: b.hdr["pages_offset"],
        "mid-pages": lambda b: b.hdr["pages_offset"] + b.blk["used_length"] // 2 + 123,
        "end-of-pages": pages_end,
        "in-ram-eos": lambda b: pages_end(b) + 4,
        "in-section-part": lambda b: b.section("SECTION_PART") + 9,
        "in-command": lambda b: b.lay["commands"][0]["offset"] + 2,
        "in-section-end": lambda b: b.section("SECTION_END") + 3,
        "in-timer": lambda b: b.section("SECTION_FULL", "timer") + 20,
        "in-globalstate": lambda b: b.section("SECTION_FULL", "globalstate") + 60,
        "eof-byte-missing": lambda b: b.lay["eof_offset"],
        "vmdesc-last-byte-missing": lambda b: b.lay["stream_end"] - 1,
    }
    return [Case(f"cut-{name}", "mfd", cut(at), "truncated|past the end|empty")
            for name, at in points.items()]


def spread_cuts(base: str, n: int) -> list[Case]:
    """Evenly spread cut points over a QEMU file (stream: they land inside page records)."""
    def at(k: int) -> Callable[[Base], int]:
        return lambda b: len(b.good) * k // (n + 1) + k  # +k: not always record-aligned
    return [Case(f"cut-{k}of{n + 1}", base, cut(at(k)), "truncated|past the end")
            for k in range(1, n + 1)]


def tail_garbage(good: bytes, b: Base) -> bytes:
    start = b.section("SECTION_PART")
    return put(good, start, garbage(b.section("SECTION_FULL", "globalstate") + 40 - start, 11))


def trailer_flip(good: bytes, b: Base) -> bytes:
    body = good.index(b'"blocks"', b.lay["stream_end"])
    return flip(good, body + 20)


def page_flip(good: bytes, b: Base) -> bytes:
    return flip(good, b.hdr["pages_offset"] + first_set_page(b) * PAGE + 100)


FAILING: list[Case] = [
    Case("empty", "mfd", lambda g, b: b"", "empty"),
    Case("only-QEVM", "mfd", lambda g, b: b"QEVM", "truncated"),
    *named_cuts(),
    *spread_cuts("qemu-stream", 10),
    Case("cut-mid-pages", "qemu-mr", cut(lambda b: b.hdr["pages_offset"] + (8 << 20)),
         "past the end"),
    Case("cut-eof-byte-missing", "qemu-mr", cut(lambda b: b.lay["eof_offset"]), "truncated"),
    Case("file-version-2", "mfd", patch(lambda b: 4, be32(2)), "version 2"),
    Case("file-version-ffffffff", "mfd", patch(lambda b: 4, be32(0xFFFFFFFF)), "version"),
    Case("mr-version-2", "mfd", patch(hdr_field("version"), be32(2)), "version 2"),
    Case("mr-version-ffffffff", "mfd", patch(hdr_field("version"), be32(0xFFFFFFFF)),
         "version"),
    Case("page-size-8192", "mfd", patch(hdr_field("page_size"), be64(8192)), "page_size"),
    Case("page-size-2048", "mfd", patch(hdr_field("page_size"), be64(2048)), "page_size"),
    Case("page-size-8192", "qemu-mr", patch(hdr_field("page_size"), be64(8192)), "page_size"),
    Case("bitmap-offset-0", "mfd", patch(hdr_field("bitmap_offset"), be64(0)), "bitmap"),
    Case("bitmap-offset-0", "qemu-mr", patch(hdr_field("bitmap_offset"), be64(0)), "bitmap"),
    Case("bitmap-offset-beyond-eof", "mfd",
         patch(hdr_field("bitmap_offset"), lambda b: be64(len(b.good) + PAGE)), "bitmap"),
    Case("bitmap-offset-into-header", "mfd",
         patch(hdr_field("bitmap_offset"), lambda b: be64(b.blk["header_offset"] + 4)),
         "bitmap"),
    Case("bitmap-offset-into-the-gap", "mfd",  # a readable bitmap of zeros: only the digest
         patch(hdr_field("bitmap_offset"), lambda b: be64(bitmap_end(b) + PAGE)), "digest",
         inspect_ok=True),
    Case("pages-offset+1", "mfd",
         patch(hdr_field("pages_offset"), lambda b: be64(b.hdr["pages_offset"] + 1)),
         "aligned"),
    Case("pages-offset+4096", "mfd",  # lands past the end, or in the trailer's JSON
         patch(hdr_field("pages_offset"), lambda b: be64(b.hdr["pages_offset"] + PAGE)),
         "past the end|pages_offset or used_length"),
    Case("pages-offset+4096", "qemu-mr",
         patch(hdr_field("pages_offset"), lambda b: be64(b.hdr["pages_offset"] + PAGE)),
         "past the end"),
    Case("pages-offset-4096", "mfd",
         patch(hdr_field("pages_offset"), lambda b: be64(b.hdr["pages_offset"] - PAGE)),
         "pages_offset or used_length"),
    Case("pages-offset-beyond-eof", "mfd",
         patch(hdr_field("pages_offset"), lambda b: be64(len(b.good) // PAGE * PAGE + PAGE)),
         "past the end"),
    Case("used-length-4096", "mfd",
         patch(used_length_at, lambda b: be64(b.blk["used_length"] - PAGE)), "MEM_SIZE"),
    Case("used-length+4096", "mfd",
         patch(used_length_at, lambda b: be64(b.blk["used_length"] + PAGE)), "MEM_SIZE"),
    Case("used-length-not-page-multiple", "mfd",
         patch(used_length_at, lambda b: be64(b.blk["used_length"] + 100)), "multiple"),
    Case("used-length-0", "mfd", patch(used_length_at, be64(0)), "used_length"),
    Case("mem-size-4096", "mfd",
         patch(mem_size_at, lambda b: be64((b.lay["mem_size"] - PAGE) | 4)), "MEM_SIZE"),
    Case("mem-size+4096", "mfd",
         patch(mem_size_at, lambda b: be64((b.lay["mem_size"] + PAGE) | 4)), "MEM_SIZE"),
    Case("used-length-and-mem-size-4096", "mfd", shrink_block, "pages_offset or used_length"),
    Case("block-mem-to-mex", "mfd", rename_block, "mex"),
    Case("block-mem-to-mex", "qemu-mr", rename_block, "'mex'.*given: 'mem'", inspect_ok=True),
    Case("capability-mapped-rax", "mfd", patch(lambda b: caps_at(b) + 10, b"x"), "mapped-rax"),
    Case("caps-count-5", "mfd", patch(lambda b: caps_at(b) - 4, be32(5)), "caps_count"),
    Case("machine-name-length-huge", "mfd", patch(lambda b: 9, be32(0xFFFFFFF0)), "machine"),
    Case("machine-name-length+1", "mfd", patch(lambda b: 9, be32(5)), "0x1a"),
    Case("machine-name-not-text", "mfd", patch(lambda b: 13, b"\xff\xfe"), "machine"),
    Case("garbage-first-4k", "mfd", patch(lambda b: 0, garbage(PAGE, 5)), "magic"),
    Case("garbage-in-stream-tail", "mfd", tail_garbage),
    Case("garbage-in-stream-tail", "qemu-mr", tail_garbage),
    Case("record-flags-bad", "qemu-stream", patch(first_record, be64(0x80)), "flags"),
    Case("record-xbzrle-encoding-bad", "qemu-stream", patch(first_record, be64(0x40)),
         "wrong compression"),
    Case("record-offset-past-block", "qemu-stream",
         patch(first_record, be64((16 << 20) | 0x08)), "past the end of block"),
    Case("record-unknown-block", "qemu-stream",
         patch(lambda b: first_record(b) + 9, b"mex"), "mex"),
    Case("trailer-body-flipped", "mfd", trailer_flip, "trailer"),
    Case("page-data-flipped", "mfd", page_flip, "digest", inspect_ok=True),
    Case("bitmap-bit-cleared", "mfd", clear_bit, "digest", inspect_ok=True),
    # libvirt's header: every refusal
    *[Case(f"header-cut-at-{n}", "libvirt-stream", cut(lambda b, n=n: n), "truncated")
      for n in (20, 91)],
    Case("header-cut-in-xml", "libvirt-stream", cut(lambda b: 500), "past the end"),
    Case("partial-magic", "libvirt-stream", patch(lambda b: 0, b"LibvirtQemudPart"),
         "never completed"),
    Case("data-len-past-the-end", "libvirt-stream",
         patch(lambda b: 20, lambda b: struct.pack("<I", len(b.good))), "past the end"),
    Case("data-len-0", "libvirt-stream", patch(lambda b: 20, bytes(4)), "data_len 0"),
    Case("unknown-format-7", "libvirt-stream", patch(lambda b: 28, struct.pack("<I", 7)),
         "unknown image format 7"),
    Case("version-3", "libvirt-stream", patch(lambda b: 16, struct.pack("<I", 3)), "version"),
    Case("garbage-after-header", "libvirt-stream",
         patch(lambda b: b.lay["libvirt"]["stream_offset"], garbage(PAGE, 7)),
         "neither QEVM nor"),
    Case("says-zstd-is-raw", "libvirt-stream", patch(lambda b: 28, struct.pack("<I", 5)),
         "says image format .zstd.*uncompressed"),
    Case("says-raw-is-zstd", "libvirt-zstd", patch(lambda b: 28, bytes(4)),
         "a zstd stream"),
    Case("cut-mid-stream", "libvirt-stream", cut(lambda b: len(b.good) // 2), "truncated"),
    # compressed streams: cut, corrupt, mapped-ram
    *[Case(f"cut-{k}of4", base, cut(lambda b, k=k: len(b.good) * k // 4),
           "truncated|cut short")
      for base in ("zstd-stream", "gzip-stream", "bzip2-stream", "lzop-stream",
                   "libvirt-zstd", "libvirt-xz") for k in (1, 3)],
    Case("cut-in-magic", "zstd-stream", cut(lambda b: 3), "magic|truncated|cut short"),
    *[Case("byte-flipped", base, lambda g, b: flip(g, len(g) // 2), "corrupt")
      for base in ("zstd-stream", "gzip-stream", "bzip2-stream", "lzop-stream",
                   "libvirt-xz")],
    Case("as-made", "zstd-mapped-ram", lambda g, b: g, "cannot be compressed|compress"),
]

HARMLESS: list[Case] = [
    Case("spare-bits-of-last-word-set", "mfd", set_spare_bits),
    Case("0xff-after-bitmap", "mfd", patch(bitmap_end, b"\xff" * 64)),
    Case("stale-bytes-in-zero-page-slot", "mfd", stale_slot),
    Case("mr-version-0", "mfd", patch(hdr_field("version"), be32(0))),
    Case("trailer-missing", "mfd", cut(lambda b: b.lay["stream_end"])),
    Case("cut-inside-trailer", "mfd", cut(lambda b: b.lay["stream_end"] + 100)),
    Case("4k-garbage-appended", "mfd", lambda g, b: g + garbage(PAGE, 3)),
    Case("vmdesc-json-corrupt", "mfd",
         patch(lambda b: b.lay["vmdesc"]["offset"] + 5, b"\x00")),
    Case("4k-garbage-appended", "qemu-mr", lambda g, b: g + garbage(PAGE, 3)),
    Case("vmdesc-missing", "qemu-mr", cut(lambda b: b.lay["eof_offset"] + 1)),
    Case("all-bits-set", "qemu-mr", set_all_bits),
    Case("4k-garbage-appended", "qemu-stream", lambda g, b: g + garbage(PAGE, 3)),
    *[Case("as-made", base, lambda g, b: g) for base in WRAPPED if base != "zstd-mapped-ram"],
    Case("as-made", "libvirt-sparse", lambda g, b: g),
    Case("xml-edited-in-its-padding", "libvirt-stream",  # what libvirt's padding is for
         lambda g, b: put(g, LIBVIRT_HEADER + len(DOMAIN_XML) - 9, b"<x/></domain>\0")),
]

# ------------------------------------------------------------------------------ running mfd


def _held(paths: set[str]) -> set[str]:
    """Those of ``paths`` some live process has open or mapped."""
    held = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            held |= {p for p in paths if p in Path(f"/proc/{d}/maps").read_text()}
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{d}/fd"):
                with contextlib.suppress(OSError):
                    held.add(os.readlink(f"/proc/{d}/fd/{fd}"))
    return held & paths


def shm_leaked(before: set[str]) -> set[str]:
    """New mfd-* RAM files in /dev/shm that nobody holds, still there half a second later:
    leaks. Other sessions share this machine (their guests' RAM, a benchmark's temporary
    directory), so entries a live process holds, directories and transients are not ours."""
    def unheld() -> set[str]:
        new = {f"/dev/shm/{n}" for n in shm_entries() - before}
        new = {p for p in new if os.path.isfile(p)}
        return new - _held(new) if new else set()
    if not unheld():
        return set()
    time.sleep(0.5)
    return unheld()


@pytest.fixture(autouse=True)
def no_shm_leak():
    """Overrides conftest's: the same check, tolerant of other sessions' live guests."""
    before = shm_entries()
    yield
    assert not shm_leaked(before), "left in /dev/shm"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def private_tmp():
    """TMPDIR for the mfd subprocesses, short (zmq ipc paths) and checked for leftovers."""
    d = tempfile.mkdtemp(prefix="bf")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_both(bad: Path, out: Path, tmpdir: str) -> tuple[Run, Run]:
    """``restore BAD --image mem=OUT`` and ``inspect BAD`` side by side (2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "MFD_DEBUG"} | {"TMPDIR": tmpdir}
    argvs = [["restore", str(bad), "--image", f"mem={out}"], ["inspect", str(bad)]]
    procs = [start_mfd(*a, env=env) for a in argvs]
    runs = []
    try:
        for p, a in zip(procs, argvs, strict=True):
            try:
                so, se = p.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"mfd {a[0]} hung for {TIMEOUT} s on {bad.name}")
            runs.append(Run(p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return runs[0], runs[1]


def assert_one_line_failure(run: Run, what: str, message: str = "") -> str:
    assert run.returncode == 1, f"{what}: exit {run.returncode}, stderr {run.stderr!r}"
    assert "Traceback" not in run.stderr, f"{what}: {run.stderr}"
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mfd: ") and lines[0][5:].strip(), \
        f"{what}: stderr is not one 'mfd: ...' line: {run.stderr!r}"
    assert "internal error" not in lines[0], f"{what}: {lines[0]}"
    if message:
        assert re.search(message, lines[0], re.IGNORECASE), \
            f"{what}: {lines[0]!r} does not mention {message!r}"
    return lines[0]


def assert_nothing_left(out: Path, shm_before: set[str], tmpdir: str) -> None:
    assert not out.exists(), f"{out} was created"
    temps = [n for n in os.listdir(out.parent) if n.startswith(f"{out.name}.mfd-restore-")]
    assert not temps, f"temporary images left: {temps}"
    assert not shm_leaked(shm_before), "left in /dev/shm"
    assert os.listdir(tmpdir) == [], f"left in TMPDIR: {os.listdir(tmpdir)}"


def write_bad(case: Case, bases: Bases, tmp_path: Path) -> tuple[Base, Path]:
    base = bases[case.base]
    bad = tmp_path / "BAD.mig"
    bad.write_bytes(case.corrupt(base.good, base))
    return base, bad


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("case", [c.param() for c in FAILING])
def test_bad_file_is_refused(case: Case, bases: Bases, tmp_path: Path, private_tmp: str):
    _, bad = write_bad(case, bases, tmp_path)
    out = tmp_path / "OUT.img"
    shm_before = shm_entries()
    restore, inspect = run_both(bad, out, private_tmp)
    try:
        assert_one_line_failure(restore, "restore", case.message)
        if case.inspect_ok:
            assert inspect.returncode == 0 and inspect.stderr == "", inspect.stderr
        else:
            assert_one_line_failure(inspect, "inspect", case.message)
        assert_nothing_left(out, shm_before, private_tmp)
    finally:
        bad.unlink()


@pytest.mark.parametrize("case", [c.param() for c in HARMLESS])
def test_harmless_corruption_restores_exactly(case: Case, bases: Bases, tmp_path: Path,
                                              private_tmp: str):
    """Bytes QEMU never reads (and mfd need not either): the exact image comes back."""
    base, bad = write_bad(case, bases, tmp_path)
    out = tmp_path / "OUT.img"
    shm_before = shm_entries()
    restore, inspect = run_both(bad, out, private_tmp)
    try:
        assert restore.returncode == 0 and restore.stderr == "", restore.stderr
        with open(out, "rb") as got, open(base.image, "rb") as want:
            while chunk := want.read(1 << 22):
                assert got.read(len(chunk)) == chunk, f"{out} differs from {base.image}"
            assert got.read(1) == b""
        assert sorted(os.listdir(tmp_path)) == ["BAD.mig", "OUT.img"]
        assert not shm_leaked(shm_before)
        assert os.listdir(private_tmp) == []
        assert inspect.returncode == 0 and inspect.stderr == "", inspect.stderr
    finally:
        bad.unlink()
        out.unlink(missing_ok=True)


def test_failed_restore_keeps_the_existing_image(bases: Bases, tmp_path: Path,
                                                 private_tmp: str):
    """The digest fails only after every page was loaded: the user's image is untouched."""
    base = bases["mfd"]
    bad = tmp_path / "BAD.mig"
    bad.write_bytes(page_flip(base.good, base))
    out = tmp_path / "OUT.img"
    out.write_bytes(b"precious" * 512)
    restore, _ = run_both(bad, out, private_tmp)
    assert_one_line_failure(restore, "restore", "digest")
    assert out.read_bytes() == b"precious" * 512
    assert sorted(os.listdir(tmp_path)) == ["BAD.mig", "OUT.img"]
    assert os.listdir(private_tmp) == []


def test_an_lzop_image_without_the_lzop_program(bases: Bases, tmp_path: Path,
                                                private_tmp: str):
    """mfd reads lzop through the lzop program (no maintained Python library): without it,
    one line saying so."""
    base = bases["lzop-stream"]
    out = tmp_path / "OUT.img"
    env = {k: v for k, v in os.environ.items() if k != "MFD_DEBUG"} | {
        "TMPDIR": private_tmp, "PATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "mfd", "restore", str(base.mig), "--image",
                        f"mem={out}"], capture_output=True, text=True, env=env,
                       timeout=TIMEOUT)
    assert_one_line_failure(Run(r.returncode, r.stdout, r.stderr), "restore", "install lzop")
    assert_nothing_left(out, shm_entries(), private_tmp)


# ---------------------------------------------------------------- the parser, every cut point


def _parse_or_refuse(buf) -> migration_file.MigrationFile | None:
    """The wall: a ProtocolError of one line, or a file that describe() can show."""
    try:
        mf = migration_file.parse(buf)
    except ProtocolError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return None
    describe(mf, buf)
    return mf


@pytest.mark.parametrize("name", ["mfd", "qemu-mr"])
def test_every_cut_of_the_structure_is_refused(bases: Bases, name: str):
    """Truncation at every byte outside the pages region (in process: the parser is pure).
    Only bytes after the vmdesc may go: the RAM is then complete."""
    base = bases[name]
    view = memoryview(base.good)
    stream_end = base.lay["stream_end"]
    points = [*range(0, bitmap_end(base) + 2), *range(pages_end(base) - 2, len(base.good))]
    for at in points:
        mf = _parse_or_refuse(view[:at])
        complete = at == base.lay["eof_offset"] + 1 or at >= stream_end
        assert (mf is not None) == complete, f"cut at {at:#x}: parsed={mf is not None}"
        if mf is not None and at < len(base.good):
            assert mf.trailer is None  # a cut trailer is not a trailer


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_byte_changes_never_escape_the_wall(bases: Bases, data):
    """Any bytes in the structure: a clear ProtocolError or a file inspect can show."""
    name = data.draw(st.sampled_from(["mfd", "qemu-mr", "qemu-stream"]), label="base")
    try:
        base = bases[name]
    except pytest.skip.Exception:
        return
    buf = bases.scratch(name)
    # the vmdesc's type byte and length are left alone (they move the end of the stream)
    vmdesc = base.lay["vmdesc"]["offset"]
    tail = [(vmdesc + 5, base.lay["stream_end"])]
    if base.lay["format"] == "mapped-ram":
        spans = [(0, bitmap_end(base) + 8), (pages_end(base), vmdesc),
                 (base.lay["stream_end"], len(buf)), *tail]
    else:
        spans = [(0, first_record(base) + 3 * (PAGE + 8)),
                 (base.lay["eof_offset"] - 300, vmdesc), *tail]
    spans = [(lo, hi) for lo, hi in spans if hi > lo]
    changed = []
    try:
        for _ in range(data.draw(st.integers(1, 4), label="changes")):
            lo, hi = data.draw(st.sampled_from(spans))
            at = data.draw(st.integers(lo, hi - 1), label="offset")
            changed.append(at)
            buf[at] = data.draw(st.integers(0, 255), label="byte")
        _parse_or_refuse(buf)
    finally:
        for at in changed:
            buf[at] = base.good[at]


# ------------------------------------------------------------------------------ killed save


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    img = tmp_path_factory.mktemp("killed") / "big.img"
    generate(str(img), 512 << 20, seed=5)
    return img


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return -1


KILL_MOMENTS = {
    "file-appears": lambda mig, pid: _allocated(mig) >= 0,
    "channels-up": lambda mig, pid: len(descendants(pid)) >= 2,
    "16MiB-written": lambda mig, pid: _allocated(mig) >= 16 << 20,
    "100MiB-written": lambda mig, pid: _allocated(mig) >= 100 << 20,
}


@pytest.mark.parametrize("moment", KILL_MOMENTS)
@pytest.mark.slow
def test_killed_save_is_refused(big_image: Path, tmp_path: Path, private_tmp: str,
                                moment: str):
    mig = tmp_path / "KILLED.mig"
    save_tmp = tmp_path / "savetmp"  # the killed save cannot remove its socket directory
    save_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MFD_DEBUG"} | {"TMPDIR": str(save_tmp)}
    shm_before = shm_entries()
    proc = start_mfd("save", str(mig), "--image", f"mem={big_image}", "--multifd-channels", "2",
                     stdout=subprocess.DEVNULL, text=False, env=env)
    try:
        deadline = time.monotonic() + 20
        while not KILL_MOMENTS[moment](mig, proc.pid):
            assert proc.poll() is None, f"save ended before the kill: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "save did not get going within 20 s"
            time.sleep(0.002)
        kids = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # the channels die with their parent (PR_SET_PDEATHSIG, or they see it gone)
    until(lambda: not any(alive(p, s) for p, s in kids.items()),
          lambda: f"processes of the killed save survive: "
                  f"{[p for p, s in kids.items() if alive(p, s)]}", 5, 0.05)

    out = tmp_path / "OUT.img"
    restore, inspect = run_both(mig, out, private_tmp)
    assert_one_line_failure(restore, "restore", "empty|did not complete|truncated")
    assert_one_line_failure(inspect, "inspect", "empty|did not complete|truncated")
    assert_nothing_left(out, shm_before, private_tmp)
