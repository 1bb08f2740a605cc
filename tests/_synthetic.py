"""Planted caches for the probing tests, written through featx.cache.CacheWriter, so they follow the schema.

`planted(...)` draws features where only layer `k` carries the label (other layers are noise), so a probe
sweep has a right answer.
"""
from __future__ import annotations

import numpy as np

from featx.cache import CacheWriter


def write_cache(path, pooled, ids, labels=None, splits=None, model="toy/encoder", modality="text",
                done=None, seq=None, pooling="mean", failed=None):
    """Write a cache. pooled: (N, L, D); seq: optional list of N arrays (T_i, L, D); done: (N,) bool, the
    items written (the others stay pending); failed: (N,) bool, items recorded as failed at extraction (not
    written, with an error, as featx extract records a corrupt file)."""
    pooled = np.asarray(pooled)
    N, L, D = pooled.shape
    dtype = "float16" if pooled.dtype == np.float16 else "float32"
    with CacheWriter(path, ids=list(ids), attrs={"model": model, "modality": modality}, poolings=[pooling],
                     num_layers=L, hidden_size=D, dtype=dtype, seq=seq is not None,
                     labels=None if labels is None else list(labels),
                     splits=None if splits is None else list(splits)) as w:
        written = np.ones(N, bool) if done is None else np.asarray(done, bool).copy()
        if failed is not None:
            written &= ~np.asarray(failed, bool)
            w.fail(np.flatnonzero(failed), "cannot decode the file")
        idx = np.flatnonzero(written)
        w.write(idx, {pooling: pooled[idx]}, None if seq is None else [seq[i] for i in idx])
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
