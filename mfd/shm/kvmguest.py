"""A real guest: one KVM vCPU running mfd's own x86-64 program over the guest's RAM blocks.

``mfd guest --kvm`` makes the guest process a VM owner (../shared/kvm-facts.md): one memslot
per RAMBlock over the block's /dev/shm mapping, dirty logged, the first block at guest-physical
0; one vCPU in a thread of its own, in 64-bit long mode at CPL3 over an identity map (the mode
that runs natively under kvm_pvm here). The guest's layout in its first block::

    0x1000   the program (PROGRAM below, or SWEEP; the guest never writes it)
    0x2000   params: u32 N (iterations per exit), u32 MASK (data offsets) or, for SWEEP,
             END (the block's end), u32 DATA (base)
    0x3000   u64 counter: one per iteration
    0x4000   PML4, 0x5000 PDPT, 0x6000.. one PD per GiB: 2 MiB pages, A and D preset
    0x200000 the data area: each iteration stores 8 bytes at DATA + (x & MASK); SWEEP
             (``--pattern sequential``) adds one to the u32 at offset 0 of each page in
             turn, DATA to the end and again, as ``mfd.bench.bootsector``'s guest does in
             QEMU (its postcopy faults come in the same order)

The program is deterministic: RAM and registers fully decide its future, which is what the
determinism test checks across a migration. It exits to the vCPU thread every N iterations
(``out 0x10``); the thread paces it to ``--dirty-rate`` (one iteration dirties about one page)
and applies the cpu throttle there, as QEMU's cpu_throttle_thread does (sleep
``pct / (1 - pct)`` times what ran), in sleeps a stop interrupts.

Dirty tracking is KVM's log, read on the main process's ``harvest``, ORed with this
process's own log of what it wrote through the mapping (KVM does not see those writes). With
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` a harvest does not write-protect anything; the main
process clears each chunk just before it sends it (``clear``), as QEMU's clear_bmap does.

Stop is QEMU's kick: set the request, ``immediate_exit``, SIGUSR1 to the vCPU thread; KVM_RUN
returns at once wherever the guest was, the thread completes a pending I/O (one KVM_RUN with
``immediate_exit``), saves the registers and parks.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from mfd.errors import MfdError
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import bits_to_words
from mfd.shm import kvm
from mfd.shm.ramblock import MappedBlock

CODE, PARAMS, COUNTER, PML4, PDPT, PD, DATA = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000,
                                               0x200000)
OUT_PORT = 0x10
MIN_RAM = 2 * DATA  # the data area is at least 2 MiB
MAX_RAM = 4 << 30  # the program computes data addresses in 32 bits; four PDs
GIB, HUGE = 1 << 30, 2 << 20
HOTSET_SHARE = 8  # hotset: the writes go to one eighth of the data area
MAX_ITERATIONS_PER_EXIT = 1 << 16  # ~1 ms at full speed: a stop or throttle never waits long
TIMESLICE = 0.010  # QEMU's CPU_THROTTLE_TIMESLICE_NS

# The program, instruction by instruction: (bytes, assembly, what for). EAX holds the
# xorshift32 state, ECX the iterations left before the next exit.
PROGRAM: tuple[tuple[bytes, str, str], ...] = (
    (b"\x8b\x0c\x25\x00\x20\x00\x00", "mov ecx, [0x2000]", "outer: N iterations per exit"),
    (b"\x89\xc2", "mov edx, eax", "inner: x ^= x << 13"),
    (b"\xc1\xe2\x0d", "shl edx, 13", ""),
    (b"\x31\xd0", "xor eax, edx", ""),
    (b"\x89\xc2", "mov edx, eax", "x ^= x >> 17"),
    (b"\xc1\xea\x11", "shr edx, 17", ""),
    (b"\x31\xd0", "xor eax, edx", ""),
    (b"\x89\xc2", "mov edx, eax", "x ^= x << 5"),
    (b"\xc1\xe2\x05", "shl edx, 5", ""),
    (b"\x31\xd0", "xor eax, edx", ""),
    (b"\x89\xc2", "mov edx, eax", "where: DATA + (x & MASK), 8-byte aligned"),
    (b"\x23\x14\x25\x04\x20\x00\x00", "and edx, [0x2004]", "(absolute: a SIB byte, not RIP)"),
    (b"\x03\x14\x25\x08\x20\x00\x00", "add edx, [0x2008]", ""),
    (b"\x89\x02", "mov [rdx], eax", "store the state ..."),
    (b"\x8b\x1c\x25\x00\x30\x00\x00", "mov ebx, [0x3000]", "... and the counter's low word"),
    (b"\x89\x5a\x04", "mov [rdx+4], ebx", ""),
    (b"\x48\xff\x04\x25\x00\x30\x00\x00", "inc qword [0x3000]", "count the iteration"),
    (b"\xff\xc9", "dec ecx", ""),
    (b"\x75\xc3", "jnz inner", "back 0x3d bytes"),
    (b"\xe7\x10", "out 0x10, eax", "exit to the vCPU thread (KVM_EXIT_IO)"),
    (b"\xeb\xb8", "jmp outer", "back 0x48 bytes"),
)
# EBX holds the page, ECX the iterations left before the next exit.
SWEEP: tuple[tuple[bytes, str, str], ...] = (
    (b"\x8b\x0c\x25\x00\x20\x00\x00", "mov ecx, [0x2000]", "outer: N iterations per exit"),
    (b"\xff\x03", "inc dword [rbx]", "inner: the page's counter, at offset 0"),
    (b"\x48\xff\x04\x25\x00\x30\x00\x00", "inc qword [0x3000]", "count the iteration"),
    (b"\x81\xc3\x00\x10\x00\x00", "add ebx, 0x1000", "next page"),
    (b"\x3b\x1c\x25\x04\x20\x00\x00", "cmp ebx, [0x2004]", "past the end?"),
    (b"\x72\x07", "jb next", ""),
    (b"\x8b\x1c\x25\x08\x20\x00\x00", "mov ebx, [0x2008]", "again from DATA"),
    (b"\xff\xc9", "next: dec ecx", ""),
    (b"\x75\xdc", "jnz inner", "back 0x24 bytes"),
    (b"\xe7\x10", "out 0x10, eax", "exit to the vCPU thread (KVM_EXIT_IO)"),
    (b"\xeb\xd1", "jmp outer", "back 0x2f bytes"),
)


def program(pattern: str) -> bytes:
    return b"".join(code for code, _, _ in (SWEEP if pattern == "sequential" else PROGRAM))


@dataclass
class KvmState:
    """What a saved or migrated KVM guest needs to go on exactly where it stopped."""

    dirty_rate: int
    pattern: str
    seed: int
    manual_protect: bool = True
    exits: int = 0  # OUT exits so far
    regs: str = ""  # kvm_regs / kvm_sregs as hex, saved when the vCPU stopped
    sregs: str = ""

    def to_json(self) -> dict[str, object]:
        return {"kind": "kvm", **vars(self)}

    @classmethod
    def from_json(cls, d: dict) -> KvmState:
        return cls(**{k: v for k, v in d.items() if k != "kind"})


def data_mask(size: int, pattern: str) -> int:
    """The offsets the program writes: the largest power of two of data area that fits (an
    eighth of it for hotset), minus 8 for 8-byte aligned stores."""
    area = 1 << ((size - DATA).bit_length() - 1)
    if pattern == "hotset":
        area = max(TARGET_PAGE_SIZE, area // HOTSET_SHARE)
    return area - 8


def iterations_per_exit(dirty_rate: int) -> int:
    """About one exit per millisecond at the paced rate (an iteration dirties about a page)."""
    return int(min(MAX_ITERATIONS_PER_EXIT, max(1, dirty_rate // TARGET_PAGE_SIZE // 1000)))


def install(ram: np.ndarray, state: KvmState) -> list[int]:
    """Write the program, its params and the page tables into the first block's bytes;
    return the pages written (this process's writes: KVM's log does not see them)."""
    size = len(ram)
    code = program(state.pattern)
    ram[CODE:CODE + len(code)] = np.frombuffer(code, np.uint8)
    end = size // TARGET_PAGE_SIZE * TARGET_PAGE_SIZE if state.pattern == "sequential" \
        else data_mask(size, state.pattern)
    struct.pack_into("<III", ram, PARAMS, iterations_per_exit(state.dirty_rate), end, DATA)
    struct.pack_into("<Q", ram, COUNTER, 0)
    gibs = (size + GIB - 1) // GIB
    flags = 0x1 | 0x2 | 0x4  # present, writable, user
    struct.pack_into("<Q", ram, PML4, PDPT | flags)
    for g in range(gibs):
        struct.pack_into("<Q", ram, PDPT + 8 * g, (PD + g * 0x1000) | flags)
        huge = np.arange(g * 512, (g + 1) * 512, dtype=np.uint64) * HUGE
        # 2 MiB pages (PS) with Accessed and Dirty preset: KVM's walker then never writes the
        # tables, so they stay out of the dirty log
        ram[PD + g * 0x1000:PD + (g + 1) * 0x1000] = (
            huge | np.uint64(flags | 0x20 | 0x40 | 0x80)).view(np.uint8)
    return sorted({p // TARGET_PAGE_SIZE for p in (CODE, PARAMS, COUNTER, PML4, PDPT)}
                  | {(PD + g * 0x1000) // TARGET_PAGE_SIZE for g in range(gibs)})


def initial_state(vm: kvm.VM, seed: int) -> tuple[bytes, bytes]:
    """Long mode at CPL3 straight from KVM_SET_SREGS: the hidden segment parts are what the
    CPU uses, no GDT or IDT is ever loaded (the program never reloads a segment or faults)."""
    _, reset = vm.get_state()
    sregs = bytearray(reset)
    kvm.segment(sregs, "cs", base=0, limit=0xFFFFFFFF, selector=0x1B, type=0xB, present=1,
                dpl=3, db=0, s=1, l=1, g=1)
    for seg in ("ds", "es", "fs", "gs", "ss"):
        kvm.segment(sregs, seg, base=0, limit=0xFFFFFFFF, selector=0x23, type=0x3, present=1,
                    dpl=3, db=1, s=1, l=0, g=1)
    for name, value in (("cr0", 0x80000011), ("cr3", PML4), ("cr4", 0x20), ("efer", 0x500)):
        kvm.control_register(sregs, name, value)
    regs = [0] * 18
    regs[0] = seed & 0xFFFFFFFF or 0x12345678  # RAX: the xorshift state, never 0
    regs[1] = DATA  # RBX: SWEEP's first page
    regs[6] = 0x10000  # RSP: unused by the program
    regs[kvm.RIP], regs[kvm.RFLAGS] = CODE, 0x3002  # IOPL 3: `out` is legal at CPL3
    return struct.pack("<18Q", *regs), bytes(sregs)


class KvmWorkload:
    """The guest process's KVM side; its control thread calls everything but the vCPU loop."""

    runs_itself = True  # the vCPU thread runs the guest, not the guest process's ticks

    def __init__(self, blocks: list[MappedBlock], state: KvmState, fresh: bool,
                 kick: bool = True) -> None:
        if not blocks:
            raise MfdError("--kvm: no RAM block")
        size = blocks[0].block.used_length
        if not MIN_RAM <= size <= MAX_RAM:
            raise MfdError(f"--kvm: the first RAM block must hold {MIN_RAM >> 20} MiB to "
                           f"{MAX_RAM >> 30} GiB, not {size} bytes")
        self.blocks, self.state = blocks, state
        self.ram = np.frombuffer(blocks[0].mm, dtype=np.uint8)
        self.own_log = [np.zeros(b.block.num_pages, dtype=bool) for b in blocks]
        self.vm = kvm.VM(manual_protect=state.manual_protect)
        try:
            state.manual_protect = self.vm.manual_protect
            gpa = 0
            for b in blocks:
                self.vm.add_memslot(gpa, b.mm)
                gpa += (b.block.used_length + HUGE - 1) // HUGE * HUGE
            self.vm.create_vcpu()
            if fresh:
                self.own_log[0][install(self.ram, state)] = True
                regs, sregs = initial_state(self.vm, state.seed)
            else:
                regs, sregs = bytes.fromhex(state.regs), bytes.fromhex(state.sregs)
            self.vm.set_state(regs, sregs)
            state.regs, state.sregs = regs.hex(), sregs.hex()
        except OSError as e:
            self.vm.close()
            raise kvm.KvmError(f"--kvm: cannot set up the vCPU: {e.strerror}") from None
        except BaseException:
            self.vm.close()
            raise
        self.kick = kick  # False: a stop waits for the vCPU's next exit (to measure the kick)
        self.throttle = 0
        self.stop_at: int | None = None  # park at this many exits (run-exits)
        self.error: str | None = None  # why the vCPU stopped for good
        self._stop_req = False
        self._quit = False
        self._go = threading.Event()  # the vCPU may run
        self._parked = threading.Event()
        self._parked.set()
        self._wake = threading.Event()  # interrupts pacing and throttle sleeps
        self._throttled = threading.Event()  # a throttle is set: the kicker runs
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # the kick: EINTR only
        self.thread = threading.Thread(target=self._vcpu_loop, name="vcpu0", daemon=True)
        self.thread.start()
        self.kicker = threading.Thread(target=self._throttle_kicks, name="throttle-kick",
                                       daemon=True)
        self.kicker.start()

    # ------------------------------------------------------------------ the control thread

    @property
    def pages_written(self) -> int:
        """Iterations so far (each stores into one page): the guest's own counter."""
        return int(struct.unpack_from("<Q", self.ram, COUNTER)[0])

    @property
    def parked(self) -> bool:
        return self._parked.is_set()

    def start(self) -> None:
        if self.error is None and self.parked:
            self._stop_req = False
            self.vm.set_immediate_exit(False)  # the vCPU is parked: nobody else touches it
            self._parked.clear()
            self._go.set()

    def stop(self) -> None:
        """Kick the vCPU out of KVM_RUN and wait until it parked with its state saved."""
        if self.parked:
            return
        self._stop_req = True
        self._wake.set()
        if self.kick:
            self.vm.set_immediate_exit(True)  # a vCPU between two KVM_RUNs
            self._kick()  # one inside KVM_RUN
        if not self._parked.wait(5.0):
            raise MfdError("--kvm: the vCPU did not stop within 5 s")

    def set_throttle(self, pct: int) -> None:
        self.throttle = pct
        if pct:
            self._throttled.set()
        else:
            self._throttled.clear()
        self._wake.set()

    def _kick(self) -> None:
        if self.thread.ident is not None and self.thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(self.thread.ident, signal.SIGUSR1)

    def _throttle_kicks(self) -> None:
        """While throttled, take the vCPU out of KVM_RUN every 10 ms, as QEMU's throttle
        timer does: a vCPU that rarely exits (a fast loop slowed by write faults can stay
        seconds in one KVM_RUN) still sleeps its share."""
        while not self._quit:
            self._throttled.wait()
            time.sleep(TIMESLICE)
            if self.throttle and not self.parked:
                self._kick()

    def run_exits(self, count: int) -> None:
        """Run until ``count`` more exits, then park (a deterministic stopping point)."""
        self.stop()
        self.stop_at = self.state.exits + count
        self.start()

    def harvest(self) -> list[bytes]:
        """Each slot's dirty log since the last harvest (or, with manual protect, since its
        pages were last cleared), ORed with this process's own writes."""
        out = []
        for slot, own in enumerate(self.own_log):
            words = self.vm.get_dirty_log(slot)
            if own.any():
                np.bitwise_or(words, bits_to_words(own), out=words)
                own[:] = False
            out.append(words.tobytes())
        return out

    def clear(self, slot: int, first_page: int, words: np.ndarray) -> None:
        if self.vm.manual_protect:
            self.vm.clear_dirty_log(slot, first_page, words)

    def close(self) -> None:
        with contextlib.suppress(MfdError):
            self.stop()
        self._quit = True
        self._go.set()
        self._throttled.set()
        self.thread.join(5.0)
        self.kicker.join(5.0)
        self.vm.close()

    # ------------------------------------------------------------------ the vCPU thread

    def _vcpu_loop(self) -> None:
        """Run, pace, throttle. Pacing and throttle follow the guest's clock, which stands
        still while the throttle holds the vCPU, so ``--dirty-rate`` is per second of run
        time (as the built-in guest's) and a throttle of P% takes P% off it, as QEMU's does
        off a busy guest: after each 10 ms slice the vCPU sleeps ``P / (1 - P)`` slices."""
        vm = self.vm
        throttled = 0.0  # wall time the throttle held the vCPU: not the guest's time
        paced_from = slice_start = 0.0  # on the guest's clock
        paced_iterations = 0
        while True:
            self._go.wait()
            if self._quit:
                return
            rate = self.state.dirty_rate / TARGET_PAGE_SIZE  # iterations per second
            if not self._stop_req and rate > 0:
                reason = vm.run()
                if reason == kvm.KVM_EXIT_IO and vm.io_exit()[0] == OUT_PORT:
                    self.state.exits += 1
                    if self.stop_at is not None and self.state.exits >= self.stop_at:
                        self._stop_req = True
                    paced_iterations += iterations_per_exit(self.state.dirty_rate)
                elif reason != kvm.KVM_EXIT_INTR:
                    self.error = (f"the vCPU stopped: KVM_EXIT_"
                                  f"{kvm.EXIT_NAMES.get(reason, reason)}")
                    self._stop_req = True
            elif not self._stop_req:
                self._wake.wait()  # idle guest (dirty rate 0): nothing to run
                self._wake.clear()
            if self._stop_req:
                self._park()
                throttled, paced_iterations = 0.0, 0
                paced_from = slice_start = time.monotonic()
                continue
            clock = time.monotonic() - throttled
            if self.throttle and clock - slice_start >= TIMESLICE:
                ratio = self.throttle / 100
                throttled += self._sleep(ratio / (1 - ratio) * (clock - slice_start))
                slice_start = clock
            elif not self.throttle:
                slice_start = clock
            if rate > 0:
                due = paced_from + paced_iterations / rate
                if clock - due > 0.1:  # fell behind (a stall): no burst to catch up
                    paced_from, paced_iterations = clock, 0
                elif due > clock:
                    self._sleep(due - clock)

    def _sleep(self, seconds: float) -> float:
        """Sleep that a stop (or a new throttle) cuts short; returns the time slept."""
        t0 = time.monotonic()
        if self._wake.wait(seconds):
            self._wake.clear()
        return time.monotonic() - t0

    def _park(self) -> None:
        """Complete a pending I/O without running guest code, save the state, park."""
        vm = self.vm
        vm.set_immediate_exit(True)
        vm.run()
        vm.set_immediate_exit(False)
        regs, sregs = vm.get_state()
        self.state.regs, self.state.sregs = regs.hex(), sregs.hex()
        self.stop_at = None
        self._go.clear()
        self._parked.set()

