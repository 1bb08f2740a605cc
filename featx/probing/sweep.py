"""Probe sweeps over caches x layers x seeds x training sizes (+ fusion), writing the tidy results tables.

`run_probe(caches, out, ...)` is what `featx probe` and `featx fuse` call. Protocol: with a manifest `split`
column, fit on train, select (regularisation per layer, best layer) on dev, report dev and test; without
splits, stratified K-fold CV, an inner stratified split of each training fold for selection, and the
out-of-fold test predictions pooled into split "cv". Training sizes subsample the training part only; each
is resolved per fold to a number of training labels (TrainSize.labels).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning

from featx import metrics
from featx.errors import FeatxError
from featx.naming import cache_names, slug
from featx.probing.classifier import Classifier
from featx.probing.data import load_cache
from featx.probing.estimators import infer_task, inferred_task_note
from featx.probing.fusion import EarlyFusion, GatedFusion, LateFusion, WeightedLayerProbe, align_by_id
from featx.probing.registry import get_probe, make_probe
from featx.probing.results import (FULL_PART_ADDED, WEIGHT_COLUMNS, FoldScores, best_layer_table,
                                   clear_earlier_outputs, labels_count, meta_head, said_removed,
                                   write_results)
from featx.probing.splits import fold_count, make_folds, subsample
from featx.runinfo import provenance, write_meta
from featx.settings import ProbeSettings, TrainSize, dashed

FULL = TrainSize("fraction", 1.0)
SWEEP_KEYS = ("probe", "layers", "pool", "seeds", "train_sizes", "folds", "weighted", "fusion", "fusion_layer",
              "missing", "late_rule", "device", "task", "save_classifier")   # meta.json's settings


class SweepSettings(ProbeSettings):
    """`featx probe`'s options (featx.settings.ProbeSettings declares each default and parser once), with the
    probe checked against the registry and the training sizes run (sizes_run).

    layers: "all" or indices; seeds: the seeds run; train_sizes: TrainSize in the order given; fusion: methods
    out of featx.settings.FUSIONS; fusion_layer: "best" (each modality's best dev layer), "weighted" or a layer
    index; task: "auto" (from the labels), regression or classification.
    """

    def __post_init__(self):
        super().__post_init__()
        get_probe(self.probe)
        self.collapsed = {}   # {size not run: (the size run in its place, its numbers of labels)}: run_probe's

    @classmethod
    def of(cls, caches, out, progress=True, **options) -> "SweepSettings":
        """The settings of run_probe(caches, out, **options); progress is the opposite of --quiet."""
        return cls(caches=[os.fspath(c) for c in caches], out=os.fspath(out), quiet=not progress, **options)

    @property
    def sizes_run(self) -> list:
        """The training sizes fitted: those given, plus the full training part (the headline) if absent, less
        those that come to the numbers of labels of another (collapsed; see collapsed_sizes)."""
        sizes = self.train_sizes if any(t.is_full for t in self.train_sizes) else self.train_sizes + [FULL]
        return [t for t in sizes if t not in self.collapsed]

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in SWEEP_KEYS}
        out["train_sizes"] = [str(t) for t in self.train_sizes]
        out["train_sizes_run"] = [str(t) for t in self.sizes_run]
        return out


@dataclass
class SweepOutput:
    """Rows of one fit group: results rows, layer-weight rows, and per fold what fusion may reuse:
    best dev layer (index into the cache's layers) and the fitted WeightedLayerProbe."""
    rows: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    best_dev: dict = field(default_factory=dict)
    weighted_models: dict = field(default_factory=dict)


def run_probe(caches, out, progress=True, **options):
    """Probe every layer of every cache, optionally fuse modalities; write results to `out`.

    caches: list of .h5 paths. options: those of featx.settings.ProbeSettings (`featx probe`'s, with their
    defaults): probe: a registered probe (linear | ridge | logistic | mlp | batched). layers: "all" or indices.
    seeds: a count n (seeds 0..n-1) or a list. train_sizes: fractions of the training part (0 < x <= 1) or
    numbers of labels (whole numbers > 1). weighted: also fit the layer-weighted sum. fusion: any of early,
    late, gated. fusion_layer: best | weighted | an index. missing: intersect | error.
    task: auto | regression | classification. See SweepSettings.
    Writes results.csv / .parquet, best_layers.csv, layer_weights.csv (and classifier__NAME.safetensors with
    save_classifier), meta.json last; an earlier run's outputs in `out` (featx.probing.results.earlier_outputs) are
    removed once the sweep is done, and said in a warning. Returns the results DataFrame; its attrs["meta"] is what
    meta.json holds.
    """
    s = SweepSettings.of(caches, out, progress, **options)
    datas = load_caches(s.caches, s)
    task = resolve_task(datas, s.task)
    if task == "classification":
        check_classes(datas, s)
    note = inferred_task_note(datas[0].y, as_classes=task == "classification" or could_be_classes(datas[0], s)) \
        if s.task == "auto" else None
    if note and not s.quiet:
        warnings.warn(note)   # one line: the command line prints it as "featx probe: task: ..."
    if s.fusion and len(datas) < 2:
        raise FeatxError("fusion needs at least two caches (one per modality)")
    unused_fusion_options(s)
    aligned = align(datas, s.missing) if s.fusion else None
    if aligned is None and len(datas) > 1:
        warn_split_disagreement(datas)
    check_sizes(datas, task, s, aligned)
    if task == "classification":
        warn_unseen_classes(datas, s)
    s.collapsed = collapsed_sizes(datas, aligned, task, s)
    check_out(out)
    os.makedirs(out, exist_ok=True)
    rows, weight_rows = _sweep_all(datas, aligned, task, s, not s.quiet)
    # Only now, with every fit done: an interrupted sweep leaves an earlier run's outputs whole, never mixed.
    removed = clear_earlier_outputs(out)
    if removed:
        warnings.warn(f"{os.path.normpath(out)} held an earlier run's outputs, removed so that it holds only this "
                      f"run's: {said_removed(removed)}")
    df = write_results(rows, out)
    pd.DataFrame(weight_rows, columns=WEIGHT_COLUMNS).to_csv(os.path.join(out, "layer_weights.csv"), index=False)
    best = best_layer_table(df, metrics.PRIMARY[task])
    best.to_csv(os.path.join(out, "best_layers.csv"), index=False)
    meta = run_meta(datas, aligned, task, s, df)
    if s.save_classifier:
        save_classifiers(datas, best, task, s, out)
    write_meta(meta, os.path.join(out, "meta.json"))   # last: a folder with meta.json holds a finished run
    df.attrs["meta"] = meta
    return df


def check_out(out):
    """A probe's --out may hold an earlier probe's outputs (replaced once the sweep is done), not a finetune run
    (its checkpoints and saved model are not probe's to remove): a one-line FeatxError."""
    if os.path.exists(os.path.join(out, "finetune.json")):
        raise FeatxError(f"{out} holds a finetune run (finetune.json, runs/, model/), which probe does not replace: "
                         "give another --out")


def save_classifiers(datas, best, task, s, out):
    """out/classifier__NAME.safetensors per cache: its best dev layer's probe (Classifier.from_sweep)."""
    names = [d.name for d in datas]
    for d in datas:
        hit = best[(best.encoder == d.name) & (best.modality == d.modality)].best_dev_layer
        if hit.empty:
            warnings.warn(f"{d.name} ({d.modality}): no best dev layer, so no classifier saved")
            continue
        stem = d.name if names.count(d.name) == 1 else f"{d.name}-{d.modality}"
        Classifier.from_sweep(d, hit.iloc[0], task, s).save(os.path.join(out, f"classifier__{slug(stem)}.safetensors"))


def load_caches(caches, s):
    """CacheData per path with its display name set (the settings refuse a file given twice)."""
    paths = [os.fspath(p) for p in caches]
    if not paths:
        raise FeatxError("give at least one cache")
    datas = [load_cache(p, s.pool, s.layers, task=s.task) for p in paths]
    for d, name in zip(datas, cache_names([d.encoder for d in datas], [d.modality for d in datas],
                                          [d.path for d in datas])):
        d.name = name
    return datas


def resolve_task(datas, forced="auto") -> str:
    """The task of the caches' labels (or `forced`); caches that disagree are a one-line error naming each
    cache's task."""
    if forced != "auto":
        return forced
    tasks = [infer_task(d.y) for d in datas]
    if len(set(tasks)) != 1:
        said = "; ".join(f"{d.path}: {t}" for d, t in zip(datas, tasks))
        raise FeatxError(f"the caches' labels disagree on the task ({said}); set task to regression or "
                         "classification")
    return tasks[0]


def _classification_folds(d, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # scikit-learn's note on a class smaller than the number of folds
        return make_folds(d.y, d.splits, "classification", s.folds, s.seeds[0])[0]


def check_classes(datas, s):
    """Classification needs labels that are classes, each with a training item: a one-line error for a cache
    whose labelled items hold more distinct labels than half their number (continuous scores, or ids, made one
    class per item), or whose training part (of each fold of the first seed) holds fewer items than classes.
    One item per class is allowed (few-shot); warn_unseen_classes says when there are fewer than two per class,
    and when dev or test items are in a class the training part lacks."""
    for d in datas:
        y = class_labels(d.y)
        n, k = len(y), len(np.unique(y))
        if k > n / 2:
            raise FeatxError(f"{d.path}: classification needs labels that are classes, but its {n} labelled items "
                             f"hold {k} distinct labels (more than half of them, so most classes would have one "
                             "item): continuous labels are regression (--task regression)")
        n_train = min(len(train) for train, _, _ in _classification_folds(d, s))
        if k > n_train:
            raise FeatxError(f"{d.path}: classification needs a training item per class at least, but its {k} "
                             f"classes come with {n_train} training items (so some class is never learned): "
                             "continuous labels are regression (--task regression)")


def class_labels(y) -> np.ndarray:
    """Labels as the classes a classifier tells apart, as text: numbers by value (-0.0 is 0.0, which scikit-learn
    counts as one class; their text differs), anything else by its text."""
    y = np.asarray(y)
    numbers = y.dtype.kind in "fiub" or (y.dtype.kind == "O" and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in y.tolist()))
    return (y.astype(np.float64) + 0.0).astype(str) if numbers else y.astype(str)   # -0.0 + 0.0 is 0.0


def could_be_classes(d, s) -> bool:
    """Whether check_classes would take cache d's labels as classes (what the task line may suggest)."""
    try:
        check_classes([d], s)
    except (FeatxError, ValueError):
        return False
    return True


def warn_unseen_classes(datas, s):
    """Per cache, one warning line when its training part (of each fold of the first seed) holds fewer than two
    items per class, and one when its dev or test items are in a class that the training part lacks (a
    classifier cannot predict it, so they are scored as errors)."""
    for d in datas:
        y, folds = class_labels(d.y), _classification_folds(d, s)
        k, n_train = len(np.unique(y)), min(len(train) for train, _, _ in folds)
        if k > n_train / 2:
            warnings.warn(f"{d.path}: its {k} classes come with {n_train} training items, fewer than two per class: "
                          "most classes are learned from one item; continuous labels are regression "
                          "(--task regression)")
        line = unseen_classes(y, folds)
        if line:
            warnings.warn(f"{d.path}: {line}")


def unseen_classes(y, folds):
    """None, or one line counting the dev and test items (over all folds) whose class the fold's training part
    lacks, with the first such class as an example."""
    counts, example = {"dev": [0, 0], "test": [0, 0]}, None
    for train, dev, test in folds:
        seen = set(y[train].tolist())
        for part, idx in (("dev", dev), ("test", test)):
            missing = [v for v in y[idx].tolist() if v not in seen]
            counts[part][0] += len(missing)
            counts[part][1] += len(idx)
            example = example if example is not None or not missing else missing[0]
    if example is None:
        return None
    said = " and ".join(f"{m} of {t} {part} items" for part, (m, t) in sorted(counts.items(), reverse=True) if m)
    over = f" (over {len(folds)} folds)" if len(folds) > 1 else ""
    return (f"{said}{over} are in a class the training part lacks (e.g. {example!r}): a classifier cannot predict "
            "such a class, so these items are scored as errors; their scores say little (merge rare classes, or "
            "--task regression for scores)")


# Options that only fusion reads, with their defaults.
_FUSION_OPTIONS = (("fusion_layer", "best"), ("missing", "intersect"), ("late_rule", "mean"))


def unused_fusion_options(s):
    """One warning line naming the fusion options given (not at their default) that no fusion reads: no fusion
    runs, or --late-rule without late fusion."""
    unused = [(k, getattr(s, k)) for k, default in _FUSION_OPTIONS if getattr(s, k) != default
              and (not s.fusion or (k == "late_rule" and "late" not in s.fusion))]
    if unused:
        given = ", ".join(f"--{dashed(k)} {v}" for k, v in unused)
        why = "no fusion runs (give --fusion, or run featx fuse)" if not s.fusion else "no late fusion runs"
        warnings.warn(f"{given} ignored: {why}")


def collapsed_sizes(datas, aligned, task, s) -> dict:
    """{size: (size run instead, numbers of labels)}: the training sizes that take the same number of training
    labels as another in every fold of every seed, of every cache (and of fusion's items); a fit on them would
    repeat the other's (same labels drawn, same seed). The full training part is the one kept, else the size
    given first; each collapse is one note in meta.json."""
    units = [(d.y, d.splits) for d in datas]
    if aligned is not None:
        idx, d = aligned["index"][0], datas[0]
        units.append((d.y[idx], None if d.splits is None else d.splits[idx]))
    n_train = [len(train) for y, splits in units for seed in s.seeds
               for train, _, _ in make_folds(y, splits, task, s.folds, seed)[0]]
    groups = {}
    for size in s.sizes_run:
        groups.setdefault(tuple(size.labels(n) for n in n_train), []).append(size)
    out = {}
    for key, sizes in groups.items():
        kept = next((t for t in sizes if t.is_full), sizes[0])
        out.update({t: (kept, sorted(set(key))) for t in sizes if t != kept})
    return out


def collapse_note(size, kept, labels) -> str:
    counts = "/".join(map(str, labels))
    return (f"training sizes {kept} and {size} both come to {counts} training label(s), so {size} was not run "
            f"(its fits would repeat those of {kept})")


def _split_names(splits, idx):
    return np.full(len(idx), "", dtype=object) if splits is None else np.asarray(splits, dtype=object)[idx]


def split_disagreement(a, b, ids, idx_a, idx_b):
    """None, or one line saying how many of the shared `ids` caches a and b (CacheData) put in different splits,
    with the first as an example."""
    sa, sb = _split_names(a.splits, idx_a), _split_names(b.splits, idx_b)
    differ = np.flatnonzero(sa != sb)
    if not differ.size:
        return None
    k = differ[0]
    name = lambda v: repr(v) if v else "no split"   # noqa: E731
    return (f"{b.path}: splits differ from {a.path} for {differ.size} of the {len(ids)} ids they share (e.g. item "
            f"{str(ids[k])!r}: {name(sb[k])} here, {name(sa[k])} there)")


def warn_split_disagreement(datas):
    """Probing caches without fusing them: one warning per pair of caches that put shared ids in different
    splits (their rows in one table are then trained and scored on different items)."""
    first = datas[0]
    for d in datas[1:]:
        ids, index, _ = align_by_id([first.ids, d.ids])
        line = split_disagreement(first, d, ids, index[0], index[1]) if len(ids) else None
        if line:
            warnings.warn(f"{line}: their rows are trained and scored on different items; extract both from one "
                          "manifest")


def check_sizes(datas, task, s, aligned=None):
    """Every training size must fit every fold's training part (TrainSize.labels raises otherwise), and for
    classification every fold's training part must hold two classes: a one-line error before any fit. With
    `aligned` (fusion's shared items), the same for fusion's folds; caches that share no item are refused."""
    for d in datas:
        _check_folds(d.y, d.splits, d.path, task, s)
    if aligned is not None:
        if len(aligned["ids"]) == 0:
            raise FeatxError("the caches share no item id, so there is nothing to fuse: give caches extracted from "
                             "the same manifest")
        idx, d = aligned["index"][0], datas[0]
        where = f"fusion of the {len(idx)} items the caches share"
        try:
            _check_folds(d.y[idx], None if d.splits is None else d.splits[idx], where, task, s)
        except FeatxError as e:
            raise FeatxError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _check_folds(y, splits, where, task, s):
    for seed in s.seeds:
        folds, _ = make_folds(y, splits, task, s.folds, seed)
        for size in s.sizes_run:
            size.labels(min(len(train) for train, _, _ in folds))
        if task == "classification":
            for train, _, _ in folds:
                classes = np.unique(class_labels(np.asarray(y)[train]))
                if len(classes) < 2:
                    raise FeatxError(f"{where}: classification needs at least two classes in the training "
                                     f"part, which holds only {str(classes[0])!r} ({len(train)} item(s))")


def _sweep_all(datas, aligned, task, s, progress):
    """(results rows, layer-weight rows) of every cache, seed and size, and of fusion; fits that stopped before
    converging are counted and named in one line."""
    unconverged = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # RuntimeWarnings of constant features on tiny subsamples and the like
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.showwarning = lambda message, category, *a, **k: _count_unconverged(unconverged, message)
        rows, weights = _sweep_runs(datas, aligned, task, s, progress)
    if unconverged:
        what = ", ".join(f"{n} {name}" for name, n in sorted(unconverged.items()))
        warnings.warn(f"{sum(unconverged.values())} probe fit(s) stopped at their iteration limit before converging "
                      f"({what}); their scores may be below what the probe can reach: give more training labels or "
                      "use --probe batched")
    return rows, weights


def _count_unconverged(counts, message):
    """Count a ConvergenceWarning under the estimator its scikit-learn message names (MLP, logistic, other)."""
    text = str(message)
    name = "MLP" if "Stochastic Optimizer" in text or "Multilayer" in text else \
        "logistic" if "lbfgs" in text or "Logistic" in text else "other"
    counts[name] = counts.get(name, 0) + 1


def _sweep_runs(datas, aligned, task, s, progress):
    """_sweep_all's loop over seeds, sizes and caches (then fusion), with one progress display of fits."""
    from featx.progress import progress_bar

    reuse = (s.fusion_layer == "best" and s.probe != "mlp") or (s.fusion_layer == "weighted" and s.weighted)
    reuse = bool(s.fusion) and reuse and same_items(datas, aligned)
    n_folds = len(make_folds(datas[0].y, datas[0].splits, task, s.folds, s.seeds[0])[0])
    total = len(s.seeds) * len(s.sizes_run) * n_folds * (len(datas) + (1 if s.fusion else 0))
    bar = progress_bar(total, "probe", "fit", enabled=progress)
    rows, weights = [], []
    for seed in s.seeds:
        for size in s.sizes_run:
            kept = []
            for d in datas:
                got = sweep_cache(d, task, s, seed, size, keep=reuse, tick=bar.update)
                rows += got.rows
                weights += got.weights
                kept.append(got)
            if s.fusion:
                got = fuse(datas, aligned, task, s, seed, size, kept if reuse else None, tick=bar.update)
                rows += got.rows
                weights += got.weights
    bar.close()
    return rows, weights


def _rows(base, layer, split, values):
    return [dict(base, layer=layer, split=split, metric=m, value=float(v)) for m, v in values.items()]


def _targets(y, task):
    return y if task == "classification" else np.asarray(y, dtype=np.float64)


def _fit(est, X, y, fit, dev, task):
    """Fit `est` on the fit part with the dev part for selection; the task is the sweep's, not re-inferred."""
    if "task" in est.get_params():
        est.set_params(task=task)
    return est.fit(X[fit], y[fit], X[dev], y[dev])  # under _sweep_all's warning filters


def sweep_cache(d, task, s, seed, size, keep=False, tick=lambda n: None) -> SweepOutput:
    """Fit the probes of every layer of one cache for one (seed, size); with `keep`, each fold's best dev layer
    and weighted probe are kept for fusion."""
    folds, test_name = make_folds(d.y, d.splits, task, s.folds, seed)
    y = _targets(d.y, task)
    scores = [FoldScores(task) for _ in d.layers]
    w_scores, n_labels, got = FoldScores(task), [], SweepOutput()
    for k, (train, dev, test) in enumerate(folds):
        fit = subsample(train, y, task, size.labels(len(train)), seed)
        n_labels.append(len(fit))
        est = _fit(make_probe(s.probe, seed, s.device, d.layer_widths), d.X, y, fit, dev, task)
        p_dev, p_test = est.predict_layers(d.X[dev]), est.predict_layers(d.X[test])
        for i, fold_scores in enumerate(scores):
            fold_scores.add(y[dev], p_dev[:, i], y[test], p_test[:, i])
        if keep:
            got.best_dev[k] = est.best_layer_
        if s.weighted:
            w = _fit(WeightedLayerProbe(random_state=seed), d.X, y, fit, dev, task)
            if keep:
                got.weighted_models[k] = w
            w_scores.add(y[dev], w.predict(d.X[dev]), y[test], w.predict(d.X[test]))
            got.weights += [dict(encoder=d.name, modality=d.modality, seed=seed, layer=layer, weight=float(v),
                                 train_size=str(size), method="weighted") for layer, v in zip(d.layers, w.weights_)]
        tick(1)
    base = dict(encoder=d.name, modality=d.modality, num_layers=d.num_layers, pooling=s.pool,
                probe=get_probe(s.probe).label(task), train_size=str(size), train_labels=labels_count(n_labels),
                seed=seed, method="layer")
    for layer, fold_scores in zip(d.layers, scores):
        dev_m, test_m = fold_scores.result()
        got.rows += _rows(base, layer, "dev", dev_m) + _rows(base, layer, test_name, test_m)
    if s.weighted:
        dev_m, test_m = w_scores.result()
        wb = dict(base, method="weighted", probe="weighted-linear")
        got.rows += _rows(wb, -1, "dev", dev_m) + _rows(wb, -1, test_name, test_m)
    return got


def same_items(datas, aligned):
    """Whether fusion runs on every cache's own items in its own order, with the same splits: then its folds
    are each modality's own."""
    if any(not np.array_equal(idx, np.arange(len(d.ids))) for d, idx in zip(datas, aligned["index"])):
        return False
    splits = [d.splits for d in datas]
    return all(x is None for x in splits) or all(x is not None and np.array_equal(np.asarray(x, str),
                                                                                  np.asarray(splits[0], str))
                                                 for x in splits)


def align(datas, missing):
    """{"ids", "index" (M, K), "missing" {modality: [ids]}, "unlabeled" {modality: [ids]}}: the labelled items
    every cache shares. An id a cache holds without a label is not missing from it: it is counted apart
    (unlabeled) and does not trip missing="error". The warning and the error for items missing from a modality
    also say how many of each cache's items failed at extraction (or are pending), since those are among the
    missing ones. Caches whose labels or splits differ for the same ids are a one-line error (fusion's folds are
    the first cache's split: its score would otherwise depend on the caches' order)."""
    not_done = {d.modality: d.failed + d.pending for d in datas if d.failed + d.pending}
    why = f" (items not done at extraction per modality: {not_done})" if not_done else ""
    if missing not in ("intersect", "error"):
        raise FeatxError(f"unknown missing-item rule {missing!r}: use intersect or error")
    ids, index, report = align_by_id([d.ids for d in datas], [d.modality for d in datas], "intersect")
    # An id a cache holds without a label is not missing from it: it is left out for want of a label.
    held = {d.modality: set(d.unlabeled_ids) for d in datas}
    unlabeled = {k: [i for i in v if i in held[k]] for k, v in report.items()}
    absent = {k: [i for i in v if i not in held[k]] for k, v in report.items()}
    lost = {k: len(v) for k, v in absent.items() if v}
    if missing == "error" and lost:
        raise FeatxError(f"items missing from some modalities (counts {lost}); use missing='intersect' to fuse the "
                         f"shared items only{why}")
    parts = [f"missing per modality: {lost}{why}"] if lost else []
    no_label = {k: len(v) for k, v in unlabeled.items() if v}
    if no_label:
        parts.append(f"held without a label per modality: {no_label}")
    if parts:
        warnings.warn(f"fusion uses the {len(ids)} labelled items present in every cache; " + "; ".join(parts))
    y0 = datas[0].y[index[0]]
    for d, idx in zip(datas[1:], index[1:]):
        if not np.array_equal(class_labels(d.y[idx]), class_labels(y0)):
            raise FeatxError(f"{d.path}: labels differ from {datas[0].path} for the same ids")
        # fusion's folds are the first cache's splits: caches that disagree would train fusion on other items
        # than their own rows (and its score would depend on the caches' order)
        line = split_disagreement(datas[0], d, ids, index[0], idx)
        if line:
            raise FeatxError(f"{line}; extract both from one manifest")
    return {"ids": ids, "index": index, "missing": absent, "unlabeled": {k: v for k, v in unlabeled.items() if v}}


def fuse(datas, aligned, task, s, seed, size, kept=None, tick=lambda n: None) -> SweepOutput:
    """Fuse the modalities on the items they share, for one (seed, size). kept: each cache's SweepOutput
    of the same (seed, size) when fusion's folds are the caches' own (its selections are reused)."""
    idx = aligned["index"]
    y = _targets(datas[0].y[idx[0]], task)
    splits = None if datas[0].splits is None else datas[0].splits[idx[0]]
    folds, test_name = make_folds(y, splits, task, s.folds, seed)
    scores, n_labels, got = {m: FoldScores(task) for m in s.fusion}, [], SweepOutput()
    for k, (train, dev, test) in enumerate(folds):
        fit = subsample(train, y, task, size.labels(len(train)), seed)
        n_labels.append(len(fit))
        reuse = [(g.best_dev[k], g.weighted_models.get(k)) for g in kept] if kept else None
        feats, full = _fusion_features(datas, idx, y, fit, dev, task, s, seed, reuse)
        for method in s.fusion:
            Xs = full if method == "gated" and s.fusion_layer == "weighted" else \
                [f[:, None] for f in feats] if method == "gated" else feats
            est = _fit_fusion(_fusion_estimator(method, s, task, seed), Xs, y, fit, dev)
            scores[method].add(y[dev], est.predict([x[dev] for x in Xs]), y[test], est.predict([x[test] for x in Xs]))
            if method == "gated" and s.fusion_layer == "weighted":
                got.weights += [dict(encoder=d.name, modality=d.modality, seed=seed, layer=layer, weight=float(v),
                                     train_size=str(size), method="fusion-gated")
                                for d, w in zip(datas, est.weights_) for layer, v in zip(d.layers, w)]
        tick(1)
    base = dict(encoder="+".join(d.name for d in datas), modality="+".join(d.modality for d in datas),
                num_layers=-1, pooling=s.pool, train_size=str(size), train_labels=labels_count(n_labels), seed=seed)
    for method, fold_scores in scores.items():
        dev_m, test_m = fold_scores.result()
        b = dict(base, method=f"fusion-{method}", probe=_fusion_label(method, s, task))
        got.rows += _rows(b, -1, "dev", dev_m) + _rows(b, -1, test_name, test_m)
    return got


def _fusion_features(datas, idx, y, fit, dev, task, s, seed, reuse=None):
    """(one (N, D_m) feature per modality, the (N, L_m, D_m) layers per modality) for one fold. reuse: per
    modality (best dev layer, WeightedLayerProbe or None) from its own sweep of this fold."""
    feats, full = [], []
    for m, d in enumerate(datas):
        X = d.X[idx[m]]
        full.append(X)
        if s.fusion_layer == "best":
            # The best dev layer, chosen by the per-modality probe on the same fit / dev parts.
            sel = reuse[m][0] if reuse else _best_dev_layer(X, y, fit, dev, task, s, seed)
            feats.append(d.features(sel, X))  # at the layer's own width
        elif s.fusion_layer == "weighted":
            w = reuse[m][1] if reuse else \
                _fit(WeightedLayerProbe(random_state=seed), X, y, fit, dev, task)
            feats.append(w.transform(X))
        else:
            if s.fusion_layer not in d.layers:
                raise FeatxError(f"fusion layer {s.fusion_layer} is not among the layers probed for {d.name}")
            feats.append(d.features(d.layers.index(s.fusion_layer), X))
    return feats, full


def _fusion_probe(s):
    """The LayerProbe kind early and late fusion fit: the sweep's probe, or linear for the batched one."""
    return s.probe if s.probe != "batched" else "linear"


def _fusion_estimator(method, s, task, seed):
    probe = _fusion_probe(s)
    if method == "early":
        return EarlyFusion(probe=probe, task=task, random_state=seed)
    if method == "late":
        return LateFusion(rule=s.late_rule, probe=probe, task=task, random_state=seed)
    return GatedFusion(task=task, random_state=seed)


def _fit_fusion(est, Xs, y, fit, dev):
    return est.fit([x[fit] for x in Xs], y[fit], [x[dev] for x in Xs], y[dev])  # under _sweep_all's filters


def _fusion_label(method, s, task):
    return {"early": "concat-" + get_probe(_fusion_probe(s)).label(task), "late": f"late-{s.late_rule}",
            "gated": "gated-attentive"}[method]


def _best_dev_layer(X, y, fit, dev, task, s, seed):
    est = make_probe(s.probe if s.probe != "mlp" else "linear", seed, s.device)
    return _fit(est, X, y, fit, dev, task).best_layer_


def chance_scores(d, task, s):
    """Metrics of the chance / majority prediction on the first seed's folds, full training part."""
    folds, _ = make_folds(d.y, d.splits, task, s.folds, s.seeds[0])
    y = _targets(d.y, task)
    preds = [metrics.chance_prediction(task, y[train], len(test)) for train, _, test in folds]
    return metrics.compute(task, np.concatenate([y[test] for _, _, test in folds]), np.concatenate(preds))


def unsplit_items(d) -> int:
    """How many of a cache's labelled items have an empty split while others have one: they are in no fold
    (make_folds uses the given train/dev/test), so no fit and no score sees them."""
    if d.splits is None or not (d.splits != "").any():
        return 0
    return int((d.splits == "").sum())


def run_meta(datas, aligned, task, s, df) -> dict:
    """meta.json: task and metric, chance, command line, every resolved setting, versions, encoders, items."""
    folds_run = {d.name: (1 if make_folds(d.y, d.splits, task, s.folds, s.seeds[0])[1] == "test"
                          else fold_count(d.y, task, s.folds)) for d in datas}
    meta = {**meta_head(task, chance_scores(datas[0], task, s)), **provenance({**s.to_json(), "task": task}),
            "caches": [os.path.abspath(d.path) for d in datas],
            "encoders": [{"encoder": d.name, "path": d.encoder, "cache": os.path.abspath(d.path),
                          "modality": d.modality, "num_layers": d.num_layers, "hidden_size": d.hidden_size,
                          "layers": list(d.layers), "labelled_items": len(d.ids), "unlabeled_items": d.unlabeled,
                          "failed_items": d.failed, "pending_items": d.pending,
                          "folds_run": folds_run[d.name],
                          **({} if d.layer_widths is None else {"layer_widths": list(d.layer_widths)})}
                         for d in datas],
            "failed": {d.name: d.failed for d in datas},
            "pending": {d.name: d.pending for d in datas},
            "unlabeled": {d.name: d.unlabeled for d in datas},
            "unsplit": {d.name: unsplit_items(d) for d in datas},
            "train_labels": {str(k): labels_count(v) for k, v in df.groupby("train_size")["train_labels"]}}
    notes = [f"{name}: {k} folds ran, not {s.folds} (the smallest class or label bin has only {k} items)"
             for name, k in folds_run.items() if k != 1 and k < s.folds]
    if s.fusion and s.fusion_layer == "best" and s.probe == "mlp":
        notes.append("fusion's best layers were chosen on dev by linear probes (the MLP probe's are not reused)")
    notes += [f"{name}: {n} labelled item(s) with no split were left out of training and scoring"
              for name, n in meta["unsplit"].items() if n]
    if not any(t.is_full for t in s.train_sizes):
        notes.append(FULL_PART_ADDED)
    notes += [collapse_note(size, kept, labels) for size, (kept, labels) in s.collapsed.items()]
    if s.save_classifier and not get_probe(s.probe).linear:  # Classifier.from_sweep saves linear weights only
        notes.append(f"the saved classifiers are linear probes ({s.probe} has no linear weights to save): featx "
                     f"predict's scores are theirs, not the {s.probe} scores of the tables")
    if notes:
        meta["notes"] = notes
    if aligned is not None:
        meta["fusion"] = {"items": len(aligned["ids"]), "missing": dict(aligned["missing"]),
                          "unlabeled": dict(aligned.get("unlabeled", {})),
                          "rule": "intersect: items missing from any modality are left out of fusion and listed here"}
    return meta
