"""Reading a consolidated cache, validated against featx.cache.schema: `Cache`, `open_cache`, `read_layer`.

Every file is checked before any array is read: no links or external storage, root attributes of the schema's
types, every dataset of the schema's shape and dtype. A checksum that fails on read is one FeatxError naming
the dataset.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import stat
import warnings

import h5py
import numpy as np

from featx.cache import schema
from featx.errors import FeatxError, first_line

__all__ = ["Cache", "LayerData", "open_cache", "read_layer"]

READ_ROWS = 4096  # items per block when a layer is read and cast
VERIFY_BYTES = 64 << 20  # bytes per block when every chunk is read to check its checksum

LayerData = collections.namedtuple("LayerData", "features ids labels splits")


def plain(v):
    """An HDF5 attribute value as plain Python (bytes -> str, numpy scalar -> int/float/bool)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v.item() if isinstance(v, np.generic) else v


@contextlib.contextmanager
def reading(path, name):
    """Turn HDF5's read errors (a failed Fletcher-32 checksum among them) into one line naming the dataset."""
    try:
        yield
    except OSError as e:
        raise FeatxError(f"{path}: dataset {name} is damaged: a checksum or structure check failed "
                         f"({first_line(e)})") from None


def check_regular_file(path):
    """FeatxError unless `path` is a regular file: a FIFO or a device would block or never end."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise FeatxError(f"{path} is not a regular file")


def open_file(path):
    """An HDF5 file opened read-only after checking it is a regular file with no links out of it."""
    check_regular_file(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FeatxError(f"{path} is not a readable HDF5 file ({first_line(e)})") from None
    try:
        check_links(f, path)
    except BaseException:
        f.close()
        raise
    return f


def check_links(f, path):
    """Refuse soft and external links anywhere in the file (HDF5 would follow them out of it)."""
    found = []
    f.id.links.visit(lambda name, info: found.append(name) if info.type != h5py.h5l.TYPE_HARD else None,
                     info=True)
    if found:
        raise FeatxError(f"{path}: /{found[0].decode('utf-8', 'replace')} is a soft or external link; "
                         "a featx cache holds no links")


def check_dataset(f, name, path, shape, kind, dtype=None):
    """f[name], checked: a dataset stored in the file, of `shape`, of kind "str" | "bool" | "int" | "float"
    (or exactly `dtype`), declaring no more bytes than its file could hold."""
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise FeatxError(f"{path}: {name} is not a dataset")
    if ds.is_virtual or ds.id.get_create_plist().get_external_count():
        raise FeatxError(f"{path}: dataset {name} stores its data outside the file; "
                         "a featx cache holds its data itself")
    found, dt = ds.shape, ds.dtype
    if found != tuple(shape):
        raise FeatxError(f"{path}: dataset {name} has shape {found}, the format needs {tuple(shape)}")
    is_str = h5py.check_string_dtype(dt) is not None
    ok = {"str": is_str, "bool": dt == np.bool_, "int": dt.kind in "iu", "float": dt.kind == "f",
          "number": dt.kind in "iuf"}[kind]
    if not ok or (dtype is not None and dt != np.dtype(dtype)):
        raise FeatxError(f"{path}: dataset {name} has dtype {dt}, the format needs {dtype or kind}")
    if int(np.prod(found, dtype=np.float64)) * max(dt.itemsize, 16 if is_str else 1) > \
            schema.MAX_INFLATION * max(f.id.get_filesize(), 1):
        raise FeatxError(f"{path}: dataset {name} declares {found}, more than the file could hold")
    return ds


def _attrs(f, path):
    """Root attributes as plain Python, each a str, bool, int or float of the schema's type."""
    out = {}
    for k in f.attrs:
        try:
            v = plain(f.attrs[k])
        except (OSError, TypeError, ValueError) as e:
            raise FeatxError(f"{path}: attribute {k} cannot be read ({first_line(e)})") from None
        want = schema.ATTR_TYPES.get(k)
        if not isinstance(v, schema.SETTING_TYPES) or (want is not None and (
                not isinstance(v, want) or (want is int and isinstance(v, bool)))):
            raise FeatxError(f"{path}: attribute {k} is a {type(v).__name__}, the format needs "
                             f"{(want or str).__name__ if want else 'a str, bool, int or float'}")
        out[k] = v
    if "model" not in out:
        raise FeatxError(f"{path} is not a featx cache (it lacks the model attribute)")
    if out.get("modality", "text") not in schema.MODALITIES:
        raise FeatxError(f"{path}: modality {out['modality']!r} is not one of {', '.join(schema.MODALITIES)}")
    return out


def _layout(f, attrs, path, n):
    """(poolings, num_layers, hidden_size, dtype), each pooled/<p> checked to be (n, L, D) of the dtype."""
    if not isinstance(f.get(schema.POOLED), h5py.Group):
        raise FeatxError(f"{path} is not a featx cache (it lacks the pooled group)")
    poolings = [p for p in attrs.get("poolings", "").split(",") if p] or list(f[schema.POOLED])
    if not poolings:
        raise FeatxError(f"{path}: the pooled group holds no pooling")
    first = f.get(schema.pooled_name(poolings[0]))
    shape = getattr(first, "shape", ())
    L = attrs.get("num_layers", shape[1] if len(shape) == 3 else 0)
    D = attrs.get("hidden_size", shape[2] if len(shape) == 3 else 0)
    dtype = attrs.get("dtype", getattr(first, "dtype", np.dtype("f4")).name)
    if dtype not in schema.DTYPES or L < 1 or D < 1:
        raise FeatxError(f"{path}: dtype {dtype!r}, {L} layers, hidden size {D} do not fit the format")
    for p in poolings:
        check_dataset(f, schema.pooled_name(p), path, (n, L, D), "float", dtype)
    return poolings, int(L), int(D), dtype


def _strings(f, name, path, n):
    ds = check_dataset(f, name, path, (n,), "str")
    with reading(path, name):
        return ds.asstr()[:].astype(object)


def _meta(f, path, n):
    """{column name: (n,) str}: names from meta's `columns` attribute, or the dataset keys (format 1.0)."""
    if schema.META not in f:
        return {}
    group = f[schema.META]
    if not isinstance(group, h5py.Group):
        raise FeatxError(f"{path}: {schema.META} is not a group")
    if schema.META_COLUMNS not in group.attrs:
        return {k: _strings(f, f"{schema.META}/{k}", path, n) for k in group}
    try:
        names = json.loads(plain(group.attrs[schema.META_COLUMNS]))
    except (TypeError, ValueError, OSError):
        names = None
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names) or len(names) != len(group):
        raise FeatxError(f"{path}: attribute meta/columns does not name the meta datasets")
    return {name: _strings(f, schema.meta_name(k), path, n) for k, name in enumerate(names)}


def _labels(f, path, n):
    if schema.LABEL not in f:
        return None
    ds = f.get(schema.LABEL)
    if isinstance(ds, h5py.Dataset) and h5py.check_string_dtype(ds.dtype) is not None:
        return _strings(f, schema.LABEL, path, n)
    ds = check_dataset(f, schema.LABEL, path, (n,), "number")
    with reading(path, schema.LABEL):
        return ds[:].astype(np.float64)


def fingerprints(f, path, n):
    """(n,) uint64: the fingerprint dataset of a file or part (each item's source when it was computed), zeros
    (not known) where the file has none."""
    if schema.FINGERPRINT not in f:
        return np.zeros(n, np.uint64)
    ds = check_dataset(f, schema.FINGERPRINT, path, (n,), "int")
    with reading(path, schema.FINGERPRINT):
        return ds[:].astype(np.uint64)


def seq_offsets(f, path, n, num_layers, hidden_size, dtype):
    """(n+1,) int64 offsets of seq/data, checked to start at 0, never decrease and end at its length."""
    data = f.get(schema.SEQ_DATA)
    rows = data.shape[0] if isinstance(data, h5py.Dataset) and data.ndim == 3 else -1
    check_dataset(f, schema.SEQ_DATA, path, (max(rows, 0), num_layers, hidden_size), "float", dtype)
    ds = check_dataset(f, schema.SEQ_OFFSETS, path, (n + 1,), "int")
    with reading(path, schema.SEQ_OFFSETS):
        offsets = ds[:].astype(np.int64)
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != rows:
        raise FeatxError(f"{path}: seq/offsets do not index seq/data (they must rise from 0 to {rows})")
    return offsets


def read_header(f, path):
    """Everything of a consolidated file but the arrays of features, as plain Python / numpy, validated.

    Returns {ids (N,), done (N,) bool, error (N,), fingerprints (N,) uint64 (zeros in a file without them), attrs, version, poolings, num_layers, hidden_size, dtype,
    layer_widths (L ints, or None when every layer is hidden_size wide), seq (bool), offsets (N+1,) or None,
    labels (N,) or None, splits (N,) or None, meta {column: (N,)}}.
    """
    attrs = _attrs(f, path)
    version = schema.check_version(attrs, path)
    if schema.IDS not in f or schema.DONE not in f:
        raise FeatxError(f"{path} is not a featx cache (it lacks ids or done)")
    ids_ds = f[schema.IDS]
    n = ids_ds.shape[0] if isinstance(ids_ds, h5py.Dataset) and ids_ds.ndim == 1 else -1
    ids = _strings(f, schema.IDS, path, max(n, 0))
    with reading(path, schema.DONE):
        done = check_dataset(f, schema.DONE, path, (n,), "bool")[:]
    error = _strings(f, schema.ERROR, path, n) if schema.ERROR in f else np.full(n, "", object)
    poolings, L, D, dtype = _layout(f, attrs, path, n)
    seq = schema.SEQ in f
    widths = attrs.get(schema.LAYER_WIDTHS)
    widths = None if widths is None else schema.parse_widths(widths, L, D, path)
    return {"ids": ids, "done": done, "error": error, "fingerprints": fingerprints(f, path, n),
            "attrs": attrs, "version": version,
            "poolings": poolings, "num_layers": L, "hidden_size": D, "dtype": dtype, "seq": seq,
            "layer_widths": widths,
            "offsets": seq_offsets(f, path, n, L, D, dtype) if seq else None, "labels": _labels(f, path, n),
            "splits": _strings(f, schema.SPLIT, path, n) if schema.SPLIT in f else None,
            "meta": _meta(f, path, n)}


def verify_checksums(f, path):
    """Read every dataset of `f` once, so a damaged chunk (Fletcher-32) or string heap raises FeatxError."""
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    for name in names:
        ds = f[name]
        row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
        step = max(1, VERIFY_BYTES // row)
        with reading(path, name):
            for lo in range(0, ds.shape[0] if ds.ndim else 1, step):
                ds[lo:lo + step] if ds.ndim else ds[()]


def no_cache_error(path):
    hint = ""
    if os.path.isdir(schema.parts_dir(path)):
        hint = (f"; a killed run left parts in {schema.parts_dir(path)}: run the same extraction again to resume "
                "(`featx info` shows its progress)")
    return FeatxError(f"no cache at {path}{hint}")


def open_validated(path):
    """(open h5py.File, header) of the consolidated cache at `path`; FeatxError (one line) when it is not one."""
    if not os.path.exists(path):
        raise no_cache_error(path)
    f = open_file(path)
    try:
        return f, read_header(f, path)
    except BaseException:
        f.close()
        raise


def _has_parts(path):
    folder = schema.parts_dir(path)
    return os.path.isdir(folder) and any(schema.part_counter(x) is not None for x in os.listdir(folder))


class Cache:
    """Read-only view of a consolidated cache file.

    Attributes: path, attrs (dict), model, modality, num_layers (L), hidden_size (D: the widest layer's width),
    layer_widths (L ints, or None when every layer is D wide), poolings (list), dtype, has_seq, ids (N,) str, done (N,) bool, error (N,) str, labels (N,) float64|str or None,
    splits (N,) str or None, meta {column: (N,) str}, format_version, fingerprints (N,) uint64 (each done item's
    source when it was computed; 0: not known).
    Raises FeatxError if the file is missing, not a featx cache or not of the schema; warns if unmerged parts exist.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._f, h = open_validated(self.path)
        if _has_parts(self.path):
            warnings.warn(f"{self.path} has unmerged parts in {schema.parts_dir(self.path)} (a killed run?); "
                          "run the same extraction again to merge them", stacklevel=2)
        self.attrs, self.poolings, self.dtype, self.has_seq = h["attrs"], h["poolings"], h["dtype"], h["seq"]
        self.num_layers, self.hidden_size, self.format_version = h["num_layers"], h["hidden_size"], h["version"]
        self.model, self.modality = self.attrs["model"], self.attrs.get("modality")
        self.ids, self.labels, self.splits, self.meta = h["ids"], h["labels"], h["splits"], h["meta"]
        self.done, self.error, self._offsets = h["done"].astype(bool), h["error"], h["offsets"]
        self.layer_widths = h["layer_widths"]
        self.fingerprints = h["fingerprints"]

    def width(self, layer) -> int:
        """The number of features of `layer` (its stored values beyond it are zero padding)."""
        return self.hidden_size if self.layer_widths is None else self.layer_widths[self._layer(layer)]

    def _layer(self, layer):
        L = self.num_layers
        if not -L <= int(layer) < L:
            raise FeatxError(f"layer {layer} is out of range: {self.path} has {L} layers (0..{L - 1}, "
                             "negative counts from the end)")
        return int(layer) % L

    def _pooled(self, pooling):
        if pooling not in self.poolings:
            raise FeatxError(f"{self.path} has no pooling {pooling!r} (it has {', '.join(self.poolings)})")
        return self._f[schema.pooled_name(pooling)]

    def layer(self, layer, pooling="mean", only_done=True, dtype=np.float32):
        """One layer for every item: (N_done, D_l) in manifest order ((N, D_l) with only_done=False), D_l = its
        width (the padding of a narrower layer cut off), as float32, or in the stored dtype with dtype=None (no
        conversion: the fastest read)."""
        ds, w = self._pooled(pooling), self.width(layer)
        keep = self.done if only_done and not self.done.all() else None  # mask only when something is missing
        if dtype is None or np.dtype(dtype) == ds.dtype:
            with reading(self.path, ds.name.lstrip("/")):
                x = ds[:, self._layer(layer), :w]
            return x if keep is None else x[keep]
        n = len(self.ids) if keep is None else int(keep.sum())
        out = np.empty((n, w), dtype)
        self._read_into(out, ds, self._layer(layer), keep)
        return out

    def pooled(self, pooling="mean", layers=None, only_done=True):
        """Layers `layers` (default all; negative count from the end): (N_done, L', W) float32, manifest order;
        W = the widest of those layers' widths (layer j's features beyond self.width(layers[j]) are zeros)."""
        ds = self._pooled(pooling)
        chosen = range(self.num_layers) if layers is None else [self._layer(layer) for layer in layers]
        keep = self.done if only_done and not self.done.all() else None
        n = len(self.ids) if keep is None else int(keep.sum())
        out = np.empty((n, len(chosen), max([self.width(layer) for layer in chosen], default=0)), np.float32)
        for j, layer in enumerate(chosen):  # one layer at a time: reads follow the chunks
            self._read_into(out[:, j], ds, layer, keep)
        return out

    def _read_into(self, out, ds, layer, keep):
        """out[:] = ds[keep, layer, :] cast to out's dtype, in blocks of rows: torch's vectorised cast runs
        ~3x faster than numpy's float16 -> float32, and the stored-dtype block stays small."""
        import torch

        o, at = torch.from_numpy(out), 0  # a view, strided too (out[:, j] of pooled())
        with reading(self.path, ds.name.lstrip("/")):
            for s in range(0, ds.shape[0], READ_ROWS):
                block = ds[s:s + READ_ROWS, layer, :out.shape[-1]]
                if keep is not None:
                    block = block[keep[s:s + READ_ROWS]]
                o[at:at + len(block)].copy_(torch.from_numpy(block))
                at += len(block)

    def sequence(self, i):
        """Item i's (manifest index) per-position states: (T_i, L, D) float32; T_i = 0 if it is not done.
        (Caches of layers of differing widths hold no sequences.)"""
        if not self.has_seq:
            raise FeatxError(f"{self.path} holds no sequences (extract with --seq)")
        if not 0 <= int(i) < len(self.ids):
            raise FeatxError(f"item {i} is out of range: {self.path} has {len(self.ids)} items")
        lo, hi = self._offsets[int(i):int(i) + 2]
        with reading(self.path, schema.SEQ_DATA):
            return self._f[schema.SEQ_DATA][lo:hi].astype(np.float32)

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

    Returns LayerData(features (N_done, D_l) float32 (D_l: the layer's width), ids (N_done,), labels (N_done,) or None,
    splits (N_done,) or None).
    """
    with Cache(path) as c:
        d = c.done
        return LayerData(c.layer(layer, pooling), c.ids[d], None if c.labels is None else c.labels[d],
                         None if c.splits is None else c.splits[d])
