"""Device sections that QEMU writes for ``-machine none`` (``timer``, ``globalstate``) and
the vmdesc JSON that describes them.

mfd writes them exactly as QEMU 10 does, so an mfd file of an image is byte-identical to
QEMU's own up to the end of the vmdesc; they are also what mfd knows how to skip when it reads
a QEMU file. Layouts: ``migration/global_state.c`` and ``system/cpu-timers.c``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from mfd.protocol import constants as C
from mfd.protocol import stream
from mfd.protocol.codec import Reader

TIMER_SECTION_ID = 0
RAM_SECTION_ID = 1
GLOBALSTATE_SECTION_ID = 3
GUEST_SECTION_ID = 4
# mfd's guest (its workload's state) as a device of its own: be32 length + JSON
GUEST_IDSTR = "mfd-guest"
GUEST_VERSION = 1
GUEST_STATE_MAX = 1 << 20

_TIMER = struct.Struct(">q8sq")
_RUNSTATE_LEN = 32
_GLOBALSTATE_UNUSED = 66


@dataclass(frozen=True)
class DeviceState:
    """A decoded device section: its name and its fields (for ``inspect``)."""

    idstr: str
    instance_id: int
    version_id: int
    fields: dict[str, object]


def encode_timer(cpu_ticks_offset: int = 0, cpu_clock_offset: int = 0) -> bytes:
    return _TIMER.pack(cpu_ticks_offset, bytes(8), cpu_clock_offset)


def encode_globalstate(runstate: str) -> bytes:
    """``globalstate`` v1: be32 size (strlen + NUL), runstate[32], two u8 flags, unused[66]."""
    raw = runstate.encode()
    assert len(raw) < _RUNSTATE_LEN
    return (struct.pack(">I", len(raw) + 1) + raw.ljust(_RUNSTATE_LEN, b"\0")
            + bytes([1, 0]) + bytes(_GLOBALSTATE_UNUSED))


def encode_sections(runstate: str, guest: dict | None = None) -> bytes:
    """The device state after RAM, as FULL sections: timer, globalstate and, only to an mfd
    destination, the guest's own state (``guest``: name, runstate, workload)."""
    out = (stream.encode_section_start(C.QEMU_VM_SECTION_FULL, TIMER_SECTION_ID, "timer", 0, 2)
           + encode_timer() + stream.encode_footer(TIMER_SECTION_ID)
           + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, GLOBALSTATE_SECTION_ID,
                                         "globalstate", 0, 1)
           + encode_globalstate(runstate) + stream.encode_footer(GLOBALSTATE_SECTION_ID))
    if guest is not None:
        out += (stream.encode_section_start(C.QEMU_VM_SECTION_FULL, GUEST_SECTION_ID,
                                            GUEST_IDSTR, 0, GUEST_VERSION)
                + encode_guest(guest) + stream.encode_footer(GUEST_SECTION_ID))
    return out


def _decode_timer(r: Reader) -> dict[str, object]:
    ticks, _unused, clock = _TIMER.unpack(r.take(_TIMER.size, "timer state"))
    return {"cpu_ticks_offset": ticks, "cpu_clock_offset": clock}


def _decode_globalstate(r: Reader) -> dict[str, object]:
    at = r.pos
    size = r.be32("globalstate size")
    if not 1 <= size <= _RUNSTATE_LEN:
        raise r.error(f"globalstate runstate size {size}, expected 1..{_RUNSTATE_LEN}", at=at)
    raw = bytes(r.take(_RUNSTATE_LEN, "globalstate runstate"))
    has_suspended = r.u8("globalstate has_vm_was_suspended")
    suspended = r.u8("globalstate vm_was_suspended")
    r.take(_GLOBALSTATE_UNUSED, "globalstate unused")
    runstate = raw[: size - 1].decode("ascii", errors="replace")
    return {"runstate": runstate, "has_vm_was_suspended": has_suspended,
            "vm_was_suspended": suspended}


def encode_guest(state: dict | None) -> bytes:
    body = json.dumps(state, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def _decode_guest(r: Reader) -> dict[str, object]:
    at = r.pos
    n = r.be32("guest state length")
    if n > GUEST_STATE_MAX:
        raise r.error(f"guest state of {n} bytes is implausible (at most {GUEST_STATE_MAX})",
                      at=at)
    raw = bytes(r.take(n, "guest state"))
    try:
        state = json.loads(raw)
    except ValueError:
        raise r.error("guest state is not JSON", at=at) from None
    if state is not None and not isinstance(state, dict):
        raise r.error("guest state is not a JSON object", at=at)
    return {"guest": state}


# idstr -> (version_id, decoder); a device not listed here cannot be skipped, because the
# stream does not record section lengths.
KNOWN_DEVICES = {
    "timer": (2, _decode_timer),
    "globalstate": (1, _decode_globalstate),
    GUEST_IDSTR: (GUEST_VERSION, _decode_guest),
}


def decode_device(r: Reader, idstr: str, instance_id: int, version_id: int) -> DeviceState:
    known = KNOWN_DEVICES.get(idstr)
    if known is None:
        raise r.error(f"device section {idstr!r} has no layout mfd knows (the stream does not "
                      "record section lengths, so it cannot be skipped)")
    version, decode = known
    if version_id != version:
        raise r.error(f"device {idstr!r} version {version_id}, expected {version}")
    return DeviceState(idstr, instance_id, version_id, decode(r))


def _field(name: str, kind: str, size: int) -> dict[str, object]:
    return {"name": name, "type": kind, "size": size}


def vmdesc_json(machine: str, capabilities: tuple[str, ...]) -> bytes:
    """QEMU's vmdesc for the configuration, timer and globalstate (``vmstate_save`` JSON).

    Python's default separators give QEMU's ``", "`` and ``": "`` spacing.
    """
    configuration: dict[str, object] = {
        "vmsd_name": "configuration", "version": 1,
        "fields": [_field("len", "uint32", 4), _field("name", "buffer", len(machine.encode()))],
    }
    if capabilities:
        configuration["subsections"] = [{
            "vmsd_name": "configuration/capabilities", "version": 1,
            "fields": [_field("caps_count", "uint32", 4),
                       _field("capabilities", "capability",
                              sum(1 + len(c.encode()) for c in capabilities))],
        }]
    devices = [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
         "fields": [_field("cpu_ticks_offset", "int64", 8),
                    _field("unused", "unused_buffer", 8),
                    _field("cpu_clock_offset", "int64", 8)]},
        {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1,
         "fields": [_field("size", "uint32", 4), _field("runstate", "buffer", _RUNSTATE_LEN),
                    _field("has_vm_was_suspended", "uint8", 1),
                    _field("vm_was_suspended", "uint8", 1),
                    _field("unused", "buffer", _GLOBALSTATE_UNUSED)]},
    ]
    doc = {"configuration": configuration, "page_size": C.TARGET_PAGE_SIZE, "devices": devices}
    return json.dumps(doc).encode()
