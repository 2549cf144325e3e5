"""The savevm stream's framing: file header, configuration, sections, footers, commands, EOF.

Mirrors ``migration/savevm.c`` (``qemu_savevm_state_header``, ``vmstate_configuration``,
``save_section_header``/``save_section_footer``, ``qemu_savevm_command_send``) byte for byte.
All integers are big-endian; strings are u8 length + bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mfd.protocol import constants as C
from mfd.protocol.codec import Reader, Writer

CAPS_SUBSECTION = "configuration/capabilities"
PAGE_BITS_SUBSECTION = "configuration/target-page-bits"
UUID_SUBSECTION = "configuration/uuid"


@dataclass(frozen=True)
class Configuration:
    """QEMU_VM_CONFIGURATION: the machine type and the validated capabilities."""

    machine: str
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: bytes | None = None


@dataclass(frozen=True)
class SectionHeader:
    """A section's header: START/FULL carry idstr, instance and version; PART/END only the id."""

    type: int
    section_id: int
    idstr: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    offset: int = 0  # absolute offset of the type byte

    @property
    def type_name(self) -> str:
        return C.SECTION_NAMES[self.type]


@dataclass(frozen=True)
class Command:
    """QEMU_VM_COMMAND: be16 cmd, be16 len, payload."""

    cmd: int
    payload: bytes = b""

    @property
    def name(self) -> str:
        return C.MIG_CMD_NAMES.get(self.cmd, f"unknown({self.cmd})")


# ---------------------------------------------------------------------------- encoders


def encode_file_header() -> bytes:
    return Writer().be32(C.QEMU_VM_FILE_MAGIC).be32(C.QEMU_VM_FILE_VERSION).getvalue()


def encode_configuration(cfg: Configuration) -> bytes:
    machine = cfg.machine.encode()
    w = Writer().u8(C.QEMU_VM_CONFIGURATION).be32(len(machine)).raw(machine)
    if cfg.target_page_bits is not None:
        _subsection(w, PAGE_BITS_SUBSECTION).be32(cfg.target_page_bits)
    if cfg.capabilities:
        _subsection(w, CAPS_SUBSECTION).be32(len(cfg.capabilities))
        for cap in cfg.capabilities:
            w.counted_str(cap)
    if cfg.uuid is not None:
        _subsection(w, UUID_SUBSECTION).raw(cfg.uuid)
    return w.getvalue()


def _subsection(w: Writer, name: str) -> Writer:
    return w.u8(C.QEMU_VM_SUBSECTION).counted_str(name).be32(1)


def encode_section_start(section_type: int, section_id: int, idstr: str, instance_id: int,
                         version_id: int) -> bytes:
    """START or FULL header (save_section_header)."""
    assert section_type in (C.QEMU_VM_SECTION_START, C.QEMU_VM_SECTION_FULL)
    return (Writer().u8(section_type).be32(section_id).counted_str(idstr).be32(instance_id)
            .be32(version_id).getvalue())


def encode_section_part(section_type: int, section_id: int) -> bytes:
    """PART or END header."""
    assert section_type in (C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END)
    return Writer().u8(section_type).be32(section_id).getvalue()


def encode_footer(section_id: int) -> bytes:
    return Writer().u8(C.QEMU_VM_SECTION_FOOTER).be32(section_id).getvalue()


def encode_command(cmd: Command) -> bytes:
    return (Writer().u8(C.QEMU_VM_COMMAND).be16(cmd.cmd).be16(len(cmd.payload))
            .raw(cmd.payload).getvalue())


def encode_eof() -> bytes:
    return bytes([C.QEMU_VM_EOF])


def encode_vmdesc(json_bytes: bytes) -> bytes:
    return Writer().u8(C.QEMU_VM_VMDESCRIPTION).be32(len(json_bytes)).raw(json_bytes).getvalue()


# ---------------------------------------------------------------------------- decoders


def decode_file_header(r: Reader) -> int:
    """Magic and version; returns the version (3)."""
    at = r.pos
    magic = r.be32("file magic")
    if magic != C.QEMU_VM_FILE_MAGIC:
        raise r.error(f"not a QEMU migration stream: magic {magic:#010x}, expected "
                      f"{C.QEMU_VM_FILE_MAGIC:#010x} ('QEVM')", at=at)
    at = r.pos
    version = r.be32("file version")
    if version == C.QEMU_VM_FILE_VERSION_COMPAT:
        raise r.error("file version 2 is obsolete (QEMU refuses it too), expected 3", at=at)
    r.expect(version, C.QEMU_VM_FILE_VERSION, "file version", at)
    return version


def decode_configuration(r: Reader) -> Configuration:
    at = r.pos
    r.expect(r.u8("configuration section"), C.QEMU_VM_CONFIGURATION,
             "section type (configuration expected)", at)
    n = r.be32("machine name length")
    if n > 256:
        raise r.error(f"machine name length {n} is implausible (at most 256)", at=r.pos - 4)
    raw = bytes(r.take(n, "machine name"))
    try:
        machine = raw.decode("ascii")
    except UnicodeDecodeError:
        raise r.error(f"machine name is not text: {raw[:32]!r}", at=r.pos - n) from None
    caps: tuple[str, ...] = ()
    page_bits = None
    uuid = None
    while r.remaining and r.peek_u8("next section") == C.QEMU_VM_SUBSECTION:
        at = r.pos
        r.u8("subsection")
        name = r.counted_str("subsection name")
        version = r.be32("subsection version")
        if version != 1:
            raise r.error(f"subsection {name!r} version {version}, expected 1", at=at)
        if name == CAPS_SUBSECTION:
            caps = _decode_capabilities(r)
        elif name == PAGE_BITS_SUBSECTION:
            page_bits = r.be32("target_page_bits")
        elif name == UUID_SUBSECTION:
            uuid = bytes(r.take(16, "uuid"))
        else:
            raise r.error(f"unknown configuration subsection {name!r}", at=at)
    return Configuration(machine, caps, page_bits, uuid)


def _decode_capabilities(r: Reader) -> tuple[str, ...]:
    at = r.pos
    count = r.be32("caps_count")
    if count > len(C.VALIDATED_CAPABILITIES):
        raise r.error(f"caps_count {count}, at most {len(C.VALIDATED_CAPABILITIES)} capabilities "
                      "are validated", at=at)
    caps = []
    for _ in range(count):
        at = r.pos
        cap = r.counted_str("capability")
        if cap not in C.VALIDATED_CAPABILITIES:
            raise r.error(f"unknown capability {cap!r} (known: "
                          f"{', '.join(C.VALIDATED_CAPABILITIES)})", at=at)
        caps.append(cap)
    return tuple(caps)


def decode_section_header(r: Reader) -> SectionHeader:
    """After the caller peeked a section type byte (START/PART/END/FULL)."""
    at = r.pos
    kind = r.u8("section type")
    section_id = r.be32("section_id")
    if kind in (C.QEMU_VM_SECTION_START, C.QEMU_VM_SECTION_FULL):
        idstr = r.counted_str("section idstr")
        instance_id = r.be32("instance_id")
        version_id = r.be32("version_id")
        return SectionHeader(kind, section_id, idstr, instance_id, version_id, r.base + at)
    if kind in (C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END):
        return SectionHeader(kind, section_id, offset=r.base + at)
    raise r.error(f"section type {kind:#04x} is not START/PART/END/FULL", at=at)


def decode_named_section(r: Reader, names: dict[int, str]) -> tuple[SectionHeader, str]:
    """The next section header and the idstr it belongs to: START/FULL register their id in
    ``names``, PART/END must name a started one (``qemu_loadvm_state_main``)."""
    at = r.pos
    kind = r.peek_u8("next section type")
    if kind not in C.SECTION_NAMES:
        raise r.error(f"unexpected byte {kind:#04x} where a section, command or EOF was "
                      "expected", at=at)
    hdr = decode_section_header(r)
    if hdr.type in (C.QEMU_VM_SECTION_START, C.QEMU_VM_SECTION_FULL):
        if hdr.section_id in names:
            raise r.error(f"section id {hdr.section_id} used twice", at=at)
        names[hdr.section_id] = hdr.idstr or ""
    name = names.get(hdr.section_id)
    if name is None:
        raise r.error(f"{hdr.type_name} for section id {hdr.section_id} that was never "
                      "started", at=at)
    return hdr, name


def check_ram_section(r: Reader, hdr: SectionHeader, at: int, started: bool,
                      complete: bool) -> None:
    """A RAM section header in its place: one START (instance 0, version 4), never FULL,
    nothing after END."""
    if hdr.type == C.QEMU_VM_SECTION_START:
        if started:
            raise r.error("second RAM section START", at=at)
        if hdr.version_id != C.RAM_SECTION_VERSION or hdr.instance_id != 0:
            raise r.error(f"RAM section instance {hdr.instance_id} version {hdr.version_id}, "
                          f"expected instance 0 version {C.RAM_SECTION_VERSION}", at=at)
    elif hdr.type == C.QEMU_VM_SECTION_FULL:
        raise r.error("RAM saved as a FULL section", at=at)
    elif complete:
        raise r.error(f"RAM {hdr.type_name} after the RAM section's END", at=at)


def decode_footer(r: Reader, section_id: int, idstr: str) -> None:
    at = r.pos
    kind = r.u8(f"footer of section {idstr!r}")
    if kind != C.QEMU_VM_SECTION_FOOTER:
        raise r.error(f"missing section footer for {idstr!r}: byte {kind:#04x}, expected 0x7e",
                      at=at)
    got = r.be32("footer section_id")
    if got != section_id:
        raise r.error(f"footer of {idstr!r} names section {got}, expected {section_id}", at=at)


def decode_command(r: Reader) -> Command:
    at = r.pos
    r.expect(r.u8("command"), C.QEMU_VM_COMMAND, "command byte", at)
    cmd = r.be16("command id")
    if cmd not in C.MIG_CMD_NAMES or cmd == 0:
        raise r.error(f"unknown command {cmd}", at=at)
    n = r.be16("command length")
    return Command(cmd, bytes(r.take(n, f"command {C.MIG_CMD_NAMES[cmd]} payload")))


def decode_vmdesc(r: Reader) -> bytes:
    at = r.pos
    r.expect(r.u8("vmdesc"), C.QEMU_VM_VMDESCRIPTION, "vmdesc byte", at)
    n = r.be32("vmdesc length")
    return bytes(r.take(n, "vmdesc JSON"))
