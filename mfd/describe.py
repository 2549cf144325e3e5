"""``mfd inspect``: the structure of a migration file as a plain dict (and as text)."""

from __future__ import annotations

import orjson

from mfd.protocol import libvirt_save, mapped_ram, trailer
from mfd.protocol import migration_file as mfile


def describe(mf: mfile.MigrationFile, buf,
             header: libvirt_save.SaveHeader | None = None) -> dict[str, object]:
    """``buf``: the file's mapping (None for a compressed stream: never mapped-ram);
    ``header``: libvirt's save header in front of the stream."""
    cfg = mf.configuration
    assert cfg is not None
    blocks = []
    for b in mf.blocks:
        entry: dict[str, object] = {"idstr": b.idstr, "used_length": b.used_length,
                                    "entry_offset": b.entry_offset, "num_pages": b.num_pages}
        if b.mapped_ram is not None:
            hdr = b.mapped_ram
            bits = mfile.read_bitmap(buf, b)
            entry.update({
                "header_offset": b.header_offset,
                "mapped_ram_header": {"version": hdr.version, "page_size": hdr.page_size,
                                      "bitmap_offset": hdr.bitmap_offset,
                                      "pages_offset": hdr.pages_offset},
                "bitmap_size": mapped_ram.bitmap_size(b.num_pages),
                "popcount": int(bits.sum()),
                "stream_continues_at": hdr.pages_offset + b.used_length,
            })
        elif b.page_state is not None:
            entry.update({"pages_with_data": int((b.page_state == mfile.PAGE_DATA).sum()),
                          "zero_pages": int((b.page_state == mfile.PAGE_ZERO).sum()),
                          "pages_absent": int((b.page_state == mfile.PAGE_ABSENT).sum())})
        blocks.append(entry)
    out: dict[str, object] = {
        "offset": mf.start,
        "file_size": mf.file_size,
        "libvirt": None if header is None else _libvirt(header),
        "compression": mf.compression,
        "magic": "QEVM",
        "version": mf.version,
        "configuration": {"machine": cfg.machine, "capabilities": list(cfg.capabilities),
                          "target_page_bits": cfg.target_page_bits},
        "format": "mapped-ram" if mf.mapped_ram else "stream",
        "mem_size": mf.mem_size,
        "ram_blocks": blocks,
        "sections": [{"type": s.type_name, "section_id": s.section_id, "idstr": s.idstr,
                      "offset": s.offset} for s in mf.sections],
        "commands": [{"offset": off, "command": c.name} for off, c in mf.commands],
        "ram_records": mf.record_counts,
        "devices": [{"idstr": d.idstr, "instance_id": d.instance_id, "version_id": d.version_id,
                     **d.fields} for d in mf.devices],
        "skipped_devices": [{"idstr": n, "offset": o, "length": n_} for n, o, n_ in
                            mf.skipped_devices],
        "eof_offset": mf.eof_offset,
        "vmdesc": None if mf.vmdesc is None else _vmdesc(mf),
        "stream_end": mf.stream_end,
        "trailing_bytes": mf.trailing_bytes,
        "mfd_trailer": None,
    }
    if mf.trailer is not None:
        t = mf.trailer
        out["mfd_trailer"] = {"tool": t.tool, "stream_end": t.stream_end, "guest": t.guest,
                              "blocks": {k: {"blake3": v.blake3,
                                             "chunks": len(v.chunks) // trailer.DIGEST_SIZE,
                                             "chunk_pages": trailer.CHUNK_PAGES,
                                             "normal_pages": v.normal_pages,
                                             "zero_pages": v.zero_pages}
                                         for k, v in t.blocks.items()}}
    return out


def _libvirt(h: libvirt_save.SaveHeader) -> dict[str, object]:
    return {"offset": h.start, "magic": libvirt_save.MAGIC.decode(), "version": h.version,
            "data_len": h.data_len, "was_running": h.was_running, "image_format": h.format,
            "cookie_offset": h.cookie_offset, "byte_swapped": h.byte_swapped,
            "xml_length": len(h.xml), "cookie_length": len(h.cookie), "domain": h.domain(),
            "stream_offset": h.stream_offset}


def _vmdesc(mf: mfile.MigrationFile) -> dict[str, object]:
    """QEMU reads the vmdesc and throws it away; a broken one is shown, not fatal."""
    assert mf.vmdesc is not None
    out: dict[str, object] = {"offset": mf.vmdesc_offset, "length": len(mf.vmdesc)}
    try:
        doc = orjson.loads(mf.vmdesc)
        devices = doc.get("devices", []) if isinstance(doc, dict) else None
        out["json"] = doc
        out["devices"] = [d.get("name") for d in devices if isinstance(d, dict)] \
            if isinstance(devices, list) else []
    except orjson.JSONDecodeError as e:
        out["json"] = None
        out["devices"] = []
        out["error"] = f"not valid JSON: {e}"
    return out


def as_text(d: dict) -> str:
    """A human-readable summary, offsets in hex like QEMU's analyze-migration."""
    cfg = d["configuration"]
    lines = []
    if lv := d["libvirt"]:
        dom = lv["domain"]
        mem = dom.get("memory")
        lines += [f"libvirt save image ({lv['magic']} version {lv['version']}"
                  f"{', other byte order' if lv['byte_swapped'] else ''}) @{lv['offset']:#x}: "
                  f"image format {lv['image_format']}, was_running {int(lv['was_running'])}, "
                  f"data_len {lv['data_len']:#x}",
                  f"  domain {dom['name']!r}, memory "
                  f"{'?' if mem is None else f'{mem} ({mem / 2**20:.1f} MiB)'}, vcpus "
                  f"{dom['vcpus']}, machine {dom['machine']}" if "error" not in dom else
                  f"  {dom['error']}",
                  f"  XML {lv['xml_length']} bytes, cookie {lv['cookie_length']} bytes; QEMU "
                  f"stream at {lv['stream_offset']:#x}"]
    where = f"{d['compression']}-compressed stream" if d["compression"] else "stream"
    lines += [
        f"file size {d['file_size']} ({d['file_size']:#x}), {where} at offset {d['offset']:#x}"
        + (" (offsets below are the decompressed stream's)" if d["compression"] else ""),
        f"QEVM version {d['version']}, machine {cfg['machine']!r}, capabilities "
        f"{cfg['capabilities'] or 'none'}, format {d['format']}",
        f"RAM: MEM_SIZE {d['mem_size']:#x} ({d['mem_size'] / 2**20:.1f} MiB), "
        f"{len(d['ram_blocks'])} block(s)",
    ]
    for b in d["ram_blocks"]:
        lines.append(f"  block {b['idstr']!r} used_length {b['used_length']:#x} "
                     f"({b['num_pages']} pages) entry @{b['entry_offset']:#x}")
        if "mapped_ram_header" in b:
            h = b["mapped_ram_header"]
            lines.append(f"    MappedRamHeader @{b['header_offset']:#x}: version {h['version']} "
                         f"page_size {h['page_size']} bitmap_offset {h['bitmap_offset']:#x} "
                         f"pages_offset {h['pages_offset']:#x}")
            pct = 100.0 * b["popcount"] / b["num_pages"]
            lines.append(f"    bitmap {b['bitmap_size']} bytes, popcount {b['popcount']} "
                         f"({pct:.1f}%), stream continues at {b['stream_continues_at']:#x}")
        else:
            lines.append(f"    pages with data {b['pages_with_data']}, zero {b['zero_pages']}, "
                         f"absent {b['pages_absent']}")
    lines.append("sections:")
    for s in d["sections"]:
        name = f" {s['idstr']!r}" if s["idstr"] else ""
        lines.append(f"  @{s['offset']:#x} {s['type']} id {s['section_id']}{name}")
    for c in d["commands"]:
        lines.append(f"  @{c['offset']:#x} COMMAND {c['command']}")
    lines.append(f"RAM records: {d['ram_records']}")
    for dev in d["devices"]:
        fields = {k: v for k, v in dev.items() if k not in ("idstr", "instance_id",
                                                             "version_id")}
        lines.append(f"device {dev['idstr']!r} v{dev['version_id']}: {fields}")
    for dev in d["skipped_devices"]:
        lines.append(f"device {dev['idstr']!r}: layout unknown, {dev['length']} bytes skipped")
    lines.append(f"EOF @{d['eof_offset']:#x}")
    if d["vmdesc"]:
        v = d["vmdesc"]
        what = f"devices {v['devices']}" if "error" not in v else v["error"]
        lines.append(f"vmdesc @{v['offset']:#x}: {v['length']} bytes JSON, {what}")
    lines.append(f"QEMU stream ends at {d['stream_end']:#x}")
    t = d["mfd_trailer"]
    if t:
        lines.append(f"mfd trailer ({t['tool']}):")
        for name, bd in t["blocks"].items():
            lines.append(f"  {name!r}: blake3 {bd['blake3'][:16]}... ({bd['chunks']} chunk "
                         f"digests) normal {bd['normal_pages']} zero {bd['zero_pages']}")
        if t["guest"]:
            lines.append(f"  guest state: {t['guest']}")
    elif d["trailing_bytes"]:
        lines.append(f"{d['trailing_bytes']} bytes after the stream (not an mfd trailer)")
    else:
        lines.append("no mfd trailer (written by QEMU, or not by mfd)")
    return "\n".join(lines)


