"""Consolidation and part layout on real HDF5 files: parts chunked in whole items, and the final file holding
exactly the values written whatever the order of the parts, the block size and the number of open sources."""
import os

import h5py
import numpy as np
import pytest

from featx.cache import CacheWriter, merge_caches, open_cache, parts, schema
from featx.cache import writer as cache_writer

from test_store import L, D, assert_same_file, assert_values, batch, item, write_all, writer_args


def small_blocks(monkeypatch):
    """Blocks of 4 items (chunk rows of 4 items, a block of one chunk row) and 2 open sources, so that a
    small cache spans many blocks and sources are closed and opened again."""
    monkeypatch.setattr(schema, "CHUNK_BYTES", 4 * D * 4)  # float32: chunk rows of 4 items
    monkeypatch.setattr(cache_writer, "BLOCK_BYTES", 1)  # one chunk row of items, a few positions of sequences
    monkeypatch.setattr(cache_writer, "OPEN_SOURCES", 2)


def test_part_arrays_are_chunked_in_whole_items(tmp_path, monkeypatch):
    path = str(tmp_path / "c.h5")
    w = CacheWriter(path, **writer_args(40))
    w.write(np.arange(20), *batch(range(20)))
    w.fail([30, 31], "cannot decode")
    monkeypatch.setattr(schema, "PART_CHUNK_BYTES", 3 * L * D * 4)  # 3 items of float32
    w.write(np.arange(20, 30), *batch(range(20, 30)))
    first, failed, small = parts.part_files(path)
    with h5py.File(first, "r") as f:
        assert f["pooled/mean"].chunks == f["pooled/cls"].chunks == (20, L, D)  # 256 KiB hold them all
        assert f["seq/data"].chunks == (len(f["seq/data"]), L, D)
        assert f["pooled/mean"].fletcher32 and f["seq/data"].fletcher32
    with h5py.File(small, "r") as f:
        assert f["pooled/mean"].chunks == (3, L, D) and f["seq/data"].chunks == (3, L, D)
    with h5py.File(failed, "r") as f:  # no done items: empty arrays
        assert f["pooled/mean"].shape == (0, L, D) and f["seq/data"].shape == (0, L, D)
    w.close()
    with h5py.File(path, "r") as f:  # the final file keeps the format's chunks
        assert f["pooled/mean"].chunks == (40, 1, D)
    assert_values(path, must_be_done=range(30))


@pytest.mark.parametrize("blocks", ["one", "small"])
def test_parts_in_longest_first_order_consolidate_to_exactly_the_values_written(tmp_path, monkeypatch, blocks):
    """Batches of items scattered over the manifest, each in no particular order (featx's longest-first order),
    with failures (given and non-finite) and pending items: the same file as batches in manifest order."""
    if blocks == "small":
        small_blocks(monkeypatch)
    n, rng = 60, np.random.default_rng(3)
    order = rng.permutation(n)[:52]  # 8 stay pending
    failed = order[40:46]
    ref, path = str(tmp_path / "ref.h5"), str(tmp_path / "c.h5")

    def run(target, batches):
        with CacheWriter(target, **writer_args(n, dtype="float16")) as w:
            for b in batches:
                pooled, seq = batch(b)
                bad = np.isin(b, order[46:52])  # values that overflow float16: recorded as failed
                pooled["mean"][bad, 1, 2] = 1e6
                w.write(b, pooled, seq)
            w.fail(failed, "cannot decode")

    done = order[~np.isin(order, failed)]  # scattered
    run(ref, [np.sort(done)])
    run(path, [done[lo:lo + 7] for lo in range(0, len(done), 7)])
    assert_same_file(path, ref)
    with open_cache(path) as c:
        assert c.done.sum() == 40 and (c.error[failed] == "cannot decode").all()
        assert c.error[order[46]] == "non-finite value after cast to float16 (layer 1, pooling mean)"
        np.testing.assert_array_equal(c.pooled("mean", only_done=False)[~c.done], 0)
        cls = c.pooled("cls", only_done=False)
        for i in np.flatnonzero(c.done):
            np.testing.assert_array_equal(cls[i], -item(i).astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(c.sequence(i), batch([i])[1][0].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("blocks", ["one", "small"])
def test_a_final_file_whose_items_later_parts_hold_again_consolidates_exactly(tmp_path, monkeypatch, blocks):
    """A final file plus parts holding some of its items again (a run killed while deleting its parts): each
    block reads the final file's remaining items, not contiguous, and the parts' ones."""
    if blocks == "small":
        small_blocks(monkeypatch)
    n, ref, path = 50, str(tmp_path / "ref.h5"), str(tmp_path / "c.h5")
    write_all(ref, n)
    write_all(path, n, order=np.arange(0, 45))  # items 45..49 pending
    again = np.random.default_rng(5).permutation(np.arange(1, 50, 3))
    with CacheWriter(path, **writer_args(n)) as w:
        for lo in range(0, len(again), 5):
            w.write(again[lo:lo + 5], *batch(again[lo:lo + 5]))
        rest = np.setdiff1d(w.todo, again)
        w.write(rest, *batch(rest))
    assert_same_file(path, ref)


def test_merged_shards_of_interleaved_items_in_small_blocks(tmp_path, monkeypatch):
    small_blocks(monkeypatch)
    full, a, b, c, out = (str(tmp_path / f"{x}.h5") for x in ("full", "a", "b", "c", "out"))
    write_all(full, 30)
    for shard, k in ((a, 0), (b, 1), (c, 2)):
        write_all(shard, 30, order=np.arange(k, 30, 3))
    assert merge_caches([a, b, c], out)["done"] == 30
    assert_same_file(out, full)


def test_sequences_longer_than_a_block_and_empty_ones(tmp_path, monkeypatch):
    """A block of sequences holds one item at least: an item longer than the block's positions is copied whole;
    items of no positions copy nothing."""
    monkeypatch.setattr(cache_writer, "BLOCK_BYTES", 2 * L * D * 4)  # 2 positions of float32
    path, n = str(tmp_path / "c.h5"), 24
    order = np.random.default_rng(9).permutation(n)
    with CacheWriter(path, **writer_args(n)) as w:
        for lo in range(0, n, 5):
            w.write(order[lo:lo + 5], *batch(order[lo:lo + 5]))  # item i has i % 4 positions
    assert_values(path, must_be_done=range(n))
    with open_cache(path) as c:
        for i in range(n):
            np.testing.assert_array_equal(c.sequence(i), batch([i])[1][0])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_non_finite_rows_are_found_on_the_bits(monkeypatch, dtype):
    monkeypatch.setattr(cache_writer, "CHECK_BYTES", 100)  # a few rows at a time, with a short last step
    rng = np.random.default_rng(2)
    info = np.finfo(dtype)
    a = rng.standard_normal((37, 3, 5)).astype(dtype)
    a[3, 0, 0], a[4, 2, 4], a[9, 1, 1], a[20, 0, 3] = np.inf, -np.inf, np.nan, -np.nan
    a[5, 1, 2], a[6, 0, 0], a[7, 2, 2] = info.max, -info.max, info.tiny / 2  # finite: largest and subnormal
    a[8, 0, 0], a[36, 2, 4] = -0.0, np.inf
    want = ~np.isfinite(a).reshape(len(a), -1).all(axis=1)
    np.testing.assert_array_equal(cache_writer._non_finite_rows(a), want)
    np.testing.assert_array_equal(cache_writer._non_finite_rows(a[::2]), want[::2])  # not contiguous
    assert cache_writer._non_finite_rows(a[:0]).shape == (0,)
    assert cache_writer._non_finite_rows(a[:, :0]).tolist() == [False] * len(a)  # rows of no values


def test_a_sequence_not_finite_fails_its_item_only(tmp_path):
    """The sequences of a batch are cast in one call: a value that overflows float16 in one item's sequence fails
    that item alone, and the others (of 0 to 3 positions) keep exactly theirs."""
    path, items = str(tmp_path / "c.h5"), [5, 0, 7, 3, 4, 2, 6, 1]
    pooled, seq = batch(items)
    seq[3][2, 1, 4] = 1e6  # item 3, its last position
    seq[6] = seq[6].astype(np.float16)  # a sequence already in the storage dtype
    with CacheWriter(path, **writer_args(10, dtype="float16")) as w:
        np.testing.assert_array_equal(w.write(items, pooled, seq), [3])
    with open_cache(path) as c:
        assert c.done.tolist() == [True] * 3 + [False] + [True] * 4 + [False] * 2
        assert c.error[3] == "non-finite value after cast to float16 (layer 1, sequence)"
        for i in (0, 1, 2, 4, 5, 6, 7):
            np.testing.assert_array_equal(c.sequence(i), batch([i])[1][0].astype(np.float16).astype(np.float32))
        assert c.sequence(3).shape == (0, L, D)


def test_parts_of_h5pys_chunk_shapes_consolidate_alike(tmp_path, monkeypatch):
    """Parts written before parts were chunked in whole items (h5py's chunk shapes), resumed and consolidated by
    this writer: the same file as one written now."""
    n, ref, path = 30, str(tmp_path / "ref.h5"), str(tmp_path / "c.h5")
    write_all(ref, n)
    order = np.random.default_rng(4).permutation(n)
    with monkeypatch.context() as m:
        # chunks across items, layers and features, as h5py guesses them for large arrays ((128, 2, 128) for
        # 2048 x 25 x 1024), as featx wrote parts before
        m.setattr(schema, "part_chunks", lambda rows, *a: (min(rows, 4), 1, D // 2) if rows else None)
        w = CacheWriter(path, **writer_args(n))
        for lo in range(0, 18, 6):
            w.write(order[lo:lo + 6], *batch(order[lo:lo + 6]))
        w._lock.close()  # a writer that stopped before close(): its parts stay
    with h5py.File(parts.part_files(path)[0], "r") as f:
        assert f["pooled/mean"].chunks == (4, 1, D // 2) and f["seq/data"].chunks == (4, 1, D // 2)
    w = CacheWriter(path, **writer_args(n))
    np.testing.assert_array_equal(w.todo, np.sort(order[18:]))
    w.write(order[18:], *batch(order[18:]))
    w.close()
    assert_same_file(path, ref)


def test_the_new_file_is_written_to_the_disk_while_it_is_built(tmp_path, monkeypatch):
    """Each block of consolidation starts a sync of the .tmp in the background (so that the fsync before the
    rename has little left): syncs of the .tmp's descriptor while it is unnamed, the final file still absent."""
    small_blocks(monkeypatch)
    path = str(tmp_path / "c.h5")
    seen = []
    sync = cache_writer._datasync

    def spy(fd):
        seen.append((os.path.samestat(os.fstat(fd), os.stat(path + ".tmp")), os.path.exists(path)))
        sync(fd)

    monkeypatch.setattr(cache_writer, "_datasync", spy)
    write_all(path, 30)
    assert seen and set(seen) == {(True, False)}, seen
    with h5py.File(path, "r") as f:  # h5py reads it with its own checksum check
        assert f["pooled/mean"].fletcher32 and f["pooled/mean"][()].shape == (30, L, D)
    assert_values(path, must_be_done=range(30))
