"""The HDF5 cache of hidden states: a resumable, crash-safe writer, a reader, `describe` and `merge_caches`.

A consolidated cache (one file per manifest x encoder) holds:
  ids (N,) str, done (N,) bool, error (N,) str ("" where done or pending)
  pooled/<pooling> (N, L, D) float16|float32, zeros where not done, chunked (n, 1, D) so one layer reads fast
  seq/data (T_total, L, D) and seq/offsets (N+1,) int64, optional: item i is data[offsets[i]:offsets[i+1]]
  label (N,) float64|str, split (N,) str, meta/<column> (N,) str, all optional
  root attrs: model, modality, num_layers, hidden_size, featx_version, dtype, poolings and the caller's settings

Crash safety: a writer never touches the final file. Each `write`/`fail` is one small HDF5 part in
`<path>.parts/`, written under a temporary name, fsynced and renamed, so it exists whole or not at all.
`close` builds `<path>.tmp` from the old final file plus every part, renames it over `<path>`, then deletes
the parts. Killed at any moment, the old final file and every finished part survive and the next writer
resumes from them.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import types
import warnings

import h5py
import numpy as np

from featx.version import __version__
from featx.errors import FeatxError, first_line

try:
    import fcntl
except ImportError:  # no advisory locks on Windows: one writer per cache is then up to the user
    fcntl = None

__all__ = ["CacheWriter", "Cache", "LayerData", "open_cache", "read_layer", "describe", "merge_caches"]

MODALITIES = ("text", "image", "audio", "video")
DTYPES = ("float16", "float32")
_OWN_ATTRS = ("num_layers", "hidden_size", "dtype", "poolings", "featx_version")  # set by the writer itself
_READ_ROWS = 4096  # items per block when a layer is read and cast
_CHUNK_BYTES = 512 * 1024  # one chunk of one layer; 256 KiB-1 MiB keeps reading one layer for all items fast
_OPEN_SOURCES = 32  # files kept open at once while consolidating (parts can number thousands)
_STR = h5py.string_dtype()
_SHOWN_ERRORS = 5

LayerData = collections.namedtuple("LayerData", "features ids labels splits")


# ---------------------------------------------------------------- small helpers
def _parts_dir(path):
    return path + ".parts"


def _part_files(path):
    """Finished parts of `path`, oldest first (names are zero-padded counters)."""
    folder = _parts_dir(path)
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.startswith("part-") and n.endswith(".h5"))
    return [os.path.join(folder, n) for n in names]


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


def _is_missing(v):
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN, NaT, pandas NA
    except (TypeError, ValueError):
        return True  # pandas NA has no truth value


def _strings(values):
    return np.array(["" if _is_missing(v) else str(v) for v in values], dtype=object)


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


def _plain(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return v.item() if isinstance(v, np.generic) else v


def _ids_hash(ids):
    return hashlib.sha256("\0".join(ids).encode("utf-8")).hexdigest()


def _chunk_rows(hidden_size, dtype):
    """Rows per chunk so that one chunk (rows, 1, D) is about 512 KiB."""
    return max(1, _CHUNK_BYTES // (int(hidden_size) * np.dtype(dtype).itemsize))


def _size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _cast(a, dtype):
    """a as `dtype` ('float16' | 'float32'); the cast runs in torch, ~4x faster than numpy's float32 -> float16."""
    import torch

    if a.dtype == np.dtype(dtype):
        return a
    return torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype)).numpy()


_EXPONENT = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def _non_finite_rows(a):
    """(B,) bool: rows of the float array a (B, ...) holding an inf or a NaN (all exponent bits set), found on
    the bits: several times faster than np.isfinite on float16."""
    bits, mask = _EXPONENT[a.dtype.itemsize]
    u = np.ascontiguousarray(a).view(bits).reshape(len(a), -1)
    return ((u & bits(mask)) == bits(mask)).any(axis=1)


# ---------------------------------------------------------------- settings
def _settings(attrs, poolings, dtype, seq, num_layers, hidden_size, ids):
    """What must match for a cache to be resumed: the caller's attrs, the layout, and the id list."""
    return {"attrs": dict(attrs), "poolings": list(poolings), "dtype": dtype, "seq": bool(seq),
            "num_layers": int(num_layers), "hidden_size": int(hidden_size), "n_items": len(ids),
            "ids_sha256": _ids_hash(ids)}


def _final_settings(f):
    h = _read_header(f)
    attrs = {k: v for k, v in h["attrs"].items() if k not in _OWN_ATTRS}
    return _settings(attrs, h["poolings"], h["dtype"], h["seq"], h["num_layers"], h["hidden_size"], h["ids"])


def _settings_diff(old, new):
    """One short phrase per setting that differs, e.g. "model 'a' (now 'b')"."""
    diffs = []
    keys = sorted(set(old["attrs"]) | set(new["attrs"]), key=lambda k: (k not in ("model", "modality"), k))
    for k in keys:
        a, b = old["attrs"].get(k), new["attrs"].get(k)
        if a != b:
            diffs.append(f"{k} {a!r} (now {b!r})")
    for k in ("num_layers", "hidden_size", "dtype", "seq"):
        if old[k] != new[k]:
            diffs.append(f"{k} {old[k]!r} (now {new[k]!r})")
    if sorted(old["poolings"]) != sorted(new["poolings"]):
        diffs.append(f"poolings {','.join(old['poolings'])!r} (now {','.join(new['poolings'])!r})")
    if old["n_items"] != new["n_items"]:
        diffs.append(f"number of items {old['n_items']} (now {new['n_items']})")
    elif old["ids_sha256"] != new["ids_sha256"]:
        diffs.append("the id list differs")
    return diffs


# ---------------------------------------------------------------- reading files
def _open_h5(path):
    """Open a consolidated cache read-only, or raise a one-line FeatxError."""
    if not os.path.exists(path):
        hint = ""
        if _part_files(path):
            hint = f"; a killed run left parts in {_parts_dir(path)}: run the same extraction again to resume"
        raise FeatxError(f"no cache at {path}{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FeatxError(f"{path} is not a readable HDF5 file ({first_line(e)})") from None
    if not {"ids", "done", "pooled"} <= set(f) or "model" not in f.attrs:
        f.close()
        raise FeatxError(f"{path} is not a featx cache (it lacks ids, done, pooled/ or the model attribute)")
    return f


def _read_header(f):
    """Everything of a consolidated file but the arrays of features, as plain Python / numpy."""
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    poolings = [p for p in str(attrs.get("poolings", "")).split(",") if p] or list(f["pooled"])
    first = f["pooled"][poolings[0]]
    label = None
    if "label" in f:
        label = f["label"].asstr()[:] if f["label"].dtype.kind == "O" else f["label"][:].astype(np.float64)
    return {"ids": f["ids"].asstr()[:], "attrs": attrs, "poolings": poolings,
            "num_layers": int(attrs.get("num_layers", first.shape[1])),
            "hidden_size": int(attrs.get("hidden_size", first.shape[2])),
            "dtype": str(attrs.get("dtype", first.dtype.name)), "seq": "seq" in f, "labels": label,
            "splits": f["split"].asstr()[:] if "split" in f else None,
            "meta": {k: f["meta"][k].asstr()[:] for k in f["meta"]} if "meta" in f else {}}


def _read_source(f, n):
    """(indices, ids, done, error, rows, seq lengths) of a final file or a part, one entry per item it records.

    rows: where a done item's arrays sit in that file (a part stores arrays for its done items only).
    """
    part = "indices" in f
    done, ids = f["done"][:].astype(bool), f["ids"].asstr()[:]
    idx = f["indices"][:].astype(np.int64) if part else np.arange(n)
    rows = np.cumsum(done) - 1 if part else idx
    error = f["error"].asstr()[:] if "error" in f else np.full(len(idx), "", object)
    lengths = np.zeros(len(idx), np.int64)
    if "seq" in f:
        lengths[done] = np.diff(f["seq/offsets"][:]) if part else np.diff(f["seq/offsets"][:])[done]
    return idx, ids, done, error, rows, lengths


def _scan(sources, n):
    """Which source holds each item: the last one that has it done. A failure counts only where none has.

    Returns a namespace of (N,) arrays: src (index into sources, -1 if not done), row, seq_len, done, error,
    ids (None where no source names the item).
    """
    s = types.SimpleNamespace(src=np.full(n, -1, np.int32), row=np.zeros(n, np.int64),
                              seq_len=np.zeros(n, np.int64), error=np.full(n, "", object),
                              ids=np.full(n, None, object))
    for k, path in enumerate(sources):
        with h5py.File(path, "r") as f:
            idx, ids, done, error, rows, lengths = _read_source(f, n)
        s.ids[idx] = ids
        failed = ~done & (error != "")
        s.error[idx[failed]] = error[failed]
        s.src[idx[done]], s.row[idx[done]], s.seq_len[idx[done]] = k, rows[done], lengths[done]
    s.done = s.src >= 0
    s.error[s.done] = ""  # a success anywhere beats a failure anywhere
    return s


def _counts(state, path):
    failed = int((state.error != "").sum())
    done = int(state.done.sum())
    return {"done": done, "failed": failed, "pending": len(state.done) - done - failed, "path": path}


class _Sources:
    """Source files opened on demand, at most _OPEN_SOURCES at a time; get(k) -> (file, seq offsets or None)."""

    def __init__(self, paths):
        self.paths, self.open = paths, collections.OrderedDict()

    def get(self, k):
        k = int(k)
        if k in self.open:
            self.open.move_to_end(k)
            return self.open[k]
        if len(self.open) >= _OPEN_SOURCES:
            self.open.popitem(last=False)[1][0].close()
        f = h5py.File(self.paths[k], "r")
        self.open[k] = (f, f["seq/offsets"][:] if "seq" in f else None)
        return self.open[k]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f, _ in self.open.values():
            f.close()
        self.open.clear()


def _consolidate(out_path, sources, state, header):
    """Write the final file from `sources` as `state` says, to <out_path>.tmp, then rename it over out_path.

    Streams in blocks of one chunk row of items in manifest order, so memory stays about L chunks.
    """
    n, L, D, dtype = len(header["ids"]), header["num_layers"], header["hidden_size"], header["dtype"]
    rows = _chunk_rows(D, dtype)
    tmp = out_path + ".tmp"
    # Room for a few chunks per layer: sequence writes straddle chunks and must not rewrite them partially.
    cache = max(16 << 20, 4 * L * rows * D * np.dtype(dtype).itemsize)
    with h5py.File(tmp, "w", rdcc_nbytes=cache, rdcc_nslots=100003, rdcc_w0=1.0) as out, _Sources(sources) as src:
        out.attrs.update(header["attrs"])
        out.create_dataset("ids", data=header["ids"], dtype=_STR)
        out.create_dataset("done", data=state.done)
        out.create_dataset("error", data=state.error, dtype=_STR)
        if header["labels"] is not None:
            labels = header["labels"]
            out.create_dataset("label", data=labels, dtype=_STR if labels.dtype == object else np.float64)
        if header["splits"] is not None:
            out.create_dataset("split", data=header["splits"], dtype=_STR)
        for k, values in header["meta"].items():
            out.create_dataset(f"meta/{k}", data=values, dtype=_STR)
        pooled = {p: out.create_dataset(f"pooled/{p}", (n, L, D), dtype, chunks=(min(n, rows), 1, D))
                  for p in header["poolings"]}
        if header["seq"]:
            offsets = np.concatenate([[0], np.cumsum(np.where(state.done, state.seq_len, 0))]).astype(np.int64)
            out.create_dataset("seq/offsets", data=offsets)
            t_rows = int(min(max(offsets[-1], 1), rows))
            data = out.create_dataset("seq/data", (offsets[-1], L, D), dtype, chunks=(t_rows, 1, D),
                                      maxshape=(None, L, D))  # resizable, so a 0-length T may be chunked
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            which = state.src[lo:hi]
            blocks = {p: np.zeros((hi - lo, L, D), dtype) for p in pooled}
            for k in np.unique(which[which >= 0]):
                at = np.flatnonzero(which == k)
                r = state.row[lo + at]  # increasing, and contiguous within one part
                f, off = src.get(k)
                for p, block in blocks.items():
                    block[at] = f[f"pooled/{p}"][r[0]:r[-1] + 1][r - r[0]]
                for i, j in zip(lo + at, r) if header["seq"] else ():  # one item at a time: sequences can be long
                    data[offsets[i]:offsets[i + 1]] = f["seq/data"][off[j]:off[j + 1]]
            for p, ds in pooled.items():
                ds[lo:hi] = blocks[p]
    _publish(tmp, out_path)


def _remove_parts(path):
    """Delete the parts folder: parts first, settings.json and the lock last, so a kill leaves a valid state."""
    folder = _parts_dir(path)
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder), key=lambda n: (not n.startswith("part-"), n == "lock", n)):
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(folder)
    except OSError:
        pass  # another writer already started a new parts folder


# ---------------------------------------------------------------- writer
class CacheWriter:
    """Writes a cache crash-safely and resumably; `close()` consolidates it into one file (see the module doc).

    path: the final .h5 file. ids: N str in manifest order. attrs: settings that change the numbers (must
    include model and modality; str/bool/int/float, None = absent). poolings: names, e.g. ["mean", "cls"].
    dtype: "float16" or "float32" storage. seq: also store per-position sequences. labels, splits: N values
    or None. meta: {column: N values} stored as str. overwrite: delete an existing cache and its parts first.
    `todo` holds the (K,) int64 manifest indices not done at open (pending and failed ones).
    Raises FeatxError when an existing cache or parts folder was made with other settings or ids.
    """

    def __init__(self, path, *, ids, attrs, poolings, num_layers, hidden_size, dtype="float16", seq=False,
                 labels=None, splits=None, meta=None, overwrite=False):
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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float16 or float32, not {dtype!r}")
        own = {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "dtype": self.dtype,
               "poolings": ",".join(self.poolings), "featx_version": __version__}
        self.attrs = self._clean_attrs(attrs, own)
        columns = {"labels": labels, "splits": splits, **{f"meta[{k!r}]": v for k, v in (meta or {}).items()}}
        for name, values in columns.items():
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} values for {n} ids")
        self._header = {"ids": self.ids, "attrs": {**self.attrs, **own}, "poolings": self.poolings,
                        "num_layers": self.num_layers, "hidden_size": self.hidden_size, "dtype": self.dtype,
                        "seq": self.seq, "labels": None if labels is None else _labels_array(labels),
                        "splits": None if splits is None else _strings(splits),
                        "meta": {str(k): _strings(v) for k, v in (meta or {}).items()}}
        self._result, self._closed = None, False
        self._open(_settings(self.attrs, self.poolings, self.dtype, self.seq, self.num_layers,
                             self.hidden_size, self.ids), overwrite)

    @staticmethod
    def _clean_attrs(attrs, own):
        out = {}
        for k, v in dict(attrs).items():
            v = _plain(v)
            if k in own:
                if k != "featx_version" and v != own[k]:
                    raise ValueError(f"attrs[{k!r}] = {v!r} contradicts the writer's {k} = {own[k]!r}")
                continue
            if v is None:
                continue  # HDF5 cannot store None; an absent attr reads back as None
            if not isinstance(v, (str, bool, int, float)):
                raise TypeError(f"attrs[{k!r}] must be a str, bool, int or float, not {type(v).__name__}")
            out[str(k)] = v
        for k in ("model", "modality"):
            if k not in out:
                raise ValueError(f"attrs must include {k!r}")
        if out["modality"] not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {out['modality']!r}")
        return out

    def _open(self, settings, overwrite):
        folder = _parts_dir(self.path)
        made = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        self._lock = open(os.path.join(folder, "lock"), "a")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    made = False  # the folder is the other writer's
                    raise FeatxError(f"another process is writing {self.path}; wait for it or stop it") from None
            if overwrite:
                for name in os.listdir(folder):
                    if name != "lock":
                        os.remove(os.path.join(folder, name))
                if os.path.exists(self.path):
                    os.remove(self.path)
            for stale in [self.path + ".tmp"] + [os.path.join(folder, x) for x in os.listdir(folder)
                                                 if x.endswith(".tmp")]:
                if os.path.exists(stale):
                    os.remove(stale)  # left by a killed writer; the parts and the old final file still hold it all
            settings_file = os.path.join(folder, "settings.json")
            parts = _part_files(self.path)
            if os.path.exists(settings_file):
                with open(settings_file, encoding="utf-8") as f:
                    self._refuse(json.load(f), settings, folder)
            elif parts:
                raise FeatxError(f"{folder} holds parts but no settings.json; use --overwrite to start again")
            if os.path.exists(self.path):
                with _open_h5(self.path) as f:
                    self._refuse(_final_settings(f), settings, self.path)
            if not os.path.exists(settings_file):  # so that a killed first run is recognised
                with open(settings_file + ".tmp", "w", encoding="utf-8") as f:
                    json.dump(settings, f)
                _publish(settings_file + ".tmp", settings_file)
            sources = ([self.path] if os.path.exists(self.path) else []) + parts
            self.todo = np.flatnonzero(~_scan(sources, len(self.ids)).done).astype(np.int64)
            self._next_part = 1 + max((int(os.path.basename(p)[5:-3]) for p in parts), default=0)
        except BaseException:
            self._lock.close()
            if made:
                _remove_parts(self.path)
            raise

    @staticmethod
    def _refuse(old, new, where):
        diffs = _settings_diff(old, new)
        if diffs:
            raise FeatxError(f"{where} was made with different settings: {', '.join(diffs)}; "
                             "use --overwrite to start again")

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

    def write(self, indices, pooled, seq=None):
        """Store a batch of finished items as one atomic part.

        indices: (B,) manifest indices. pooled: {pooling: (B, L, D) float array} for every pooling of the cache.
        seq: list of B arrays (T_i, L, D) when the cache stores sequences, else None.
        An item with a value that is not finite after the cast to the storage dtype is recorded as failed.
        Returns the (k,) int64 indices recorded as failed.
        """
        idx = self._indices(indices)
        B, L, D = len(idx), self.num_layers, self.hidden_size
        if set(pooled) != set(self.poolings):
            raise ValueError(f"pooled must hold exactly the poolings {self.poolings}, got {sorted(pooled)}")
        if (seq is not None) != self.seq or (seq is not None and len(seq) != B):
            raise ValueError("seq must be a list of one array per item exactly when the cache stores sequences")
        if B == 0:
            return idx
        order = np.argsort(idx, kind="stable")
        reasons = [""] * B
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported per item below
            arrays = {}
            for p in self.poolings:
                a = np.asarray(pooled[p])
                if a.shape != (B, L, D):
                    raise ValueError(f"pooled[{p!r}] has shape {a.shape}, expected {(B, L, D)}")
                arrays[p] = a = _cast(a if (order[1:] > order[:-1]).all() else a[order], self.dtype)
                for b in np.flatnonzero(_non_finite_rows(a)):
                    reasons[b] = reasons[b] or self._bad_layer(a[b:b + 1], f"pooling {p}")
            seqs = None
            if self.seq:
                seqs = [_cast(np.asarray(seq[j]), self.dtype) for j in order]
                for b, s in enumerate(seqs):
                    if s.ndim != 3 or s.shape[1:] != (L, D):
                        raise ValueError(f"seq[{order[b]}] has shape {s.shape}, expected (T, {L}, {D})")
                    if _non_finite_rows(s.reshape(1, -1))[0]:
                        reasons[b] = reasons[b] or self._bad_layer(s, "sequence")
        done = np.array([not r for r in reasons])
        self._write_part(idx[order], done, reasons, {p: a[done] for p, a in arrays.items()},
                         None if seqs is None else [s for s, d in zip(seqs, done) if d])
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
                         {p: empty for p in self.poolings}, [] if self.seq else None)

    def _write_part(self, idx, done, error, pooled, seqs):
        """One part file: indices, ids, done, error (B,) and the arrays of the done items only."""
        final = os.path.join(_parts_dir(self.path), f"part-{self._next_part:08d}.h5")
        self._next_part += 1
        with h5py.File(final + ".tmp", "w") as f:
            f.create_dataset("indices", data=idx)
            f.create_dataset("ids", data=self.ids[idx], dtype=_STR)
            f.create_dataset("done", data=done)
            f.create_dataset("error", data=np.array(error, dtype=object), dtype=_STR)
            for p, a in pooled.items():
                f.create_dataset(f"pooled/{p}", data=a)
            if seqs is not None:
                empty = np.zeros((0, self.num_layers, self.hidden_size), self.dtype)
                f.create_dataset("seq/offsets", data=np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64))
                f.create_dataset("seq/data", data=np.concatenate([empty] + seqs))
        _publish(final + ".tmp", final, sync_dir=False)  # a part lost to a power cut is only recomputed

    def close(self):
        """Consolidate the final file and every part into `path`; idempotent.

        Returns {"done": n, "failed": n, "pending": n, "path": path}.
        """
        if self._result is not None:
            return self._result
        try:
            parts = _part_files(self.path)
            sources = ([self.path] if os.path.exists(self.path) else []) + parts
            state = _scan(sources, len(self.ids))
            if parts or not os.path.exists(self.path):
                _consolidate(self.path, sources, state, self._header)
            _remove_parts(self.path)  # everything is in the final file now
            self._result = _counts(state, self.path)
        finally:
            self._closed = True
            self._lock.close()
        return self._result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # also on errors: what was written is kept
        return False


# ---------------------------------------------------------------- reader
class Cache:
    """Read-only view of a consolidated cache file.

    Attributes: path, attrs (dict), model, modality, num_layers (L), hidden_size (D), poolings (list), dtype,
    has_seq, ids (N,) str, done (N,) bool, error (N,) str, labels (N,) float64|str or None,
    splits (N,) str or None, meta {column: (N,) str}.
    Raises FeatxError if the file is missing or not a featx cache; warns if unmerged parts exist.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._f = _open_h5(self.path)
        if _part_files(self.path):
            warnings.warn(f"{self.path} has unmerged parts in {_parts_dir(self.path)} (a killed run?); "
                          "run the same extraction again to merge them", stacklevel=2)
        h = _read_header(self._f)
        self.attrs, self.poolings, self.dtype, self.has_seq = h["attrs"], h["poolings"], h["dtype"], h["seq"]
        self.num_layers, self.hidden_size = h["num_layers"], h["hidden_size"]
        self.model, self.modality = self.attrs["model"], self.attrs.get("modality")
        self.ids, self.labels, self.splits, self.meta = h["ids"], h["labels"], h["splits"], h["meta"]
        self.done = self._f["done"][:].astype(bool)
        self.error = self._f["error"].asstr()[:] if "error" in self._f else np.full(len(self.ids), "", object)

    def _layer(self, layer):
        L = self.num_layers
        if not -L <= int(layer) < L:
            raise FeatxError(f"layer {layer} is out of range: {self.path} has {L} layers (0..{L - 1}, "
                             "negative counts from the end)")
        return int(layer) % L

    def _pooled(self, pooling):
        if pooling not in self.poolings:
            raise FeatxError(f"{self.path} has no pooling {pooling!r} (it has {', '.join(self.poolings)})")
        return self._f[f"pooled/{pooling}"]

    def layer(self, layer, pooling="mean", only_done=True, dtype=np.float32):
        """One layer for every item: (N_done, D) in manifest order ((N, D) with only_done=False), as float32,
        or in the stored dtype with dtype=None (no conversion: the fastest read)."""
        ds = self._pooled(pooling)
        keep = self.done if only_done and not self.done.all() else None  # mask only when something is missing
        if dtype is None or np.dtype(dtype) == ds.dtype:
            x = ds[:, self._layer(layer), :]
            return x if keep is None else x[keep]
        n = len(self.ids) if keep is None else int(keep.sum())
        out = np.empty((n, self.hidden_size), dtype)
        self._read_into(out, ds, self._layer(layer), keep)
        return out

    def pooled(self, pooling="mean", layers=None, only_done=True):
        """Layers `layers` (default all; negative count from the end): (N_done, L', D) float32, manifest order."""
        ds = self._pooled(pooling)
        chosen = range(self.num_layers) if layers is None else [self._layer(layer) for layer in layers]
        keep = self.done if only_done and not self.done.all() else None
        n = len(self.ids) if keep is None else int(keep.sum())
        out = np.empty((n, len(chosen), self.hidden_size), np.float32)
        for j, layer in enumerate(chosen):  # one layer at a time: reads follow the chunks
            self._read_into(out[:, j], ds, layer, keep)
        return out

    @staticmethod
    def _read_into(out, ds, layer, keep):
        """out[:] = ds[keep, layer, :] cast to out's dtype, in blocks of rows: torch's vectorised cast runs
        ~3x faster than numpy's float16 -> float32, and the stored-dtype block stays small."""
        import torch

        o, at = torch.from_numpy(out), 0  # a view, strided too (out[:, j] of pooled())
        rows = _READ_ROWS
        for s in range(0, ds.shape[0], rows):
            block = ds[s:s + rows, layer, :]
            if keep is not None:
                block = block[keep[s:s + rows]]
            o[at:at + len(block)].copy_(torch.from_numpy(block))
            at += len(block)

    def sequence(self, i):
        """Item i's (manifest index) per-position states: (T_i, L, D) float32; T_i = 0 if it is not done."""
        if not self.has_seq:
            raise FeatxError(f"{self.path} holds no sequences (extract with --seq)")
        if not 0 <= int(i) < len(self.ids):
            raise FeatxError(f"item {i} is out of range: {self.path} has {len(self.ids)} items")
        lo, hi = self._f["seq/offsets"][int(i):int(i) + 2]
        return self._f["seq/data"][lo:hi].astype(np.float32)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_cache(path) -> Cache:
    """A read-only Cache over the consolidated file at `path`."""
    return Cache(path)


def read_layer(path, layer, pooling="mean") -> LayerData:
    """One layer of the done items, in manifest order.

    Returns LayerData(features (N_done, D) float32, ids (N_done,), labels (N_done,) or None,
    splits (N_done,) or None).
    """
    with Cache(path) as c:
        d = c.done
        return LayerData(c.layer(layer, pooling), c.ids[d], None if c.labels is None else c.labels[d],
                         None if c.splits is None else c.splits[d])


def describe(path) -> str:
    """Multi-line summary of a cache for `featx info`; counts unmerged parts too (a killed run's leftovers)."""
    path = os.fspath(path)
    parts, settings_file = _part_files(path), os.path.join(_parts_dir(path), "settings.json")
    if os.path.exists(path):
        with _open_h5(path) as f:
            h = _read_header(f)
        s = {"attrs": h["attrs"], "n_items": len(h["ids"]), **{k: h[k] for k in
             ("poolings", "dtype", "seq", "num_layers", "hidden_size")}}
    elif os.path.exists(settings_file):
        with open(settings_file, encoding="utf-8") as f:
            s = json.load(f)
    else:
        raise FeatxError(f"no cache at {path}")
    sources = ([path] if os.path.exists(path) else []) + parts
    state = _scan(sources, s["n_items"])
    c = _counts(state, path)
    shown = ("model", "modality") + _OWN_ATTRS
    other = ", ".join(f"{k}={v}" for k, v in sorted(s["attrs"].items()) if k not in shown)
    lines = [path,
             f"  model      {s['attrs'].get('model')} ({s['attrs'].get('modality')})",
             f"  items      {s['n_items']}: {c['done']} done, {c['failed']} failed, {c['pending']} pending",
             f"  layers     {s['num_layers']} (hidden size {s['hidden_size']})",
             f"  poolings   {', '.join(s['poolings'])}",
             f"  dtype      {s['dtype']}",
             f"  sequences  {'yes' if s['seq'] else 'no'}",
             f"  size       {_size(sum(os.path.getsize(p) for p in sources))}"]
    if other:
        lines.append(f"  settings   {other}")
    if parts:
        lines.append(f"  unmerged   {len(parts)} parts in {_parts_dir(path)} (a killed run? run the same "
                     "extraction again to resume and merge them)")
    elif not os.path.exists(path):
        lines.append("  unmerged   a run started here but stored nothing yet")
    bad = np.flatnonzero(state.error != "")
    if len(bad):
        lines.append(f"  errors     first {min(len(bad), _SHOWN_ERRORS)} of {len(bad)}:")
        lines += [f"    {state.ids[i]}: {state.error[i]}" for i in bad[:_SHOWN_ERRORS]]
    return "\n".join(lines)


def merge_caches(paths, out_path) -> dict:
    """Combine caches of the same ids and settings (e.g. one shard per rank) into one consolidated file.

    paths: consolidated cache files; an item done in several is taken from the last. out_path may be one of
    them (it is replaced atomically) but must not be another existing file.
    Returns {"done": n, "failed": n, "pending": n, "path": out_path}.
    """
    paths, out_path = [os.fspath(p) for p in paths], os.fspath(out_path)
    if not paths:
        raise FeatxError("merge_caches needs at least one cache")
    if os.path.exists(out_path) and not any(os.path.exists(p) and os.path.samefile(p, out_path) for p in paths):
        raise FeatxError(f"{out_path} already exists; choose another output or remove it")
    with _open_h5(paths[0]) as f:
        header, base = _read_header(f), _final_settings(f)
    for p in paths[1:]:
        with _open_h5(p) as f:
            diffs = _settings_diff(base, _final_settings(f))
        if diffs:
            raise FeatxError(f"cannot merge {p} with {paths[0]}: different settings: {', '.join(diffs)}")
    state = _scan(paths, len(header["ids"]))
    _consolidate(out_path, paths, state, header)
    return _counts(state, out_path)
