"""Linear centred kernel alignment (CKA) between layers, from arrays or from HDF5 caches.

Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited". The plain (biased) estimator
uses HSIC_0 = tr(K H L H) / (n-1)^2; the debiased one uses the unbiased HSIC estimator of Song et al. 2012,
which matters when the number of items n is small relative to the feature size (the plain one drifts towards 1).
For linear kernels both reduce to sums over centred features, so no n x n kernel is needed unless it is cheaper.
"""
from __future__ import annotations

from contextlib import ExitStack, closing
from dataclasses import dataclass

import numpy as np

from featx.errors import FeatxError

# One float64 n x n Gram matrix per layer is much faster than D x D cross-products per pair; this caps its memory.
_GRAM_BYTES = 512 * 2**20


def _centre(X):
    X = np.asarray(X, dtype=np.float64)
    return X - X.mean(axis=0, keepdims=True)


def _check_n(n, debiased):
    if debiased and n < 4:
        raise FeatxError(f"debiased CKA needs at least 4 items, got {n}")
    if n < 2:
        raise FeatxError(f"CKA needs at least 2 items, got {n}")


def _hsic(xty, rows_x, rows_y, n, debiased):
    """HSIC (up to a factor common to numerator and denominator of CKA) from centred-feature statistics.

    xty: ||X^T Y||_F^2 = <K, L>_F for centred X, Y; rows_x, rows_y: (n,) squared row norms (diagonals of K, L).
    """
    if not debiased:
        return xty
    # Unbiased HSIC of Song et al. 2012, written with the centred features (Kornblith et al.'s form).
    sx, sy = rows_x.sum(), rows_y.sum()
    return xty - n / (n - 2.0) * rows_x.dot(rows_y) + sx * sy / ((n - 1.0) * (n - 2.0))


def _cka(xty, xtx, yty, rows_x, rows_y, n, debiased):
    den2 = _hsic(xtx, rows_x, rows_x, n, debiased) * _hsic(yty, rows_y, rows_y, n, debiased)
    if den2 <= 0:
        return float("nan")  # a constant representation: CKA is undefined
    return float(_hsic(xty, rows_x, rows_y, n, debiased) / np.sqrt(den2))


def linear_cka(X, Y, debiased=False):
    """Linear CKA between two representations of the same n items.

    X: (n, D_x); Y: (n, D_y). Returns a float, 1.0 for representations equal up to an orthogonal transform,
    an isotropic scaling and a translation; nan if either is constant.
    """
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise FeatxError(f"CKA needs 2-D arrays (items, features), got shapes {X.shape} and {Y.shape}")
    return float(cka_matrix(X[:, None], Y[:, None], debiased=debiased)[0, 0])


def _layers(A, name):
    """A list of L (n, D_l) arrays from an (n, L, D) array or from a list of L (n, D_l) arrays (layers of
    differing widths, e.g. a CNN's stages)."""
    if isinstance(A, (list, tuple)):
        out = [np.asarray(a) for a in A]
        if not out or any(a.ndim != 2 or len(a) != len(out[0]) for a in out):
            raise FeatxError(f"{name} must be a list of (items, features) arrays of the same items")
        return out
    A = np.asarray(A)
    if A.ndim != 3:
        raise FeatxError(f"{name} must have shape (items, layers, features), got {A.shape}")
    return [A[:, i] for i in range(A.shape[1])]


def _products(layers, small):
    """Per layer, what CKA's pair products use, layer by layer so only that is kept: (its n x n Gram matrix
    X X^T when `small`, else its centred features X; its (n,) squared row norms), X the layer centred."""
    out = []
    for a in layers:
        x = _centre(a)
        out.append((x @ x.T if small else x, (x * x).sum(1)))
    return out


def cka_matrix(layers_x, layers_y=None, debiased=False):
    """Layer x layer linear CKA.

    layers_x: (n, L_x, D_x), or a list of L_x (n, D_l) arrays; layers_y: the same over the same items in the
    same order, or None for layers_x against itself. Returns (L_x, L_y) float64; entry [i, j] =
    linear_cka(layers_x[:, i], layers_y[:, j]).
    """
    X = _layers(layers_x, "layers_x")
    Y = X if layers_y is None else _layers(layers_y, "layers_y")
    if len(X[0]) != len(Y[0]):
        raise FeatxError(f"CKA needs the same items on both sides, got {len(X[0])} and {len(Y[0])}")
    n = len(X[0])
    _check_n(n, debiased)
    # <K, L>_F with K = X X^T: one n x n Gram matrix per layer, then one dot product per pair (when they fit
    # _GRAM_BYTES); otherwise ||X^T Y||_F^2 per pair from the centred features.
    small = (len(X) + (0 if layers_y is None else len(Y))) * n * n * 8 <= _GRAM_BYTES
    sim = (lambda a, b: float(np.vdot(a, b))) if small else (lambda a, b: float(np.linalg.norm(a.T @ b) ** 2))
    px = _products(X, small)
    py = px if layers_y is None else _products(Y, small)
    self_x = [sim(f, f) for f, _ in px]
    self_y = self_x if layers_y is None else [sim(f, f) for f, _ in py]
    out = np.empty((len(px), len(py)))
    for i, (fx, rows_x) in enumerate(px):
        for j, (fy, rows_y) in enumerate(py):
            if layers_y is None and j < i:
                out[i, j] = out[j, i]
                continue
            out[i, j] = _cka(sim(fx, fy), self_x[i], self_y[j], rows_x, rows_y, n, debiased)
    return out


@dataclass
class CacheCKA:
    """Layer x layer CKA between two caches (or one cache with itself) over the items both have done."""

    matrix: np.ndarray  # (L_x, L_y)
    name_x: str
    name_y: str
    num_items: int
    debiased: bool
    pooling: str

    @property
    def within(self):
        return self.name_x == self.name_y


def _subset(cache, pooling, rows):
    """L arrays (len(rows), D_l) float32: the given done-item rows of every layer at its own width (the padding
    of a narrower layer cut off), read one layer at a time."""
    return [np.asarray(cache.layer(layer, pooling))[rows] for layer in range(cache.num_layers)]


def cache_cka(path_x, path_y=None, pooling="mean", debiased=True, max_items=2048, seed=0):
    """CKA between every layer of the cache at path_x and every layer of path_y (or of path_x itself).

    Items are aligned by id (the intersection of done ids); above max_items a seeded random subset is used.
    Returns a CacheCKA whose matrix has shape (L_x, L_y).
    """
    from featx.cache import open_cache

    with ExitStack() as stack:
        cx = stack.enter_context(closing(open_cache(path_x)))
        cy = cx if path_y is None else stack.enter_context(closing(open_cache(path_y)))
        ids_x = np.asarray(cx.ids)[np.asarray(cx.done, dtype=bool)]
        ids_y = np.asarray(cy.ids)[np.asarray(cy.done, dtype=bool)]
        common, ix, iy = np.intersect1d(ids_x, ids_y, assume_unique=True, return_indices=True)
        if len(common) > max_items:
            keep = np.sort(np.random.default_rng(seed).choice(len(common), max_items, replace=False))
            ix, iy = ix[keep], iy[keep]
        if len(ix) < (4 if debiased else 2):
            raise FeatxError(f"CKA of {path_x} and {path_y or path_x}: only {len(ix)} items done in both")
        X = _subset(cx, pooling, ix)
        Y = None if path_y is None else _subset(cy, pooling, iy)
        names = str(cx.model), str(cy.model)
    return CacheCKA(matrix=cka_matrix(X, Y, debiased=debiased), name_x=names[0], name_y=names[1],
                    num_items=len(ix), debiased=debiased, pooling=pooling)


@dataclass
class SummaryCKA:
    """CKA between the output layers of several caches over the items done in all of them."""

    matrix: np.ndarray  # (M, M)
    names: list         # M model names (as stored in the caches)
    paths: list         # M cache paths
    num_items: int
    debiased: bool
    pooling: str


def summary_cka(paths, pooling="mean", debiased=True, max_items=2048, seed=0):
    """(M, M) linear CKA between the output layers of the caches at `paths`, on the ids done in every one of
    them (a seeded subset above max_items): cka_matrix of the M output layers."""
    from featx.cache import open_cache

    ids, names = [], []
    for p in paths:
        with closing(open_cache(p)) as c:
            ids.append(np.asarray(c.ids)[np.asarray(c.done, dtype=bool)].astype(str))
            names.append(str(c.model))
    common = ids[0]
    for other in ids[1:]:
        common = np.intersect1d(common, other)
    if len(common) > max_items:
        common = np.sort(np.random.default_rng(seed).choice(common, max_items, replace=False))
    outputs = []
    for p, own in zip(paths, ids):
        with closing(open_cache(p)) as c:
            order = np.argsort(own)
            outputs.append(np.asarray(c.layer(c.num_layers - 1, pooling))[order[np.searchsorted(own, common,
                                                                                                 sorter=order)]])
    matrix = cka_matrix(outputs, debiased=debiased)  # each cache's output layer at its own width
    n = len(common)
    return SummaryCKA(matrix=matrix, names=names, paths=list(paths), num_items=n, debiased=debiased,
                      pooling=pooling)
