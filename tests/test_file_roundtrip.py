"""Parallel save and restore of mapped-ram files, against QEMU 10's own files."""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from pathlib import Path

import blake3
import numpy as np
import orjson
import pytest
from helpers import run_mfd

import mfd
from mfd.options import MigrationParameters, RestoreOptions, SaveOptions
from mfd.protocol import migration_file
from mfd.ramimage import generate

CASES = [
    ("case1_mapped-ram.mig", "ram_16M_seed1.bin"),
    ("case2_mapped-ram_multifd4.mig", "ram_16M_seed1.bin"),
    ("case3_stream.mig", "ram_16M_seed1.bin"),
    ("case4_mapped-ram_multifd2_16M8K.mig", "ram_16M8K_seed1.bin"),
]


@pytest.mark.parametrize("case,image", CASES)
@pytest.mark.parametrize("channels", [1, 3])
def test_restore_reference_byte_exact(reference, tmp_path, case, image, channels):
    out = tmp_path / "out.bin"
    res = mfd.restore(str(reference[case]), images={"mem": str(out)},
                      options=RestoreOptions(multifd_channels=channels))
    assert out.read_bytes() == reference[image].read_bytes()
    assert not res.verified  # QEMU's files carry no mfd trailer
    assert os.listdir(tmp_path) == ["out.bin"]


def test_save_is_byte_identical_to_qemu(reference, tmp_path):
    """Same image, same settings: mfd's file equals QEMU 10's up to the end of its stream
    (the vmdesc); mfd's trailer follows."""
    qemu = reference["case1_mapped-ram.mig"].read_bytes()
    for channels in (1, 4):
        out = tmp_path / f"mfd{channels}.mig"
        mfd.save(str(out), images={"mem": str(reference["ram_16M_seed1.bin"])},
                 params=MigrationParameters(multifd_channels=channels))
        ours = out.read_bytes()
        assert ours[: len(qemu)] == qemu
        info = mfd.inspect(str(out))
        assert info["stream_end"] == len(qemu) and info["mfd_trailer"]["blocks"]["mem"][
            "normal_pages"] == 2080


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    a, b = d / "a.bin", d / "b.bin"
    generate(str(a), 24 << 20, seed=5)
    generate(str(b), (3 << 20) + 4096 * 5, seed=6, zero=0.2)
    return {"pc.ram": str(a), "/rom@etc/acpi/tables": str(b)}


@pytest.mark.parametrize("save_ch,load_ch", [(1, 4), (4, 1), (2, 2)])
def test_multi_block_round_trip(tmp_path, images, save_ch, load_ch):
    mig = tmp_path / "vm.mig"
    res = mfd.save(str(mig), images=images, options=SaveOptions(machine="pc-q35-10.0"),
                   params=MigrationParameters(multifd_channels=save_ch))
    assert res.status == "completed" and res.zero_pages > 0
    outs = {name: str(tmp_path / f"out{i}.bin") for i, name in enumerate(images)}
    r = mfd.restore(str(mig), images=outs, options=RestoreOptions(multifd_channels=load_ch))
    assert r.verified
    for name, path in images.items():
        assert Path(outs[name]).read_bytes() == Path(path).read_bytes()
    info = mfd.inspect(str(mig))
    blocks = info["ram_blocks"]
    assert [b["idstr"] for b in blocks] == list(images)
    # the second block's entry starts where the first block's pages end
    assert blocks[1]["entry_offset"] == blocks[0]["stream_continues_at"]
    assert info["configuration"]["machine"] == "pc-q35-10.0"


@pytest.mark.parametrize("mode", ["multifd", "legacy", "none"])
def test_zero_page_detection_and_file_bmap(tmp_path, images, mode):
    """QEMU's file_bmap semantics: a zero page has its bit clear and nothing written;
    with detection off every page is written and set."""
    mig = tmp_path / "z.mig"
    img = images["pc.ram"]
    mfd.save(str(mig), images={"mem": img},
             params=MigrationParameters(zero_page_detection=mode))
    with open(mig, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    mf = migration_file.parse(m)
    bits = migration_file.read_bitmap(m, mf.blocks[0])
    ram = np.fromfile(img, dtype=np.uint64).reshape(-1, 512)
    nonzero = ram.any(axis=1)
    if mode == "none":
        assert bits.all()
    else:
        assert (bits == nonzero).all()
    # a zero page's slot is a hole: nothing was written there
    hdr = mf.blocks[0].mapped_ram
    zero_page = int(np.flatnonzero(~nonzero)[0])
    slot = hdr.pages_offset + zero_page * 4096
    if mode != "none":
        assert os.lseek(os.open(mig, os.O_RDONLY), slot, os.SEEK_DATA) > slot
    m.close()
    out = tmp_path / "out.bin"
    mfd.restore(str(mig), images={"mem": str(out)})
    assert out.read_bytes() == Path(img).read_bytes()


@pytest.mark.parametrize("mode", ["multifd", "legacy"])
def test_trailer_chunk_digests(tmp_path, images, mode):
    """The trailer's chunk digests, whether the writing channels hashed whole packets as they
    went (multifd) or the channels hashed everything at completion (legacy: the main process
    drops zero pages, so no job is a whole chunk), equal blake3 over each 128-page chunk's
    set pages, computed here from the image and the file's bitmap."""
    mig = tmp_path / "d.mig"
    img = images["/rom@etc/acpi/tables"]  # 773 pages: the last chunk is partial
    mfd.save(str(mig), images={"mem": img},
             params=MigrationParameters(zero_page_detection=mode, multifd_channels=3))
    with open(mig, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    mf = migration_file.parse(m)
    bits = migration_file.read_bitmap(m, mf.blocks[0])
    m.close()
    ram = Path(img).read_bytes()
    want = b""
    for c in range(0, len(bits), 128):
        h = blake3.blake3()
        for p in np.flatnonzero(bits[c : c + 128]) + c:
            h.update(ram[p * 4096 : (p + 1) * 4096])
        want += h.digest()
    assert mf.trailer is not None and mf.trailer.blocks["mem"].chunks == want


def test_offset_keeps_the_header_in_front(tmp_path, images):
    """``file:PATH,offset=N`` as libvirt uses it: bytes before N are kept (a header mfd
    does not know here: libvirt's own is found without --offset, tests/test_libvirt.py)."""
    mig = tmp_path / "app.save"
    header = b"MyAppHeader" + bytes(4096 - 11)
    mig.write_bytes(header + b"stale bytes that the save truncates")
    mfd.save(str(mig), images={"mem": images["pc.ram"]}, options=SaveOptions(offset=4096))
    assert mig.read_bytes()[:4096] == header
    assert mig.read_bytes()[4096:4100] == b"QEVM"
    out = tmp_path / "out.bin"
    mfd.restore(str(mig), images={"mem": str(out)}, options=RestoreOptions(offset=4096))
    assert out.read_bytes() == Path(images["pc.ram"]).read_bytes()
    assert run_mfd("inspect", str(mig), "--offset", "0x1000", "--json").returncode == 0
    bad = run_mfd("inspect", str(mig))
    assert bad.returncode == 1 and "not a QEMU migration stream" in bad.stderr


def test_cli_save_inspect_restore(tmp_path, images):
    mig = tmp_path / "cli.mig"
    r = run_mfd("save", str(mig), "--image", f"mem={images['pc.ram']}", "--multifd-channels",
                "3", "--json")
    assert r.returncode == 0, r.stderr
    q = orjson.loads(r.stdout)
    assert q["status"] == "completed" and q["ram"]["normal"] + q["ram"]["duplicate"] == 6144
    r = run_mfd("inspect", str(mig))
    assert r.returncode == 0 and "MappedRamHeader" in r.stdout and "mfd trailer" in r.stdout
    out = tmp_path / "o.bin"
    r = run_mfd("restore", str(mig), "--image", f"mem={out}", "--multifd-channels", "2")
    assert r.returncode == 0 and "digests verified" in r.stdout, r.stderr
    assert out.read_bytes() == Path(images["pc.ram"]).read_bytes()


def test_restore_does_not_touch_an_existing_image_on_failure(tmp_path, images):
    mig = tmp_path / "x.mig"
    mfd.save(str(mig), images={"mem": images["pc.ram"]})
    out = tmp_path / "precious.bin"
    out.write_bytes(b"keep me")
    r = run_mfd("restore", str(mig), "--image", f"other={out}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "no destination for RAM block(s) 'mem'" in r.stderr
    assert out.read_bytes() == b"keep me" and sorted(os.listdir(tmp_path)) == ["precious.bin",
                                                                               "x.mig"]


@pytest.mark.parametrize("args,message", [
    (["save", "x.mig"], "one of the arguments --image --guest is required"),
    (["save", "x.mig", "--image", "mem"], "expected NAME=VALUE"),
    (["save", "x.mig", "--image", "mem=/nonexistent"], "No such file"),
    (["restore", "/nonexistent.mig", "--image", "mem=o"], "No such file"),
    (["save", "x.mig", "--image", "mem=i", "--multifd-channels", "0"], "between 1 and 255"),
    (["guest", "--name", "nobody-here", "--stop"], "no guest named"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "i").write_bytes(bytes(8192))
    r = run_mfd(*args) if "/" in " ".join(args) else _in(tmp_path, args)
    assert r.returncode in (1, 2)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert message in r.stderr


def _in(d, args):
    cwd = os.getcwd()
    os.chdir(d)
    try:
        return run_mfd(*args)
    finally:
        os.chdir(cwd)


def test_direct_io_on_disk_and_fallback_on_tmpfs(tmp_path, images):
    """O_DIRECT channel writes and reads on a real disk. Where tmpfs refuses O_DIRECT (before
    Linux 6.6) that is said once on stderr and mfd falls back to buffered I/O."""
    disk = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="mfd-dio-"))
    try:
        mig = disk / "dio.mig"
        r = run_mfd("save", str(mig), "--image", f"mem={images['pc.ram']}", "--direct-io",
                    "--multifd-channels", "3")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        out = tmp_path / "o.bin"
        r = run_mfd("restore", str(mig), "--image", f"mem={out}", "--direct-io")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == Path(images["pc.ram"]).read_bytes()
    finally:
        shutil.rmtree(disk)
    shm_dir = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dio-"))
    try:
        probe = shm_dir / "probe"
        probe.touch()
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
            refused = False
        except OSError:
            refused = True
        r = run_mfd("save", str(shm_dir / "x.mig"), "--image", f"mem={images['pc.ram']}",
                    "--direct-io")
        assert r.returncode == 0
        if refused:
            assert "refuses O_DIRECT" in r.stderr and r.stderr.count("\n") == 1
        else:
            assert r.stderr == ""
    finally:
        shutil.rmtree(shm_dir)
