"""Writing a cache crash-safely and resumably: `CacheWriter`, `pending_items` and the consolidation.

A writer never touches the final file. Each `write`/`fail` is one small HDF5 part in `<path>.parts/`,
written under a temporary name, fsynced and renamed, so it exists whole or not at all. `close` builds
`<path>.tmp` from the old final file plus every part, renames it over `<path>`, then deletes the parts.
Killed at any moment, the old final file and every finished part survive and the next writer resumes from
them. A damaged part, settings.json or a foreign file in the parts folder is set aside (renamed *.bad) and its
items computed again. A full disk is one FeatxError naming the folder and the space needed; no .tmp stays.
"""
from __future__ import annotations

import collections
import errno
import json
import os
import queue
import shutil
import threading
import warnings

import h5py
import numpy as np

from featx.cache import parts, schema
from featx.cache.reader import open_validated, plain
from featx.errors import FeatxError
from featx.version import __version__

try:
    import fcntl
except ImportError:  # no advisory locks on Windows: one writer per cache is then up to the user
    fcntl = None

__all__ = ["CacheWriter", "is_complete", "pending_items", "consolidate", "update_columns"]

OPEN_SOURCES = 256  # files kept open at once while consolidating (parts can number thousands), at most a
# quarter of the process's file limit: a block of items reads from every part that holds one of them; each
# open file keeps HDF5's chunk cache (1 MiB at most)
BLOCK_BYTES = 64 << 20  # about the values a block of consolidation holds (all poolings; or sequences)
CHECK_BYTES = 4 << 20  # bytes of scratch per block when looking for non-finite values
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = ("No space left", "errno = 28", "File too large", "errno = 27", "Disk quota", "errno = 122")
_datasync = getattr(os, "fdatasync", os.fsync)  # no fdatasync on macOS


# ---------------------------------------------------------------- small helpers
def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp, final, sync_dir=True):
    """Make a finished temporary file durable, then give it its final name in one atomic step.

    sync_dir=False skips making the rename itself durable: after a power cut the file is then whole or absent.
    """
    _fsync(tmp)
    os.replace(tmp, final)
    if sync_dir:
        _fsync(os.path.dirname(os.path.abspath(final)))


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _disk_full(e):
    """Whether an OSError (or HDF5's, which carries the errno only in its text) means the disk is full."""
    return getattr(e, "errno", None) in _FULL or any(t in str(e) for t in _FULL_TEXT)


def size_text(nbytes):
    """A byte count for people: "512 B", "1.5 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _full_error(folder, needed, what):
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    return FeatxError(f"no space left in {folder} {what}: it needs about {size_text(needed)} "
                      f"({size_text(free)} free); free some space and run the same command again (nothing is lost)")


def _is_missing(v):
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN, NaT, pandas NA
    except (TypeError, ValueError):
        return True  # pandas NA has no truth value


def _strings(values):
    return np.array(["" if _is_missing(v) else str(v) for v in values], dtype=object)


def _differing(old, new) -> int:
    """How many values of a stored column (labels or splits; None: none) differ from the given one's: all of
    them where one is None or one is numeric and the other text; NaN equals NaN."""
    if old is None and new is None:
        return 0
    if old is None or new is None or (old.dtype == object) != (new.dtype == object) or len(old) != len(new):
        return len(new if old is None else old)
    if old.dtype == object:
        return int((old != new).sum())
    return int((~((old == new) | (np.isnan(old) & np.isnan(new)))).sum())


def _labels_array(labels):
    """float64 when every label is a number (missing -> NaN), else str (missing -> "")."""
    values = list(labels)
    if all(_is_missing(v) or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
           for v in values):
        return np.array([np.nan if _is_missing(v) else float(v) for v in values], dtype=np.float64)
    return _strings(values)


def _one_line(reason):
    text = " ".join(str(reason).split())
    return (text[:497] + "...") if len(text) > 500 else (text or "failed (no reason given)")


def _cast(a, dtype, order=None):
    """a (B, ...) as `dtype` ('float16' | 'float32'), its rows in `order` (None: as they are; else a copy). The
    cast runs in torch, ~4x faster than numpy's float32 -> float16, and reorders as it copies."""
    import torch

    if a.dtype == np.dtype(dtype):
        return a if order is None else np.take(a, order, axis=0)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if order is None:
        return t.to(getattr(torch, dtype)).numpy()
    out = np.empty(a.shape, dtype)
    torch.cat([t[i:i + 1] for i in order.tolist()], out=torch.from_numpy(out))
    return out


def _cast_concat(arrays, dtype):
    """The arrays (T_i, ...) one after the other, as `dtype`, in one torch call that casts as it copies (a cast
    per array costs a thread hand-off each; a concatenation before the cast, another copy)."""
    import torch

    out = np.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), dtype)
    if len(out):
        torch.cat([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays], out=torch.from_numpy(out))
    return out


_EXPONENT = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def _non_finite_rows(a):
    """(B,) bool: rows of the float array a (B, ...) holding an inf or a NaN, found on the bits: a value is not
    finite when its bits without the sign are at least the exponent's (all exponent bits set). A few rows at a
    time, so that the scratch stays in the CPU's cache: several times faster than np.isfinite on float16."""
    bits, exponent = _EXPONENT[a.dtype.itemsize]
    u = np.ascontiguousarray(a).view(bits).reshape(len(a), int(np.prod(a.shape[1:])))
    out = np.zeros(len(a), bool)
    if u.size == 0:
        return out
    step = max(1, CHECK_BYTES // max(1, u[0].nbytes))
    scratch = np.empty((min(step, len(u)), u.shape[1]), bits)
    no_sign = bits(np.iinfo(bits).max >> 1)
    for lo in range(0, len(u), step):
        part = scratch[:len(u[lo:lo + step])]
        np.bitwise_and(u[lo:lo + step], no_sign, out=part)
        out[lo:lo + step] = part.max(axis=1) >= bits(exponent)
    return out


# ---------------------------------------------------------------- consolidation
class _Source:
    """One open source file: its seq offsets (None without sequences) and its datasets' low-level handles."""

    def __init__(self, path):
        self.file = h5py.File(path, "r")
        self.offsets = self.file[schema.SEQ_OFFSETS][:] if schema.SEQ in self.file else None
        self.handles = {}

    def __getitem__(self, name):
        """The h5py.h5d.DatasetID of dataset `name` (looked up once: a lookup costs more than a small read)."""
        if name not in self.handles:
            self.handles[name] = self.file[name].id
        return self.handles[name]


class _Sources:
    """Source files opened on demand, at most OPEN_SOURCES at a time; get(k) -> _Source. When full, the file
    used last is closed: every block asks for its sources in the same order, and in that cycle closing the
    least recently used file would close each one just before it is asked for again."""

    def __init__(self, paths):
        self.paths, self.open, self.most = paths, collections.OrderedDict(), _open_limit()

    def get(self, k):
        k = int(k)
        if k in self.open:
            self.open.move_to_end(k)
            return self.open[k]
        if len(self.open) >= self.most:
            self.open.popitem(last=True)[1].file.close()
        self.open[k] = _Source(self.paths[k])
        return self.open[k]

    def close(self):
        for source in self.open.values():
            source.file.close()
        self.open.clear()


def _create_layout(out, header, state):
    """Every dataset of the final file; returns ({pooling: dataset}, seq/data or None, seq offsets or None)."""
    n, L, D, dtype = len(header["ids"]), header["num_layers"], header["hidden_size"], header["dtype"]
    rows = schema.chunk_rows(D, dtype)
    out.attrs.update({**header["attrs"], "format_version": schema.FORMAT_VERSION})
    schema.create_strings(out, schema.IDS, header["ids"])
    schema.create(out, schema.DONE, data=state.done)
    schema.create_strings(out, schema.ERROR, state.error)
    if header.get("fingerprints") or state.fp.any():
        schema.create(out, schema.FINGERPRINT, data=state.fp)
    labels = header["labels"]
    if labels is not None:
        if labels.dtype == object:
            schema.create_strings(out, schema.LABEL, labels)
        else:
            schema.create(out, schema.LABEL, data=labels.astype(np.float64))
    if header["splits"] is not None:
        schema.create_strings(out, schema.SPLIT, header["splits"])
    meta = out.create_group(schema.META) if header["meta"] else None
    for k, (name, values) in enumerate(header["meta"].items()):
        schema.create_strings(out, schema.meta_name(k), values)
    if meta is not None:
        meta.attrs[schema.META_COLUMNS] = json.dumps(list(header["meta"]))
    pooled = {p: schema.create(out, schema.pooled_name(p), shape=(n, L, D), dtype=dtype,
                               chunks=(min(n, rows), 1, D)) for p in header["poolings"]}
    if not header["seq"]:
        return pooled, None, None
    offsets = np.concatenate([[0], np.cumsum(np.where(state.done, state.seq_len, 0))]).astype(np.int64)
    schema.create(out, schema.SEQ_OFFSETS, data=offsets)
    data = schema.create(out, schema.SEQ_DATA, shape=(offsets[-1], L, D), dtype=dtype,  # resizable, so a
                         chunks=(int(min(max(offsets[-1], 1), rows)), 1, D), maxshape=(None, L, D))  # 0-length T chunks
    return pooled, data, offsets


def _open_limit():
    """How many sources _Sources keeps open: OPEN_SOURCES, at most a quarter of the file limit (at least 8);
    32 where the limit is unknown."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no resource module on Windows
        return 32
    return OPEN_SOURCES if soft == resource.RLIM_INFINITY else min(OPEN_SOURCES, max(8, soft // 4))


def _runs(x):
    """[(start, stop)] of the maximal runs of consecutive integers in the (K,) int array x."""
    cuts = (np.flatnonzero(np.diff(x) != 1) + 1).tolist()
    return list(zip([0] + cuts, cuts + [len(x)]))


class _Buffers:
    """Scratch arrays (rows, L, D) by name, reused between blocks (a fresh one costs a page fault per 4 KiB),
    grown when a block needs more rows."""

    def __init__(self, L, D, dtype):
        self.shape, self.dtype, self.arrays = (L, D), dtype, {}

    def get(self, name, rows):
        if name not in self.arrays or len(self.arrays[name]) < rows:
            self.arrays[name] = np.empty((rows, *self.shape), self.dtype)
        return self.arrays[name][:rows]


def _slab(dataset, start, count):
    """The dataspace of `count` rows of a (rows, ...) dataset (h5py.h5d.DatasetID) from row `start`."""
    space = dataset.get_space()
    shape = space.shape
    space.select_hyperslab((int(start),) + (0,) * (len(shape) - 1), (int(count),) + shape[1:])
    return space


def _read(dataset, start, out):
    """out = rows start .. start + len(out) of `dataset` (an h5py.h5d.DatasetID; out C-contiguous). h5py's
    low level: read_direct and slicing cost more than a small read."""
    if len(out):
        dataset.read(h5py.h5s.create_simple(out.shape), _slab(dataset, start, len(out)), out)


def _write(dataset, start, values):
    """Rows start .. start + len(values) of `dataset` (an h5py.h5d.DatasetID) = values (C-contiguous)."""
    if len(values):
        dataset.write(h5py.h5s.create_simple(values.shape), _slab(dataset, start, len(values)), values)


def _read_rows(dataset, r, out, at, scratch):
    """out[at] = dataset[r] (an h5py.h5d.DatasetID), read in one slice: r, at increasing, as a source's rows of
    the items of one block are (one run in a part; in a consolidated file the items themselves, whose span
    is at most the block's)."""
    r0, m, span = int(r[0]), len(r), int(r[-1] - r[0]) + 1
    if span == m and at[-1] - at[0] + 1 == m:  # the common case: straight into the block
        _read(dataset, r0, out[int(at[0]):int(at[0]) + m])
    elif span <= len(out) and (np.diff(r) > 0).all():
        spare = scratch.get("spare", span)
        _read(dataset, r0, spare)
        out[at] = spare if span == m else spare[r - r0]
    else:  # rows not in featx's order: one item at a time
        for a, j in zip(at, r):
            _read(dataset, j, out[a:a + 1])


def _copy_pooled(pooled, src, state, header, check):
    """Fill the final file's pooled arrays in blocks of whole chunk rows of items in manifest order (about
    BLOCK_BYTES): each source's items of a block are read in one slice and each block is written whole, so
    every chunk is written once. check() after each block stops at the first failed write."""
    n, L, D, dtype = len(header["ids"]), header["num_layers"], header["hidden_size"], header["dtype"]
    rows, item = schema.chunk_rows(D, dtype), L * D * np.dtype(dtype).itemsize
    size = min(n, rows * max(1, BLOCK_BYTES // (rows * item * len(pooled))))
    scratch = _Buffers(L, D, dtype)
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        which = state.src[lo:hi]
        blocks = {p: scratch.get(p, hi - lo) for p in pooled}
        missing = which < 0
        for block in blocks.values() if missing.any() else ():
            block[missing] = 0
        for k in np.unique(which[~missing]):
            at = np.flatnonzero(which == k)
            source = src.get(k)
            for p, block in blocks.items():
                _read_rows(source[schema.pooled_name(p)], state.row[lo + at], block, at, scratch)
        for p, ds in pooled.items():
            _write(ds.id, lo, blocks[p])
        check()


def _copy_seq(data, offsets, src, state, header, check):
    """Fill the final file's seq/data in blocks of items in manifest order of about BLOCK_BYTES (one item at
    least: sequences can be long), each written whole so that no chunk is written twice; from each source, a
    run of its items is read in one slice. check() after each block."""
    n, L, D, dtype = len(header["ids"]), header["num_layers"], header["hidden_size"], header["dtype"]
    limit = max(1, BLOCK_BYTES // (L * D * np.dtype(dtype).itemsize))  # positions per block
    scratch = _Buffers(L, D, dtype)
    lo = 0
    while lo < n:
        hi = min(n, max(lo + 1, int(np.searchsorted(offsets, offsets[lo] + limit, side="right")) - 1))
        o0, o1 = int(offsets[lo]), int(offsets[hi])
        block = scratch.get("block", o1 - o0)
        which = state.src[lo:hi]
        for k in np.unique(which[which >= 0]) if o1 > o0 else ():
            items = lo + np.flatnonzero(which == k)
            r = state.row[items]
            source = src.get(k)
            ds, off = source[schema.SEQ_DATA], source.offsets
            for s, e in _runs(r):  # contiguous in the source
                a, b = int(off[r[s]]), int(off[r[e - 1] + 1])
                first, last = items[s], items[e - 1]
                if last - first == e - 1 - s:  # contiguous in the block too
                    _read(ds, a, block[offsets[first] - o0:offsets[last + 1] - o0])
                    continue
                run = scratch.get("spare", b - a)
                _read(ds, a, run)
                for i, j in zip(items[s:e], r[s:e]):
                    block[offsets[i] - o0:offsets[i + 1] - o0] = run[off[j] - a:off[j + 1] - a]
        _write(data.id, o0, block)
        check()
        lo = hi


def _copy_values(pooled, data, offsets, src, state, header, check):
    """Fill the final file's arrays from the sources (see _copy_pooled, _copy_seq)."""
    _copy_pooled(pooled, src, state, header, check)
    if data is not None:
        _copy_seq(data, offsets, src, state, header, check)


def _check_room(out_path, header, state):
    """FeatxError when the folder of out_path has less free space than the final file needs, about."""
    folder = os.path.dirname(os.path.abspath(out_path))
    needed = schema.estimated_size(len(header["ids"]), header["num_layers"], header["hidden_size"],
                                   header["dtype"], header["poolings"], state.seq_len[state.done].sum())
    if shutil.disk_usage(folder).free < needed:
        raise _full_error(folder, needed, f"to consolidate {os.path.basename(out_path)}")
    return folder, needed


class _EarlySync:
    """Writes a file's data to the disk (fdatasync) in a background thread while the caller writes on, so that
    the fsync before the file's rename finds little left to write (420 MB on a 2-core VM: that fsync 0.17 s ->
    0.01 s). Durability stays the fsync's: this only starts the disk earlier. start() asks for a sync of what is
    written by the time it runs (one request waits at most: it covers all later ones); stop() ends the thread
    after the syncs asked for. `error`: the first OSError of a sync, for the caller to raise (the fsync of
    another descriptor may not report an error that a sync here has already reported)."""

    def __init__(self, fd):
        self.fd, self.error = fd, None
        self._requests = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="featx-early-sync", daemon=True)
        self._thread.start()

    def _run(self):
        while self._requests.get():  # None: stop
            if self.error is None:
                try:
                    _datasync(self.fd)
                except OSError as e:
                    self.error = e

    def start(self):
        try:
            self._requests.put_nowait(True)
        except queue.Full:
            pass

    def stop(self):
        self._requests.put(None)
        self._thread.join()


class _GuardedFile:
    """A binary file for h5py whose writes never fail in HDF5's eyes: the first OSError is kept in `error` and
    later writes are dropped, so HDF5 can always close its handles (after a failed write inside HDF5 they
    cannot be closed and crash the process at exit); the caller then deletes the file. early_sync: each
    check() also starts writing what is written so far to the disk in the background (_EarlySync)."""

    def __init__(self, path, early_sync=False):
        self.f, self.error = open(path, "w+b", buffering=0), None  # unbuffered: a seek never writes
        self.early = _EarlySync(self.f.fileno()) if early_sync else None

    def seek(self, pos, whence=0):
        try:
            return self.f.seek(pos, whence)
        except OSError as e:
            self.error = self.error or e
            return pos

    def tell(self):
        return self.f.tell()

    def readinto(self, buf):
        """Fill buf from the file; what lies past its end reads as zeros, as HDF5's own driver reads it. h5py's
        leaves it unset, and past the end lie the writes dropped after an error, which HDF5 may read back: it
        took the garbage there for strings and crashed on a full disk."""
        view = memoryview(buf).cast("B")
        n = self.f.readinto(view) or 0
        if n < len(view):
            view[n:] = bytes(len(view) - n)
        return len(view)

    def read(self, n=-1):
        return self.f.read(n)

    def write(self, buf):
        n = memoryview(buf).nbytes
        if self.error is None:
            try:
                return self.f.write(buf)
            except OSError as e:
                self.error = e
        return n

    def truncate(self, size=None):
        try:
            return self.f.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return size

    def flush(self):
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e

    def check(self):
        """Raise the first write error (or error of the early sync), if any; else start an early sync."""
        if self.early is not None:
            self.error = self.error or self.early.error
        if self.error is not None:
            raise self.error
        if self.early is not None:
            self.early.start()

    def close(self):
        """Close the file, after the early sync's thread has ended (check() then raises its error)."""
        if self.early is not None:
            self.early.stop()
        self.f.close()


def _write_hdf5(tmp, fill, early_sync=False, **file_options):
    """Make the HDF5 file `tmp` with fill(file, check) (check() raises a write error as soon as one happened;
    early_sync: and starts writing the file so far to the disk, see _GuardedFile) and close it. On any error
    every handle is closed and tmp removed before the error is raised."""
    guard, f = _GuardedFile(tmp, early_sync), None
    try:
        f = h5py.File(guard, "w", **file_options)
        fill(f, guard.check)
        f.close()
        guard.close()
        guard.check()
    except BaseException:
        if f is not None and f.id.valid:
            f.close()  # cannot fail on a write: the guard drops them
        if not guard.f.closed:
            try:
                guard.close()
            except OSError:
                pass
        _remove(tmp)
        raise


def consolidate(out_path, sources, state, header):
    """Write the final file from the files `sources` as `state` (featx.cache.parts.scan) says, to
    <out_path>.tmp, then rename it over out_path. On any error every handle is closed and the .tmp removed;
    a full disk is a FeatxError naming the folder and the space needed."""
    folder, needed = _check_room(out_path, header, state)
    tmp = out_path + schema.TMP_SUFFIX
    L, D, dtype = header["num_layers"], header["hidden_size"], header["dtype"]
    # Room for a few chunks per layer: a block of sequences ends inside a chunk, which the next block completes.
    # Without sequences every block is whole chunks, written once: no chunk cache, so each goes straight through
    # the checksum filter to the file instead of via the cache (840 MB on a 2-core CPU: copy 2.0 s -> 1.9 s).
    cache = max(16 << 20, 4 * L * schema.chunk_rows(D, dtype) * D * np.dtype(dtype).itemsize) if header["seq"] else 0
    # The Fletcher-32 checksums (about 40% of the copy) stay HDF5's: a vectorised numpy one, with read_direct_chunk
    # or write_direct_chunk, is slower (0.28 s per 420 MB against HDF5's 0.2 s, each way, on a 2-core CPU).
    src = _Sources(sources)

    def fill(out, check):
        _copy_values(*_create_layout(out, header, state), src, state, header, check)

    try:
        _write_hdf5(tmp, fill, early_sync=True, rdcc_nbytes=cache, rdcc_nslots=100003, rdcc_w0=1.0)
        _publish(tmp, out_path)
    except OSError as e:
        _remove(tmp)
        if _disk_full(e):
            raise _full_error(folder, needed, f"while writing {os.path.basename(tmp)}") from None
        raise
    finally:
        src.close()


# ---------------------------------------------------------------- what is left to do
def _valid_settings(path):
    """The parts folder's settings.json, or None when it is absent or damaged (its parts then do not count)."""
    try:
        return parts.read_settings(path)
    except ValueError:
        return None


def _wanted(ids, attrs, poolings, dtype, seq, num_layers, hidden_size):
    """resume_settings of pending_items' keywords; attributes that are None or the writer's own left out."""
    given = {k: plain(v) for k, v in attrs.items() if v is not None and k not in schema.OWN_ATTRS}
    return parts.resume_settings(given, poolings, np.dtype(dtype).name, seq, num_layers, hidden_size, ids)


def _refuse(stored, want, where, attrs_given_only):
    """CacheWriter.refuse; attrs_given_only: the stored attributes that `want` does not name are not compared."""
    if attrs_given_only:
        stored = {**stored, "attrs": {k: v for k, v in stored["attrs"].items() if k in want["attrs"]}}
    CacheWriter.refuse(stored, want, where)


def pending_items(path, ids, *, attrs, poolings, dtype="float16", seq=False, num_layers=None, hidden_size=None,
                  attrs_given_only=False, fingerprints=None):
    """(K,) int64 manifest indices a CacheWriter with these settings would still have to compute (pending and
    failed items), read without writing anything, so that a caller can skip loading a model.

    num_layers, hidden_size: None when not known yet (not compared). attrs_given_only: compare only the
    attributes in `attrs` (a caller that knows some of them before loading a model). fingerprints: None, or the
    (N,) uint64 fingerprints of the items' sources now (CacheWriter's): an item computed from another source is
    pending. Raises FeatxError like CacheWriter when the cache was made with other settings.
    """
    path, ids = os.fspath(path), _strings(ids)
    check_settings(path, ids, attrs=attrs, poolings=poolings, dtype=dtype, seq=seq, num_layers=num_layers,
                   hidden_size=hidden_size, attrs_given_only=attrs_given_only)
    stored, records = _valid_settings(path), []
    if os.path.exists(path):
        f, h = open_validated(path)
        f.close()
        records.append(parts.final_record(h))
    if stored is not None:
        records += [record for _, record in parts.check_parts(path, stored, ids)[0]]
    current = None if fingerprints is None else _fingerprints(fingerprints, len(ids))
    return np.flatnonzero(~parts.scan(records, len(ids), current).done).astype(np.int64)


def _fingerprints(values, n):
    a = np.asarray(values, dtype=np.uint64).reshape(-1)
    if len(a) != n:
        raise ValueError(f"fingerprints has {len(a)} values for {n} ids")
    return a


def check_settings(path, ids, *, attrs, poolings, dtype="float16", seq=False, num_layers=None, hidden_size=None,
                   attrs_given_only=False, parts_folder=True):
    """Raise FeatxError, CacheWriter's one line, when cache `path` was made with other settings than these
    (pending_items' keywords): its parts folder's settings.json (parts_folder: False leaves the folder out) and
    its consolidated file's header are compared, as CacheWriter compares them on opening; no part is read
    and nothing is written, so that a caller can check a cache before loading a model. Nothing to check where
    neither exists; a damaged settings.json or file is left to CacheWriter, which sets it aside or names it."""
    path, ids = os.fspath(path), _strings(ids)
    want = _wanted(ids, attrs, poolings, dtype, seq, num_layers, hidden_size)
    stored = _valid_settings(path) if parts_folder else None
    if stored is not None:
        _refuse(stored, want, schema.parts_dir(path), attrs_given_only)
    if os.path.isfile(path):
        try:
            f, h = open_validated(path)
        except FeatxError:
            return
        f.close()
        _refuse(parts.file_settings(h), want, path, attrs_given_only)


def is_complete(path, ids, **settings) -> bool:
    """Whether `path` is a consolidated cache (no parts folder left) holding every item of `ids` done with
    these settings (pending_items' keywords), read without writing anything; False for anything to check."""
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.exists(schema.parts_dir(path)):
        return False
    try:
        return len(pending_items(path, ids, **settings)) == 0
    except FeatxError:
        return False   # the writer reports what is wrong with the file


def update_columns(path, ids, *, labels=None, splits=None, meta=None) -> bool:
    """Give the consolidated cache `path` the labels, splits and metadata of the manifest (ids: its N ids, those
    of the cache) when its labels or splits differ from them, through the crash-safe consolidation of a
    CacheWriter with the file's own settings (it warns how many differ); nothing is written otherwise.
    Returns whether the file was rewritten. For a complete cache, whose next run has no item to compute."""
    path = os.fspath(path)
    f, h = open_validated(path)
    f.close()
    if not (_differing(h["labels"], None if labels is None else _labels_array(labels))
            or _differing(h["splits"], None if splits is None else _strings(splits))):
        return False
    attrs = {k: v for k, v in h["attrs"].items() if k not in schema.OWN_ATTRS}
    CacheWriter(path, ids=ids, attrs=attrs, poolings=h["poolings"], num_layers=h["num_layers"],
                hidden_size=h["hidden_size"], dtype=h["dtype"], seq=h["seq"], labels=labels, splits=splits,
                meta=meta, layer_widths=h["layer_widths"]).close()
    return True


# ---------------------------------------------------------------- writer
class CacheWriter:
    """Writes a cache crash-safely and resumably; `close()` consolidates it into one file (see the module doc).

    path: the final .h5 file. ids: N str in manifest order. attrs: settings that change the numbers (must
    include model and modality; str/bool/int/float, None = absent). poolings: names, e.g. ["mean", "cls"].
    dtype: "float16" or "float32" storage. seq: also store per-position sequences. labels, splits: N values
    or None. meta: {column: N values} stored as str (any column name). overwrite: delete an existing cache and
    its parts first. layer_widths: None, or each layer's width when layers differ (the encoder's layer_widths;
    values are then zero-padded to hidden_size and the widths stored as the layer_widths attribute).
    fingerprints: None, or (N,) uint64 hashes of the items' sources now (0: not known), recorded with each item
    computed: an item stored from another source (a recorded fingerprint that differs) is computed again, and
    said so in a warning (one line, `featx COMMAND: ...`, on the command line); one stored without a fingerprint
    is not compared.
    Labels and splits are not features: the consolidated file takes this writer's, also when no item is left
    to compute (`close` then rewrites it), with a warning that says how many differ from those stored.
    `todo` holds the (K,) int64 manifest indices not done at open (pending, failed and changed ones).
    Raises FeatxError when an existing cache or parts folder was made with other settings or ids.
    """

    def __init__(self, path, *, ids, attrs, poolings, num_layers, hidden_size, dtype="float16", seq=False,
                 labels=None, splits=None, meta=None, overwrite=False, layer_widths=None, fingerprints=None):
        self.path = os.fspath(path)
        self.ids = _strings(ids)
        n = len(self.ids)
        if n == 0:
            raise FeatxError(f"cannot make cache {self.path}: no items")
        self.poolings = [str(p) for p in poolings]
        self.num_layers, self.hidden_size = int(num_layers), int(hidden_size)
        self.dtype = np.dtype(dtype).name
        self.seq = bool(seq)
        if not self.poolings or len(set(self.poolings)) != len(self.poolings):
            raise ValueError(f"poolings must be distinct names, got {self.poolings}")
        if self.dtype not in schema.DTYPES:
            raise ValueError(f"dtype must be float16 or float32, not {dtype!r}")
        own = {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "dtype": self.dtype,
               "poolings": ",".join(self.poolings), "featx_version": __version__,
               "format_version": schema.FORMAT_VERSION}
        if layer_widths is not None:
            own[schema.LAYER_WIDTHS] = schema.widths_text(layer_widths)
            schema.parse_widths(own[schema.LAYER_WIDTHS], self.num_layers, self.hidden_size, self.path)
        self.attrs = self._clean_attrs(attrs, own)
        columns = {"labels": labels, "splits": splits, **{f"meta[{k!r}]": v for k, v in (meta or {}).items()}}
        for name, values in columns.items():
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} values for {n} ids")
        self._header = {"ids": self.ids, "attrs": {**self.attrs, **own}, "poolings": self.poolings,
                        "num_layers": self.num_layers, "hidden_size": self.hidden_size, "dtype": self.dtype,
                        "seq": self.seq, "labels": None if labels is None else _labels_array(labels),
                        "splits": None if splits is None else _strings(splits),
                        "meta": {str(k): _strings(v) for k, v in (meta or {}).items()},
                        "fingerprints": fingerprints is not None}
        self._prints = None if fingerprints is None else _fingerprints(fingerprints, n)
        self._result, self._closed, self._rewrite = None, False, False
        self._settings = parts.resume_settings(self.attrs, self.poolings, self.dtype, self.seq, self.num_layers,
                                               self.hidden_size, self.ids)
        self._open(overwrite)

    @staticmethod
    def _clean_attrs(attrs, own):
        out = {}
        for k, v in dict(attrs).items():
            v = plain(v)
            if k in own:
                if k not in ("featx_version", "format_version") and v != own[k]:
                    raise ValueError(f"attrs[{k!r}] = {v!r} contradicts the writer's {k} = {own[k]!r}")
                continue
            if v is None:
                continue  # HDF5 cannot store None; an absent attr reads back as None
            if not isinstance(v, schema.SETTING_TYPES):
                raise TypeError(f"attrs[{k!r}] must be a str, bool, int or float, not {type(v).__name__}")
            out[str(k)] = v
        for k in ("model", "modality"):
            if k not in out:
                raise ValueError(f"attrs must include {k!r}")
        if out["modality"] not in schema.MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(schema.MODALITIES)}, not {out['modality']!r}")
        return out

    def _open(self, overwrite):
        folder = schema.parts_dir(self.path)
        made = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        self._lock = open(os.path.join(folder, schema.LOCK_FILE), "a")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    made = False  # the folder is the other writer's
                    raise FeatxError(f"another process is writing {self.path}; wait for it or stop it") from None
            if overwrite:
                for name in os.listdir(folder):
                    if name != schema.LOCK_FILE:
                        os.remove(os.path.join(folder, name))
                _remove(self.path)
            for stale in [self.path + schema.TMP_SUFFIX] + [os.path.join(folder, x) for x in os.listdir(folder)
                                                            if x.endswith(schema.TMP_SUFFIX)]:
                _remove(stale)  # left by a killed writer; the parts and the old final file still hold it all
            self._resume()
        except BaseException:
            self._lock.close()
            if made:
                parts.remove_parts(self.path)
            raise

    def _resume(self):
        """Check what is stored against this writer's settings, set damaged files aside, and find `todo`."""
        folder = schema.parts_dir(self.path)
        settings_file = os.path.join(folder, schema.SETTINGS_FILE)
        for file in parts.foreign_files(self.path):
            parts.set_aside(file, "not a file featx writes")
        try:
            stored = parts.read_settings(self.path)
        except ValueError as e:
            parts.set_aside(settings_file, f"damaged: {e}")
            stored = None
        if stored is None:
            for p in parts.part_files(self.path):  # no settings say what they were made with
                parts.set_aside(p, f"{schema.SETTINGS_FILE} is missing or damaged")
        else:
            self.refuse(stored, self._settings, folder)
        records = []
        if os.path.exists(self.path):
            f, h = open_validated(self.path)
            f.close()
            self.refuse(parts.file_settings(h), self._settings, self.path)
            records.append(parts.final_record(h))
            self._rewrite = self._columns_changed(h)
        good, bad = parts.check_parts(self.path, self._settings, self.ids)
        records += [record for _, record in good]
        for p, reason in bad:
            parts.set_aside(p, f"damaged part ({reason})")
        if stored is None:  # so that a killed first run is recognised
            with open(settings_file + schema.TMP_SUFFIX, "w", encoding="utf-8") as f:
                json.dump(self._settings, f)
            _publish(settings_file + schema.TMP_SUFFIX, settings_file)
        state = parts.scan(records, len(self.ids), self._prints)
        self.todo = np.flatnonzero(~state.done).astype(np.int64)
        if state.stale.any():
            stale = np.flatnonzero(state.stale)
            column = self.attrs.get("source_column")
            what = ("the manifest's text" if column == "text" else
                    f"the {column} file (its path from the manifest, size or modification time)" if column else
                    "the source")
            warnings.warn(f"{self.path}: {what} of {len(stale)} item(s) changed since the cache was made, e.g. id "
                          f"{self.ids[stale[0]]}; extracting them again")   # the CLI: "featx COMMAND: ..."
        counters = [schema.part_counter(os.path.basename(p)) for p, _ in good + bad]
        self._next_part = 1 + max(counters, default=0)

    def _columns_changed(self, h) -> bool:
        """Whether the labels or splits of the consolidated file (header h) differ from this writer's; a warning
        for each that does."""
        changed = False
        for what, key in (("labels", "labels"), ("splits", "splits")):
            k = _differing(h[key], self._header[key])
            if k:
                warnings.warn(f"{self.path}: the manifest's {what} of {k} of {len(self.ids)} items differ from "
                              "those the cache held; it now holds the manifest's")
                changed = True
        return changed

    @staticmethod
    def refuse(old, new, where):
        """FeatxError when the stored settings `old` differ from `new` (see featx.cache.parts.settings_diff)."""
        diffs = parts.settings_diff(old, new)
        if diffs:
            raise FeatxError(f"{where} was made with different settings: {', '.join(diffs)}; "
                             "run with the settings it was made with, or use --overwrite to start again")

    def _indices(self, indices):
        if self._closed:
            raise ValueError(f"writer of {self.path} is closed")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.ids)):
            raise ValueError(f"indices must lie in 0..{len(self.ids) - 1}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("indices of one batch must be distinct")
        return idx

    def _bad_layer(self, a, what):
        """Reason why an item's cast array a (T, L, D) is not storable, or ""."""
        bad = ~np.isfinite(a).all(axis=(0, 2))
        return f"non-finite value after cast to {self.dtype} (layer {int(np.argmax(bad))}, {what})" if bad.any() else ""

    def _cast_batch(self, pooled, seq, order):
        """(arrays {pooling: (B, L, D)}, seqs, reasons [B]) in `order`, cast to the dtype. seqs: None, or
        (values (T_1 + ... + T_B, L, D), lengths (B,)): the sequences one after the other."""
        B, L, D = len(order), self.num_layers, self.hidden_size
        reasons = [""] * B
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported per item below
            arrays, ordered = {}, (order[1:] > order[:-1]).all()
            for p in self.poolings:
                a = np.asarray(pooled[p])
                if a.shape != (B, L, D):
                    raise ValueError(f"pooled[{p!r}] has shape {a.shape}, expected {(B, L, D)}")
                arrays[p] = a = _cast(a, self.dtype, None if ordered else order)
                for b in np.flatnonzero(_non_finite_rows(a)):
                    reasons[b] = reasons[b] or self._bad_layer(a[b:b + 1], f"pooling {p}")
            seqs = None
            if self.seq:
                given = [np.asarray(seq[j]) for j in order]
                for b, s in enumerate(given):
                    if s.ndim != 3 or s.shape[1:] != (L, D):
                        raise ValueError(f"seq[{order[b]}] has shape {s.shape}, expected (T, {L}, {D})")
                values = _cast_concat(given, self.dtype)
                lengths = np.array([len(s) for s in given], np.int64)
                ends = np.cumsum(lengths)
                bad = np.concatenate([[0], np.cumsum(_non_finite_rows(values))])  # non-finite positions so far
                for b in np.flatnonzero(bad[ends] > bad[ends - lengths]):
                    reasons[b] = reasons[b] or self._bad_layer(values[ends[b] - lengths[b]:ends[b]], "sequence")
                seqs = values, lengths
        return arrays, seqs, reasons

    def write(self, indices, pooled, seq=None):
        """Store a batch of finished items as one atomic part.

        indices: (B,) manifest indices. pooled: {pooling: (B, L, D) float array} for every pooling of the cache.
        seq: list of B arrays (T_i, L, D) when the cache stores sequences, else None.
        An item with a value that is not finite after the cast to the storage dtype is recorded as failed.
        Returns the (k,) int64 indices recorded as failed.
        """
        idx = self._indices(indices)
        if set(pooled) != set(self.poolings):
            raise ValueError(f"pooled must hold exactly the poolings {self.poolings}, got {sorted(pooled)}")
        if (seq is not None) != self.seq or (seq is not None and len(seq) != len(idx)):
            raise ValueError("seq must be a list of one array per item exactly when the cache stores sequences")
        if len(idx) == 0:
            return idx
        order = np.argsort(idx, kind="stable")
        arrays, seqs, reasons = self._cast_batch(pooled, seq, order)
        done = np.array([not r for r in reasons])
        if not done.all():  # the arrays hold the done items only
            arrays = {p: a[done] for p, a in arrays.items()}
            if seqs is not None:
                values, lengths = seqs
                keep = np.repeat(done, lengths)
                seqs = values[keep], lengths[done]
        self._write_part(idx[order], done, reasons, arrays, seqs)
        return idx[order][~done]

    def fail(self, indices, reasons):
        """Record items that could not be processed. indices: (B,) ints; reasons: B strings, or one for all."""
        idx = self._indices(indices)
        reasons = [reasons] * len(idx) if isinstance(reasons, str) else list(reasons)
        if len(reasons) != len(idx):
            raise ValueError(f"{len(reasons)} reasons for {len(idx)} indices")
        if len(idx) == 0:
            return
        order = np.argsort(idx, kind="stable")
        empty = np.zeros((0, self.num_layers, self.hidden_size), self.dtype)
        self._write_part(idx[order], np.zeros(len(idx), bool), [_one_line(reasons[j]) for j in order],
                         {p: empty for p in self.poolings}, (empty, np.zeros(0, np.int64)) if self.seq else None)

    def _write_part(self, idx, done, error, pooled, seqs):
        """One part file: indices, ids, done, error (B,) and the arrays of the done items only (seqs: None or
        (values (T, L, D), lengths (K,)), the done items' sequences one after the other)."""
        final = os.path.join(schema.parts_dir(self.path), schema.part_name(self._next_part))
        tmp = final + schema.TMP_SUFFIX
        self._next_part += 1

        def chunks(a):
            return schema.part_chunks(len(a), self.num_layers, self.hidden_size, self.dtype)

        def fill(f, check):
            schema.create(f, schema.INDICES, data=idx)
            schema.create_strings(f, schema.IDS, self.ids[idx])
            schema.create(f, schema.DONE, data=done)
            schema.create_strings(f, schema.ERROR, error)
            if self._prints is not None:
                schema.create(f, schema.FINGERPRINT, data=self._prints[idx])
            for p, a in pooled.items():
                schema.create(f, schema.pooled_name(p), data=a, chunks=chunks(a))
            if seqs is not None:
                values, lengths = seqs
                schema.create(f, schema.SEQ_OFFSETS, data=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
                schema.create(f, schema.SEQ_DATA, data=values, chunks=chunks(values))

        try:
            _write_hdf5(tmp, fill)
            _publish(tmp, final, sync_dir=False)  # a part lost to a power cut is only recomputed
        except OSError as e:
            _remove(tmp)
            if _disk_full(e):
                needed = sum(a.nbytes for a in pooled.values()) + (seqs[0].nbytes if seqs else 0) + 4096 * len(idx)
                raise _full_error(os.path.dirname(final), needed, f"for a part of {len(idx)} items") from None
            raise

    def close(self):
        """Consolidate the final file and every part into `path`; idempotent.

        Returns {"done": n, "failed": n, "pending": n, "path": path}.
        """
        if self._result is not None:
            return self._result
        try:
            found = parts.part_files(self.path)
            records, sources = [], []
            if os.path.exists(self.path):
                f, h = open_validated(self.path)
                f.close()
                records, sources = [parts.final_record(h)], [self.path]
            records += [parts.read_part(p, self._settings) for p in found]
            state = parts.scan(records, len(self.ids), self._prints)
            if found or self._rewrite or not os.path.exists(self.path):
                consolidate(self.path, sources + found, state, self._header)
            parts.remove_parts(self.path)  # everything is in the final file now
            self._result = parts.counts(state, self.path)
        finally:
            self._closed = True
            self._lock.close()
        return self._result

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return False
        try:
            self.close()  # also on errors: what was written is kept
        except Exception:
            pass  # the error on its way out says what went wrong; the parts stay for the next run
        return False

