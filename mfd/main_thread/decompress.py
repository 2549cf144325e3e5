"""QEMU's stream out of a compressed file, in bounded memory whatever its size.

What libvirt's ``save_image_format`` pipes QEMU's stream through (``virsh save`` with
``zstd``, ``gzip``, ``bzip2``, ``xz``, ``lzop``), or a user's ``migrate exec:"zstd > FILE"``.
The format is found by the stream's first bytes (a libvirt header's ``format`` must agree).
Each is read through a well-kept decoder that streams: ``zstandard`` (already mfd's zstd for
multifd) and the standard library's ``gzip``, ``bz2`` and ``lzma``. lzop has no maintained
Python library (python-lzo decodes LZO blocks, not lzop's container): mfd runs the ``lzop``
program, as libvirt itself does to restore such an image, and says so if it is missing.

Errors of the decoders (corrupt data, a cut file) become one :class:`ProtocolError` line
naming the format, the file and about where in it. A zstd frame cut short ends the stream
without an error (``zstandard``'s reader does not tell): the stream's own structure then
tells (it ends before QEMU_VM_EOF).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
import tempfile
import zlib
from typing import BinaryIO

import zstandard

from mfd.errors import MfdError, ProtocolError

# the first bytes of each format (its magic number)
MAGICS = {
    "zstd": b"\x28\xb5\x2f\xfd",
    "gzip": b"\x1f\x8b",
    "bzip2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "lzop": b"\x89LZO\x00\r\n\x1a\n",
}
READ_SIZE = 1 << 20  # compressed bytes read at a time
_ERRORS = (zstandard.ZstdError, OSError, EOFError, lzma.LZMAError, zlib.error)


def detect(head: bytes) -> str | None:
    """The compression format the stream starts with, if any."""
    for name, magic in MAGICS.items():
        if head.startswith(magic):
            return name
    return None


class Decompressed:
    """``readinto`` the decompressed stream of ``path`` from ``start``, compressed with
    ``fmt``; 0 at its end."""

    def __init__(self, path: str, start: int, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.file.seek(start)
        self.proc: subprocess.Popen | None = None
        self.stderr: BinaryIO | None = None
        try:
            self.reader = self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        if self.fmt == "zstd":
            return zstandard.ZstdDecompressor().stream_reader(
                self.file, read_size=READ_SIZE, read_across_frames=True, closefd=False)
        if self.fmt == "gzip":
            return gzip.GzipFile(fileobj=self.file, mode="rb")
        if self.fmt == "bzip2":
            return bz2.BZ2File(self.file)
        if self.fmt == "xz":
            return lzma.LZMAFile(self.file)
        assert self.fmt == "lzop", self.fmt
        lzop = shutil.which("lzop")
        if lzop is None:
            raise MfdError(f"{self.path}: lzop-compressed: mfd decompresses lzop with the lzop "
                           "program (as libvirt does), which is not installed (apt-get "
                           "install lzop)")
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen([lzop, "-dc", "--ignore-warn"], stdin=self.file,
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        assert self.proc.stdout is not None
        return self.proc.stdout

    def readinto(self, view: memoryview) -> int:
        try:
            n = self.reader.readinto(view)
        except _ERRORS as e:
            raise ProtocolError(f"{self.path}: the {self.fmt} stream is corrupt or cut short "
                                f"near file offset {self.file.tell():#x}: {e}") from None
        if n == 0 and self.proc is not None:
            self._lzop_done()
        return n

    def _lzop_done(self) -> None:
        assert self.proc is not None and self.stderr is not None
        if self.proc.wait() != 0:
            self.stderr.seek(0)
            said = self.stderr.read().decode(errors="replace").strip().splitlines()
            raise ProtocolError(f"{self.path}: the lzop stream is corrupt or cut short: "
                                f"{said[-1] if said else f'lzop exited {self.proc.returncode}'}")

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self.stderr is not None:
            self.stderr.close()
        self.file.close()

    def __enter__(self) -> Decompressed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

