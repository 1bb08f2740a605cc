"""Planted caches for the probing tests, written with h5py following the store's file contract.

`planted(...)` draws features where only layer `k` carries the label (other layers are noise), so a probe
sweep has a right answer. Switch to featx.cache.store.CacheWriter once it exists.
"""
from __future__ import annotations

import h5py
import numpy as np


def write_cache(path, pooled, ids, labels=None, splits=None, model="toy/encoder", modality="text",
                done=None, seq=None, pooling="mean"):
    """Write an HDF5 cache. pooled: (N, L, D); seq: optional list of N arrays (T_i, L, D)."""
    N, L, D = pooled.shape
    s = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update(model=model, modality=modality, num_layers=L, hidden_size=D, poolings=pooling,
                       dtype=str(pooled.dtype))
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=s)
        f.create_dataset("done", data=np.ones(N, bool) if done is None else np.asarray(done, bool))
        f.create_dataset("error", data=np.asarray([""] * N, dtype=object), dtype=s)
        f.create_dataset(f"pooled/{pooling}", data=pooled)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.dtype.kind in "OUS":
                f.create_dataset("label", data=labels.astype(object), dtype=s)
            else:
                f.create_dataset("label", data=labels.astype(np.float64))
        if splits is not None:
            f.create_dataset("split", data=np.asarray(splits, dtype=object), dtype=s)
        if seq is not None:
            f.create_dataset("seq/data", data=np.concatenate(seq, axis=0))
            f.create_dataset("seq/offsets", data=np.concatenate([[0], np.cumsum([len(x) for x in seq])]).astype(np.int64))
    return str(path)


def standard_splits(n, seed=0, fractions=(0.6, 0.2, 0.2)):
    """(n,) array of train/dev/test in the given proportions, shuffled."""
    rng = np.random.default_rng(seed)
    n_tr, n_dev = int(fractions[0] * n), int(fractions[1] * n)
    s = np.array(["train"] * n_tr + ["dev"] * n_dev + ["test"] * (n - n_tr - n_dev), dtype=object)
    return s[rng.permutation(n)]


def planted(n=300, num_layers=5, dim=16, k=3, task="regression", seed=0, signal=None, noise=1.0):
    """(X (n, L, D) float32, y): only layer k carries the label.

    regression: y in [-3, 3]; classification: three string classes. Layer k holds a noisy linear code of
    the label in a few dimensions; every other layer is Gaussian noise. `signal` (n,) overrides the latent.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n) if signal is None else np.asarray(signal, dtype=np.float64)
    X = rng.standard_normal((n, num_layers, dim)).astype(np.float32)
    X[:, k, :4] += (z[:, None] * np.array([1.5, -1.0, 0.7, 1.2]) / noise).astype(np.float32)
    if task == "regression":
        y = np.clip(np.round(z * 1.2 * 3) / 3, -3, 3)   # MOSI-like thirds
    else:
        y = np.where(z > 0.4, "pos", np.where(z < -0.4, "neg", "neu")).astype(object)
    return X, y
