"""Layer probes: one small model per layer of a cached encoder, chosen on dev, reported on test.

Estimators follow scikit-learn's contract: `__init__` stores parameters, `fit(X, y)` returns self, fitted
state ends in `_`. X is (N, L, D): pooled hidden states of L layers (a (N, D) array is one layer).

- `LayerProbe`: a scikit-learn pipeline (StandardScaler + ridge / logistic regression / MLP) per layer,
  regularisation chosen per layer on a dev set, best layer chosen on dev.
- `BatchedLinearProbe`: the same linear probes for all layers and all regularisation strengths at once in
  torch (closed-form ridge; full-batch L-BFGS logistic regression), on GPU when there is one.

Sweeps over caches, seeds and training sizes that write the results tables live in `featx.probing.sweep`
(`run_probe`, re-exported here).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from featx import metrics
from featx.device import resolve_device
from featx.errors import FeatxError
from featx.metrics import selection_score
from featx.probing.splits import inner_split

__all__ = ["LayerProbe", "BatchedLinearProbe", "infer_task", "as_layers", "prepare_fit", "DEFAULT_ALPHAS", "DEFAULT_CS"]

DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)        # ridge: ||y - Xw||^2 + alpha ||w||^2
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0)                 # logistic: C * sum(logloss) + ||w||^2 / 2
DEFAULT_MLP_ALPHAS = (1e-3, 1e-1, 1.0)               # MLP L2 penalty


def infer_task(y) -> str:
    """"regression" for numeric labels, "classification" for strings, booleans or a 0/1 flag."""
    y = np.asarray(y)
    if y.dtype.kind in "OUSb":
        return "classification"
    values = np.unique(y[~np.isnan(y.astype(np.float64))])
    if values.size <= 2 and set(values.tolist()) <= {0.0, 1.0}:
        return "classification"
    return "regression"


def as_layers(X) -> np.ndarray:
    """(N, L, D) float32 from (N, L, D) or (N, D) (one layer)."""
    X = np.asarray(X)
    if X.ndim == 2:
        X = X[:, None, :]
    if X.ndim != 3:
        raise ValueError(f"X must be (N, L, D) or (N, D), got shape {X.shape}")
    return X.astype(np.float32, copy=False)


def prepare_fit(est, X, y, X_dev, y_dev):
    """Shared start of a probe's fit: check X (N, L, D) and y, set est.task_ (and classes_), hold out a dev
    part when none is given, cast regression targets. Returns X, y, X_dev, y_dev."""
    X = as_layers(X)
    y = np.asarray(y)
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} items, y has {len(y)}")
    est.task_ = infer_task(y) if est.task == "auto" else est.task
    if est.task_ not in ("regression", "classification"):
        raise ValueError(f"task must be auto, regression or classification, got {est.task!r}")
    if X_dev is None:
        # No dev part given: hold out a stratified part of the training data for selection.
        fit_idx, dev_idx = inner_split(y, est.task_, est.validation_fraction, est.random_state)
        X, X_dev, y, y_dev = X[fit_idx], X[dev_idx], y[fit_idx], y[dev_idx]
    else:
        X_dev, y_dev = as_layers(X_dev), np.asarray(y_dev)
    if est.task_ == "regression":
        y, y_dev = y.astype(np.float64), y_dev.astype(np.float64)
    else:
        est.classes_ = np.unique(y)
    est.n_layers_in_, est.n_features_in_ = X.shape[1], X.shape[2]
    return X, y, X_dev, y_dev


class _ProbeBase(BaseEstimator):
    """Shared fit plumbing: task, dev part, layer selection, predict/score on the best layer."""


    def _layer_index(self, layer):
        check_is_fitted(self, "scores_")
        return self.best_layer_ if layer is None else int(layer)

    def predict(self, X, layer=None):
        """(N,) predictions of the best dev layer (or `layer`, an index into X's layer axis)."""
        X = as_layers(X)
        return self._predict_layer(X[:, self._layer_index(layer)], self._layer_index(layer))

    def predict_layers(self, X) -> np.ndarray:
        """(N, L) predictions of every layer's probe."""
        check_is_fitted(self, "scores_")
        X = as_layers(X)
        return np.stack([self._predict_layer(X[:, i], i) for i in range(X.shape[1])], axis=1)

    def score(self, X, y, layer=None):
        """R^2 (regression) or accuracy (classification) of the best layer, as scikit-learn scores."""
        from sklearn.metrics import accuracy_score, r2_score

        pred = self.predict(X, layer)
        return r2_score(y, pred) if self.task_ == "regression" else accuracy_score(y, pred)


class LayerProbe(_ProbeBase):
    """A scikit-learn probe per layer; regularisation and best layer chosen on dev.

    Parameters: probe ("linear" = ridge or logistic by task, "ridge", "logistic", "mlp"), grid (the
    regularisation values: ridge alpha, logistic C, MLP alpha; None = defaults), task ("auto" infers it from
    y), validation_fraction (dev part held out of X when fit gets no X_dev), hidden_size and max_iter (MLP),
    random_state.

    fit(X (N, L, D), y (N,), X_dev=None, y_dev=None). Each layer's pipeline is StandardScaler + model,
    fitted on the training part only; the dev part only selects.
    Fitted: task_, scores_ (L,) best primary-metric dev value per layer (MAE for regression, f1_macro for
    classification), dev_scores_ (L, G), best_params_ (L,) grid values, best_layer_, estimators_ (L pipelines).
    """

    def __init__(self, probe="linear", grid=None, task="auto", validation_fraction=0.2, hidden_size=256,
                 max_iter=300, random_state=0):
        self.probe = probe
        self.grid = grid
        self.task = task
        self.validation_fraction = validation_fraction
        self.hidden_size = hidden_size
        self.max_iter = max_iter
        self.random_state = random_state

    def _model(self, task, value):
        kind = self.probe
        if kind == "linear":
            kind = "ridge" if task == "regression" else "logistic"
        if kind == "ridge":
            if task != "regression":
                raise FeatxError("probe 'ridge' needs numeric labels; use 'logistic' for classes")
            return Ridge(alpha=value)
        if kind == "logistic":
            if task != "classification":
                raise FeatxError("probe 'logistic' needs class labels; use 'ridge' for numeric labels")
            return LogisticRegression(C=value, max_iter=self.max_iter)
        if kind == "mlp":
            cls = MLPRegressor if task == "regression" else MLPClassifier
            # early_stopping holds out part of the *training* data, never dev or test.
            return cls(hidden_layer_sizes=(self.hidden_size,), alpha=value, max_iter=self.max_iter,
                       early_stopping=True, random_state=self.random_state)
        raise FeatxError(f"unknown probe {self.probe!r}: use linear, ridge, logistic or mlp")

    def _grid(self, task):
        if self.grid is not None:
            return tuple(self.grid)
        if self.probe == "mlp":
            return DEFAULT_MLP_ALPHAS
        return DEFAULT_ALPHAS if task == "regression" else DEFAULT_CS

    def fit(self, X, y, X_dev=None, y_dev=None):
        X, y, X_dev, y_dev = prepare_fit(self, X, y, X_dev, y_dev)
        grid = self._grid(self.task_)
        L = X.shape[1]
        self.dev_scores_ = np.full((L, len(grid)), np.nan)
        self.estimators_, self.best_params_ = [], []
        for layer in range(L):
            best = None
            for g, value in enumerate(grid):
                pipe = make_pipeline(StandardScaler(), self._model(self.task_, value)).fit(X[:, layer], y)
                s = selection_score(self.task_, y_dev, pipe.predict(X_dev[:, layer]))
                self.dev_scores_[layer, g] = s
                if best is None or s > best[0]:
                    best = (s, value, pipe)
            self.best_params_.append(best[1])
            self.estimators_.append(best[2])
        self.best_params_ = np.asarray(self.best_params_)
        self._finish_scores()
        return self

    def _finish_scores(self):
        signed = np.nanmax(self.dev_scores_, axis=1)
        self.best_layer_ = int(np.argmax(signed))
        name = metrics.PRIMARY[self.task_]
        self.scores_ = signed if metrics.higher_is_better(name) else -signed

    def _predict_layer(self, X2d, layer):
        return self.estimators_[layer].predict(X2d)

    def predict_proba(self, X, layer=None):
        """(N, C) class probabilities of the best layer (classification only)."""
        i = self._layer_index(layer)
        return self.estimators_[i].predict_proba(as_layers(X)[:, i])

    def linear_params(self, layer=None) -> dict:
        """mean (D,), scale (D,), coef (C', D), intercept (C',) of a linear layer probe (for saving)."""
        i = self._layer_index(layer)
        scaler, model = self.estimators_[i][0], self.estimators_[i][-1]
        if not hasattr(model, "coef_"):
            raise FeatxError(f"probe {self.probe!r} is not linear; only linear probes can be saved")
        return {"mean": scaler.mean_, "scale": scaler.scale_, "coef": np.atleast_2d(model.coef_),
                "intercept": np.atleast_1d(model.intercept_)}


class BatchedLinearProbe(_ProbeBase):
    """Linear probes for all L layers x all regularisation values trained at once in torch.

    Regression: closed-form ridge (||y - Xw - b||^2 + alpha ||w||^2, as scikit-learn's Ridge) for every layer
    and alpha by batched Cholesky solves, in the primal (D x D) or dual (N x N) form, whichever is smaller.
    Classification: logistic regression with scikit-learn's penalty (C * sum(logloss) + ||W||^2 / 2; one logit
    for two classes, softmax otherwise) by full-batch L-BFGS: on a GPU all layers and Cs in one problem (they are
    independent, so the sum's minimum is each one's minimum); on the CPU one at a time in float64, each C
    starting from the previous C's solution.
    Features are standardised per layer with training statistics. Same fit signature and fitted attributes as
    LayerProbe, plus mean_ / scale_ (L, D), coef_ (L, C', D) and intercept_ (L, C') of the chosen values.
    """

    def __init__(self, grid=None, task="auto", validation_fraction=0.2, max_iter=200, tol=1e-5,
                 device="auto", random_state=0):
        self.grid = grid
        self.task = task
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.random_state = random_state

    def fit(self, X, y, X_dev=None, y_dev=None):
        import torch

        X, y, X_dev, y_dev = prepare_fit(self, X, y, X_dev, y_dev)
        grid = tuple(self.grid) if self.grid is not None else (
            DEFAULT_ALPHAS if self.task_ == "regression" else DEFAULT_CS)
        dev = torch.device(resolve_device(self.device))
        Xt = torch.from_numpy(np.ascontiguousarray(X.transpose(1, 0, 2))).to(dev)   # (L, N, D)
        mean = Xt.mean(1, keepdim=True)
        scale = Xt.std(1, unbiased=False, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # as StandardScaler: constant -> 1
        Xt = (Xt - mean) / scale
        if self.task_ == "regression":
            W, b = self._fit_ridge(Xt, torch.from_numpy(y).to(dev), grid)               # (L, G, D, 1), (L, G, 1)
        else:
            W, b = self._fit_logistic(Xt, y, grid, dev)                                 # (L, G, D, C'), (L, G, C')
        del Xt
        self.mean_, self.scale_ = mean[:, 0].cpu().numpy(), scale[:, 0].cpu().numpy()
        Xd = (torch.from_numpy(np.ascontiguousarray(X_dev.transpose(1, 0, 2))).to(dev) - mean) / scale
        logits = (torch.einsum("lnd,lgdc->lgnc", Xd, W) + b[:, :, None, :]).cpu().numpy()  # (L, G, N_dev, C')
        L = X.shape[1]
        self.dev_scores_ = np.empty((L, len(grid)))
        for layer in range(L):
            for g in range(len(grid)):
                pred = self._decode(logits[layer, g])
                self.dev_scores_[layer, g] = selection_score(self.task_, y_dev, pred)
        best = np.argmax(self.dev_scores_, axis=1)
        idx = torch.as_tensor(best, device=dev)
        ar = torch.arange(L, device=dev)
        self.coef_ = W[ar, idx].transpose(1, 2).cpu().numpy().astype(np.float64)       # (L, C', D)
        self.intercept_ = b[ar, idx].cpu().numpy().astype(np.float64)                   # (L, C')
        self.best_params_ = np.asarray(grid)[best]
        self._finish_scores()
        return self

    _finish_scores = LayerProbe._finish_scores

    def _fit_ridge(self, Xt, y, grid):
        import torch

        L, N, D = Xt.shape
        dt = torch.float64 if Xt.device.type == "cpu" and N * D < 2e5 else Xt.dtype
        X = Xt.to(dt)
        y_mean = y.mean()
        yc = (y - y_mean).to(dt)
        alphas = torch.tensor(grid, dtype=dt, device=X.device)
        if D <= N:   # primal: (X'X + aI) w = X'y
            A = X.transpose(1, 2) @ X                                                   # (L, D, D)
            eye = torch.eye(D, dtype=dt, device=X.device)
            rhs = (X.transpose(1, 2) @ yc)[:, None, :, None]                            # (L, 1, D, 1)
            W = torch.cholesky_solve(rhs.expand(L, len(grid), D, 1).contiguous(),
                                     torch.linalg.cholesky(A[:, None] + alphas[:, None, None] * eye))
        else:        # dual: w = X' (XX' + aI)^-1 y
            K = X @ X.transpose(1, 2)                                                   # (L, N, N)
            eye = torch.eye(N, dtype=dt, device=X.device)
            rhs = yc[None, None, :, None].expand(L, len(grid), N, 1).contiguous()
            c = torch.cholesky_solve(rhs, torch.linalg.cholesky(K[:, None] + alphas[:, None, None] * eye))
            W = torch.einsum("lnd,lgno->lgdo", X, c)
        W = W.to(Xt.dtype)
        b = torch.full((L, len(grid), 1), float(y_mean), dtype=Xt.dtype, device=Xt.device)
        return W, b

    def _fit_logistic(self, Xt, y, grid, dev):
        import torch

        L, N, D = Xt.shape
        classes = self.classes_
        if len(classes) < 2:
            raise FeatxError("classification needs at least two classes in the training part")
        codes = np.searchsorted(classes, y)
        C = 1 if len(classes) == 2 else len(classes)
        G = len(grid)
        # Penalty per item: mean logloss + ||W||^2 / (2 C N) has the minimum of C * sum + ||W||^2 / 2.
        lam = torch.tensor([1.0 / (2 * c * N) for c in grid], dtype=Xt.dtype, device=dev)
        target = torch.as_tensor(codes, device=dev)
        if dev.type != "cpu":  # all L x G problems in one L-BFGS: big batched products keep a GPU busy
            return self._lbfgs(Xt, target, lam, C)
        # On the CPU one problem at a time is faster (measured 7x on 25 x 4 problems of 1280 x 1024): a layer's
        # features stay in cache, each problem stops when it has converged, and, going up the C grid, each
        # starts from the previous solution.
        W = torch.empty(L, G, D, C, dtype=Xt.dtype)
        b = torch.empty(L, G, C, dtype=Xt.dtype)
        lam = lam.double()
        for layer in range(L):
            Xl, start = Xt[layer:layer + 1].double(), None  # float64: float32 stalls short of the optimum
            for g in np.argsort(grid):
                start = self._lbfgs(Xl, target, lam[g:g + 1], C, start)
                W[layer, g], b[layer, g] = start[0][0, 0], start[1][0, 0]
        return W, b

    def _lbfgs(self, Xt, target, lam, C, start=None):
        """Minimise mean logloss + lam ||W||^2 for every layer of Xt (L, N, D) and every lam (G,) at once.
        Returns W (L, G, D, C') and b (L, G, C'); start: a (W, b) of the same shapes to begin from."""
        import torch

        L, N, D = Xt.shape
        G = len(lam)
        W = torch.zeros(L, G, D, C, dtype=Xt.dtype, device=Xt.device) if start is None else start[0].clone()
        b = torch.zeros(L, G, C, dtype=Xt.dtype, device=Xt.device) if start is None else start[1].clone()
        W.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=self.max_iter, tolerance_grad=self.tol,
                                tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            # One bmm over layers: (L, N, D) @ (L, D, G*C) -> (L, G, N, C).
            logits = (torch.bmm(Xt, W.permute(0, 2, 1, 3).reshape(L, D, G * C)).reshape(L, N, G, C)
                      .permute(0, 2, 1, 3)) + b[:, :, None, :]
            if C == 1:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits[..., 0], target.to(Xt.dtype).expand(L, G, N), reduction="none").mean(-1)
            else:
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, C), target.repeat(L * G), reduction="none").reshape(L, G, N).mean(-1)
            loss = (loss + lam * (W ** 2).sum((2, 3))).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return W.detach(), b.detach()

    def _decode(self, logits):
        """(N, C') logits -> (N,) predictions."""
        if self.task_ == "regression":
            return logits[:, 0].astype(np.float64)
        if logits.shape[1] == 1:
            return self.classes_[(logits[:, 0] > 0).astype(int)]
        return self.classes_[np.argmax(logits, axis=1)]

    def decision_layers(self, X) -> np.ndarray:
        """(L, N, C') raw outputs of every layer's chosen probe."""
        check_is_fitted(self, "scores_")
        X = as_layers(X).transpose(1, 0, 2)
        Xs = (X - self.mean_[:, None]) / self.scale_[:, None]
        return np.einsum("lnd,lcd->lnc", Xs, self.coef_.astype(np.float32)) + self.intercept_[:, None]

    def _predict_layer(self, X2d, layer):
        Xs = (X2d - self.mean_[layer]) / self.scale_[layer]
        return self._decode(Xs @ self.coef_[layer].T.astype(np.float32) + self.intercept_[layer])

    def predict_layers(self, X):
        out = self.decision_layers(X)
        return np.stack([self._decode(o) for o in out], axis=1)

    def linear_params(self, layer=None) -> dict:
        i = self._layer_index(layer)
        return {"mean": self.mean_[i], "scale": self.scale_[i], "coef": self.coef_[i], "intercept": self.intercept_[i]}
