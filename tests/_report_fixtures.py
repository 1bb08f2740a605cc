"""Synthetic results directories (the format `featx probe` writes) and HDF5 caches, with plausible values."""
import json
import os

import numpy as np
import pandas as pd

REGRESSION_METRICS = ["mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7"]
CLASSIFICATION_METRICS = ["acc", "balanced_acc", "f1_macro", "f1_weighted"]
# (encoder, modality, num_layers, layer where the probe peaks, peak corr)
ENCODERS = [("clip-vit-tiny-random", "vision", 4, 2, 0.25),
            ("wavlm-tiny-random", "audio", 6, 3, 0.35),
            ("bert-base-uncased", "text", 12, 8, 0.70)]


def _curve(num_layers, peak_layer, peak):
    """Score in [0, 1] over layers 0..num_layers: rises to the peak, then sags towards the output layer."""
    layers = np.arange(num_layers + 1)
    return peak * np.exp(-0.5 * ((layers - peak_layer) / (0.45 * num_layers)) ** 2)


def _regression_metrics(corr, rng):
    """Metric values that move together with the correlation, as MOSI probes do."""
    jitter = lambda s: rng.normal(0, s)  # noqa: E731
    acc2 = 0.5 + 0.4 * corr + jitter(0.01)
    return {"mae": 1.45 - 0.85 * corr + jitter(0.01), "corr": corr, "acc2_has0": acc2,
            "f1_has0": acc2 - 0.005, "acc2_non0": acc2 + 0.01, "f1_non0": acc2 + 0.005,
            "acc5": 0.2 + 0.3 * corr + jitter(0.01), "acc7": 0.17 + 0.3 * corr + jitter(0.01)}


def _classification_metrics(score, rng):
    acc = 0.4 + 0.5 * score + rng.normal(0, 0.01)
    return {"acc": acc, "balanced_acc": acc - 0.03, "f1_macro": acc - 0.05, "f1_weighted": acc - 0.01}


def make_results_dir(path, task="regression", encoders=ENCODERS, seeds=(0, 1, 2), train_sizes=(0.1, 0.25, 0.5, 1.0),
                     splits=("dev", "test"), fusion=True, weights=True, best_layers=True, notes=(), caches=(),
                     seed=0):
    """Write results.csv, results.parquet, best_layers.csv, layer_weights.csv and meta.json under `path`.

    Returns `path`. Scores follow `_curve` per encoder, shrink with the training size and vary over seeds.
    """
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    to_metrics = _regression_metrics if task == "regression" else _classification_metrics
    rows = []

    def add(encoder, modality, num_layers, layer, method, ts, s, split, score):
        for metric, value in to_metrics(score, rng).items():
            rows.append({"encoder": encoder, "modality": modality, "num_layers": num_layers, "layer": layer,
                         "pooling": "mean", "probe": "ridge", "method": method, "train_size": ts, "seed": s,
                         "split": split, "metric": metric, "value": value})

    for ts in train_sizes:
        shrink = 1.0 - 0.5 * (1.0 - ts) ** 2
        for s in seeds:
            for split in splits:
                for encoder, modality, num_layers, peak_layer, peak in encoders:
                    curve = _curve(num_layers, peak_layer, peak) * shrink
                    for layer, score in enumerate(curve):
                        add(encoder, modality, num_layers, layer, "layer", ts, s, split, score + rng.normal(0, 0.02))
                    add(encoder, modality, num_layers, -1, "weighted", ts, s, split,
                        curve.max() + 0.01 + rng.normal(0, 0.02))
                if fusion:
                    best = max(p for *_, p in encoders) * shrink
                    add("V+A+T", "multimodal", 0, -1, "fusion-late", ts, s, split, best + 0.04 + rng.normal(0, .02))
                    add("V+A+T", "multimodal", 0, -1, "fusion-early", ts, s, split, best + 0.02 + rng.normal(0, .02))
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(path, "results.csv"), index=False)
    df.to_parquet(os.path.join(path, "results.parquet"), index=False)

    metrics = list(to_metrics(0.5, rng))
    primary = "mae" if task == "regression" else "acc"
    higher = {m: m != "mae" for m in metrics}
    full = df[df["train_size"] == max(train_sizes)]
    eval_split = "test" if "test" in splits else splits[0]
    select_split = "dev" if "dev" in splits else eval_split
    if best_layers:
        best_rows = []
        for encoder, modality, num_layers, *_ in encoders:
            for metric in metrics:
                g = full[(full["encoder"] == encoder) & (full["metric"] == metric)]
                lay = g[g["method"] == "layer"]
                dev = lay[lay["split"] == select_split].groupby("layer")["value"].mean()
                test = lay[lay["split"] == eval_split].groupby("layer")["value"].mean()
                best = int(dev.idxmax() if higher[metric] else dev.idxmin())
                weighted = g[(g["method"] == "weighted") & (g["split"] == eval_split)]["value"].mean()
                best_rows.append({"encoder": encoder, "modality": modality, "metric": metric, "best_layer": best,
                                  "best_value": test[best], "output_layer_value": test[num_layers],
                                  "weighted_value": weighted, "fusion_value": np.nan})
        if fusion:
            for metric in metrics:
                g = full[(full["method"] == "fusion-late") & (full["split"] == eval_split)
                         & (full["metric"] == metric)]
                best_rows.append({"encoder": "V+A+T", "modality": "multimodal", "metric": metric, "best_layer": -1,
                                  "best_value": np.nan, "output_layer_value": np.nan, "weighted_value": np.nan,
                                  "fusion_value": g["value"].mean()})
        pd.DataFrame(best_rows).to_csv(os.path.join(path, "best_layers.csv"), index=False)

    if weights:
        wrows = []
        for encoder, modality, num_layers, peak_layer, peak in encoders:
            for ts in train_sizes:
                # Fewer labels: the weights stay near the bottom layer, so every size's bars differ.
                at = peak_layer if ts == max(train_sizes) else 0
                for s in seeds:
                    logits = 3 * _curve(num_layers, at, 1.0) + rng.normal(0, 0.2, num_layers + 1)
                    w = np.exp(logits) / np.exp(logits).sum()
                    wrows += [{"encoder": encoder, "modality": modality, "seed": s, "layer": l, "weight": w[l],
                               "train_size": ts, "method": "weighted"} for l in range(num_layers + 1)]
        pd.DataFrame(wrows).to_csv(os.path.join(path, "layer_weights.csv"), index=False)

    chance = ({"mae": 1.45, "corr": 0.0, "acc2_has0": 0.57, "f1_has0": 0.41, "acc2_non0": 0.58, "f1_non0": 0.42,
               "acc5": 0.21, "acc7": 0.17} if task == "regression"
              else {"acc": 0.4, "balanced_acc": 0.33, "f1_macro": 0.19, "f1_weighted": 0.23})
    meta = {"task": task, "primary_metric": primary, "higher_is_better": higher[primary], "chance": chance,
            "caches": list(caches),
            "encoders": [{"encoder": e, "modality": m, "num_layers": n, "hidden_size": 32}
                         for e, m, n, *_ in encoders]}
    if notes:
        meta["notes"] = list(notes)
    with open(os.path.join(path, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return path


def write_cache(path, ids, pooled, done=None, model="tiny", modality="text"):
    """An HDF5 cache in the layout featx.cache writes: ids, done, error, pooled/mean (N, L, D)."""
    import h5py

    pooled = np.asarray(pooled, dtype=np.float32)
    done = np.ones(len(ids), bool) if done is None else np.asarray(done, bool)
    with h5py.File(path, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("done", data=done)
        f.create_dataset("error", data=np.asarray([""] * len(ids), dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("pooled/mean", data=pooled)
        f.attrs.update({"model": model, "modality": modality, "num_layers": pooled.shape[1],
                        "hidden_size": pooled.shape[2], "poolings": "mean", "dtype": "float32"})
    return path
