"""A guest of our own for QEMU: a 512-byte x86 boot sector that keeps dirtying RAM.

QEMU's dirty log only sees what its own vCPUs write, so a test that wants a QEMU *source*
whose RAM changes while it migrates needs code running inside that QEMU. This module builds
it: a boot sector for ``qemu-system-x86_64 -machine pc -accel tcg`` with the image as a raw
IDE drive. The BIOS (SeaBIOS) loads sector 0 at ``0x7c00`` and jumps there in real mode;
the program switches to flat 32-bit protected mode and then, for ever, sweeps the pages
``[start, end)``, adding one to the little-endian u32 counter at offset 0 of each page, and
writes one character to the serial port after each full sweep (the idea of QEMU's own
``tests/migration/i386/a-b-bootblock.S``; this program is written from scratch).

Sector layout (offsets from ``0x7c00``)::

    0x000  16-bit real mode: cli, fast A20 (port 0x92), DS = 0, lgdt, CR0.PE = 1,
           far jump to selector 0x08 : 0x7c1f
    0x01f  32-bit protected mode: DS = ES = SS = 0x10, ESP = 0x7c00, DX = 0x3f8,
           ENTRY_CHAR out once, then the sweep loop (EBX = page address) and
           SWEEP_CHAR out after each sweep
    0x050  GDT: null, 0x08 flat code (base 0, limit 4 GiB, 32-bit, ring 0), 0x10 flat data
    0x068  GDTR: u16 limit 23, u32 base 0x7c50
    0x1fe  0x55 0xaa, the BIOS's boot signature

Registers in the loop: EBX the page address, AL the character, DX the port. Nothing but the
counters in ``[start, end)`` is ever written (no stack use, interrupts off), so a test can
expect every other page above 1 MiB to stay as the BIOS left it.

Why a u32 counter and not a byte: a byte wraps to zero after 256 sweeps (about a second of
TCG), so "every page in the range is nonzero" would be a flaky check. With a u32, when the
vCPU is stopped the counters read ``k + 1`` for the pages below the loop's position and
``k`` above it, ``k`` being the number of completed sweeps (and of SWEEP_CHARs written).
The low byte is still the byte at offset 0 of the page.

In a ``-machine pc`` guest with at most 3 GiB of RAM, guest-physical address ``a`` is byte
``a`` of the RAM block (``mem``), so the counter of page ``p`` is at offset ``p`` of the RAM
file. ``start`` must be at least 1 MiB (below it: BIOS data, the sector itself, VGA and ROM
windows) and page aligned; ``end`` must be page aligned and below 4 GiB.

Standard library only; the bytes are listed instruction by instruction below (checked with
GNU as / objdump, which this module does not need).
"""

from __future__ import annotations

import os
import struct

__all__ = [
    "ENTRY_CHAR",
    "ORIGIN",
    "PAGE",
    "SECTOR",
    "SWEEP_CHAR",
    "boot_sector",
    "default_range",
    "program_listing",
    "write_boot_image",
]

ORIGIN = 0x7C00  # where the BIOS loads sector 0
SECTOR = 512
PAGE = 4096
MIB = 1 << 20
SERIAL_PORT = 0x3F8  # COM1's transmit register
ENTRY_CHAR = b"P"  # written once, when protected mode is reached
SWEEP_CHAR = b"."  # written after each full sweep of [start, end)
PM32, GDT, GDTR = 0x1F, 0x50, 0x68  # offsets in the sector (the layout in the docstring)
CODE_SEL, DATA_SEL = 0x08, 0x10
SIGNATURE = b"\x55\xaa"

# Flat descriptors: base 0, limit 0xfffff in 4 KiB units (G=1), D/B=1 (32-bit), present, ring 0.
GDT_ENTRIES: tuple[tuple[int, str], ...] = (
    (0x0000000000000000, "null descriptor"),
    (0x00CF9A000000FFFF, "0x08: code, execute/read"),
    (0x00CF92000000FFFF, "0x10: data, read/write"),
)


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _check_range(start: int, end: int) -> None:
    if start % PAGE or end % PAGE:
        raise ValueError(f"start and end must be page aligned, got {start:#x}, {end:#x}")
    if start < MIB:
        raise ValueError(f"start must be >= 1 MiB (BIOS, VGA and ROM below), got {start:#x}")
    if not start < end < 1 << 32:
        raise ValueError(f"need start < end < 4 GiB, got {start:#x}, {end:#x}")


def program_listing(start: int, end: int) -> tuple[tuple[int, bytes, str, str], ...]:
    """The program, instruction by instruction: (offset, bytes, assembly, what for).

    16-bit code up to ``PM32``, 32-bit code after it; Intel syntax in the listing.
    """
    _check_range(start, end)
    real16: tuple[tuple[bytes, str, str], ...] = (
        (b"\xfa", "cli", "no interrupts: there is no IDT for protected mode"),
        (b"\xe4\x92", "in al, 0x92", "fast A20: system control port A ..."),
        (b"\x0c\x02", "or al, 2", "... bit 1 enables A20"),
        (b"\x24\xfe", "and al, 0xfe", "... bit 0 would reset the machine"),
        (b"\xe6\x92", "out 0x92, al", ""),
        (b"\x31\xc0", "xor ax, ax", "DS = 0: the sector's data at linear 0x7c00 + x"),
        (b"\x8e\xd8", "mov ds, ax", ""),
        (b"\x0f\x01\x16" + _u16(ORIGIN + GDTR), f"lgdt [{ORIGIN + GDTR:#x}]", "the GDTR below"),
        (b"\x0f\x20\xc0", "mov eax, cr0", ""),
        (b"\x0c\x01", "or al, 1", "CR0.PE"),
        (b"\x0f\x22\xc0", "mov cr0, eax", ""),
        (b"\xea" + _u16(ORIGIN + PM32) + _u16(CODE_SEL), f"jmp {CODE_SEL:#x}:{ORIGIN + PM32:#x}",
         "far jump: loads CS from the GDT, 32-bit code from here"),
    )
    prot32: tuple[tuple[bytes, str, str], ...] = (
        (b"\x66\xb8" + _u16(DATA_SEL), f"mov ax, {DATA_SEL:#x}", "flat data selector"),
        (b"\x8e\xd8", "mov ds, ax", ""),
        (b"\x8e\xc0", "mov es, ax", ""),
        (b"\x8e\xd0", "mov ss, ax", ""),
        (b"\xbc" + _u32(ORIGIN), f"mov esp, {ORIGIN:#x}", "a valid stack, though none is used"),
        (b"\x66\xba" + _u16(SERIAL_PORT), f"mov dx, {SERIAL_PORT:#x}", "COM1"),
        (b"\xb0" + ENTRY_CHAR, f"mov al, {ENTRY_CHAR.decode()!r}", "protected mode reached"),
        (b"\xee", "out dx, al", ""),
        (b"\xbb" + _u32(start), f"mov ebx, {start:#x}", "sweep: the first page"),
        (b"\xff\x03", "inc dword [ebx]", "page: its counter, at offset 0"),
        (b"\x81\xc3" + _u32(PAGE), f"add ebx, {PAGE:#x}", "next page"),
        (b"\x81\xfb" + _u32(end), f"cmp ebx, {end:#x}", ""),
        (b"\x72\xf0", "jb page", "back 0x10 bytes (unsigned: end may exceed 2 GiB)"),
        (b"\xb0" + SWEEP_CHAR, f"mov al, {SWEEP_CHAR.decode()!r}", "one character per sweep"),
        (b"\xee", "out dx, al", ""),
        (b"\xeb\xe6", "jmp sweep", "back 0x1a bytes"),
    )
    out = []
    offset = 0
    for part, first in ((real16, 0), (prot32, PM32)):
        assert offset == first, f"code at {offset:#x}, expected {first:#x}"
        for code, asm, why in part:
            out.append((offset, code, asm, why))
            offset += len(code)
    assert offset <= GDT
    return tuple(out)


def boot_sector(start: int = MIB, end: int = 63 * MIB) -> bytes:
    """The 512-byte sector sweeping the pages ``[start, end)`` (defaults fit 64 MiB of RAM)."""
    sector = bytearray(SECTOR)
    for offset, code, _, _ in program_listing(start, end):
        sector[offset:offset + len(code)] = code
    for i, (descriptor, _) in enumerate(GDT_ENTRIES):
        struct.pack_into("<Q", sector, GDT + 8 * i, descriptor)
    struct.pack_into("<HI", sector, GDTR, 8 * len(GDT_ENTRIES) - 1, ORIGIN + GDT)
    sector[SECTOR - 2:] = SIGNATURE
    return bytes(sector)


def default_range(ram_size: int) -> tuple[int, int]:
    """``(1 MiB, ram_size - 1 MiB)``: all RAM above the BIOS area except the top MiB, where
    SeaBIOS keeps its tables (seen at ``ram_size - 128 KiB``). SeaBIOS also leaves data from
    its boot-time high zone lower down (seen at 0x2fe1000-0x3000000 with 64 MiB): counters
    there start from that data, not from zero."""
    start, end = MIB, ram_size - MIB
    _check_range(start, end)
    return start, end


def write_boot_image(path: str | os.PathLike[str], start: int = MIB, end: int = 63 * MIB,
                     size: int = SECTOR) -> None:
    """Write a raw disk image for ``-drive file=PATH,format=raw``: the sector, zero padded to
    ``size`` bytes (a multiple of 512; one sector is enough for SeaBIOS and QEMU)."""
    if size < SECTOR or size % SECTOR:
        raise ValueError(f"image size must be a positive multiple of {SECTOR}, got {size}")
    with open(path, "wb") as f:
        f.write(boot_sector(start, end).ljust(size, b"\0"))
