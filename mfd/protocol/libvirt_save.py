"""libvirt's save image header: what ``virsh save`` writes in front of QEMU's stream.

Pure: decodes bytes already read. Mirrors libvirt's ``src/qemu/qemu_saveimage.{h,c}``
(``virQEMUSaveHeader``, ``virQEMUSaveDataWrite``, ``qemuSaveImageReadHeader``)::

    0    magic[16]       "LibvirtQemudSave"; "LibvirtQemudPart" while the save runs (libvirt
                         writes the final magic last: a Part image never completed)
    16   u32 version     2 (1: images of libvirt < 0.7.6), in the saving host's byte order:
                         a version > 2 is read byte-swapped, as libvirt does
    20   u32 data_len    bytes of domain XML + cookie + padding after the header (libvirt pads
                         64 KiB so the XML can be edited in place)
    24   u32 was_running 1: the domain ran when saved (restore resumes it)
    28   u32 format      QEMU_SAVE_FORMAT_*: what QEMU's stream went through (FORMATS)
    32   u32 cookieOffset where the save cookie starts in the data (0: none)
    36   u32 unused[14]
    92   domain XML, NUL-terminated; the cookie (XML, NUL-terminated); zeros
    92 + data_len        QEMU's stream: raw, compressed by the program ``format`` names, or
                         mapped-ram (``sparse``: its offsets are positions in this file)
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from mfd.errors import ProtocolError

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
VERSION = 2
HEADER_SIZE = 92
# QEMU_SAVE_FORMAT_*: on-disk numbers, never reused (libvirt's virQEMUSaveFormat)
FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
_FIELDS = struct.Struct("=5I")  # the saving host's order: native, as libvirt writes them
_SWAPPED = struct.Struct("<5I" if struct.pack("=I", 1) == struct.pack(">I", 1) else ">5I")
# the XML's memory units (libvirt's virScaleInteger): the decimal ones too
_UNITS = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20,
          "mib": 1 << 20, "mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
          "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4}


@dataclass(frozen=True)
class SaveHeader:
    """A libvirt save image's header and data, decoded; ``start``: where it is in the file."""

    start: int
    version: int
    data_len: int
    was_running: bool
    format: str
    cookie_offset: int
    xml: str
    cookie: str
    byte_swapped: bool  # written by a host of the other byte order

    @property
    def stream_offset(self) -> int:
        """Where QEMU's stream starts in the file."""
        return self.start + HEADER_SIZE + self.data_len

    @property
    def compressed(self) -> bool:
        return self.format not in ("raw", "sparse")

    def domain(self) -> dict[str, object]:
        """What the domain XML says of the guest (what ``mfd inspect`` shows); an XML mfd
        cannot read is shown as such: the RAM does not depend on it."""
        try:
            root = ET.fromstring(self.xml)
        except ET.ParseError as e:
            return {"error": f"domain XML not readable: {e}"}
        memory = root.find("memory")
        os_type = root.find("os/type")
        return {"name": root.findtext("name"), "uuid": root.findtext("uuid"),
                "memory": None if memory is None else _bytes(memory),
                "vcpus": root.findtext("vcpu"),
                "machine": None if os_type is None else os_type.get("machine"),
                "arch": None if os_type is None else os_type.get("arch")}


def is_save_image(head: bytes) -> bool:
    """The first bytes are libvirt's (complete or not)."""
    return head[: len(MAGIC)] in (MAGIC, PARTIAL_MAGIC)


def decode(buf: bytes, file_size: int, start: int = 0) -> SaveHeader:
    """The header and its data from ``buf`` (the file's bytes from ``start``: at least
    HEADER_SIZE + data_len of them, or all the file has); ``file_size`` to check data_len."""
    what = f"libvirt save image header at offset {start:#x}"
    if buf[: len(MAGIC)] == PARTIAL_MAGIC:
        raise ProtocolError(f"{what}: magic {PARTIAL_MAGIC.decode()}: the save never completed "
                            "(libvirt writes the final magic last, and refuses it too)")
    if buf[: len(MAGIC)] != MAGIC:
        raise ProtocolError(f"{what}: magic {bytes(buf[:len(MAGIC)])!r}, expected "
                            f"{MAGIC.decode()}")
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(f"{what}: truncated: {len(buf)} of its {HEADER_SIZE} bytes")
    fields = _FIELDS.unpack_from(buf, len(MAGIC))
    swapped = fields[0] > VERSION
    if swapped:
        fields = _SWAPPED.unpack_from(buf, len(MAGIC))
    version, data_len, was_running, fmt, cookie_offset = fields
    if not 1 <= version <= VERSION:
        raise ProtocolError(f"{what}: version {fields[0]}, mfd knows 1 and 2 (either byte "
                            "order)")
    if fmt >= len(FORMATS):
        raise ProtocolError(f"{what}: unknown image format {fmt} (known: " + ", ".join(
            f"{i} {name}" for i, name in enumerate(FORMATS)) + ")")
    if data_len == 0:
        raise ProtocolError(f"{what}: data_len 0: no domain XML")
    end = start + HEADER_SIZE + data_len
    if end > file_size:
        raise ProtocolError(f"{what}: data_len {data_len:#x} runs to {end:#x}, past the end "
                            f"of the file ({file_size:#x} bytes): truncated?")
    if cookie_offset >= data_len:
        raise ProtocolError(f"{what}: cookieOffset {cookie_offset:#x} is past data_len "
                            f"{data_len:#x}")
    assert len(buf) >= HEADER_SIZE + data_len, "the caller reads the data too"
    data = bytes(buf[HEADER_SIZE : HEADER_SIZE + data_len])
    xml_end = cookie_offset or data_len
    return SaveHeader(start, version, data_len, bool(was_running), FORMATS[fmt], cookie_offset,
                      _text(data[:xml_end]), _text(data[xml_end:]) if cookie_offset else "",
                      swapped)


def data_len_of(head: bytes) -> int:
    """data_len from the header's first bytes (to know how much more to read), 0 if they
    are too short: :func:`decode` then says what is wrong."""
    if len(head) < HEADER_SIZE:
        return 0
    fields = _FIELDS.unpack_from(head, len(MAGIC))
    if fields[0] > VERSION:
        fields = _SWAPPED.unpack_from(head, len(MAGIC))
    return fields[1]


def _text(data: bytes) -> str:
    """A NUL-terminated string in its padded field."""
    return data.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _bytes(element: ET.Element) -> int | None:
    """``<memory unit='KiB'>65536</memory>`` in bytes (libvirt's default unit is KiB)."""
    unit = _UNITS.get((element.get("unit") or "KiB").lower())
    try:
        return int((element.text or "").strip()) * unit if unit else None
    except ValueError:
        return None
