"""Folds and training subsets: which items train, select (dev) and report (test) in each fit.

A fold is a (train, dev, test) triple of item indices. With a manifest `split` column there is one fold
(train/dev/test as given); without, stratified K-fold CV with an inner stratified dev split of each training
part.
"""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from featx.errors import FeatxError
from featx.settings import canonical_split, parse_train_size

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
    """([(train_idx, dev_idx, test_idx)] one per fold, the test split's name: "test" or "cv").

    splits: (N,) split names (train, dev, test or an alias, see settings.canonical_split; "" for none) or None.
    With any split named, train and test must be present and the given parts are used (a missing dev part is
    held out of train); otherwise stratified K-fold CV, with K lowered to the smallest class's size when that
    is smaller (fold_count says how many ran)."""
    if splits is not None:
        names = {v: canonical_split(v) for v in set(np.asarray(splits).astype(str).tolist())}
        splits = np.asarray([names[v] for v in np.asarray(splits).astype(str)], dtype=object)
    if splits is not None and (splits != "").any():
        return _given_split(y, splits, task, seed), "test"
    from sklearn.model_selection import StratifiedKFold

    labels = strata(y, task)
    units = []
    for tr, te in StratifiedKFold(fold_count(y, task, folds), shuffle=True, random_state=seed).split(
            np.zeros(len(y)), labels):
        fit, d = inner_split(y[tr], task, 0.2, seed)
        units.append((tr[fit], tr[d], te))
    return units, "cv"


def fold_count(y, task, folds):
    """The number of CV folds that can run: `folds`, lowered to the smallest stratum's size (at least 2)."""
    _, counts = np.unique(strata(y, task), return_counts=True)
    if len(y) < 4:
        raise FeatxError(f"cross-validation needs at least 4 labelled items, got {len(y)}")
    return int(min(folds, max(2, counts.min())))


def _given_split(y, splits, task, seed):
    """The one (train, dev, test) fold of a manifest's split column; too small a part is a one-line error."""
    train = np.flatnonzero(splits == "train")
    dev = np.flatnonzero(splits == "dev")
    test = np.flatnonzero(splits == "test")
    if train.size == 0 or test.size == 0:
        raise FeatxError("the split column needs both train and test items (found "
                         + ", ".join(f"{n} {k}" for k, n in (("train", train.size), ("dev", dev.size),
                                                                  ("test", test.size))) + ")")
    if dev.size == 0:  # no dev part: hold one out of train, never out of test
        if train.size < 4:
            raise FeatxError(f"the train split has {train.size} labelled item(s); with no dev split at least "
                             "4 are needed to hold a dev part out")
        fit, d = inner_split(y[train], task, 0.2, seed)
        train, dev = train[fit], train[d]
    small = [(k, n) for k, n in (("train", train.size), ("dev", dev.size), ("test", test.size)) if n < 2]
    if small:
        raise FeatxError(f"the {small[0][0]} split has {small[0][1]} labelled item; each of train, dev and test "
                         "needs at least 2")
    return [(train, dev, test)]


def subsample(train_idx, y, task, size, seed):
    """Indices of `size` training labels drawn from the training part (all of it for the full part);
    classification keeps the classes' proportions (stratified) where it can.

    size: a number of labels (a whole number > 1, e.g. TrainSize.labels(len(train_idx))), or a TrainSize or
    fraction (0 < x <= 1) resolved here; a count larger than the training part is a FeatxError."""
    n_labels = parse_train_size(size).labels(len(train_idx))
    if n_labels >= len(train_idx):
        return train_idx
    if task == "classification":
        try:
            picked = train_test_split(train_idx, train_size=n_labels, random_state=seed, stratify=y[train_idx])[0]
        except ValueError:  # fewer labels than classes, or a class of one: a plain random draw
            picked = np.random.default_rng(seed).choice(train_idx, size=n_labels, replace=False)
        return _with_two_classes(picked, train_idx, y, seed)
    return np.random.default_rng(seed).choice(train_idx, size=n_labels, replace=False)


def _with_two_classes(picked, train_idx, y, seed):
    """`picked`, or, when it holds one class and the training part more (a few labels drawn from a part with a
    rare class), `picked` with its last item swapped for a random item of another class: a classifier cannot
    be fitted on one class."""
    y = np.asarray(y)
    if len(picked) < 2 or len(set(y[picked].tolist())) > 1:
        return picked
    others = train_idx[y[train_idx] != y[picked[0]]]
    if others.size == 0:
        return picked
    picked = np.array(picked, copy=True)
    picked[-1] = np.random.default_rng(seed).choice(others)
    return picked
