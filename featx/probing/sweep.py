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

import numpy as np
import pandas as pd

from featx import metrics
from featx.errors import FeatxError
from featx.probing.classifier import Classifier
from featx.probing.data import load_cache
from featx.probing.estimators import infer_task
from featx.probing.fusion import EarlyFusion, GatedFusion, LateFusion, WeightedLayerProbe, align_by_id
from featx.probing.registry import get_probe, make_probe
from featx.probing.results import WEIGHT_COLUMNS, FoldScores, best_layer_table, meta_head, write_results
from featx.probing.splits import make_folds, subsample



def _rows(base, layer, split, values):
    return [dict(base, layer=layer, split=split, metric=m, value=float(v)) for m, v in values.items()]


def run_probe(caches, out, probe="linear", layers="all", pool="mean", seeds=1, train_sizes=(1.0,), folds=5,
              weighted=False, fusion=(), fusion_layer="best", missing="intersect", late_rule="mean",
              device="auto", save_classifier=False, progress=True, task="auto"):
    """Probe every layer of every cache, optionally fuse modalities; write results to `out`.

    caches: list of .h5 paths. probe: linear | ridge | logistic | mlp | batched. layers: "all" or indices.
    seeds: int n (seeds 0..n-1) or a list. train_sizes: fractions of the training part, or counts > 1
    (k per class for classification). weighted: also fit the learned layer-weighted sum. fusion: any of
    "early", "late", "gated". fusion_layer: "best" (best dev layer per modality), "weighted", or an int.
    missing: "intersect" | "error" for items absent from a modality. task: "auto" (from the labels) or forced.
    Writes results.csv / .parquet, best_layers.csv, layer_weights.csv, meta.json. Returns the results DataFrame.
    """
    from featx.progress import progress_bar

    datas = [load_cache(p, pool, layers) for p in caches]
    tasks = {infer_task(d.y) for d in datas} if task == "auto" else {task}
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
    probe_name = get_probe(probe).label(task)

    rows, weight_rows, chance_parts = [], [], []
    aligned = _align(datas, missing) if fusion else None
    # fusion_layer "best" picks each modality's best dev layer per fold, "weighted" fits its layer-weighted
    # probe: where fusion's items and folds are the modality's own (every cache holds the same ids in the same
    # order), the modality's sweep has already fit that very probe (for "weighted", with --weighted), so its
    # result is kept ({(cache, seed, size, unit): layer or WeightedLayerProbe}) instead of fitting it again.
    reuse = (fusion_layer == "best" and probe != "mlp") or (fusion_layer == "weighted" and weighted)
    best_dev = {} if fusion and reuse and _same_items(datas, aligned) else None
    n_units = len(make_folds(datas[0].y, datas[0].splits, task, folds, 0)[0])
    total = len(seeds) * len(sizes) * n_units * (len(datas) + (1 if fusion else 0))
    bar = progress_bar(total, "probe", "fit", enabled=progress)
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
        for d in datas:
            layer = best[(best.encoder == d.encoder) & (best.modality == d.modality)].best_layer.iloc[0]
            Classifier.from_sweep(d, layer, task, pool, probe).save(
                os.path.join(out, f"classifier__{_slug(d.encoder)}.safetensors"))
    return df


def _slug(text):
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-")


def _sweep_one(d, task, probe, probe_name, pool, seed, size, folds, weighted, device, rows, weight_rows,
               chance_parts, bar, best_dev=None, k=0):
    """Fit the probes of every layer of one cache for one (seed, size); append rows and layer weights, and
    record each fold's best dev layer in best_dev[(k, seed, size, unit)] (and its layer-weighted probe in
    best_dev[("weighted", k, seed, size, unit)]) when best_dev is a dict."""
    units, test_name = make_folds(d.y, d.splits, task, folds, seed)
    base = dict(encoder=d.encoder, modality=d.modality, num_layers=d.num_layers, pooling=pool, probe=probe_name,
                train_size=size, seed=seed)
    poolers = [FoldScores(task) for _ in d.layers]
    w_pooler, chance_pooler = FoldScores(task), []
    y = d.y if task == "classification" else d.y.astype(np.float64)
    for u, (train, dev, test) in enumerate(units):
        fit = subsample(train, y, task, size, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # convergence warnings on tiny subsamples
            est = make_probe(probe, seed, device).fit(d.X[fit], y[fit], d.X[dev], y[dev])
        if best_dev is not None:
            best_dev[(k, seed, size, u)] = est.best_layer_
        p_dev, p_test = est.predict_layers(d.X[dev]), est.predict_layers(d.X[test])
        for i, pooler in enumerate(poolers):
            pooler.add(y[dev], p_dev[:, i], y[test], p_test[:, i])
        if weighted:
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
    idx = aligned["index"]
    y = datas[0].y[idx[0]]
    y = y if task == "classification" else y.astype(np.float64)
    splits = None if datas[0].splits is None else datas[0].splits[idx[0]]
    units, test_name = make_folds(y, splits, task, folds, seed)
    base = dict(encoder="+".join(d.encoder for d in datas), modality="+".join(d.modality for d in datas),
                num_layers=-1, pooling=pool, train_size=size, seed=seed)
    poolers = {m: FoldScores(task) for m in methods}
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
                 probe={"early": "concat-" + get_probe(probe).label(task), "late": f"late-{late_rule}",
                        "gated": "gated-attentive"}[method])
        rows += _rows(b, -1, "dev", dev_m) + _rows(b, -1, test_name, test_m)


def _best_dev_layer(d, X, y, fit, dev, task, probe, seed, device):
    est = make_probe(probe if probe != "mlp" else "linear", seed, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(X[fit], y[fit], X[dev], y[dev]).best_layer_


