"""userfaultfd: a process's missing pages reported to, and placed by, another.

What postcopy needs (``migration/postcopy-ram.c``): the process that maps guest RAM (the
guest, the VM owner: a uffd is bound to the mm of its creator) opens the uffd, registers its
block mappings for MISSING faults, and passes the fd (SCM_RIGHTS) to the incoming migration,
which reads the fault messages and places pages atomically with UFFDIO_COPY or
UFFDIO_ZEROPAGE in the owner's address space (the page is filled before it is mapped: a
write through another mapping would be seen half done, and a read through one allocates a
zero page the owner then never faults on). The owner must keep its fd open until the end:
closing the last fd turns every missing page into a zero page.

The numbers are the x86_64 uapi's, checked on this kernel (``shared/postcopy-facts.md``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from mfd.errors import MfdError

_SYS_USERFAULTFD = 323  # x86_64
USERFAULTFD_IOC_NEW = 0xAA00
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
REGISTER_MODE_MISSING = 1
FEATURE_THREAD_ID = 1 << 8
EVENT_PAGEFAULT = 0x12
PAGEFAULT_FLAG_WRITE = 1
# the ioctls a MISSING registration must allow (bits are _UFFDIO_* numbers)
_NEEDED = (1 << 0x02) | (1 << 0x03) | (1 << 0x04)  # WAKE, COPY, ZEROPAGE

_API = struct.Struct("=QQQ")
_RANGE = struct.Struct("=QQ")
_REGISTER = struct.Struct("=QQQQ")
_COPY = struct.Struct("=QQQQq")
_ZEROPAGE = struct.Struct("=QQQq")
_MSG = struct.Struct("=B7xQQI4x")
PAGE_SIZE = 4096


@dataclass(frozen=True)
class Fault:
    address: int  # the faulting address in the owner's address space
    write: bool
    thread: int  # the faulting thread (THREAD_ID)


def open_uffd() -> int:
    """A new userfaultfd (non-blocking, close-on-exec) with the API handshake done. Through
    /dev/userfaultfd where it exists (Docker's default seccomp refuses the syscall, the
    device works), else the syscall; never UFFD_USER_MODE_ONLY (KVM's faults are the
    kernel's)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        fd = _syscall(flags)
    else:
        try:
            fd = fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        except OSError as e:
            raise MfdError(f"userfaultfd: /dev/userfaultfd refused a new fd ({e.strerror})") \
                from None
        finally:
            os.close(dev)
    try:
        buf = bytearray(_API.pack(UFFD_API, FEATURE_THREAD_ID, 0))
        fcntl.ioctl(fd, UFFDIO_API, buf)
    except OSError as e:
        os.close(fd)
        raise MfdError(f"userfaultfd: UFFDIO_API failed ({e.strerror})") from None
    return fd


def _syscall(flags: int) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_USERFAULTFD, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise MfdError(f"userfaultfd: not available here ({os.strerror(err)}; in a container, "
                       "give it the device /dev/userfaultfd)")
    return fd


class UserfaultFd:
    """A uffd: opened here (:func:`open_uffd`) or received from its owner. Addresses are
    the owner's."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def register(self, address: int, length: int) -> None:
        buf = bytearray(_REGISTER.pack(address, length, REGISTER_MODE_MISSING, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, buf)
        except OSError as e:
            raise MfdError(f"userfaultfd: cannot register {length:#x} bytes at {address:#x} "
                           f"({e.strerror})") from None
        if _REGISTER.unpack(buf)[3] & _NEEDED != _NEEDED:
            raise MfdError("userfaultfd: the registered range does not offer COPY, ZEROPAGE "
                           "and WAKE (not a shared memory file?)")

    def unregister(self, address: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, _RANGE.pack(address, length))

    def copy(self, dst: int, src: int, length: int) -> bool:
        """Place ``length`` bytes from ``src`` (this process's memory) at ``dst``, waking
        whoever waits there. A page there already (placed by someone else) is woken and
        left as it is, and the rest of the range still placed; False if there was one."""
        return self._place(UFFDIO_COPY, _COPY, dst, length, src)

    def zeropage(self, dst: int, length: int) -> bool:
        """Map zero pages at ``dst`` (see :meth:`copy` for pages there already)."""
        return self._place(UFFDIO_ZEROPAGE, _ZEROPAGE, dst, length)

    def _place(self, request: int, layout: struct.Struct, dst: int, length: int,
               src: int | None = None) -> bool:
        """A multi-page COPY or ZEROPAGE stops at the first page present: with EAGAIN and
        what it placed before it, or EEXIST when that is the first page (never both
        silently: the rest of the range would stay missing)."""
        whole = True
        while length:
            fields = (dst, src, length, 0, 0) if src is not None else (dst, length, 0, 0)
            buf = bytearray(layout.pack(*fields))
            try:
                fcntl.ioctl(self.fd, request, buf)
                return whole
            except OSError as e:
                done = layout.unpack(buf)[-1]
                if e.errno not in (errno.EEXIST, errno.EAGAIN):
                    what = "COPY" if src is not None else "ZEROPAGE"
                    raise MfdError(f"userfaultfd: UFFDIO_{what} of {length:#x} bytes at "
                                   f"{dst:#x} failed ({e.strerror})") from None
                if done <= 0:  # the page at dst is present: wake its waiters, skip it
                    self.wake(dst, PAGE_SIZE)
                    done, whole = PAGE_SIZE, False
                dst, length = dst + done, length - done
                if src is not None:
                    src += done
        return whole

    def wake(self, address: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_WAKE, _RANGE.pack(address, length))

    def faults(self, most: int = 64) -> list[Fault]:
        """The pending page faults (none: an empty list; the fd is non-blocking)."""
        try:
            data = os.read(self.fd, _MSG.size * most)
        except BlockingIOError:
            return []
        out = []
        for event, flags, address, ptid in _MSG.iter_unpack(data):
            if event == EVENT_PAGEFAULT:
                out.append(Fault(address, bool(flags & PAGEFAULT_FLAG_WRITE), ptid))
        return out

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestRAM:
    """A guest's RAM blocks as registered in its uffd: where each is mapped in the guest
    (``bases``) and how long; what every server of its faults (postcopy, lazy restore)
    needs to turn a fault into a page and back."""

    def __init__(self, uffd: UserfaultFd, bases: list[int], lengths: list[int]) -> None:
        self.uffd, self.bases, self.lengths = uffd, bases, lengths

    def locate(self, address: int) -> tuple[int, int]:
        """(block, page) of a faulting address."""
        for block, (base, length) in enumerate(zip(self.bases, self.lengths, strict=True)):
            if base <= address < base + length:
                return block, (address - base) // PAGE_SIZE
        raise MfdError(f"userfaultfd: a fault at {address:#x}, outside every RAM block")

    def address(self, block: int, page: int) -> int:
        return self.bases[block] + page * PAGE_SIZE

    def close(self) -> None:
        """Unregister every block through this copy of the uffd, then close it: a guest
        thread blocked on a page (a zero page never sent, a hole) is woken and maps it
        itself; the guest may close its own fd whenever it is told."""
        for base, length in zip(self.bases, self.lengths, strict=True):
            with contextlib.suppress(OSError):
                self.uffd.unregister(base, length)
        self.uffd.close()
