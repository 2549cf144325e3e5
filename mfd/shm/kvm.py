"""KVM from Python: a VM with one memslot per RAMBlock, one vCPU, its dirty log.

ctypes ``ioctl`` on /dev/kvm, the VM fd and the vCPU fd, with the structs of
``<linux/kvm.h>`` (x86_64) packed by hand; the numbers and layouts are in
../shared/kvm-facts.md. Only the process that created the VM may use it (KVM answers EIO to
any other, a forked child included); threads of that process may, so the guest's control
thread harvests the dirty log while its vCPU thread is inside ``KVM_RUN``.

What mfd needs of KVM and nothing more: memslots with ``KVM_MEM_LOG_DIRTY_PAGES``,
``KVM_GET_DIRTY_LOG`` (its bitmap is already in QEMU's ``bmap`` word layout),
``KVM_CLEAR_DIRTY_LOG`` with ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``, ``KVM_RUN`` with
``immediate_exit`` for a stop that does not wait for the guest's next exit, and the vCPU's
registers and segment/control registers (``KVM_GET/SET_REGS``, ``KVM_GET/SET_SREGS``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

import numpy as np

from mfd.errors import MfdError
from mfd.sysutil import libc

KVM_DEVICE = "/dev/kvm"
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
libc.ioctl.restype = ctypes.c_int


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | 0xAE << 8 | nr


KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_CHECK_EXTENSION = _ioc(0, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_GET_DIRTY_LOG = _ioc(1, 0x42, 16)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46, 32)
KVM_SET_TSS_ADDR = _ioc(0, 0x47, 0)
KVM_RUN = _ioc(0, 0x80, 0)
KVM_GET_REGS = _ioc(2, 0x81, 144)
KVM_SET_REGS = _ioc(1, 0x82, 144)
KVM_GET_SREGS = _ioc(2, 0x83, 312)
KVM_SET_SREGS = _ioc(1, 0x84, 312)
KVM_ENABLE_CAP = _ioc(1, 0xA3, 104)
KVM_CLEAR_DIRTY_LOG = _ioc(3, 0xC0, 24)

KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1
KVM_MEM_LOG_DIRTY_PAGES = 1
TSS_ADDR = 0xFFFBD000  # as QEMU sets it; harmless where it is not needed

KVM_EXIT_IO = 2
KVM_EXIT_INTR = 10
# the exits mfd's guest should never take, named for the line that says the vCPU stopped
EXIT_NAMES = {5: "HLT", 6: "MMIO", 8: "SHUTDOWN (a triple fault)", 9: "FAIL_ENTRY",
              17: "INTERNAL_ERROR", 31: "DIRTY_RING_FULL"}

REGS_SIZE = 144  # 18 x u64: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
SREGS_SIZE = 312
RIP, RFLAGS = 16, 17  # indexes in the regs' u64 array
# kvm_run: immediate_exit at byte 1, exit_reason u32 at 8; the io exit at 32
_RUN_IMMEDIATE_EXIT = 1
_RUN_EXIT_REASON = 8
_IO = struct.Struct("=BBHIQ")  # direction, size, port, count, data_offset
_SEGMENT = struct.Struct("=QIH10B")  # base limit selector type present dpl db s l g avl ...
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = {"cr0": 224, "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256, "efer": 264}


class KvmError(MfdError):
    pass


def _ioctl(fd: int, request: int, arg: int | ctypes.Array | None = 0) -> int:
    ptr = ctypes.addressof(arg) if isinstance(arg, ctypes.Array) else arg
    ret = libc.ioctl(fd, request, ptr)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _open_vm() -> tuple[int, int]:
    """/dev/kvm and a new VM's fd; KvmError says why not (the reason alone)."""
    try:
        kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KvmError(f"{KVM_DEVICE}: {e.strerror}") from None
    try:
        if _ioctl(kvm, KVM_GET_API_VERSION) != 12:
            raise KvmError("KVM API version is not 12")
    except OSError as e:
        os.close(kvm)
        raise KvmError(f"{KVM_DEVICE} is not KVM: {e.strerror}") from None
    except KvmError:
        os.close(kvm)
        raise
    try:
        return kvm, _ioctl(kvm, KVM_CREATE_VM)
    except OSError as e:
        os.close(kvm)
        raise KvmError(f"KVM_CREATE_VM: {e.strerror}") from None


def unavailable() -> str | None:
    """Why this machine cannot run a KVM guest, or None when it can (a VM is created and
    thrown away to find out)."""
    try:
        for fd in _open_vm():
            os.close(fd)
        return None
    except KvmError as e:
        return str(e)


class VM:
    """One VM: memslots over the caller's mappings, one vCPU, the dirty log."""

    def __init__(self, manual_protect: bool = True) -> None:
        try:
            self.kvm, self.fd = _open_vm()
        except KvmError as e:
            raise KvmError(f"--kvm: no KVM here: {e}") from None
        self.vcpu = -1
        self.run_mm: mmap.mmap | None = None
        self.slots: list[int] = []  # pages per slot
        try:
            _ioctl(self.fd, KVM_SET_TSS_ADDR, TSS_ADDR)
            if not _ioctl(self.kvm, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT):
                raise KvmError("--kvm: KVM lacks KVM_CAP_IMMEDIATE_EXIT")
            self.manual_protect = manual_protect and bool(
                _ioctl(self.fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            if self.manual_protect:
                cap = ctypes.create_string_buffer(104)
                struct.pack_into("=IIQ", cap, 0, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0,
                                 KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
                _ioctl(self.fd, KVM_ENABLE_CAP, cap)
        except OSError as e:
            self.close()
            raise KvmError(f"--kvm: cannot create a VM: {e.strerror}") from None
        except BaseException:
            self.close()
            raise

    def add_memslot(self, gpa: int, mm: mmap.mmap) -> int:
        """Guest-physical ``gpa`` onward is ``mm`` (a MAP_SHARED mapping of a block), dirty
        logged. Returns the slot number."""
        slot = len(self.slots)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        region = ctypes.create_string_buffer(32)
        struct.pack_into("=IIQQQ", region, 0, slot, KVM_MEM_LOG_DIRTY_PAGES, gpa, len(mm),
                         addr)
        try:
            _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        except OSError as e:
            raise KvmError(f"--kvm: memslot {slot} at {gpa:#x}: {e.strerror}") from None
        self.slots.append(len(mm) // mmap.PAGESIZE)
        return slot

    def create_vcpu(self) -> None:
        try:
            self.vcpu = _ioctl(self.fd, KVM_CREATE_VCPU, 0)
            size = _ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
            self.run_mm = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise KvmError(f"--kvm: cannot create a vCPU: {e.strerror}") from None

    # ------------------------------------------------------------------ the vCPU

    def run(self) -> int:
        """One ``KVM_RUN``: the exit reason, or KVM_EXIT_INTR when a signal (the stop's
        kick) or ``immediate_exit`` ended it."""
        try:
            _ioctl(self.vcpu, KVM_RUN)
        except OSError as e:
            if e.errno == errno.EINTR:
                return KVM_EXIT_INTR
            raise KvmError(f"KVM_RUN: {e.strerror}") from None
        assert self.run_mm is not None
        return struct.unpack_from("=I", self.run_mm, _RUN_EXIT_REASON)[0]

    def set_immediate_exit(self, on: bool) -> None:
        assert self.run_mm is not None
        self.run_mm[_RUN_IMMEDIATE_EXIT] = int(on)

    def io_exit(self) -> tuple[int, int, int]:
        """The last KVM_EXIT_IO: (port, direction, the first u32 of its data)."""
        assert self.run_mm is not None
        direction, _size, port, _count, offset = _IO.unpack_from(self.run_mm, 32)
        return port, direction, struct.unpack_from("=I", self.run_mm, offset)[0]

    def get_state(self) -> tuple[bytes, bytes]:
        regs, sregs = ctypes.create_string_buffer(REGS_SIZE), ctypes.create_string_buffer(
            SREGS_SIZE)
        _ioctl(self.vcpu, KVM_GET_REGS, regs)
        _ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        return regs.raw, sregs.raw

    def set_state(self, regs: bytes, sregs: bytes) -> None:
        if len(regs) != REGS_SIZE or len(sregs) != SREGS_SIZE:
            raise KvmError(f"vCPU state of {len(regs)} + {len(sregs)} bytes, expected "
                           f"{REGS_SIZE} + {SREGS_SIZE}")
        _ioctl(self.vcpu, KVM_SET_SREGS, ctypes.create_string_buffer(sregs, SREGS_SIZE))
        _ioctl(self.vcpu, KVM_SET_REGS, ctypes.create_string_buffer(regs, REGS_SIZE))

    # ------------------------------------------------------------------ dirty log

    def get_dirty_log(self, slot: int) -> np.ndarray:
        """The slot's dirty bitmap as bmap words. Without manual protect KVM clears it and
        write-protects the pages; with it, nothing changes until :meth:`clear_dirty_log`."""
        words = np.zeros((self.slots[slot] + 63) // 64, dtype=np.uint64)
        arg = ctypes.create_string_buffer(16)
        struct.pack_into("=IIQ", arg, 0, slot, 0, words.ctypes.data)
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, arg)
        return words

    def clear_dirty_log(self, slot: int, first_page: int, words: np.ndarray) -> None:
        """Manual protect: clear (and write-protect again) the pages set in ``words``, a
        bmap slice starting at ``first_page`` (a multiple of 64)."""
        words = np.ascontiguousarray(words, dtype=np.uint64)
        num_pages = min(len(words) * 64, self.slots[slot] - first_page)
        arg = ctypes.create_string_buffer(24)
        struct.pack_into("=IIQQ", arg, 0, slot, num_pages, first_page, words.ctypes.data)
        _ioctl(self.fd, KVM_CLEAR_DIRTY_LOG, arg)

    def close(self) -> None:
        if self.run_mm is not None:
            self.run_mm.close()
            self.run_mm = None
        for attr in ("vcpu", "fd", "kvm"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


def segment(sregs: bytearray, name: str, **fields: int) -> None:
    """Set a kvm_segment of ``sregs`` in place (fields: base limit selector type present
    dpl db s l g)."""
    at = SEGMENTS.index(name) * _SEGMENT.size
    keys = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
            "unusable", "padding")
    cur = dict(zip(keys, _SEGMENT.unpack_from(sregs, at), strict=True))
    cur.update(fields)
    _SEGMENT.pack_into(sregs, at, *(cur[k] for k in keys))


def control_register(sregs: bytearray, name: str, value: int) -> None:
    struct.pack_into("=Q", sregs, CONTROL[name], value)
