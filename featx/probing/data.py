"""A cache's pooled layers, labels and splits read into memory for probing."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from featx.cache import open_cache
from featx.errors import FeatxError


@dataclass
class CacheData:
    """One cache's done items: X (N, L', D) for `layers`, ids (N,), y (N,), splits (N,) or None."""
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


def load_cache(path, pool="mean", layers="all", need_labels=True) -> CacheData:
    """Read the pooled layers of a cache (featx.cache.open_cache) into memory; the file is closed after."""
    if not os.path.exists(path):
        raise FeatxError(f"no such cache: {path}")
    with open_cache(path) as c:
        L = int(c.num_layers)
        if layers in (None, "all"):
            chosen = list(range(L))
        else:
            chosen = [int(v) for v in (layers.split(",") if isinstance(layers, str) else layers)]
            chosen = [v + L if v < 0 else v for v in chosen]
            bad = [v for v in chosen if not 0 <= v < L]
            if bad:
                raise FeatxError(f"{path}: layers {bad} out of range 0..{L - 1}")
        if pool not in list(c.poolings):
            raise FeatxError(f"{path}: no pooling {pool!r} (has {', '.join(map(str, c.poolings))})")
        if c.labels is None and need_labels:
            raise FeatxError(f"{path}: the cache has no labels to probe")
        done = np.asarray(c.done, bool)
        X = np.asarray(c.pooled(pool, chosen), dtype=np.float32)
        y = None if c.labels is None else np.asarray(c.labels)[done]
        splits = None if c.splits is None else np.asarray([str(s).lower() for s in np.asarray(c.splits)[done]])
        return CacheData(str(path), str(c.model), str(c.modality), L, int(c.hidden_size), chosen, X,
                         np.asarray(c.ids)[done].astype(str), y, splits)
