"""Folds and training subsets: which items train, select (dev) and report (test) in each fit.

A fold is a (train, dev, test) triple of item indices. With a manifest `split` column there is one fold
(train/dev/test as given); without, stratified K-fold CV with an inner stratified dev split of each training
part.
"""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

DEV_NAMES = {"dev", "valid", "val", "validation"}


def inner_split(y, task, fraction=0.2, random_state=0):
    """(fit_idx, dev_idx): a stratified split of range(len(y)) (regression stratifies on label quintiles)."""
    n = len(y)
    strat = strata(y, task)
    try:
        return train_test_split(np.arange(n), test_size=fraction, random_state=random_state, stratify=strat)
    except ValueError:  # a class too small to stratify: plain split
        return train_test_split(np.arange(n), test_size=fraction, random_state=random_state)


def strata(y, task, bins=5):
    """(N,) stratification labels: the classes, or the label's quintile bin (regression)."""
    if task == "classification":
        return np.asarray(y)
    y = np.asarray(y, dtype=np.float64)
    edges = np.unique(np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.digitize(y, edges)


def make_folds(y, splits, task, folds=5, seed=0):
    """([(train_idx, dev_idx, test_idx)] one per fold, the test split's name: "test" or "cv")."""
    n = len(y)
    if splits is not None and np.isin(splits, ["train"]).any() and np.isin(splits, ["test"]).any():
        train = np.flatnonzero(splits == "train")
        dev = np.flatnonzero(np.isin(splits, list(DEV_NAMES)))
        test = np.flatnonzero(splits == "test")
        if dev.size == 0:  # no dev part: hold one out of train, never out of test
            fit, d = inner_split(y[train], task, 0.2, seed)
            train, dev = train[fit], train[d]
        return [(train, dev, test)], "test"
    from sklearn.model_selection import StratifiedKFold

    labels = strata(y, task)
    _, counts = np.unique(labels, return_counts=True)
    k = int(min(folds, max(2, counts.min())))
    units = []
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), labels):
        fit, d = inner_split(y[tr], task, 0.2, seed)
        units.append((tr[fit], tr[d], te))
    return units, "cv"


def subsample(train_idx, y, task, size, seed):
    """Indices of a random subsample of the training part: a fraction (<= 1), k per class (classification,
    size > 1) or an absolute count (regression, size > 1)."""
    rng = np.random.default_rng(seed)
    if size <= 1.0:
        if size >= 1.0:
            return train_idx
        n = max(2, int(round(size * len(train_idx))))
        if task == "classification":
            from sklearn.model_selection import train_test_split

            try:
                return train_test_split(train_idx, train_size=n, random_state=seed, stratify=y[train_idx])[0]
            except ValueError:
                pass
        return rng.choice(train_idx, size=n, replace=False)
    k = int(size)
    if task == "classification":
        picks = []
        for c in np.unique(y[train_idx]):
            members = train_idx[y[train_idx] == c]
            picks.append(rng.choice(members, size=min(k, len(members)), replace=False))
        return np.concatenate(picks)
    return rng.choice(train_idx, size=min(k, len(train_idx)), replace=False)
