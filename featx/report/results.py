"""Read a results directory written by `featx probe`, `featx fuse` or `featx finetune` and reduce it to what the
report shows.

A results directory holds results.csv (or results.parquet), and optionally best_layers.csv, layer_weights.csv and
meta.json. Only results are required; every other file and every optional column has a fallback.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from featx.probing.results import (GROUP, METRIC_LABELS, best_layer)

def layer_curves(res, metric):
    """Score against layer on the evaluated split at the full training size, over seeds (or folds).

    Returns a DataFrame with columns encoder, modality, probe, pooling, layer, mean, std, count; one row per layer.
    """
    r = res.rows
    r = r[(r["metric"] == metric) & (r["method"] == "layer") & (r["layer"] >= 0) & (r["split"] == res.eval_split)
          & (r["train_size"] == res.full_train_size)]
    keys = GROUP + ["probe", "pooling"]
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
    return r.groupby(GROUP + ["method"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()


def learning_curves(res, metric):
    """Score against training size for the best layer, the output layer and every whole-model method.

    Returns a DataFrame with columns encoder, modality, line (a readable label), train_size (as written),
    labels (the number of training labels: train_labels, or the size's number in older tables), mean, std, count;
    rows in increasing number of labels; a size whose point repeats another's (same labels, same score) is left
    out.
    """
    r = res.rows
    r = r[(r["metric"] == metric) & (r["split"] == res.eval_split)]
    parts = []
    for (encoder, modality), g in r.groupby(GROUP, sort=False):
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
        return pd.DataFrame(columns=GROUP + ["line", "train_size", "labels", "mean", "std", "count"])
    keys = GROUP + ["line", "train_size"]
    out = pd.concat(parts).groupby(keys, sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    out.insert(len(keys), "labels", out["train_size"].map(res.labels_of))
    # sizes that came to the same labels (0.01 and 0.05 of 36 items: 2 each) in tables written before probe ran
    # them once: the same point, drawn once
    out = out[~out.duplicated(GROUP + ["line", "labels", "mean"])]
    order = out.groupby(GROUP + ["line"], sort=False).ngroup()
    return out.assign(_o=order).sort_values(["_o", "labels"], kind="stable").drop(columns="_o").reset_index(drop=True)


def full_data_weights(res):
    """The learned layer weights of the full training part (all rows when the file has no train_size).

    Returns a DataFrame like res.layer_weights, or None when the results have no layer weights.
    """
    w = res.layer_weights
    if w is None or w.empty or not w["train_size"].notna().any():
        return w
    return w[w["train_size"] == res.full_train_size]


SUMMARY_COLUMNS = ["encoder", "modality", "metric", "best layer", "best-layer score", "output-layer score",
                   "best minus output", "weighted sum", "fusion method", "fusion"]
# The columns of SUMMARY_COLUMNS that hold scores.
SCORE_COLUMNS = ["best-layer score", "output-layer score", "best minus output", "weighted sum", "fusion"]
DIFF_COLUMN = "best minus output"   # signed: positive when the best layer is better
FINETUNE_COLUMN = "fine-tuned"
# After "best layer" when an encoder's layers were a subset (--layers): the layers its best layer and weighted sum
# are over ("all" for the others).
LAYERS_COLUMN = "layers probed"


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
    layer is better. When some encoder's layers were a subset (`featx probe --layers`), a 'layers probed' column
    after 'best layer' says which ('all' for the others, '–' for rows without layers).
    """
    metrics = [res.primary_metric] if metrics is None else list(metrics)
    finetune = res.has_finetune if finetune is None else bool(finetune)
    b = res.best_layers[res.best_layers["metric"].isin(metrics)].copy()
    sign = b["metric"].map(lambda m: 1.0 if res.higher_is_better(m) else -1.0)
    layer = b["best_dev_layer"].where(b["best_dev_layer"].notna() & (b["best_dev_layer"] >= 0))
    method = b["fusion_method"].where(b["fusion_score"].notna()).map(
        lambda m: m[len("fusion-"):] if isinstance(m, str) and m.startswith("fusion-") else m)
    out = pd.DataFrame({"encoder": b["encoder"], "modality": b["modality"], "metric": b["metric"],
                        "best layer": layer.astype("Int64"), "best-layer score": b["best_layer_score"],
                        "output-layer score": b["output_layer_score"],
                        # + 0.0: the best layer *is* the output layer gives 0.0, never -0.0 ("-0.000")
                        "best minus output": sign * (b["best_layer_score"] - b["output_layer_score"]) + 0.0,
                        "weighted sum": b["weighted_score"], "fusion method": method.astype(object),
                        "fusion": b["fusion_score"]})
    probed = [res.layers_probed(e, m) if pd.notna(k) else "–" for e, m, k in zip(out["encoder"], out["modality"],
                                                                                out["best layer"])]
    if any(p not in ("all", "–") for p in probed):
        out.insert(out.columns.get_loc("best layer") + 1, LAYERS_COLUMN, pd.Series(probed, index=out.index,
                                                                                   dtype=object))
    if finetune:
        out[FINETUNE_COLUMN] = np.nan
        ft = finetune_table(res, metrics)
        if len(ft):
            ft = ft.rename(columns={"value": FINETUNE_COLUMN}).reindex(columns=out.columns)
            out = pd.concat([out, ft.astype({c: out[c].dtype for c in out.columns})], ignore_index=True) \
                if len(out) else ft.astype({"best layer": "Int64"})
    order = {m: i for i, m in enumerate(metrics)}
    return out.sort_values("metric", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def decimals(*values) -> int:
    """The decimals that show `values` (NaN left out) that differ as different numbers: 3, or up to 6 where 3
    would round two of them to one number; values that differ by less than 1e-9 count as equal."""
    finite = [float(v) for v in values if pd.notna(v)]
    distinct = len({round(v, 9) for v in finite})
    return next((d for d in range(3, 7) if len({f"{v:.{d}f}" for v in finite}) == distinct), 6)


def diff_text(value) -> str:
    """A signed difference with 3 decimals, or as many more as a difference that is not zero needs to show a digit
    (never -0.000 or 0.000 for it); "–" for NaN."""
    if pd.isna(value):
        return "–"
    value = float(value) + 0.0   # -0.0 -> 0.0
    d = next((d for d in range(3, 10) if abs(value) < 1e-9 or round(value, d) != 0), 9)
    return f"{0.0 if abs(value) < 1e-9 else value:.{d}f}"


def _by(gain):
    """'better by 0.012', 'worse by less than 0.001', 'the same score' for a signed gain (positive: better)."""
    if abs(gain) < 1e-9:
        return "the same score"
    return f"{'better' if gain > 0 else 'worse'} by " + ("less than 0.001" if round(gain, 3) == 0 else
                                                        f"{abs(gain):.3f}")


def _versus(a, b) -> str:
    """'0.205 vs 0.201', with the decimals that tell two different scores apart."""
    d = decimals(a, b)
    return f"{a:.{d}f} vs {b:.{d}f}"


def _selection_score(res, row):
    """The primary metric of an encoder's best layer on the split it was chosen on (dev), mean over seeds, at the
    headline training size; NaN where the rows have none."""
    r = res.rows
    hit = r[(r["encoder"] == row["encoder"]) & (r["modality"] == row["modality"]) & (r["method"] == "layer")
            & (r["layer"] == int(row["best layer"])) & (r["split"] == res.selection_split)
            & (r["metric"] == res.primary_metric) & (r["train_size"] == res.full_train_size)]["value"]
    return float(hit.mean()) if len(hit) else np.nan


def best_single(res, rows):
    """The row of `rows` (summary_table records with a best layer) whose best layer scores best on the selection
    split (dev) by the primary metric, as the best layers and the fusion method are chosen; never on test.
    Rows without a dev score are chosen from only when none has one."""
    sign = 1.0 if res.higher_is_better(res.primary_metric) else -1.0
    scored = [(sign * _selection_score(res, r), k) for k, r in enumerate(rows)]
    finite = [(v, k) for v, k in scored if np.isfinite(v)]
    return rows[max(finite)[1]] if finite else rows[0]


def findings(res, metric=None):
    """Plain sentences on the metric (default: primary): best intermediate vs output layer, and what fusion adds
    against the single encoder best on dev (its score on the evaluated split)."""
    metric = metric or res.primary_metric
    rows = summary_table(res, [metric]).to_dict("records")
    name = METRIC_LABELS.get(metric, metric)
    sign = 1.0 if res.higher_is_better(metric) else -1.0
    single = [r for r in rows if pd.notna(r["best-layer score"])]
    out = []
    for r in single:
        gain = r["best minus output"]
        probed = res.layers_probed(r["encoder"], r["modality"])
        of = "" if probed == "all" else f" (of the layers probed: {probed})"
        last = res.last_layer(r["encoder"], r["modality"])
        if pd.isna(gain):
            if probed != "all" and pd.isna(r["output-layer score"]):
                out.append(f"{r['encoder']}: layer {r['best layer']} is the best on dev of the layers probed "
                           f"({probed}), {name} {r['best-layer score']:.3f}; the output layer ({last}) was not "
                           "probed.")
            continue
        if int(r["best layer"]) == last:
            out.append(f"{r['encoder']}: the layer chosen on dev{of} is the output layer ({r['best layer']}), "
                       f"{name} {r['best-layer score']:.3f}.")
            continue
        pair = _versus(r["best-layer score"], r["output-layer score"])
        if abs(gain) < 1e-9:
            out.append(f"{r['encoder']}: layer {r['best layer']}{of} ties with the output layer on {name} ({pair}).")
            continue
        verdict = "beats" if gain > 0 else "trails"
        out.append(f"{r['encoder']}: layer {r['best layer']}{of} {verdict} the output layer on {name} "
                   f"({pair}, {_by(gain)}).")
    fused = {}  # value -> label; probe runs repeat the chosen fusion's value on every encoder's row
    for r in rows:
        if pd.notna(r["fusion"]):
            how = f"{r['fusion method']} fusion, chosen on dev" if isinstance(r["fusion method"], str) else None
            label = r["encoder"] if pd.isna(r["best-layer score"]) else "the fused model"
            fused.setdefault(r["fusion"], f"{label}: {how}" if how and label != "the fused model" else how or label)
    if single:
        top = best_single(res, single)
        for value, label in fused.items():
            gain = sign * (value - top["best-layer score"])
            d = decimals(value, top["best-layer score"])
            out.append(f"Fusion ({label}) reaches {name} {value:.{d}f}, against {top['best-layer score']:.{d}f} "
                       f"for the best single encoder on {res.selection_split} ({top['encoder']}, layer "
                       f"{top['best layer']}), {_by(gain)}.")
    return out
