"""Read a results directory written by `featx probe`, `featx fuse` or `featx finetune` and reduce it to what the
report shows.

A results directory holds results.csv (or results.parquet), and optionally best_layers.csv, layer_weights.csv and
meta.json. Only results are required; every other file and every optional column has a fallback.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from featx.errors import FeatxError, first_line
from featx.metrics import higher_is_better

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
_GROUP = ["encoder", "modality"]
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
    for (encoder, modality, metric), g in layer_rows.groupby(_GROUP + ["metric"], sort=False):
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
    for (encoder, modality, method, metric), g in fusion.groupby(_GROUP + ["method", "metric"], sort=False):
        # One row per fusion method, named after it: a mean over early and late fusion would mean nothing.
        out.append({"encoder": f"{encoder} {method}", "modality": modality, "metric": metric, "best_layer": np.nan,
                    "best_value": np.nan, "output_layer_value": np.nan, "weighted_value": np.nan,
                    "fusion_value": g["value"].mean()})
    return pd.DataFrame(out, columns=_GROUP + ["metric", "best_layer", *_BEST_VALUES])


def best_layer(res, encoder, modality, metric):
    """The best layer recorded for (encoder, modality, metric), or None."""
    b = res.best_layers
    # A best_layers.csv without a modality column matches on the encoder alone.
    same = (b["encoder"] == encoder) & (b["metric"] == metric) & b["modality"].isin([modality, ""])
    hit = b[same]["best_layer"].dropna()
    hit = hit[hit >= 0]  # fusion rows carry -1
    return int(hit.iloc[0]) if len(hit) else None


def layer_curves(res, metric):
    """Score against layer on the evaluated split at the full training size, over seeds (or folds).

    Returns a DataFrame with columns encoder, modality, probe, pooling, layer, mean, std, count; one row per layer.
    """
    r = res.rows
    r = r[(r["metric"] == metric) & (r["method"] == "layer") & (r["layer"] >= 0) & (r["split"] == res.eval_split)
          & (r["train_size"] == res.full_train_size)]
    keys = _GROUP + ["probe", "pooling"]
    out = r.groupby(keys + ["layer"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    order = out.groupby(keys, sort=False).ngroup()  # encoders in the order they appear in the results
    return out.assign(_order=order).sort_values(["_order", "layer"]).drop(columns="_order").reset_index(drop=True)


def method_scores(res, metric, methods):
    """Mean, std and count over seeds of whole-model methods (weighted, fusion-*, finetune) at full training size.

    Returns a DataFrame with columns encoder, modality, method, mean, std, count.
    """
    r = res.rows
    r = r[(r["metric"] == metric) & r["method"].isin(methods) & (r["split"] == res.eval_split)
          & (r["train_size"] == res.full_train_size)]
    return r.groupby(_GROUP + ["method"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()


def learning_curves(res, metric):
    """Score against training size for the best layer, the output layer and every whole-model method.

    Returns a DataFrame with columns encoder, modality, line (a readable label), train_size, mean, std, count.
    """
    r = res.rows
    r = r[(r["metric"] == metric) & (r["split"] == res.eval_split)]
    parts = []
    for (encoder, modality), g in r.groupby(_GROUP, sort=False):
        layers = g[(g["method"] == "layer") & (g["layer"] >= 0)]
        if len(layers):
            best = best_layer(res, encoder, modality, metric)
            last = res.last_layer(encoder, modality)
            if best is None or best == last:
                picks = [(last, f"output layer ({last})" if best is None else f"best = output layer ({last})")]
            else:
                picks = [(best, f"best layer ({best})"), (last, f"output layer ({last})")]
            for layer, label in picks:
                sel = layers[layers["layer"] == layer]
                parts.append(sel.assign(line=label))
        others = g[g["method"] != "layer"]
        parts.append(others.assign(line=others["method"].replace({"weighted": "weighted sum"})))
    if not parts:
        return pd.DataFrame(columns=_GROUP + ["line", "train_size", "mean", "std", "count"])
    keys = _GROUP + ["line", "train_size"]
    return pd.concat(parts).groupby(keys, sort=False)["value"].agg(["mean", "std", "count"]).reset_index()


def full_data_weights(res):
    """The learned layer weights of the largest training size (all rows when the file has no train_size).

    Returns a DataFrame like res.layer_weights, or None when the results have no layer weights.
    """
    w = res.layer_weights
    if w is None or w.empty or not w["train_size"].notna().any():
        return w
    return w[w["train_size"] == w["train_size"].max()]


SUMMARY_COLUMNS = ["encoder", "modality", "metric", "best layer", "best-layer score", "output-layer score",
                   "best minus output", "weighted sum", "fusion"]
FINETUNE_COLUMN = "fine-tuned"


def _finetune_label(res, encoder, probe, layer):
    """'enc finetune-concat (layer 2)': the cut layer from the row, or per model from meta.json's encoders."""
    cut = [int(layer)] if layer >= 0 else \
        [e["layer"] for e in res.meta.get("encoders") or [] if isinstance(e, dict) and "layer" in e]
    name = f"{encoder} {probe if str(probe).startswith('finetune') else 'finetune'}"
    if not cut or (layer < 0 and len(cut) != len(str(encoder).split("+"))):
        return name
    return f"{name} (layer{'s' * (len(cut) > 1)} {', '.join(str(k) for k in cut)})"


def finetune_table(res, metrics):
    """Fine-tuned models' scores on the evaluated split at the full training size, mean over seeds (or folds).

    The epoch each run keeps is chosen on dev (early stopping), so this is the dev-selected test score.
    Returns a DataFrame with columns encoder (labelled with head and cut layer), modality, metric, value.
    """
    r = res.rows
    r = r[(r["method"] == "finetune") & r["metric"].isin(metrics) & (r["split"] == res.eval_split)
          & (r["train_size"] == res.full_train_size)]
    g = r.groupby(["encoder", "modality", "probe", "layer", "metric"], sort=False)["value"].mean().reset_index()
    labels = [_finetune_label(res, e, p, k) for e, p, k in zip(g["encoder"], g["probe"], g["layer"])]
    return pd.DataFrame({"encoder": labels, "modality": g["modality"], "metric": g["metric"], "value": g["value"]},
                        columns=["encoder", "modality", "metric", "value"])


def summary_table(res, metrics=None, finetune=None):
    """Best layer vs output layer vs weighted sum vs fusion (vs fine-tuning), from best_layers (test scores).

    metrics: the metrics to keep (default: the primary one). finetune: add the 'fine-tuned' column and one
    row per fine-tuned model (default: only when the results hold finetune rows). Returns a DataFrame with
    SUMMARY_COLUMNS (+ 'fine-tuned'); 'best minus output' is signed so that a positive number means the best
    layer is better.
    """
    metrics = [res.primary_metric] if metrics is None else list(metrics)
    finetune = res.has_finetune if finetune is None else bool(finetune)
    b = res.best_layers[res.best_layers["metric"].isin(metrics)].copy()
    sign = b["metric"].map(lambda m: 1.0 if res.higher_is_better(m) else -1.0)
    layer = b["best_layer"].where(b["best_layer"].notna() & (b["best_layer"] >= 0))
    out = pd.DataFrame({"encoder": b["encoder"], "modality": b["modality"], "metric": b["metric"],
                        "best layer": layer.astype("Int64"), "best-layer score": b["best_value"],
                        "output-layer score": b["output_layer_value"],
                        "best minus output": sign * (b["best_value"] - b["output_layer_value"]),
                        "weighted sum": b["weighted_value"], "fusion": b["fusion_value"]})
    if finetune:
        out[FINETUNE_COLUMN] = np.nan
        ft = finetune_table(res, metrics)
        if len(ft):
            ft = ft.rename(columns={"value": FINETUNE_COLUMN}).reindex(columns=out.columns)
            out = pd.concat([out, ft.astype({c: out[c].dtype for c in out.columns})], ignore_index=True) \
                if len(out) else ft.astype({"best layer": "Int64"})
    order = {m: i for i, m in enumerate(metrics)}
    return out.sort_values("metric", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def _by(gain):
    return f"{'better' if gain >= 0 else 'worse'} by {abs(gain):.3f}"


def findings(res, metric=None):
    """Plain sentences on the metric (default: primary): best intermediate vs output layer, and what fusion adds."""
    metric = metric or res.primary_metric
    rows = summary_table(res, [metric]).to_dict("records")
    name = METRIC_LABELS.get(metric, metric)
    sign = 1.0 if res.higher_is_better(metric) else -1.0
    single = [r for r in rows if pd.notna(r["best-layer score"])]
    out = []
    for r in single:
        gain = r["best minus output"]
        if pd.isna(gain):
            continue
        verdict = "beats" if gain > 0 else ("ties with" if gain == 0 else "trails")
        out.append(f"{r['encoder']}: layer {r['best layer']} {verdict} the output layer on {name} "
                   f"({r['best-layer score']:.3f} vs {r['output-layer score']:.3f}, {_by(gain)}).")
    fused = {}  # value -> label; probe runs repeat the chosen fusion's value on every encoder's row
    for r in rows:
        if pd.notna(r["fusion"]):
            fused.setdefault(r["fusion"], r["encoder"] if pd.isna(r["best-layer score"]) else "the fused model")
    if single:
        top = max(single, key=lambda r: sign * r["best-layer score"])
        for value, label in fused.items():
            gain = sign * (value - top["best-layer score"])
            out.append(f"Fusion ({label}) reaches {name} {value:.3f}, against {top['best-layer score']:.3f} "
                       f"for the best single encoder ({top['encoder']}, layer {top['best layer']}), {_by(gain)}.")
    return out
