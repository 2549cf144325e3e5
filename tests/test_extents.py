"""Where a RAM file has data: the extents a send channel remembers stay right as holes fill."""

from __future__ import annotations

import os

from mfd.shm.ramblock import DataExtents, data_runs

PAGE = 4096


def test_extents_follow_writes_into_holes(tmp_path):
    path = tmp_path / "ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 4096 * PAGE)
        for lo, hi in ((10, 20), (100, 300)):
            os.pwrite(fd, b"\1" * ((hi - lo) * PAGE), lo * PAGE)
        ext = DataExtents(fd)
        assert ext.runs(0, 64) == [(10, 20)]
        assert ext.runs(128, 256) == [(128, 256)]  # inside a known extent: no lseek
        assert ext.runs(0, 4096) == data_runs(fd, 0, 4096) == [(10, 20), (100, 300)]
        os.pwrite(fd, b"\2" * PAGE, 50 * PAGE)  # a hole gets written: asked again
        assert ext.runs(0, 128) == data_runs(fd, 0, 128) == [(10, 20), (50, 51), (100, 128)]
        assert ext.runs(300, 4096) == []
    finally:
        os.close(fd)
