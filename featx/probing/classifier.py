"""A trained probe saved without pickle: safetensors arrays + a JSON header (encoder reference and a
fingerprint of its weights, layers, pooling, the extraction settings of the cache it was trained on, task,
classes). Loading reads arrays and JSON only; no code runs.

Model: for each encoder block b, features f_b = sum_l w_bl * (x_bl - mean_bl) / scale_bl over its layers
(one layer: w = [1]; the weighted sum: the learned softmax weights), blocks concatenated, then
out = f @ coef.T + intercept (regression: out[:, 0]; classes: argmax, or out > 0 with one column).
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pandas as pd

from featx.checkpoint import MODEL_FINGERPRINT
from featx.errors import FeatxError, first_line
from featx.probing.data import class_name as number_class_name
from featx.probing.data import load_cache
from featx.probing.fusion import align_by_id
from featx.probing.registry import make_probe
from featx.probing.splits import make_folds

FORMAT = "featx-classifier/1"
# The extraction settings that change a cache's numbers, recorded per block (block["extraction"]) from the cache it
# was trained on, so that `featx predict` extracts new items the same way: featx extract's option names, each
# stored as the cache attribute of the same name (dtype: the cache's storage dtype). A file without the record
# (saved before it was kept) predicts as it did then: float32, default settings.
EXTRACTION_SETTINGS = ("precision", "dtype", "max_length", "max_audio_seconds", "fps", "image_preprocess",
                       "audio_attention", "image_decode")


class Classifier:
    """blocks: list of {"encoder", "modality", "pooling", "layers": [int], "hidden_size", "extraction": {setting:
    value} (EXTRACTION_SETTINGS; optional), "model_fingerprint": the training cache's fingerprint of the encoder's
    weights (featx.checkpoint; optional: not in files saved before featx recorded it)}; arrays: per block b mean_b / scale_b (L_b, D_b) and weights_b (L_b,),
    and coef (C', sum D_b), intercept (C',)."""

    def __init__(self, task, blocks, arrays, classes=None, settings=None):
        self.task, self.blocks, self.arrays = task, blocks, arrays
        self.classes = None if classes is None else np.asarray(classes)
        self.settings = settings or {}

    @classmethod
    def from_linear(cls, task, block, params, classes=None, settings=None):
        """One encoder, one layer: params = LayerProbe/BatchedLinearProbe.linear_params()."""
        arrays = {"mean_0": np.atleast_2d(params["mean"]), "scale_0": np.atleast_2d(params["scale"]),
                  "weights_0": np.ones(1), "coef": np.atleast_2d(params["coef"]),
                  "intercept": np.atleast_1d(params["intercept"])}
        return cls(task, [block], arrays, classes, settings)

    @classmethod
    def from_sweep(cls, data, layer, task, settings):
        """The probe of a cache's `layer` (its best dev layer) as the sweep reported it: the first seed's first
        fold, the full training part, the sweep's probe (linear for a probe without linear weights), folds and
        device; dev selects its regularisation. settings: a SweepSettings. The file records all of these, and the
        cache's extraction settings (extraction_settings), which `featx predict` extracts new items with."""
        from featx.probing.registry import get_probe

        layer, seed = int(layer), int(settings.seeds[0])
        col = data.layers.index(layer)
        folds, test_split = make_folds(data.y, data.splits, task, settings.folds, seed)
        train, dev, _ = folds[0]
        y = data.y if task == "classification" else np.asarray(data.y, dtype=np.float64)
        probe = settings.probe if get_probe(settings.probe).linear else "linear"
        est = make_probe(probe, seed, settings.device, data.layer_widths)
        if "task" in est.get_params():
            est.set_params(task=task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the sweep's fit ignores the same convergence warnings
            est.fit(data.X[train], y[train], data.X[dev], y[dev])
        width = data.width(col)  # the layer's own width: predict reads that one layer, its padding cut off
        # a local model folder named relative to where extract ran (the cache's attribute) is saved absolute, so
        # that predict finds it from any folder; a hub id, or a folder that is gone, as recorded
        encoder = os.path.abspath(data.encoder) if os.path.isdir(data.encoder) else data.encoder
        block = {"encoder": encoder, "name": data.name or data.encoder, "modality": data.modality,
                 "pooling": settings.pool, "layers": [layer], "hidden_size": width,
                 "num_layers": data.num_layers, "extraction": extraction_settings(data.path)}
        fingerprint = recorded_fingerprint(data.path)
        if fingerprint is not None:  # which weights; predict checks a model given in the encoder's place against it
            block[MODEL_FINGERPRINT] = fingerprint
        record = {"probe": probe, "sweep_probe": settings.probe, "folds": settings.folds, "fold": 0,
                  "folds_run": len(folds), "seed": seed, "device": settings.device, "train_size": "1.0",
                  "train_labels": int(len(train)), "test_split": test_split, "selected_on": "dev",
                  "layers_probed": list(data.layers)}
        params = {k: (v[..., :width] if k != "intercept" else v) for k, v in est.linear_params(col).items()}
        return cls.from_linear(task, block, params, getattr(est, "classes_", None), record)

    def save(self, path):
        """Write `path` (.safetensors) with the JSON header in its metadata."""
        from safetensors.numpy import save_file

        header = {"format": FORMAT, "task": self.task, "blocks": self.blocks, "settings": self.settings,
                  "classes": None if self.classes is None else [str(c) for c in self.classes],
                  "classes_dtype": None if self.classes is None else self.classes.dtype.kind}
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in self.arrays.items()}, path,
                  metadata={"featx": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path):
        """Read a classifier saved by `save`; a damaged or foreign file is a one-line FeatxError naming it."""
        header, arrays = _read(path)
        try:
            clf = cls(header["task"], header["blocks"], arrays, _classes(header), header.get("settings") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise FeatxError(f"{path}: not a valid featx classifier ({first_line(e)})")
        clf.validate(path)
        return clf

    def validate(self, where="classifier"):
        """Check the header and every array's shape and finiteness against the model; FeatxError otherwise."""
        def bad(msg):
            raise FeatxError(f"{where}: damaged classifier: {msg}")
        if self.task not in ("regression", "classification"):
            bad(f"task {self.task!r}")
        if not isinstance(self.blocks, list) or not self.blocks or not all(isinstance(b, dict) for b in self.blocks):
            bad("no encoder blocks")
        dims = [_block_shape(b, bad) for b in self.blocks]
        for b, (n_layers, dim) in enumerate(dims):
            for name, shape in ((f"mean_{b}", (n_layers, dim)), (f"scale_{b}", (n_layers, dim)),
                                (f"weights_{b}", (n_layers,))):
                _check_array(self.arrays, name, shape, bad)
            if (self.arrays[f"scale_{b}"] == 0).any():
                bad(f"scale_{b} holds zeros")
        coef = self.arrays.get("coef")
        outputs = 1 if self.task == "regression" else _class_outputs(self.classes, coef, bad)
        _check_array(self.arrays, "coef", (outputs, sum(d for _, d in dims)), bad)
        _check_array(self.arrays, "intercept", (outputs,), bad)

    def features(self, inputs):
        """inputs: list per block of (N, L_b, D_b) pooled layers (in the block's layer order) -> (N, sum D_b)."""
        parts = []
        for b, x in enumerate(inputs):
            x = np.asarray(x, np.float64)
            if x.ndim == 2:
                x = x[:, None]
            xs = (x - self.arrays[f"mean_{b}"]) / self.arrays[f"scale_{b}"]
            parts.append(np.einsum("nld,l->nd", xs, self.arrays[f"weights_{b}"]))
        return np.concatenate(parts, axis=1)

    def predict(self, inputs):
        """(N,) predictions from per-block pooled layers."""
        out = self.features(inputs) @ self.arrays["coef"].T + self.arrays["intercept"]
        if self.task == "regression":
            return out[:, 0]
        idx = (out[:, 0] > 0).astype(int) if out.shape[1] == 1 else np.argmax(out, axis=1)
        return self.classes[idx]

    def predict_proba(self, inputs):
        """(N, C) class probabilities, columns in the order of `classes`, from per-block pooled layers: the saved
        logistic probe's (a softmax of its logits; with one logit, sigmoid for the second class), as scikit-learn's
        LogisticRegression.predict_proba. FeatxError for a regression probe."""
        if self.task != "classification":
            raise FeatxError("a regression probe has no class probabilities")
        out = self.features(inputs) @ self.arrays["coef"].T + self.arrays["intercept"]
        if out.shape[1] == 1:
            out = np.concatenate([np.zeros_like(out), out], axis=1)   # sigmoid(z) = softmax([0, z])[1]
        out = np.exp(out - out.max(axis=1, keepdims=True))
        return out / out.sum(axis=1, keepdims=True)

    def predict_cache(self, caches):
        """(ids (N,), predictions (N,)) for cache paths, one per block, aligned by id (shared items only)."""
        ids, inputs = self.cache_inputs(caches)
        return ids, self.predict(inputs)

    def cache_inputs(self, caches):
        """(ids (N,), per-block pooled layers (N, L_b, D_b)) of cache paths, one per block, aligned by id (the items
        done in every cache), as predict and predict_proba take them."""
        if len(caches) != len(self.blocks):
            raise FeatxError(f"the classifier needs {len(self.blocks)} cache(s), one per encoder; got {len(caches)}")
        datas = [load_cache(p, blk["pooling"], blk["layers"], need_labels=False) for p, blk in zip(caches, self.blocks)]
        for d, blk in zip(datas, self.blocks):
            if d.X.shape[2] != blk["hidden_size"]:
                raise FeatxError(f"{d.path}: hidden size {d.X.shape[2]} but the classifier expects {blk['hidden_size']}")
        ids, index, _ = align_by_id([d.ids for d in datas], [d.modality for d in datas])
        return ids, [d.X[i] for d, i in zip(datas, index)]


def prediction_table(ids, got_ids, pred, classes=None, proba=None, reasons=None) -> pd.DataFrame:
    """predict's DataFrame: id, prediction, p_<class> per class (classes given; proba (len(got_ids), C)), error.
    ids: the manifest's ids (Series of str); got_ids (K,) the predicted ones; reasons: {id: why} of the others."""
    ids = ids.reset_index(drop=True)
    got = pd.Series(list(pred), index=list(got_ids), dtype=object)
    table = pd.DataFrame({"id": ids, "prediction": ids.map(got)})
    if classes is not None:
        for c, column in zip(classes, np.zeros((0, len(classes))).T if proba is None else np.asarray(proba).T):
            table[f"p_{class_name(c)}"] = ids.map(pd.Series(column, index=list(got_ids), dtype=np.float64))
    reasons = reasons or {}
    table["error"] = ["" if i in got.index else reasons.get(i) or "no prediction" for i in ids]
    return table


def class_name(c) -> str:
    """A class as its probability column names it: 'pos', and 0/1 labels (read as numbers) as '0', '1'
    (featx.probing.data.class_name)."""
    return number_class_name(c) if isinstance(c, (float, np.floating)) else str(c)


def extraction_settings(cache_path) -> dict:
    """The EXTRACTION_SETTINGS a cache was made with, from its attributes (a setting a cache of its modality made
    before featx recorded it: the value it ran then, featx.cache.schema.ATTRS_BEFORE_RECORDED)."""
    from featx.cache import open_cache
    from featx.cache.schema import ATTRS_BEFORE_RECORDED

    with open_cache(cache_path) as cache:
        attrs, modality, dtype = dict(cache.attrs), cache.modality, cache.dtype
    before = {"image_preprocess": "image", "audio_attention": "audio"}   # the modality whose caches record each
    # (image_decode: not video frames, which caches of modality image hold too; such a classifier decodes as before)
    out = {"dtype": str(dtype)}
    for key in EXTRACTION_SETTINGS:
        if key in attrs and key != "dtype":
            value = attrs[key]
            out[key] = value.item() if isinstance(value, np.generic) else value
        elif before.get(key) == modality:
            out[key] = ATTRS_BEFORE_RECORDED[key]
    return out


def recorded_fingerprint(cache_path):
    """The fingerprint of the weights a cache was extracted with (featx.checkpoint), or None for a cache made before
    featx recorded it."""
    from featx.cache import open_cache

    with open_cache(cache_path) as cache:
        value = cache.attrs.get(MODEL_FINGERPRINT)
    return None if value is None else str(value)


def _read(path):
    """(header dict, {name: array}) of a classifier file; one line for anything that is not one."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FeatxError(f"classifier not found: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = (f.metadata() or {}).get("featx")
            if meta is None:
                raise FeatxError(f"{path} is not a featx classifier (no featx header)")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FeatxError(f"{path}: not a readable classifier file ({first_line(e)})")
    try:
        header = json.loads(meta)
    except ValueError as e:
        raise FeatxError(f"{path}: the classifier's header is not valid JSON ({first_line(e)})")
    if not isinstance(header, dict):
        raise FeatxError(f"{path}: the classifier's header is not a JSON object")
    if header.get("format") != FORMAT:
        raise FeatxError(f"{path}: unsupported classifier format {header.get('format')!r}")
    return header, arrays


def _classes(header):
    classes = header.get("classes")
    if classes is not None and header.get("classes_dtype") in ("f", "i", "u", "b"):
        classes = np.asarray(classes, dtype=np.float64)
    return classes


def _block_shape(block, bad):
    layers, dim = block.get("layers"), block.get("hidden_size")
    if not isinstance(layers, list) or not layers or not all(isinstance(v, int) for v in layers):
        bad(f"block {block.get('encoder')!r} has no list of layers")
    if not isinstance(dim, int) or dim < 1:
        bad(f"block {block.get('encoder')!r} has no hidden size")
    for key in ("encoder", "pooling"):
        if not isinstance(block.get(key), str):
            bad(f"block without {key}")
    if not isinstance(block.get(MODEL_FINGERPRINT, ""), str):
        bad(f"block {block.get('encoder')!r} records a model fingerprint that is not a string")
    extraction = block.get("extraction", {})
    if not isinstance(extraction, dict):
        bad(f"block {block.get('encoder')!r} has extraction settings that are not a mapping")
    for key, value in extraction.items():
        if key not in EXTRACTION_SETTINGS:
            bad(f"block {block.get('encoder')!r} records the extraction setting {key!r}, which this featx does not "
                "know (a newer featx's file?)")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            bad(f"block {block.get('encoder')!r} records extraction setting {key} as {value!r}")
    return len(layers), dim


def _check_array(arrays, name, shape, bad):
    a = arrays.get(name)
    if a is None:
        bad(f"array {name} is missing")
    if tuple(a.shape) != tuple(shape):
        bad(f"array {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not np.isfinite(a).all():
        bad(f"array {name} holds NaN or infinite values")


def _class_outputs(classes, coef, bad):
    """Rows coef must have: one per class, or one for two classes (a single logit)."""
    if classes is None or len(classes) < 2:
        bad("a classification model needs at least two classes")
    binary = len(classes) == 2 and coef is not None and coef.ndim == 2 and coef.shape[0] == 1
    return 1 if binary else len(classes)
