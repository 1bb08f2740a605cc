"""A trained probe saved without pickle: safetensors arrays + a JSON header (encoder reference, layers,
pooling, task, classes). Loading reads arrays and JSON only; no code runs.

Model: for each encoder block b, features f_b = sum_l w_bl * (x_bl - mean_bl) / scale_bl over its layers
(one layer: w = [1]; the weighted sum: the learned softmax weights), blocks concatenated, then
out = f @ coef.T + intercept (regression: out[:, 0]; classes: argmax, or out > 0 with one column).
"""
from __future__ import annotations

import json

import numpy as np

from featx.errors import FeatxError
from featx.probing.data import load_cache
from featx.probing.fusion import align_by_id
from featx.probing.registry import make_probe
from featx.probing.splits import make_folds

FORMAT = "featx-classifier/1"


class Classifier:
    """blocks: list of {"encoder", "modality", "pooling", "layers": [int], "hidden_size"}; arrays: per block b
    mean_b / scale_b (L_b, D_b) and weights_b (L_b,), and coef (C', sum D_b), intercept (C',)."""

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
    def from_sweep(cls, data, layer, task, pool, probe):
        """Refit the linear probe of a cache's `layer` (its best dev layer, from _sweep.best_layer_table) on the
        train part; dev selects its regularisation."""
        layer = int(layer)
        col = data.layers.index(layer)
        (train, dev_idx, _), = make_folds(data.y, data.splits, task, 5, 0)[0][:1]
        y = data.y if task == "classification" else data.y.astype(np.float64)
        est = make_probe(probe if probe in ("batched", "ridge", "logistic") else "linear", 0, "auto")
        est.fit(data.X[train][:, [col]], y[train], data.X[dev_idx][:, [col]], y[dev_idx])
        block = {"encoder": data.encoder, "modality": data.modality, "pooling": pool, "layers": [layer],
                 "hidden_size": data.hidden_size, "num_layers": data.num_layers}
        return cls.from_linear(task, block, est.linear_params(0), getattr(est, "classes_", None),
                               {"probe": probe, "selected_on": "dev"})

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
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = (f.metadata() or {}).get("featx")
            if meta is None:
                raise FeatxError(f"{path} is not a featx classifier (no featx header)")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(meta)
        if header.get("format") != FORMAT:
            raise FeatxError(f"{path}: unsupported classifier format {header.get('format')!r}")
        classes = header["classes"]
        if classes is not None and header.get("classes_dtype") in ("f", "i", "u", "b"):
            classes = np.asarray(classes, dtype=np.float64)
        return cls(header["task"], header["blocks"], arrays, classes, header["settings"])

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

    def predict_cache(self, caches):
        """(ids (N,), predictions (N,)) for cache paths, one per block, aligned by id (shared items only)."""
        if len(caches) != len(self.blocks):
            raise FeatxError(f"the classifier needs {len(self.blocks)} cache(s), one per encoder; got {len(caches)}")
        datas = [load_cache(p, blk["pooling"], blk["layers"], need_labels=False) for p, blk in zip(caches, self.blocks)]
        for d, blk in zip(datas, self.blocks):
            if d.X.shape[2] != blk["hidden_size"]:
                raise FeatxError(f"{d.path}: hidden size {d.X.shape[2]} but the classifier expects {blk['hidden_size']}")
        ids, index, _ = align_by_id([d.ids for d in datas], [d.modality for d in datas])
        return ids, self.predict([d.X[i] for d, i in zip(datas, index)])
