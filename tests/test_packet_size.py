"""The multifd packet size two mfd ends agree on (``mfd.protocol.peer``): 4 MiB packets
between mfd ends, QEMU's 512 KiB toward and from QEMU, anything else refused."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_same_ram,
    finish,
    hostile_source,
    needs_qemu,
    start_incoming,
    zero_file,
)
from netutil import Relay

import mfd
from mfd.bench.qemu import QemuMachine
from mfd.errors import ProtocolError
from mfd.options import MigrationParameters
from mfd.protocol import multifd, peer
from mfd.protocol.constants import MULTIFD_MAGIC, MULTIFD_PAGE_COUNT
from mfd.workers.tcp import free_ports

SIZE = 16 << 20


def _settings(pages: int) -> bytes:
    return peer.encode_settings(peer.ChannelSettings(1, "none", False, True, pages))


def test_settings_carry_the_packet_size_and_refuse_one_out_of_range():
    for pages in (MULTIFD_PAGE_COUNT, peer.MFD_PACKET_PAGES, peer.MAX_PACKET_PAGES):
        assert peer.decode_settings(_settings(pages)).packet_pages == pages
    for pages in (0, MULTIFD_PAGE_COUNT - 1, peer.MAX_PACKET_PAGES + 1):
        with pytest.raises(ProtocolError, match=f"multifd packets of {pages} pages, expected "
                                                f"128 to {peer.MAX_PACKET_PAGES}"):
            peer.decode_settings(_settings(pages))


def test_a_source_asking_for_packets_too_large_is_refused(tmp_path):
    init = multifd.encode_init(multifd.MultiFDInit(bytes(16), 0, _settings(8192)))

    def act(src) -> None:
        src.channel(init)
        src.start()

    hostile_source(act, "multifd packets of 8192 pages, expected 128 to 4096",
                   tmp_path=tmp_path)


def _packet_pages(sent: bytearray) -> list[int]:
    """pages_alloc of every packet on one multifd connection (MultiFDInit first)."""
    at, pages = multifd.INIT_SIZE, []
    while at < len(sent):
        magic, _, _, alloc, normal, size = struct.unpack_from(">IIIIII", sent, at)
        assert magic == MULTIFD_MAGIC
        pages.append(alloc)
        at += multifd.packet_size(alloc) + (size if normal else 0)
    assert at == len(sent)
    return pages


def _multifd_connections(relay: Relay) -> list[bytearray]:
    return [s for s in relay.sent if s[:4] == MULTIFD_MAGIC.to_bytes(4, "big")]


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "src.bin"
    image.write_bytes(np.random.default_rng(5).bytes(SIZE // 2) + bytes(SIZE // 2))
    return image


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_mfd_ends_move_ram_in_4_mib_packets(tmp_path, compression):
    image, out = _image(tmp_path), tmp_path / "dst.bin"
    port, relayed = free_ports(2), None
    inc = start_incoming(port, "--image", f"mem={out}")
    relay = Relay(port + 1, port, 1, record=True)
    try:
        mfd.migrate(f"tcp:127.0.0.1:{port + 1}", images={"mem": str(image)},
                    params=MigrationParameters(multifd_channels=2,
                                               multifd_compression=compression))
        rc, _, err = finish(inc)
        assert rc == 0, err
        relayed = _multifd_connections(relay)
    finally:
        relay.cut()
    assert len(relayed) == 2
    sizes = {p for sent in relayed for p in _packet_pages(sent)}
    assert sizes == {peer.MFD_PACKET_PAGES}, sizes
    assert_same_ram(image, out)


@needs_qemu
def test_a_qemu_destination_only_ever_gets_qemu_packets(tmp_path):
    image, out = _image(tmp_path), tmp_path / "dst.bin"
    zero_file(out, SIZE)
    port = free_ports(2)
    with QemuMachine(str(out), SIZE, incoming=True) as q:
        q.set_migration(multifd_channels=2)
        q.start_migrate_incoming(f"tcp:127.0.0.1:{port}")
        relay = Relay(port + 1, port, 1, record=True)
        try:
            mfd.migrate(f"tcp:127.0.0.1:{port + 1}", images={"mem": str(image)},
                        params=MigrationParameters(multifd_channels=2))
            assert q.wait_migration(60)["status"] == "completed"
            relayed = _multifd_connections(relay)
        finally:
            relay.cut()
    assert len(relayed) == 2
    # the MultiFDInit proposed mfd's size all the same: QEMU does not read those bytes
    init = multifd.decode_init(bytes(relayed[0][: multifd.INIT_SIZE]), where="test")
    assert peer.decode_settings(init.unused).packet_pages == peer.MFD_PACKET_PAGES
    assert {p for sent in relayed for p in _packet_pages(sent)} == {MULTIFD_PAGE_COUNT}
    assert_same_ram(image, out)
