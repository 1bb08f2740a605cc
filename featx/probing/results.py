"""The results tables of probe, fuse and finetune: their columns, how per-fold scores are pooled into rows,
and the rule that picks the best layer (on dev, never test).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from featx import metrics
from featx.errors import FeatxError, first_line
from featx.metrics import higher_is_better
from featx.settings import parse_train_size

COLUMNS = ["encoder", "modality", "num_layers", "layer", "pooling", "probe", "method", "train_size", "train_labels",
           "seed", "split", "metric", "value"]
# layer_weights.csv: one row per fit (seed, unit, training size) and layer; method ties it to its results rows.
WEIGHT_COLUMNS = ["encoder", "modality", "seed", "layer", "weight", "train_size", "method"]
# best_layers.csv: per (encoder, modality, metric), scores on `split` (test, or cv without a test split) at the
# full training part; the best layer and the fusion method are chosen on `selected_on` (dev) by the primary metric.
# layers_probed: "all", or the layers probed (e.g. "0,3" under --layers 0,3): the best layer is the best of those,
# the weighted sum is over those, and an output layer not among them has no score.
# What made each score, as results.csv names it: pooling; layer_probe (best_layer_score, output_layer_score, e.g.
# ridge-batched), weighted_probe (weighted_score, e.g. weighted-linear), fusion_probe (fusion_score, e.g. concat-ridge).
BEST_COLUMNS = ["encoder", "modality", "pooling", "layer_probe", "metric", "split", "train_size", "selected_on",
                "layers_probed", "best_dev_layer", "best_layer_score", "output_layer", "output_layer_score",
                "weighted_probe", "weighted_score", "fusion_method", "fusion_probe", "fusion_score"]
# The note of a probe, fuse or finetune run that was not asked for the whole training part: it is added, since
# the headline (best_layers.csv, the report's summary) is always at the full training part.
FULL_PART_ADDED = "the full training part (1.0) was added to the training sizes: the headline uses it"
# Column names best_layers.csv had before BEST_COLUMNS.
_OLD_BEST = {"best_layer": "best_dev_layer", "best_value": "best_layer_score",
             "output_layer_value": "output_layer_score", "weighted_value": "weighted_score",
             "fusion_value": "fusion_score"}


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


def size_label(value) -> str:
    """A training size as the results table writes it ("0.25", "200", "1.0"); numbers from older tables too."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "1.0"
    return str(parse_train_size(value))


# The files featx writes into a run's --out folder, by name: probe / fuse (results, best_layers.csv,
# layer_weights.csv, meta.json, classifier__NAME.safetensors), finetune (history.csv, finetune.json) and a report
# written there (featx.report.build: report.html, summary.md, figures/*.png). A new run removes an earlier run's
# (clear_earlier_outputs), never another file, so that the folder holds only its own outputs.
REPORT_HTML, REPORT_MD, FIGURES = "report.html", "summary.md", "figures"  # a report's files (featx.report.build)
RUN_FILES = ("results.csv", "results.parquet", "best_layers.csv", "layer_weights.csv", "meta.json", "history.csv",
             "finetune.json", REPORT_HTML, REPORT_MD)
CLASSIFIER_FILE = re.compile(r"classifier__.+\.safetensors")


def figure_files(out) -> list:
    """The figures/*.png of `out` (a report's figures), as paths relative to `out`, sorted."""
    figures = os.path.join(out, FIGURES)
    if not os.path.isdir(figures):
        return []
    return sorted(os.path.join(FIGURES, n) for n in os.listdir(figures)
                  if n.endswith(".png") and os.path.isfile(os.path.join(figures, n)))


def earlier_outputs(out) -> list:
    """The files of `out` that a featx run writes (RUN_FILES, their .tmp, classifier__*.safetensors,
    figures/*.png), as paths relative to `out`, sorted; [] when `out` does not exist."""
    if not os.path.isdir(out):
        return []
    names = [n for n in os.listdir(out) if os.path.isfile(os.path.join(out, n))
             and (n in RUN_FILES or n.endswith(".tmp") and n[:-4] in RUN_FILES or CLASSIFIER_FILE.fullmatch(n))]
    return sorted(names + figure_files(out))


def clear_earlier_outputs(out) -> list:
    """Remove earlier_outputs(out) (and figures/ when that leaves it empty); returns what was removed."""
    removed = earlier_outputs(out)
    for name in removed:
        os.remove(os.path.join(out, name))
    figures = os.path.join(out, FIGURES)
    if any(n.startswith(FIGURES + os.sep) for n in removed) and not os.listdir(figures):
        os.rmdir(figures)
    return removed


def said_removed(removed, most_figures=3) -> str:
    """'classifier__a.safetensors, classifier__b.safetensors, report.html, ..., results.csv': every file of an
    earlier run by name (a saved classifier above all), those a run always writes anew (the results tables,
    meta.json) last; a report's figures by count and folder when there are more than `most_figures`, for the
    stderr line that says they were removed."""
    figures = [name for name in removed if name.startswith(FIGURES + os.sep)]
    named = removed if len(figures) <= most_figures else [n for n in removed if n not in figures]
    named = sorted(named, key=lambda name: (name in RUN_FILES[:5], name))
    if len(named) < len(removed):
        named.insert(next((k for k, n in enumerate(named) if n in RUN_FILES[:5]), len(named)),
                     f"{len(figures)} figures ({FIGURES}/*.png)")
    return ", ".join(named)


def labels_count(counts) -> int:
    """A number of training labels: the mean of `counts` (the folds', or the rows' of one training size) as a
    whole number, as finetune rounds it."""
    return int(round(float(np.mean(counts))))


def write_results(rows, out):
    """The tidy results table (COLUMNS) of `rows` as out/results.csv and .parquet; returns the DataFrame.
    train_size is written as given (str); train_labels is the number of training labels (labels_count: the mean
    over folds, a whole number)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["train_size"] = [size_label(v) for v in df["train_size"]]
    df = df.astype({"num_layers": int, "layer": int, "train_labels": int, "seed": int, "value": float})
    df.to_csv(os.path.join(out, "results.csv"), index=False)
    df.to_parquet(os.path.join(out, "results.parquet"), index=False)
    return df


def meta_head(task, chance):
    """The keys every meta.json starts with: task, primary metric and its direction, chance scores."""
    primary = metrics.PRIMARY[task]
    return {"task": task, "primary_metric": primary, "higher_is_better": metrics.higher_is_better(primary),
            "chance": chance}


def eval_split_of(rows) -> str:
    """The split whose scores are reported: test if there is one, else cross-validation, else dev."""
    splits = set(rows["split"])
    return next((s for s in ("test", "cv", "dev") if s in splits), sorted(splits)[0] if splits else "test")


def layers_probed_text(layers, num_layers) -> str:
    """"all" when `layers` are every layer 0..num_layers-1 (or num_layers is unknown, <= 0), else the layers
    probed, comma-joined in order ("0,3")."""
    layers = sorted({int(k) for k in layers if int(k) >= 0})
    # max(...): tables whose num_layers does not count the embedding output (layers 0..num_layers) are whole too
    if int(num_layers) <= 0 or not layers or layers == list(range(max(int(num_layers), layers[-1] + 1))):
        return "all"
    return ",".join(map(str, layers))


def best_layer_table(df, primary, higher_is_better=None, full_size="1.0"):
    """BEST_COLUMNS per (encoder, modality, metric) of a results table (COLUMNS): the layer best on dev by the
    `primary` metric (mean over seeds) at the full training part, its score on the evaluated split, the output
    layer's, the weighted sum's and that of the fusion method best on dev. Without dev rows, selection falls
    back to the evaluated split (older tables), and selected_on says so. full_size: the train_size label of
    the whole training part."""
    sign = 1 if (metrics.higher_is_better(primary) if higher_is_better is None else higher_is_better) else -1
    full = df[df["train_size"].map(size_label) == full_size] if len(df) else df
    test_split = eval_split_of(full)
    select = "dev" if (full["split"] == "dev").any() else test_split
    mean = full.groupby(["encoder", "modality", "method", "layer", "split", "metric"], sort=False)["value"].mean()
    fusion_method, fusion_value = _best_fusion(full, primary, sign, select, test_split)
    out = []
    layers = full[(full["method"] == "layer") & (full["layer"] >= 0)]
    for (enc, mod), g in layers.groupby(["encoder", "modality"], sort=False):
        last = max(int(g["num_layers"].iloc[0]) - 1, int(g["layer"].max()))   # the output layer
        dev = g[(g["split"] == select) & (g["metric"] == primary)].groupby("layer")["value"].mean()
        if dev.dropna().empty:
            continue
        best = int((sign * dev).idxmax())
        probed = layers_probed_text(g["layer"].unique(), g["num_layers"].iloc[0])
        weighted = full[(full["encoder"] == enc) & (full["modality"] == mod) & (full["method"] == "weighted")]
        made_by = dict(pooling=_names(g["pooling"]), layer_probe=_names(g["probe"]),
                       weighted_probe=_names(weighted["probe"]) or None,
                       fusion_probe=_names(full[full["method"] == fusion_method]["probe"]) or None)
        for metric in g["metric"].unique():
            def val(method, layer):
                return float(mean.get((enc, mod, method, layer, test_split, metric), np.nan))
            out.append(dict(encoder=enc, modality=mod, **made_by, metric=metric, split=test_split, train_size=full_size,
                            selected_on=select, layers_probed=probed, best_dev_layer=best,
                            best_layer_score=val("layer", best),
                            output_layer=last, output_layer_score=val("layer", last),
                            weighted_score=val("weighted", -1), fusion_method=fusion_method,
                            fusion_score=float(fusion_value.get(metric, np.nan))))
    return pd.DataFrame(out, columns=BEST_COLUMNS)


def _names(values) -> str:
    """The distinct names among `values` (a column of results rows), comma-joined ("" for none)."""
    return ",".join(sorted(map(str, values.dropna().unique())))


def _best_fusion(full, primary, sign, select, test_split):
    """(the fusion method best on `select` by the primary metric, {metric: its score on test_split})."""
    fus = full[full["method"].str.startswith("fusion")]
    if not len(fus):
        return None, {}
    fm = fus.groupby(["method", "split", "metric"])["value"].mean()
    devs = {m: fm.get((m, select, primary), np.nan) for m in fus["method"].unique()}
    devs = {m: v for m, v in devs.items() if np.isfinite(v)} or {m: 0.0 for m in devs}
    chosen = max(devs, key=lambda m: sign * devs[m])   # chosen on dev, never test
    return chosen, {k[2]: v for k, v in fm.items() if k[0] == chosen and k[1] == test_split}


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
             "seed": 0, "split": "test", "train_labels": np.nan}
GROUP = ["encoder", "modality"]
_BEST_VALUES = ("best_layer_score", "output_layer_score", "weighted_score", "fusion_score")


@dataclass
class Results:
    """One results directory: tidy rows plus the optional tables and meta.json."""

    path: str
    name: str
    rows: pd.DataFrame  # one row per (encoder, layer, method, train_size, seed, split, metric): value
    best_layers: pd.DataFrame  # BEST_COLUMNS (older files' columns renamed to them)
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
        return eval_split_of(self.rows)

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

    def _layer_rows(self, encoder, modality):
        r = self.rows
        # Only probe rows: a fine-tuned model's row carries its cut layer, which need not be the deepest probed.
        return r[(r["encoder"] == encoder) & (r["modality"] == modality) & (r["method"] == "layer")
                 & (r["layer"] >= 0)]

    def last_layer(self, encoder, modality):
        """Index of the output layer of an encoder: num_layers - 1 (as best_layers.csv's output_layer), or the
        deepest layer probed where that is deeper or num_layers is unknown. Under --layers it need not have
        been probed."""
        g = self._layer_rows(encoder, modality)
        return int(max(g["layer"].max(), g["num_layers"].max() - 1))

    def layers_probed(self, encoder, modality) -> str:
        """"all", or the layers of the encoder that were probed ("0,3" under --layers 0,3): see
        layers_probed_text."""
        g = self._layer_rows(encoder, modality)
        return layers_probed_text(g["layer"].unique(), g["num_layers"].max()) if len(g) else "all"

    @property
    def full_train_size(self):
        """The train_size label of the headline rows: the whole training part ("1.0"); a table without one
        (older runs) falls back to the size with the most training labels."""
        sizes = list(dict.fromkeys(self.rows["train_size"]))
        full = [s for s in sizes if _is_full_label(s)]
        return full[0] if full else max(sizes, key=self.labels_of)

    @property
    def headline_is_full(self) -> bool:
        """Whether the headline rows (full_train_size) are at the whole training part; False for older runs
        without one, whose headline is at the size with the most training labels."""
        return _is_full_label(self.full_train_size)

    def labels_of(self, size):
        """The number of training labels behind a train_size label (mean over rows), or the size's number."""
        n = self.rows.loc[self.rows["train_size"] == size, "train_labels"].mean()
        if np.isfinite(n):
            return float(n)
        try:
            return float(size)
        except ValueError:
            return 0.0

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
    rows["train_size"] = [size_label(v) for v in rows["train_size"]] if "train_size" in rows else "1.0"
    rows = rows.astype({"encoder": str, "metric": str, "layer": int, "value": float, "train_labels": float})
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
        if weights is not None:
            weights["train_size"] = [None if pd.isna(v) else size_label(v) for v in weights["train_size"]]

    res = Results(path=path, name=os.path.basename(path.rstrip(os.sep)), rows=rows, best_layers=pd.DataFrame(),
                  layer_weights=weights, meta=meta)
    best_path = os.path.join(path, "best_layers.csv")
    if os.path.exists(best_path):
        best = _read_table(best_path, "best layers", ("encoder", "metric"))
        best = best.rename(columns={k: v for k, v in _OLD_BEST.items() if k in best.columns})
        if "best_dev_layer" not in best.columns:
            raise FeatxError(f"{best_path} lacks the column best_dev_layer")
        best = _fill(best, {"modality": "", "pooling": "", "layer_probe": "", "weighted_probe": np.nan,
                            "fusion_method": np.nan, "fusion_probe": np.nan, **{c: np.nan for c in _BEST_VALUES}})
        res.best_layers = best.astype({"encoder": str, "metric": str})
        if "selected_on" in best.columns and best["selected_on"].notna().any():
            res.selection_split = str(best["selected_on"].dropna().iloc[0])
    else:
        res.best_layers = derive_best_layers(res)
        res.selection_split = "dev" if "dev" in set(rows["split"]) else res.eval_split
    return res


def _is_full_label(size):
    try:
        return parse_train_size(size).is_full
    except FeatxError:
        return False


def derive_best_layers(res):
    """best_layers.csv computed from the rows with the writer's rule (best_layer_table)."""
    primary = res.primary_metric
    return best_layer_table(res.rows, primary, res.higher_is_better(primary), res.full_train_size)


def best_layer(res, encoder, modality, metric):
    """The best layer recorded for (encoder, modality, metric), or None."""
    b = res.best_layers
    # A best_layers.csv without a modality column matches on the encoder alone.
    same = (b["encoder"] == encoder) & (b["metric"] == metric) & b["modality"].isin([modality, ""])
    hit = b[same]["best_dev_layer"].dropna()
    hit = hit[hit >= 0]  # fusion rows carry -1
    return int(hit.iloc[0]) if len(hit) else None
