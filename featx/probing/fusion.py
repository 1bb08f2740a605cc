"""Layer-weighted sums and fusion across modalities.

- `LayerWeightedSum`: softmax over per-layer scalar weights initialised to zero (s3prl's Featurizer,
  Ando et al.'s "layerall"), a torch module over (..., L, D).
- `WeightedLayerProbe`: standardised layers -> LayerWeightedSum -> linear head, trained in torch with early
  stopping on dev; `weights_` (L,) are the learned softmax weights.
- `EarlyFusion`: concatenate one (N, D_m) feature per modality -> a LayerProbe.
- `LateFusion`: one probe per modality, predictions averaged ("mean") or stacked ("stack": a ridge / logistic
  model fitted on the probes' out-of-fold training predictions).
- `GatedFusion`: Ando et al. (SLT 2022) over cached sequences: per modality LayerWeightedSum -> Linear +
  LayerNorm + ReLU + dropout -> masked multi-head self-attentive pooling -> gated fusion -> MLP; L1 loss for
  regression, cross-entropy for classes.
- `align_by_id`: the items shared by several caches, with the rule for items missing from a modality.

All estimators take fit(X, y, X_dev=None, y_dev=None); the dev part drives selection and early stopping,
never the test part.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.utils.validation import check_is_fitted

from featx import metrics
from featx.errors import FeatxError
from featx.metrics import selection_score
from featx.probing.estimators import LayerProbe, as_layers, infer_task, prepare_fit
from featx.probing.splits import inner_split
from torch import nn

__all__ = ["LayerWeightedSum", "WeightedLayerProbe", "EarlyFusion", "LateFusion", "GatedFusion", "align_by_id"]


def align_by_id(id_lists, names=None, missing="intersect"):
    """Align items across modalities by id.

    id_lists: M sequences of ids. Returns (ids (K,), index (M, K) int: row of each shared id in each list,
    report {name: [ids missing from that modality]}). missing="intersect" keeps the ids present in every
    modality (the rest are reported, not silently dropped); missing="error" raises FeatxError when any differs.
    """
    names = names or [f"modality{i}" for i in range(len(id_lists))]
    sets = [set(map(str, ids)) for ids in id_lists]
    union = set().union(*sets)
    report = {n: sorted(union - s) for n, s in zip(names, sets)}
    if missing == "error" and any(report.values()):
        lost = {n: len(v) for n, v in report.items() if v}
        raise FeatxError(f"items missing from some modalities (counts {lost}); use missing='intersect' "
                         "to fuse the shared items only")
    if missing not in ("intersect", "error"):
        raise FeatxError(f"unknown missing-item rule {missing!r}: use intersect or error")
    first = [str(i) for i in id_lists[0]]
    shared = [i for i in first if all(i in s for s in sets)]
    pos = [{str(v): j for j, v in enumerate(ids)} for ids in id_lists]
    index = np.array([[p[i] for i in shared] for p in pos], dtype=np.int64).reshape(len(id_lists), len(shared))
    return np.asarray(shared, dtype=object), index, report


class LayerWeightedSum(nn.Module):
    """(..., L, D) -> (..., D): sum_l softmax(w)_l x_l, w initialised to zero (a plain mean at start)."""

    def __init__(self, num_layers):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers))

    def forward(self, x):
        return torch.einsum("...ld,l->...d", x, torch.softmax(self.weight, dim=0))

    def weights(self):
        """(L,) numpy softmax weights."""
        return torch.softmax(self.weight.detach(), 0).cpu().numpy()


def _standard_stats(X):
    """Mean and scale over axis 0 for standardising; a constant column gets scale 1."""
    std = X.std(0)
    return X.mean(0), np.where(std > 0, std, 1.0).astype(np.float32)


class _TorchTrainer:
    """Mini-batch Adam with early stopping on the dev primary metric; keeps the best dev state and returns
    its primary metric on dev."""

    def _train(self, model, batches_fn, n_train, predict_dev, y_dev, task, loss_fn):
        # No weight decay on the layer weights (as s3prl): decay would pull them back to the uniform mean.
        layer_w = [p for n, p in model.named_parameters() if n.endswith("sum.weight")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("sum.weight")]
        opt = torch.optim.AdamW([{"params": rest}, {"params": layer_w, "weight_decay": 0.0}], lr=self.lr,
                                weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.random_state)
        best, best_state, bad = -np.inf, None, 0
        for epoch in range(self.max_epochs):
            model.train()
            order = rng.permutation(n_train)
            for start in range(0, n_train, self.batch_size):
                idx = order[start:start + self.batch_size]
                inputs, target = batches_fn(idx)
                opt.zero_grad()
                loss_fn(model(*inputs), target).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                score = selection_score(task, y_dev, predict_dev())
            if score > best + 1e-9:
                best, best_state, bad = score, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
        return best if metrics.higher_is_better(metrics.PRIMARY[task]) else -best  # selection_score's sign undone


def loss_function(task, regression_loss="l1"):
    """The training loss of (N, C') outputs: L1 or MSE on column 0 (regression), cross-entropy (classes)."""
    if task == "regression":
        base = nn.L1Loss() if regression_loss == "l1" else nn.MSELoss()
        return lambda out, y: base(out[:, 0], y)
    ce = nn.CrossEntropyLoss()
    return lambda out, y: ce(out, y)


def _targets(task, y, classes):
    if task == "regression":
        return torch.as_tensor(np.asarray(y, dtype=np.float32))
    return torch.as_tensor(np.searchsorted(classes, np.asarray(y)))


def _decode(task, out, classes):
    out = out.detach().cpu().numpy()
    return out[:, 0].astype(np.float64) if task == "regression" else classes[np.argmax(out, axis=1)]


class WeightedLayerProbe(BaseEstimator, _TorchTrainer):
    """Softmax-weighted sum over all layers (weights from zero) -> linear head, trained in torch.

    fit(X (N, L, D), y, X_dev=None, y_dev=None). Each layer is standardised with training statistics before
    the sum. Regression uses `regression_loss` ("mse" or "l1"). Fitted: task_, weights_ (L,) softmax layer
    weights, dev_score_ (primary metric on dev), mean_ / scale_ (L, D), coef_ (C', D), intercept_ (C',),
    classes_ (classification).
    """

    def __init__(self, task="auto", regression_loss="mse", lr=1e-2, weight_decay=1e-2, batch_size=64,
                 max_epochs=200, patience=20, validation_fraction=0.2, random_state=0):
        self.task = task
        self.regression_loss = regression_loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def fit(self, X, y, X_dev=None, y_dev=None):
        X, y, X_dev, y_dev = prepare_fit(self, X, y, X_dev, y_dev)
        if self.task_ == "regression":
            self.classes_ = None
        out_dim = 1 if self.task_ == "regression" else len(self.classes_)
        self.mean_, self.scale_ = _standard_stats(X)
        torch.manual_seed(self.random_state)
        model = nn.Sequential()
        model.add_module("sum", LayerWeightedSum(X.shape[1]))
        model.add_module("head", nn.Linear(X.shape[2], out_dim))
        Xt = torch.from_numpy((X - self.mean_) / self.scale_)
        Xd = torch.from_numpy((X_dev - self.mean_) / self.scale_)
        yt = _targets(self.task_, y, self.classes_)
        if self.task_ == "regression":
            with torch.no_grad():
                model.head.bias.fill_(float(y.mean()))
        self.dev_score_ = self._train(
            model, lambda idx: ((Xt[idx],), yt[idx]), len(Xt),
            lambda: _decode(self.task_, model(Xd), self.classes_), y_dev, self.task_,
            loss_function(self.task_, self.regression_loss))
        self.weights_ = model.sum.weights()
        self.coef_ = model.head.weight.detach().numpy().astype(np.float64)
        self.intercept_ = model.head.bias.detach().numpy().astype(np.float64)
        return self

    def transform(self, X):
        """(N, D): the learned softmax-weighted sum of the standardised layers of X (N, L, D)."""
        check_is_fitted(self, "weights_")
        return np.einsum("nld,l->nd", (as_layers(X) - self.mean_) / self.scale_, self.weights_)

    def decision_function(self, X):
        """(N, C') head outputs."""
        return self.transform(X) @ self.coef_.T + self.intercept_

    def predict(self, X):
        out = self.decision_function(X)
        return out[:, 0] if self.task_ == "regression" else self.classes_[np.argmax(out, axis=1)]

    def score(self, X, y):
        from sklearn.metrics import accuracy_score, r2_score

        return (r2_score if self.task_ == "regression" else accuracy_score)(y, self.predict(X))


class EarlyFusion(BaseEstimator):
    """Concatenate one feature per modality and fit one probe.

    fit(Xs: list of M arrays (N, D_m), y, Xs_dev=None, y_dev=None). Fitted: probe_ (a LayerProbe on the
    (N, sum D_m) concatenation), dims_ (M,).
    """

    def __init__(self, probe="linear", grid=None, task="auto", random_state=0):
        self.probe = probe
        self.grid = grid
        self.task = task
        self.random_state = random_state

    def fit(self, Xs, y, Xs_dev=None, y_dev=None):
        self.dims_ = [np.asarray(x).shape[-1] for x in Xs]
        X = np.concatenate([np.asarray(x, np.float32) for x in Xs], axis=1)
        X_dev = None if Xs_dev is None else np.concatenate([np.asarray(x, np.float32) for x in Xs_dev], axis=1)
        self.probe_ = LayerProbe(probe=self.probe, grid=self.grid, task=self.task,
                                 random_state=self.random_state).fit(X, y, X_dev, y_dev)
        self.task_ = self.probe_.task_
        return self

    def predict(self, Xs):
        check_is_fitted(self, "probe_")
        return self.probe_.predict(np.concatenate([np.asarray(x, np.float32) for x in Xs], axis=1))


class LateFusion(BaseEstimator):
    """One probe per modality; predictions combined by `rule`.

    rule="mean": average of the regression outputs / class probabilities. rule="stack": a RidgeCV (regression)
    or LogisticRegression (classes) fitted on the probes' 5-fold out-of-fold predictions on the training part.
    fit(Xs: list of M arrays (N, D_m), y, Xs_dev=None, y_dev=None). Fitted: probes_ (M LayerProbes),
    stacker_ (rule="stack").
    """

    def __init__(self, rule="mean", probe="linear", grid=None, task="auto", random_state=0):
        self.rule = rule
        self.probe = probe
        self.grid = grid
        self.task = task
        self.random_state = random_state

    def fit(self, Xs, y, Xs_dev=None, y_dev=None):
        if self.rule not in ("mean", "stack"):
            raise FeatxError(f"unknown late-fusion rule {self.rule!r}: use mean or stack")
        y = np.asarray(y)
        self.probes_ = [LayerProbe(probe=self.probe, grid=self.grid, task=self.task, random_state=self.random_state)
                        .fit(x, y, None if Xs_dev is None else Xs_dev[m], y_dev) for m, x in enumerate(Xs)]
        self.task_ = self.probes_[0].task_
        self.classes_ = getattr(self.probes_[0], "classes_", None)
        if self.rule == "stack":
            reg = self.task_ == "regression"
            cv = (KFold if reg else StratifiedKFold)(5, shuffle=True, random_state=self.random_state)
            oof = [cross_val_predict(clone(p.estimators_[0]), np.asarray(x, np.float32), y, cv=cv,
                                     method="predict" if reg else "predict_proba")
                   for p, x in zip(self.probes_, Xs)]
            Z = np.column_stack(oof)
            self.stacker_ = (RidgeCV() if reg else LogisticRegression(max_iter=1000)).fit(Z, y)
        return self

    def _outputs(self, Xs):
        reg = self.task_ == "regression"
        return [p.predict(x) if reg else p.predict_proba(x) for p, x in zip(self.probes_, Xs)]

    def predict(self, Xs):
        check_is_fitted(self, "probes_")
        outs = self._outputs(Xs)
        if self.rule == "stack":
            return self.stacker_.predict(np.column_stack(outs))
        if self.task_ == "regression":
            return np.mean(outs, axis=0)
        return self.classes_[np.argmax(np.mean(outs, axis=0), axis=1)]


def gated_model(dims, num_layers, hidden, heads, dropout, out_dim):
    """Ando et al.'s gated fusion network over M modalities of (B, T, L_m, D_m) inputs -> (B, out_dim)."""
    LWS = LayerWeightedSum

    class AttentivePooling(nn.Module):
        """Masked multi-head self-attentive pooling: (B, T, H), mask (B, T) -> (B, H)."""

        def __init__(self):
            super().__init__()
            self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, heads))
            self.proj = nn.Linear(hidden * heads, hidden)

        def forward(self, h, mask):
            a = self.score(h).masked_fill(~mask[..., None], float("-inf"))    # (B, T, heads)
            a = torch.softmax(a, dim=1)
            pooled = torch.einsum("bth,btk->bkh", h, a).reshape(h.shape[0], -1)  # (B, heads * H)
            return self.proj(pooled)

    class Branch(nn.Module):
        def __init__(self, dim, L):
            super().__init__()
            self.sum = LWS(L)
            self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout))
            self.pool = AttentivePooling()

        def forward(self, x, mask):                   # x (B, T, L, D)
            return self.pool(self.proj(self.sum(x)), mask)

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList([Branch(d, L) for d, L in zip(dims, num_layers)])
            self.transform = nn.ModuleList([nn.Linear(hidden, hidden) for _ in dims])
            self.gate = nn.Linear(hidden * len(dims), hidden * len(dims))
            self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))

        def forward(self, *inputs):                   # x_1, mask_1, ..., x_M, mask_M
            e = [b(inputs[2 * m], inputs[2 * m + 1]) for m, b in enumerate(self.branches)]
            u = torch.stack([torch.tanh(t(x)) for t, x in zip(self.transform, e)], dim=1)      # (B, M, H)
            z = torch.softmax(self.gate(torch.cat(e, -1)).reshape(u.shape), dim=1)              # gates over M
            return self.mlp((z * u).sum(1))

    return Gated()


def _pad(seqs, idx):
    """List of (T_i, L, D) arrays -> padded (B, T, L, D) tensor and (B, T) bool mask."""
    items = [seqs[i] for i in idx]
    T = max(len(s) for s in items)
    x = np.zeros((len(items), T) + items[0].shape[1:], np.float32)
    mask = np.zeros((len(items), T), bool)
    for j, s in enumerate(items):
        x[j, :len(s)], mask[j, :len(s)] = s, True
    return torch.from_numpy(x), torch.from_numpy(mask)


def _padded_inputs(seqs, idx):
    """The gated model's inputs for items idx: x_1, mask_1, ..., x_M, mask_M (_pad of each modality)."""
    return tuple(t for s in seqs for t in _pad(s, idx))


def _as_sequences(X):
    """(N, L, D) pooled array -> N sequences of length 1; a list of (T_i, L, D) arrays stays as is."""
    if isinstance(X, np.ndarray) and X.ndim == 3:
        return [x[None] for x in X.astype(np.float32)]
    return [np.asarray(x, np.float32) for x in X]


class GatedFusion(BaseEstimator, _TorchTrainer):
    """Ando et al.'s fusion model over per-modality sequences.

    fit(Xs, y, Xs_dev=None, y_dev=None): Xs is a list of M modalities, each a list of N arrays (T_i, L_m, D_m)
    (cached sequences) or an (N, L_m, D_m) pooled array (treated as length-1 sequences). Give L_m = 1 to use
    one chosen layer, L_m > 1 to learn a layer-weighted sum. Inputs are standardised per (layer, dim) with
    training statistics. Fitted: task_, weights_ (M arrays (L_m,), softmax layer weights), dev_score_, classes_.
    """

    def __init__(self, task="auto", hidden_size=128, heads=4, dropout=0.1, lr=1e-3, weight_decay=1e-4,
                 batch_size=32, max_epochs=100, patience=10, validation_fraction=0.2, random_state=0):
        self.task = task
        self.hidden_size = hidden_size
        self.heads = heads
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def _standardise(self, seqs, m):
        return [(s - self.means_[m]) / self.scales_[m] for s in seqs]

    def fit(self, Xs, y, Xs_dev=None, y_dev=None):
        y = np.asarray(y)
        self.task_ = infer_task(y) if self.task == "auto" else self.task
        seqs = [_as_sequences(x) for x in Xs]
        if Xs_dev is None:
            fit_idx, dev_idx = inner_split(y, self.task_, self.validation_fraction, self.random_state)
            dev = [[s[i] for i in dev_idx] for s in seqs]
            seqs, y, y_dev = [[s[i] for i in fit_idx] for s in seqs], y[fit_idx], y[dev_idx]
        else:
            dev, y_dev = [_as_sequences(x) for x in Xs_dev], np.asarray(y_dev)
        if self.task_ == "regression":
            y, y_dev = y.astype(np.float64), y_dev.astype(np.float64)
        self.classes_ = np.unique(y) if self.task_ == "classification" else None
        self.means_, self.scales_ = map(list, zip(*(_standard_stats(np.concatenate(s, 0)) for s in seqs)))
        seqs = [self._standardise(s, m) for m, s in enumerate(seqs)]
        dev = [self._standardise(s, m) for m, s in enumerate(dev)]
        torch.manual_seed(self.random_state)
        out_dim = 1 if self.task_ == "regression" else len(self.classes_)
        self.model_ = gated_model([s[0].shape[-1] for s in seqs], [s[0].shape[1] for s in seqs],
                                   self.hidden_size, self.heads, self.dropout, out_dim)
        yt = _targets(self.task_, y, self.classes_)
        dev_inputs = _padded_inputs(dev, np.arange(len(y_dev)))
        self.dev_score_ = self._train(self.model_, lambda idx: (_padded_inputs(seqs, idx), yt[idx]), len(y),
                                      lambda: _decode(self.task_, self.model_(*dev_inputs), self.classes_), y_dev,
                                      self.task_, loss_function(self.task_, "l1"))
        self.weights_ = [b.sum.weights() for b in self.model_.branches]
        return self

    def predict(self, Xs):
        check_is_fitted(self, "model_")
        seqs = [self._standardise(_as_sequences(x), m) for m, x in enumerate(Xs)]
        n = len(seqs[0])
        out = []
        with torch.no_grad():
            for start in range(0, n, 256):
                idx = np.arange(start, min(n, start + 256))
                out.append(_decode(self.task_, self.model_(*_padded_inputs(seqs, idx)), self.classes_))
        return np.concatenate(out)
