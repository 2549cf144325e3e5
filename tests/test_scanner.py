"""Page search over bmap and the job plan of restores and digests (pure numpy, no processes)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from mfd.main_thread.scanner import JOB_PAGES, chunk_jobs, dirty_batches, new_bmap
from mfd.protocol import mapped_ram
from mfd.protocol.trailer import CHUNK_PAGES, run_chunks

# page maps of up to ~5 jobs, as runs (like the bench image's 16-page runs) or single pages
page_maps = st.lists(st.tuples(st.booleans(), st.integers(1, 3 * CHUNK_PAGES)),
                     min_size=1, max_size=60).map(
    lambda runs: np.concatenate([np.full(n, b) for b, n in runs]))


@given(page_maps, st.sampled_from([1, 7, 128]))
def test_dirty_batches_take_every_set_page_once_in_order_and_clear_bmap(bits, batch):
    words = mapped_ram.bits_to_words(bits)
    batches = list(dirty_batches(words, batch))
    assert all(1 <= len(b) <= batch for b in batches)
    pages = np.concatenate(batches) if batches else np.empty(0, np.uint32)
    assert (pages == np.flatnonzero(bits)).all()
    assert not words.any()  # cleared before the pages go out (QEMU clears, then sends)


def test_new_bmap_is_all_ones_up_to_the_last_page():
    assert (mapped_ram.words_to_bits(new_bmap(130), 192)[:130]).all()
    assert not mapped_ram.words_to_bits(new_bmap(130), 192)[130:].any()


@given(page_maps)
def test_chunk_jobs_cover_each_set_page_once_in_whole_chunks(bits):
    got = np.zeros(len(bits), dtype=bool)
    last_chunk = -1
    for job in chunk_jobs(bits):
        runs = job.reshape(-1, 2).astype(np.int64)
        assert (runs[:, 1] > runs[:, 0]).all()
        # no run crosses a chunk boundary; a chunk belongs to exactly one job, in order
        assert (runs[:, 0] // CHUNK_PAGES == (runs[:, 1] - 1) // CHUNK_PAGES).all()
        chunks = run_chunks(runs)
        assert chunks[0] > last_chunk and (np.diff(chunks) >= 0).all()
        last_chunk = chunks[-1]
        assert (runs[:, 1] - runs[:, 0]).sum() < JOB_PAGES + CHUNK_PAGES
        for start, end in runs:
            assert not got[start:end].any()
            got[start:end] = True
    assert (got == bits).all()
