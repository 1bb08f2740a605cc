"""A cache's pooled layers, labels and splits read into memory for probing."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from featx.cache import open_cache
from featx.cache.reader import no_cache_error
from featx.errors import FeatxError
from featx.naming import display_name
from featx.settings import canonical_split, resolve_layers

# Label values that mean "no label" (compared case-insensitively after stripping).
MISSING_LABELS = frozenset({"", "n/a", "na", "nan", "none", "null", "-"})


@dataclass
class CacheData:
    """One cache's done, labelled items: X (N, L', W) for `layers`, ids (N,), y (N,) float64 or str,
    splits (N,) canonical names or None; unlabeled: how many done items had no label (left out; their ids in
    unlabeled_ids); failed and
    pending: how many items are not done in the cache (left out): failed at extraction (an error is recorded),
    or never extracted (no error recorded, e.g. a merged cache's missing part).
    layer_widths: each chosen layer's width when the cache's layers differ in width (a CNN's stages), else
    None; W is then the widest chosen one, layer j's features beyond layer_widths[j] are zeros and
    `features(j)` cuts them off. hidden_size: the cache's (the widest layer's)."""
    path: str
    encoder: str
    modality: str
    num_layers: int
    hidden_size: int
    layers: list
    X: np.ndarray
    ids: np.ndarray
    y: np.ndarray
    splits: object
    unlabeled: int = 0
    name: str = ""  # the display name (featx.naming.cache_names), set by the sweep
    layer_widths: list = None
    failed: int = 0
    pending: int = 0
    unlabeled_ids: tuple = ()   # the ids of the done items left out for want of a label


    def width(self, j) -> int:
        """The number of features of the j-th chosen layer (X[:, j])."""
        return self.X.shape[2] if self.layer_widths is None else self.layer_widths[j]

    def features(self, j, X=None) -> np.ndarray:
        """(N, width(j)): the j-th chosen layer of X (default self.X), its zero padding cut off."""
        X = self.X if X is None else X
        return X[:, j, :self.width(j)]


def read_labels(raw, ids, task="auto"):
    """(y (N,), labelled (N,) bool) from a cache's stored labels.

    A column whose non-missing values are all numbers is numeric (float64, NaN where missing); otherwise the
    values are class names (str). task "regression" requires numbers, "classification" makes numbers class
    names ("1", "2.5"). A non-finite number is a FeatxError naming the item."""
    raw = np.asarray(raw)
    if raw.dtype.kind in "fiub":
        values = raw.astype(np.float64)
    else:
        text = np.asarray([("" if v is None else (v.decode() if isinstance(v, bytes) else str(v))).strip()
                           for v in raw], dtype=object)
        missing = np.asarray([t.lower() in MISSING_LABELS for t in text], bool)
        values = _as_numbers(text, missing)
        if values is None:
            if task == "regression":
                bad = next(t for t, m in zip(text, missing) if not m and _number(t) is None)
                raise FeatxError(f"task regression needs numeric labels, but the label column holds {bad!r}")
            return text, ~missing
    inf = np.isinf(values)
    if inf.any():
        raise FeatxError(f"item {str(ids[int(np.flatnonzero(inf)[0])])!r} has a non-finite label "
                         f"({values[inf][0]:g}); fix or remove it")
    labelled = ~np.isnan(values)
    if task == "classification":
        return np.asarray([class_name(v) if ok else "" for v, ok in zip(values, labelled)], dtype=object), labelled
    return values, labelled


def class_name(value) -> str:
    """A numeric label as a class name: short ("1", "2.5"), one per number (-0.0 is 0.0's "0"; a value that six
    significant digits would round, 1.0000001, keeps every digit it needs)."""
    value = float(value) + 0.0   # -0.0 + 0.0 is 0.0
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def _as_numbers(text, missing):
    """float64 values (NaN where missing) when every non-missing text is a number, else None."""
    out = np.full(len(text), np.nan)
    for i, (t, m) in enumerate(zip(text, missing)):
        if m:
            continue
        v = _number(t)
        if v is None:
            return None
        out[i] = v
    return out if (~missing).any() else None


def _splits(raw, path):
    names = {}
    for v in np.unique(np.asarray(raw).astype(str)):
        try:
            names[v] = canonical_split(v)
        except FeatxError as e:
            raise FeatxError(f"{path}: {e}")
    return np.asarray([names[v] for v in np.asarray(raw).astype(str)], dtype=object)


def load_cache(path, pool="mean", layers="all", need_labels=True, task="auto") -> CacheData:
    """Read the pooled layers of a cache (featx.cache.open_cache) into memory; the file is closed after.

    Items that are not done are left out (counted in CacheData.failed and .pending). With need_labels, items
    without a label are left out (counted in CacheData.unlabeled). Layers of
    differing widths: X is as wide as the widest chosen layer (one layer: exactly its width)."""
    if not os.path.exists(path):
        raise no_cache_error(path)   # with a hint when a killed run left its parts
    with open_cache(path) as c:
        L = int(c.num_layers)
        chosen = resolve_layers(layers, L, where=str(path))
        if pool not in list(c.poolings):
            raise FeatxError(f"{path}: no pooling {pool!r} (has {', '.join(map(str, c.poolings))})")
        if c.labels is None and need_labels:
            raise FeatxError(f"{path}: the cache has no labels to probe")
        done = np.asarray(c.done, bool)
        errored = np.asarray([str(e) != "" for e in c.error], bool)
        failed, pending = int((~done & errored).sum()), int((~done & ~errored).sum())
        ids = np.asarray(c.ids)[done].astype(str)
        keep = np.ones(len(ids), bool)
        y = None
        if need_labels:
            y, keep = read_labels(np.asarray(c.labels)[done], ids, task)
        elif c.labels is not None:
            y = np.asarray(c.labels)[done]
        if need_labels and not keep.any():
            raise FeatxError(f"{path}: none of the {len(ids)} done items has a label")
        X = np.asarray(c.pooled(pool, chosen), dtype=np.float32)
        splits = None if c.splits is None else _splits(np.asarray(c.splits)[done], path)
        model, modality, hidden = str(c.model), str(c.modality), int(c.hidden_size)
        widths = None if c.layer_widths is None else [c.width(layer) for layer in chosen]
    unlabeled_ids = tuple(ids[~keep].tolist())
    if not keep.all():
        X, ids, y = X[keep], ids[keep], y[keep]
        splits = None if splits is None else splits[keep]
    return CacheData(str(path), model, modality, L, hidden, chosen, X, ids, y, splits, int((~keep).sum()),
                     display_name(model), widths, failed, pending, unlabeled_ids)
