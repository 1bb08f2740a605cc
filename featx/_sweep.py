"""Probe sweeps over caches x layers x seeds x training sizes (+ fusion), writing the tidy results tables.

`run_probe(caches, out, ...)` is what `featx probe` and `featx fuse` call. Protocol: with a manifest `split`
column, fit on train, select (regularisation per layer, best layer) on dev, report dev and test; without
splits, stratified K-fold CV, an inner stratified split of each training fold for selection, and the
out-of-fold test predictions pooled into split "cv". Training sizes subsample the training part only.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from featx import metrics
from featx.errors import FeatxError
from featx.probe import BatchedLinearProbe, LayerProbe, infer_task, inner_split, _strata

COLUMNS = ["encoder", "modality", "num_layers", "layer", "pooling", "probe", "method", "train_size", "seed",
           "split", "metric", "value"]
# layer_weights.csv: one row per fit (seed, unit, training size) and layer; method ties it to its results rows.
WEIGHT_COLUMNS = ["encoder", "modality", "seed", "layer", "weight", "train_size", "method"]
_DEV_NAMES = {"dev", "valid", "val", "validation"}


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
    """Read the pooled layers of a cache (featx.store.open_cache) into memory; the file is closed after."""
    from featx.store import open_cache

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


def make_units(y, splits, task, folds=5, seed=0):
    """[(train_idx, dev_idx, test_idx)], test split name ("test" or "cv")."""
    n = len(y)
    if splits is not None and np.isin(splits, ["train"]).any() and np.isin(splits, ["test"]).any():
        train = np.flatnonzero(splits == "train")
        dev = np.flatnonzero(np.isin(splits, list(_DEV_NAMES)))
        test = np.flatnonzero(splits == "test")
        if dev.size == 0:  # no dev part: hold one out of train, never out of test
            fit, d = inner_split(y[train], task, 0.2, seed)
            train, dev = train[fit], train[d]
        return [(train, dev, test)], "test"
    from sklearn.model_selection import StratifiedKFold

    strata = _strata(y, task)
    _, counts = np.unique(strata, return_counts=True)
    k = int(min(folds, max(2, counts.min())))
    units = []
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), strata):
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


def _make_probe(kind, seed, device):
    if kind == "batched":
        return BatchedLinearProbe(device=device, random_state=seed)
    return LayerProbe(probe=kind, random_state=seed)


def _probe_name(kind, task):
    if kind in ("linear", "batched"):
        return ("ridge" if task == "regression" else "logistic") + ("-batched" if kind == "batched" else "")
    return kind


def _rows(base, layer, split, values):
    return [dict(base, layer=layer, split=split, metric=m, value=float(v)) for m, v in values.items()]


class _Pooler:
    """Collects per-unit predictions: dev metrics averaged over units, test predictions pooled."""

    def __init__(self, task):
        self.task, self.dev, self.test_true, self.test_pred = task, [], [], []

    def add(self, y_dev, p_dev, y_test, p_test):
        self.dev.append(metrics.compute(self.task, y_dev, p_dev))
        self.test_true.append(y_test)
        self.test_pred.append(p_test)

    def result(self):
        with warnings.catch_warnings():  # a metric undefined in every fold (e.g. corr on a tiny dev set) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            dev = {k: float(np.nanmean([d[k] for d in self.dev])) for k in self.dev[0]}
        test = metrics.compute(self.task, np.concatenate(self.test_true), np.concatenate(self.test_pred))
        return dev, test


def run_probe(caches, out, probe="linear", layers="all", pool="mean", seeds=1, train_sizes=(1.0,), folds=5,
              weighted=False, fusion=(), fusion_layer="best", missing="intersect", late_rule="mean",
              device="auto", save_classifier=False, progress=True):
    """Probe every layer of every cache, optionally fuse modalities; write results to `out`.

    caches: list of .h5 paths. probe: linear | ridge | logistic | mlp | batched. layers: "all" or indices.
    seeds: int n (seeds 0..n-1) or a list. train_sizes: fractions of the training part, or counts > 1
    (k per class for classification). weighted: also fit the learned layer-weighted sum. fusion: any of
    "early", "late", "gated". fusion_layer: "best" (best dev layer per modality), "weighted", or an int.
    missing: "intersect" | "error" for items absent from a modality.
    Writes results.csv / .parquet, best_layers.csv, layer_weights.csv, meta.json. Returns the results DataFrame.
    """
    from tqdm.auto import tqdm

    datas = [load_cache(p, pool, layers) for p in caches]
    tasks = {infer_task(d.y) for d in datas}
    if len(tasks) != 1:
        raise FeatxError(f"the caches' labels disagree on the task ({', '.join(sorted(tasks))})")
    task = tasks.pop()
    seeds = list(range(int(seeds))) if np.isscalar(seeds) else [int(s) for s in seeds]
    sizes = [float(s) for s in train_sizes]
    if any(s <= 0 for s in sizes):
        raise FeatxError("training sizes must be > 0 (fractions <= 1 or counts > 1)")
    fusion = [f for f in (fusion or ()) if f]
    bad = set(fusion) - {"early", "late", "gated"}
    if bad:
        raise FeatxError(f"unknown fusion method(s) {sorted(bad)}: use early, late, gated")
    if fusion and len(datas) < 2:
        raise FeatxError("fusion needs at least two caches (one per modality)")
    os.makedirs(out, exist_ok=True)
    probe_name = _probe_name(probe, task)

    rows, weight_rows, chance_parts = [], [], []
    aligned = _align(datas, missing) if fusion else None
    # fusion_layer "best" picks each modality's best dev layer per fold, "weighted" fits its layer-weighted
    # probe: where fusion's items and folds are the modality's own (every cache holds the same ids in the same
    # order), the modality's sweep has already fit that very probe (for "weighted", with --weighted), so its
    # result is kept ({(cache, seed, size, unit): layer or WeightedLayerProbe}) instead of fitting it again.
    reuse = (fusion_layer == "best" and probe != "mlp") or (fusion_layer == "weighted" and weighted)
    best_dev = {} if fusion and reuse and _same_items(datas, aligned) else None
    n_units = len(make_units(datas[0].y, datas[0].splits, task, folds, 0)[0])
    total = len(seeds) * len(sizes) * n_units * (len(datas) + (1 if fusion else 0))
    bar = tqdm(total=total, desc="probe", disable=not progress, unit="fit")
    for seed in seeds:
        for size in sizes:
            for d in datas:
                chance_here = seed == seeds[0] and size == sizes[-1] and d is datas[0]  # one chance estimate
                _sweep_one(d, task, probe, probe_name, pool, seed, size, folds, weighted, device, rows, weight_rows,
                           chance_parts if chance_here else None, bar, best_dev, datas.index(d))
            if fusion:
                _fuse(datas, aligned, task, probe, pool, seed, size, folds, fusion, fusion_layer, late_rule,
                      device, rows, weight_rows, bar, best_dev)
    bar.close()
    df = write_results(rows, out)
    pd.DataFrame(weight_rows, columns=WEIGHT_COLUMNS).to_csv(os.path.join(out, "layer_weights.csv"), index=False)
    best = best_layer_table(df, task)
    best.to_csv(os.path.join(out, "best_layers.csv"), index=False)
    meta = {**meta_head(task, chance_parts[0] if chance_parts else {}),
            "caches": [os.path.abspath(d.path) for d in datas],
            "encoders": [{"encoder": d.encoder, "modality": d.modality, "num_layers": d.num_layers,
                          "hidden_size": d.hidden_size} for d in datas]}
    if fusion:
        meta["fusion"] = {"items": len(aligned["ids"]), "missing": dict(aligned["missing"]),
                          "rule": "intersect: items missing from any modality are left out of fusion and listed here"}
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=float)
    if save_classifier:
        from featx._classifier import Classifier

        for d in datas:
            layer = best[(best.encoder == d.encoder) & (best.modality == d.modality)].best_layer.iloc[0]
            Classifier.from_sweep(d, layer, task, pool, probe).save(
                os.path.join(out, f"classifier__{_slug(d.encoder)}.safetensors"))
    return df


def write_results(rows, out):
    """The tidy results table (COLUMNS) of `rows` as out/results.csv and .parquet; returns the DataFrame."""
    df = pd.DataFrame(rows, columns=COLUMNS).astype({"num_layers": int, "layer": int, "train_size": float,
                                                     "seed": int, "value": float})
    df.to_csv(os.path.join(out, "results.csv"), index=False)
    df.to_parquet(os.path.join(out, "results.parquet"), index=False)
    return df


def meta_head(task, chance):
    """The keys every meta.json starts with: task, primary metric and its direction, chance scores."""
    primary = metrics.PRIMARY[task]
    return {"task": task, "primary_metric": primary, "higher_is_better": metrics.higher_is_better(primary),
            "chance": chance}


def _slug(text):
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-")


def _sweep_one(d, task, probe, probe_name, pool, seed, size, folds, weighted, device, rows, weight_rows,
               chance_parts, bar, best_dev=None, k=0):
    """Fit the probes of every layer of one cache for one (seed, size); append rows and layer weights, and
    record each fold's best dev layer in best_dev[(k, seed, size, unit)] (and its layer-weighted probe in
    best_dev[("weighted", k, seed, size, unit)]) when best_dev is a dict."""
    units, test_name = make_units(d.y, d.splits, task, folds, seed)
    base = dict(encoder=d.encoder, modality=d.modality, num_layers=d.num_layers, pooling=pool, probe=probe_name,
                train_size=size, seed=seed)
    poolers = [_Pooler(task) for _ in d.layers]
    w_pooler, chance_pooler = _Pooler(task), []
    y = d.y if task == "classification" else d.y.astype(np.float64)
    for u, (train, dev, test) in enumerate(units):
        fit = subsample(train, y, task, size, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # convergence warnings on tiny subsamples
            est = _make_probe(probe, seed, device).fit(d.X[fit], y[fit], d.X[dev], y[dev])
        if best_dev is not None:
            best_dev[(k, seed, size, u)] = est.best_layer_
        p_dev, p_test = est.predict_layers(d.X[dev]), est.predict_layers(d.X[test])
        for i, pooler in enumerate(poolers):
            pooler.add(y[dev], p_dev[:, i], y[test], p_test[:, i])
        if weighted:
            from featx.fusion import WeightedLayerProbe

            w = WeightedLayerProbe(random_state=seed).fit(d.X[fit], y[fit], d.X[dev], y[dev])
            if best_dev is not None:
                best_dev[("weighted", k, seed, size, u)] = w
            w_pooler.add(y[dev], w.predict(d.X[dev]), y[test], w.predict(d.X[test]))
            weight_rows.extend(dict(encoder=d.encoder, modality=d.modality, seed=seed, layer=l, weight=float(v),
                                    train_size=size, method="weighted") for l, v in zip(d.layers, w.weights_))
        if chance_parts is not None:
            chance_pooler.append((y[fit], y[test]))
        bar.update(1)
    for layer, pooler in zip(d.layers, poolers):
        dev_m, test_m = pooler.result()
        rows += _rows(dict(base, method="layer"), layer, "dev", dev_m) + _rows(dict(base, method="layer"), layer,
                                                                               test_name, test_m)
    if weighted:
        dev_m, test_m = w_pooler.result()
        wb = dict(base, method="weighted", probe="weighted-linear")
        rows += _rows(wb, -1, "dev", dev_m) + _rows(wb, -1, test_name, test_m)
    if chance_parts is not None:
        preds = [metrics.chance_prediction(task, tr, len(te)) for tr, te in chance_pooler]
        chance_parts.append(metrics.compute(task, np.concatenate([te for _, te in chance_pooler]),
                                            np.concatenate(preds)))


def _same_items(datas, aligned):
    """Whether fusion runs on every cache's own items in its own order, with the same splits: then its folds
    are each modality's own."""
    if any(not np.array_equal(idx, np.arange(len(d.ids))) for d, idx in zip(datas, aligned["index"])):
        return False
    splits = [d.splits for d in datas]
    return all(s is None for s in splits) or all(s is not None and np.array_equal(np.asarray(s, str),
                                                                                  np.asarray(splits[0], str))
                                                 for s in splits)


def _align(datas, missing):
    from featx.fusion import align_by_id

    ids, index, report = align_by_id([d.ids for d in datas], [d.modality for d in datas], missing)
    if any(report.values()):
        lost = {k: len(v) for k, v in report.items() if v}
        warnings.warn(f"fusion uses the {len(ids)} items present in every cache; missing per modality: {lost}")
    y0 = datas[0].y[index[0]]
    for d, idx in zip(datas[1:], index[1:]):
        if not np.array_equal(np.asarray(d.y[idx]).astype(str), np.asarray(y0).astype(str)):
            raise FeatxError(f"{d.path}: labels differ from {datas[0].path} for the same ids")
    return {"ids": ids, "index": index, "missing": report}


def _fuse(datas, aligned, task, probe, pool, seed, size, folds, methods, fusion_layer, late_rule, device, rows,
          weight_rows, bar, best_dev=None):
    """Fuse the modalities on the items they share, for one (seed, size); append rows."""
    from featx.fusion import EarlyFusion, GatedFusion, LateFusion

    idx = aligned["index"]
    y = datas[0].y[idx[0]]
    y = y if task == "classification" else y.astype(np.float64)
    splits = None if datas[0].splits is None else datas[0].splits[idx[0]]
    units, test_name = make_units(y, splits, task, folds, seed)
    base = dict(encoder="+".join(d.encoder for d in datas), modality="+".join(d.modality for d in datas),
                num_layers=-1, pooling=pool, train_size=size, seed=seed)
    poolers = {m: _Pooler(task) for m in methods}
    for u, (train, dev, test) in enumerate(units):
        fit = subsample(train, y, task, size, seed)
        feats, full = [], []
        for m, d in enumerate(datas):
            X = d.X[idx[m]]
            full.append(X)
            if fusion_layer == "best":
                # The best dev layer, chosen from the per-modality probe on the same fit / dev parts.
                sel = (best_dev[(m, seed, size, u)] if best_dev is not None
                       else _best_dev_layer(d, X, y, fit, dev, task, probe, seed, device))
                feats.append(X[:, sel])
            elif fusion_layer == "weighted":
                from featx.fusion import WeightedLayerProbe

                w = best_dev[("weighted", m, seed, size, u)] if best_dev is not None else \
                    WeightedLayerProbe(random_state=seed).fit(X[fit], y[fit], X[dev], y[dev])
                feats.append(w.transform(X))
            else:
                feats.append(X[:, d.layers.index(int(fusion_layer))])
        for method in methods:
            if method == "early":
                est = EarlyFusion(probe=probe if probe != "batched" else "linear", random_state=seed)
            elif method == "late":
                est = LateFusion(rule=late_rule, probe=probe if probe != "batched" else "linear", random_state=seed)
            else:
                est = GatedFusion(random_state=seed)
            if method == "gated":  # learns its own layer weights when asked for the weighted sum
                Xs = full if fusion_layer == "weighted" else [f[:, None] for f in feats]
            else:
                Xs = feats
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.fit([x[fit] for x in Xs], y[fit], [x[dev] for x in Xs], y[dev])
            poolers[method].add(y[dev], est.predict([x[dev] for x in Xs]), y[test], est.predict([x[test] for x in Xs]))
            if method == "gated" and fusion_layer == "weighted":
                weight_rows.extend(dict(encoder=d.encoder, modality=d.modality, seed=seed, layer=l, weight=float(v),
                                        train_size=size, method="fusion-gated")
                                   for d, w in zip(datas, est.weights_) for l, v in zip(d.layers, w))
        bar.update(1)
    for method, pooler in poolers.items():
        dev_m, test_m = pooler.result()
        b = dict(base, method=f"fusion-{method}",
                 probe={"early": "concat-" + _probe_name(probe, task), "late": f"late-{late_rule}",
                        "gated": "gated-attentive"}[method])
        rows += _rows(b, -1, "dev", dev_m) + _rows(b, -1, test_name, test_m)


def _best_dev_layer(d, X, y, fit, dev, task, probe, seed, device):
    est = _make_probe(probe if probe != "mlp" else "linear", seed, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(X[fit], y[fit], X[dev], y[dev]).best_layer_


def best_layer_table(df, task):
    """Per (encoder, modality, metric): the best dev layer (primary metric, mean over seeds, largest training
    size) with its test value, the output layer's test value, the weighted sum's, and the best fusion's."""
    primary = metrics.PRIMARY[task]
    sign = 1 if metrics.higher_is_better(primary) else -1
    top = df[df.train_size == df.train_size.max()]
    test_split = "test" if (top.split == "test").any() else "cv"
    mean = top.groupby(["encoder", "modality", "method", "layer", "split", "metric"], sort=False)["value"].mean()
    fusion_value = {}
    fus = top[top.method.str.startswith("fusion")]
    if len(fus):
        fm = fus.groupby(["method", "split", "metric"])["value"].mean()
        devs = {m: fm.get((m, "dev", primary), np.nan) for m in fus.method.unique()}
        chosen = max(devs, key=lambda m: sign * devs[m])   # chosen on dev, never test
        fusion_value = {k[2]: v for k, v in fm.items() if k[0] == chosen and k[1] == test_split}
    out = []
    layers = top[top.method == "layer"]
    for (enc, mod), g in layers.groupby(["encoder", "modality"], sort=False):
        L = int(g.num_layers.iloc[0])
        dev = g[(g.split == "dev") & (g.metric == primary)].groupby("layer")["value"].mean()
        best = int((sign * dev).idxmax())
        for metric in g.metric.unique():
            def val(method, layer):
                return float(mean.get((enc, mod, method, layer, test_split, metric), np.nan))
            out.append(dict(encoder=enc, modality=mod, metric=metric, best_layer=best, best_value=val("layer", best),
                            output_layer_value=val("layer", L - 1), weighted_value=val("weighted", -1),
                            fusion_value=float(fusion_value.get(metric, np.nan))))
    return pd.DataFrame(out, columns=["encoder", "modality", "metric", "best_layer", "best_value",
                                      "output_layer_value", "weighted_value", "fusion_value"])
