"""The results tables of probe, fuse and finetune: their columns, how per-fold scores are pooled into rows,
and the rule that picks the best layer (on dev, never test).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from featx import metrics
from featx.errors import FeatxError, first_line
from featx.metrics import higher_is_better

# train_size: as given ("0.5", "200", "1.0"); train_labels: the number of training labels it gave per fit.
COLUMNS = ["encoder", "modality", "num_layers", "layer", "pooling", "probe", "method", "train_size", "train_labels",
           "seed", "split", "metric", "value"]
# layer_weights.csv: one row per fit (seed, unit, training size) and layer; method ties it to its results rows.
WEIGHT_COLUMNS = ["encoder", "modality", "seed", "layer", "weight", "train_size", "method"]



class FoldScores:
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


def write_results(rows, out):
    """The tidy results table (COLUMNS) of `rows` as out/results.csv and .parquet; returns the DataFrame."""
    df = pd.DataFrame(rows, columns=COLUMNS).astype({"num_layers": int, "layer": int, "seed": int, "value": float})
    df.to_csv(os.path.join(out, "results.csv"), index=False)
    df.to_parquet(os.path.join(out, "results.parquet"), index=False)
    return df


def meta_head(task, chance):
    """The keys every meta.json starts with: task, primary metric and its direction, chance scores."""
    primary = metrics.PRIMARY[task]
    return {"task": task, "primary_metric": primary, "higher_is_better": metrics.higher_is_better(primary),
            "chance": chance}


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


# ---------------------------------------------------------------- reading a results directory
# Known metrics in the order the report lists them; others follow in the order they appear.
METRIC_ORDER = ["mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7",
                "acc", "balanced_acc", "f1_macro", "f1_weighted"]
METRIC_LABELS = {"mae": "MAE", "corr": "Pearson r", "acc2_has0": "Acc-2 (has-0)", "f1_has0": "F1 (has-0)",
                 "acc2_non0": "Acc-2 (non-0)", "f1_non0": "F1 (non-0)", "acc5": "Acc-5", "acc7": "Acc-7",
                 "acc": "accuracy", "balanced_acc": "balanced accuracy", "f1_macro": "macro F1",
                 "f1_weighted": "weighted F1"}
_REQUIRED = ("encoder", "layer", "metric", "value")
_DEFAULTS = {"modality": "", "num_layers": -1, "pooling": "", "probe": "", "method": "layer",
             "train_size": 1.0, "seed": 0, "split": "test"}
GROUP = ["encoder", "modality"]
_BEST_VALUES = ("best_value", "output_layer_value", "weighted_value", "fusion_value")


@dataclass
class Results:
    """One results directory: tidy rows plus the optional tables and meta.json."""

    path: str
    name: str
    rows: pd.DataFrame  # one row per (encoder, layer, method, train_size, seed, split, metric): value
    best_layers: pd.DataFrame  # encoder, modality, metric, best_layer, best_value, output_layer_value, ...
    layer_weights: pd.DataFrame | None  # encoder, modality, seed, layer, weight, train_size, method; None if not run
    meta: dict = field(default_factory=dict)
    selection_split: str = "dev"  # the split the best layers were chosen on

    @property
    def metrics(self):
        """Metrics present: the primary one first, then the known ones in METRIC_ORDER, then the others."""
        present = list(dict.fromkeys(self.rows["metric"]))
        primary = self.primary_metric
        return sorted(present, key=lambda m: (m != primary, METRIC_ORDER.index(m) if m in METRIC_ORDER
                                              else len(METRIC_ORDER) + present.index(m)))

    @property
    def primary_metric(self):
        primary = self.meta.get("primary_metric")
        present = list(dict.fromkeys(self.rows["metric"]))
        if primary in present:
            return primary
        known = [m for m in METRIC_ORDER if m in present]
        return (known or present)[0]

    def higher_is_better(self, metric):
        if metric == self.meta.get("primary_metric") and "higher_is_better" in self.meta:
            return bool(self.meta["higher_is_better"])
        return higher_is_better(metric)

    def chance(self, metric):
        value = (self.meta.get("chance") or {}).get(metric)
        return None if value is None or not np.isfinite(float(value)) else float(value)

    @property
    def eval_split(self):
        """The split whose scores are plotted: test if there is one, else cross-validation, else dev."""
        splits = set(self.rows["split"])
        return next((s for s in ("test", "cv", "dev") if s in splits), sorted(splits)[0])

    @property
    def notes(self):
        notes = self.meta.get("notes") or []
        return [notes] if isinstance(notes, str) else [str(n) for n in notes]

    @property
    def caches(self):
        """Cache paths from meta.json; relative ones resolve against the results directory."""
        out = []
        for p in self.meta.get("caches") or []:
            p = str(p)
            out.append(p if os.path.isabs(p) or not os.path.exists(os.path.join(self.path, p))
                       else os.path.join(self.path, p))
        return out

    def last_layer(self, encoder, modality):
        """Index of the output layer of an encoder: the deepest layer probed."""
        r = self.rows
        # Only probe rows: a fine-tuned model's row carries its cut layer, which need not be the deepest probed.
        return int(r[(r["encoder"] == encoder) & (r["modality"] == modality) & (r["method"] == "layer")
                     & (r["layer"] >= 0)]["layer"].max())

    @property
    def full_train_size(self):
        return float(self.rows["train_size"].max())

    @property
    def has_learning_curves(self):
        return self.rows["train_size"].nunique() > 1

    @property
    def has_finetune(self):
        """Whether the rows hold `featx finetune` results (method finetune)."""
        return bool((self.rows["method"] == "finetune").any())


def _read_table(path, what, required):
    try:
        df = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise FeatxError(f"cannot read {what} {path}: {first_line(e)}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise FeatxError(f"{path} lacks the column(s) {', '.join(missing)}")
    return df


def _fill(df, defaults):
    """Add missing optional columns with their defaults; fill gaps in the ones present; text columns as str."""
    for col, default in defaults.items():
        if col not in df.columns:
            df[col] = default
        elif not (isinstance(default, float) and np.isnan(default)):
            df[col] = df[col].fillna(default).astype(type(default))
    return df


def load_results(path):
    """Read the results directory at `path` into a Results; raises FeatxError if it has no results table."""
    path = os.path.abspath(str(path))
    if not os.path.isdir(path):
        raise FeatxError(f"results directory {path} " + ("is not a directory" if os.path.exists(path)
                                                          else "does not exist"))
    table = next((os.path.join(path, f) for f in ("results.csv", "results.parquet")
                  if os.path.exists(os.path.join(path, f))), None)
    if table is None:
        raise FeatxError(f"{path} is not a featx results directory: it has no results.csv or results.parquet")
    rows = _fill(_read_table(table, "results", _REQUIRED).dropna(subset=["value"]), _DEFAULTS)
    rows = rows.astype({"encoder": str, "metric": str, "layer": int, "value": float})
    if rows.empty:
        raise FeatxError(f"{table} has no rows with a value")

    meta = {}
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise FeatxError(f"cannot read {meta_path}: {e}")

    weights = None
    weights_path = os.path.join(path, "layer_weights.csv")
    if os.path.exists(weights_path):
        # Files from before train_size / method were written: one method, training size unknown (NaN).
        weights = _fill(_read_table(weights_path, "layer weights", ("encoder", "layer", "weight")),
                        {"modality": "", "seed": 0, "method": "weighted", "train_size": np.nan})
        weights = weights.astype({"encoder": str, "layer": int, "weight": float}) if len(weights) else None

    res = Results(path=path, name=os.path.basename(path.rstrip(os.sep)), rows=rows, best_layers=pd.DataFrame(),
                  layer_weights=weights, meta=meta)
    best_path = os.path.join(path, "best_layers.csv")
    if os.path.exists(best_path):
        best = _fill(_read_table(best_path, "best layers", ("encoder", "metric", "best_layer")),
                     {"modality": "", **{c: np.nan for c in _BEST_VALUES}})
        res.best_layers = best.astype({"encoder": str, "metric": str})
    else:
        res.best_layers = derive_best_layers(res)
        res.selection_split = "dev" if "dev" in set(rows["split"]) else res.eval_split
    return res


def _mean_by(rows, keys):
    return rows.groupby(keys, sort=True)["value"].mean()


def derive_best_layers(res):
    """best_layers.csv computed from the rows: best layer on dev (or on the evaluated split without dev)."""
    rows = res.rows[res.rows["train_size"] == res.full_train_size]
    layer_rows = rows[(rows["method"] == "layer") & (rows["layer"] >= 0)]
    select_split = "dev" if "dev" in set(layer_rows["split"]) else res.eval_split
    out = []
    for (encoder, modality, metric), g in layer_rows.groupby(GROUP + ["metric"], sort=False):
        chooser = _mean_by(g[g["split"] == select_split], "layer")
        scores = _mean_by(g[g["split"] == res.eval_split], "layer")
        if chooser.empty or scores.empty:
            continue
        best = int(chooser.idxmax() if res.higher_is_better(metric) else chooser.idxmin())
        enc = rows[(rows["encoder"] == encoder) & (rows["modality"] == modality) & (rows["metric"] == metric)
                   & (rows["split"] == res.eval_split)]
        weighted = enc[enc["method"] == "weighted"]["value"]
        out.append({"encoder": encoder, "modality": modality, "metric": metric, "best_layer": best,
                    "best_value": scores.get(best, np.nan), "output_layer_value": scores.iloc[-1],
                    "weighted_value": weighted.mean() if len(weighted) else np.nan, "fusion_value": np.nan})
    fusion = rows[rows["method"].str.startswith("fusion") & (rows["split"] == res.eval_split)]
    for (encoder, modality, method, metric), g in fusion.groupby(GROUP + ["method", "metric"], sort=False):
        # One row per fusion method, named after it: a mean over early and late fusion would mean nothing.
        out.append({"encoder": f"{encoder} {method}", "modality": modality, "metric": metric, "best_layer": np.nan,
                    "best_value": np.nan, "output_layer_value": np.nan, "weighted_value": np.nan,
                    "fusion_value": g["value"].mean()})
    return pd.DataFrame(out, columns=GROUP + ["metric", "best_layer", *_BEST_VALUES])


def best_layer(res, encoder, modality, metric):
    """The best layer recorded for (encoder, modality, metric), or None."""
    b = res.best_layers
    # A best_layers.csv without a modality column matches on the encoder alone.
    same = (b["encoder"] == encoder) & (b["metric"] == metric) & b["modality"].isin([modality, ""])
    hit = b[same]["best_layer"].dropna()
    hit = hit[hit >= 0]  # fusion rows carry -1
    return int(hit.iloc[0]) if len(hit) else None
