"""Layer probes: one small model per layer of a cached encoder, chosen on dev, reported on test.

Estimators follow scikit-learn's contract: `__init__` stores parameters, `fit(X, y)` returns self, fitted
state ends in `_`. X is (N, L, D): pooled hidden states of L layers (a (N, D) array is one layer).

- `LayerProbe`: a scikit-learn pipeline (StandardScaler + ridge / logistic regression / MLP) per layer,
  regularisation chosen per layer on a dev set, best layer chosen on dev.
- `BatchedLinearProbe`: the same linear probes for all layers and all regularisation strengths at once in
  torch (closed-form ridge; logistic regression by batched L-BFGS), on GPU when there is one.

Sweeps over caches, seeds and training sizes that write the results tables live in `featx.probing.sweep`
(`run_probe`, re-exported here).
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
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

__all__ = ["LayerProbe", "BatchedLinearProbe", "batched_logistic_lbfgs", "infer_task", "as_layers", "prepare_fit",
           "DEFAULT_ALPHAS", "DEFAULT_CS"]

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


def inferred_task_note(y, as_classes=None):
    """For numeric labels, infer_task's choice and why, in one phrase with the --task that overrides it ("0/1 is
    a flag, 1/2 are numbers" is featx's rule, not the labels'); None for string or boolean labels (classes).
    as_classes: whether classification would take these labels (probe's rule, featx.probing.sweep.check_classes,
    also counts the training part); None: at most half as many distinct values as labels."""
    y = np.asarray(y)
    if y.dtype.kind in "OUSb":
        return None
    values = np.unique(y[~np.isnan(y.astype(np.float64))])
    shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
    if infer_task(y) == "classification":
        return (f"task: classification ({values.size} class(es): numeric labels whose only values are 0 and 1 are "
                "taken as classes; give --task regression to fit them as numbers)")
    if as_classes is None:   # more than half the labels: classification refuses them
        as_classes = 2 * values.size <= np.isfinite(y).sum()
    hint = "give --task classification to take these as classes" if as_classes else \
        "too many distinct values to be classes"
    return (f"task: regression ({values.size} distinct numeric label values: {shown}; only labels that are all 0 "
            f"or 1 are taken as classes: {hint})")


def as_layers(X) -> np.ndarray:
    """(N, L, D) float32 from (N, L, D) or (N, D) (one layer)."""
    X = np.asarray(X)
    if X.ndim == 2:
        X = X[:, None, :]
    if X.ndim != 3:
        raise ValueError(f"X must be (N, L, D) or (N, D), got shape {X.shape}")
    return X.astype(np.float32, copy=False)


def _standardised(X, dev):
    """X (N, L, D) numpy -> (X - mean) / scale as a torch (L, N, D) on `dev`, mean (L, 1, D), scale (L, 1, D):
    StandardScaler's statistics (population std; a constant feature keeps scale 1)."""
    import torch

    Xt = torch.empty(X.shape[1], X.shape[0], X.shape[2], device=dev)
    Xt.copy_(torch.from_numpy(X).transpose(0, 1))      # a copy: the in-place steps below never touch X
    mean = Xt.mean(1, keepdim=True)
    Xt -= mean
    scale = Xt.square().mean(1, keepdim=True).sqrt_()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Xt.div_(scale), mean, scale


def macro_f1(y_true, classes, codes) -> np.ndarray:
    """f1_score(y_true, classes[codes[m]], average="macro", zero_division=0) for every row m of codes (M, N),
    from per-class counts (macro over the labels present in either, as scikit-learn). Returns (M,)."""
    labels = np.union1d(classes, np.unique(y_true))
    true = np.searchsorted(labels, y_true)
    pred = np.searchsorted(labels, classes)[codes]                                       # (M, N)
    M, n = len(pred), len(labels)
    flat = pred + np.arange(M)[:, None] * n
    predicted = np.bincount(flat.ravel(), minlength=M * n).reshape(M, n)
    hits = np.bincount(flat[pred == true[None]], minlength=M * n).reshape(M, n)
    support = predicted + np.bincount(true, minlength=n)[None]
    f1 = 2 * hits / np.maximum(support, 1)                                               # = 2PR / (P + R)
    return f1.sum(1) / (support > 0).sum(1)


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
    random_state, layer_widths (None, or each layer's width when X's layers are zero-padded to D: a CNN's
    stages, CacheData.layer_widths; each layer's probe then sees its own features only, so its numbers are
    those of a probe on that layer alone: an MLP's initial weights depend on its input width).

    fit(X (N, L, D), y (N,), X_dev=None, y_dev=None). Each layer's pipeline is StandardScaler + model,
    fitted on the training part only; the dev part only selects.
    Fitted: task_, scores_ (L,) best primary-metric dev value per layer (MAE for regression, f1_macro for
    classification), dev_scores_ (L, G), best_params_ (L,) grid values, best_layer_, estimators_ (L pipelines).
    """

    def __init__(self, probe="linear", grid=None, task="auto", validation_fraction=0.2, hidden_size=256,
                 max_iter=300, random_state=0, layer_widths=None):
        self.probe = probe
        self.grid = grid
        self.task = task
        self.validation_fraction = validation_fraction
        self.hidden_size = hidden_size
        self.max_iter = max_iter
        self.random_state = random_state
        self.layer_widths = layer_widths

    def _features(self, X2d, layer):
        """(N, width) of one layer's (N, D) features: its zero padding cut off."""
        return X2d if self.layer_widths is None else X2d[:, :int(self.layer_widths[layer])]

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
        if self.layer_widths is not None and len(self.layer_widths) != L:
            raise ValueError(f"layer_widths has {len(self.layer_widths)} widths for {L} layers")
        self.dev_scores_ = np.full((L, len(grid)), np.nan)
        self.estimators_, self.best_params_ = [], []
        for layer in range(L):
            best = None
            x, x_dev = self._features(X[:, layer], layer), self._features(X_dev[:, layer], layer)
            for g, value in enumerate(grid):
                pipe = make_pipeline(StandardScaler(), self._model(self.task_, value)).fit(x, y)
                s = selection_score(self.task_, y_dev, pipe.predict(x_dev))
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
        return self.estimators_[layer].predict(self._features(X2d, layer))

    def predict_proba(self, X, layer=None):
        """(N, C) class probabilities of the best layer (classification only)."""
        i = self._layer_index(layer)
        return self.estimators_[i].predict_proba(self._features(as_layers(X)[:, i], i))

    def linear_params(self, layer=None) -> dict:
        """mean (D,), scale (D,), coef (C', D), intercept (C',) of a linear layer probe (for saving); D is the
        layer's own width with layer_widths."""
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
    Classification: logistic regression with scikit-learn's objective (C * sum(logloss) + ||W||^2 / 2; one logit
    for two classes, softmax otherwise), the same optimum as LogisticRegression, by batched L-BFGS
    (batched_logistic_lbfgs): all Cs of a layer share each product with its features, every problem keeps its
    own history and step and stops at scikit-learn's criterion (max |gradient of the mean loss| <= tol); on the
    CPU layers go in chunks that stay in cache, each starting from the solution of the layer below (warm_start).
    Features are standardised per layer with training statistics. Same fit signature and fitted attributes as
    LayerProbe, plus mean_ / scale_ (L, D), coef_ (L, C', D) and intercept_ (L, C') of the chosen values, and
    for classes n_iter_ (L, G), the L-BFGS iterations of each problem.
    """

    def __init__(self, grid=None, task="auto", validation_fraction=0.2, max_iter=300, tol=1e-4,
                 device="auto", random_state=0, warm_start=True):
        self.grid = grid
        self.task = task
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.random_state = random_state
        self.warm_start = warm_start

    def fit(self, X, y, X_dev=None, y_dev=None):
        import torch

        X, y, X_dev, y_dev = prepare_fit(self, X, y, X_dev, y_dev)
        grid = tuple(self.grid) if self.grid is not None else (
            DEFAULT_ALPHAS if self.task_ == "regression" else DEFAULT_CS)
        dev = torch.device(resolve_device(self.device))
        if self.task_ == "regression":
            Xt, mean, scale = _standardised(X, dev)                                     # (L, N, D)
            W, b = self._fit_ridge(Xt, torch.from_numpy(y).to(dev), grid)               # (L, G, D, 1), (L, G, 1)
            del Xt
        else:
            W, b, mean, scale = self._fit_logistic(X, y, grid, dev)                     # (L, G, D, C'), (L, G, C')
        self.mean_, self.scale_ = mean[:, 0].cpu().numpy(), scale[:, 0].cpu().numpy()
        Xd = (torch.from_numpy(np.ascontiguousarray(X_dev.transpose(1, 0, 2))).to(dev) - mean) / scale
        logits = (torch.einsum("lnd,lgdc->lgnc", Xd, W) + b[:, :, None, :]).cpu().numpy()  # (L, G, N_dev, C')
        L = X.shape[1]
        self.dev_scores_ = self._selection_scores(logits, y_dev)
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

    def _fit_logistic(self, X, y, grid, dev):
        """Logistic regression for every layer of X (N, L, D) and every C: W (L, G, D, C'), b (L, G, C'), and the
        standardisation mean, scale (L, 1, D)."""
        import torch

        N, L, D = X.shape
        if len(self.classes_) < 2:
            raise FeatxError("classification needs at least two classes in the training part")
        target = torch.as_tensor(np.searchsorted(self.classes_, y), device=dev)
        K = 1 if len(self.classes_) == 2 else len(self.classes_)
        # mean logloss + lam ||W||^2 with lam = 1 / (2 C N) has the minimum of C * sum(logloss) + ||W||^2 / 2.
        lam = torch.tensor([1.0 / (2 * c * N) for c in grid], dtype=torch.float32, device=dev)
        # On the CPU, layers go in chunks whose features stay in the cache across iterations; a GPU takes all.
        chunk = L if dev.type != "cpu" else max(1, int(16e6 // (4 * N * D)))
        W = torch.empty(L, len(grid), D, K, device=dev)
        b = torch.empty(L, len(grid), K, device=dev)
        mean, scale = torch.empty(L, 1, D, device=dev), torch.empty(L, 1, D, device=dev)
        self.n_iter_ = np.zeros((L, len(grid)), dtype=int)
        # Chunk j holds layers j, j + n, j + 2n, ... (n chunks): each problem starts from the solution of the
        # layer below it, which neighbouring layers' features make close to its own.
        n = -(-L // chunk)
        theta = None
        for j in range(n):
            part = np.arange(j, L, n)
            Xt, mean[part], scale[part] = _standardised(X[:, part], dev)
            start = None if theta is None or not self.warm_start else theta[:len(part)]
            theta, n_iter = batched_logistic_lbfgs(Xt, target, lam, K, self.tol, self.max_iter, start=start)
            W[part], b[part] = theta[..., :D].transpose(2, 3), theta[..., D]
            self.n_iter_[part] = n_iter.cpu().numpy()
        stopped = int((self.n_iter_ >= self.max_iter).sum())
        if stopped:
            warnings.warn(ConvergenceWarning(
                f"batched logistic regression (L-BFGS): {stopped} of {self.n_iter_.size} problems stopped at "
                f"max_iter={self.max_iter} before max |gradient| <= {self.tol}"))
        return W, b, mean, scale

    def _selection_scores(self, logits, y_dev):
        """(L, G) dev selection scores (the primary metric, larger is better) of logits (L, G, N_dev, C')."""
        L, G = logits.shape[:2]
        if self.task_ == "classification":
            codes = (logits[..., 0] > 0).astype(int) if logits.shape[-1] == 1 else np.argmax(logits, axis=-1)
            return macro_f1(y_dev, self.classes_, codes.reshape(L * G, -1)).reshape(L, G)
        return np.array([[selection_score(self.task_, y_dev, self._decode(logits[i, g])) for g in range(G)]
                         for i in range(L)])

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


# ---------------------------------------------------------------- batched logistic regression (L-BFGS)
def _dot(u, v):
    """Per-problem inner products of (B, G, K, D+1) tensors -> (B, G)."""
    return (u * v).sum((2, 3))


def _logits(X, theta):
    """X (B, N, D) and theta (B, G, K, D+1) (weights, then intercept) -> logits (B, N, G, K)."""
    import torch

    B, N, D = X.shape
    G, K = theta.shape[1:3]
    w = theta[..., :D].reshape(B, G * K, D)
    return (torch.bmm(X, w.transpose(1, 2)) + theta[..., D].reshape(B, 1, G * K)).view(B, N, G, K)


def _loss(z, target, theta, lam_pen):
    """(B, G) float64 objective (mean logloss + lam ||W||^2) and the residual d logloss / d z (B, N, G, K).
    target: (N,) float 0/1 (one logit, K = 1) or (N, K) one-hot (softmax)."""
    import torch

    if z.shape[-1] == 1:
        zz, t = z[..., 0], target[None, :, None]
        loss = torch.nn.functional.softplus(zz) - t * zz
        r = (torch.sigmoid(zz) - t)[..., None]
    else:
        t = target[None, :, None, :]
        loss = torch.logsumexp(z, -1) - (z * t).sum(-1)
        r = torch.softmax(z, -1) - t
    f = loss.sum(1, dtype=torch.float64) / z.shape[1] + _dot(lam_pen * theta, theta).double()
    return f, r


def _gradient(X, r, theta, lam_pen):
    """The objective's gradient (B, G, K, D+1) from the residual r (B, N, G, K)."""
    import torch

    B, N, D = X.shape
    G, K = theta.shape[1:3]
    gw = torch.bmm(r.reshape(B, N, G * K).transpose(1, 2), X).view(B, G, K, D)
    return torch.cat([gw, r.sum(1)[..., None]], -1) / N + 2 * lam_pen * theta


def _direction(g, history):
    """L-BFGS two-loop recursion per problem: -H g (B, G, K, D+1) from the (s, y, 1 / s'y) pairs."""
    import torch

    q, alphas = g, []
    for s, y, rho in reversed(history):
        a = rho * _dot(s, q)
        q = q - a[..., None, None] * y
        alphas.append(a)
    if history:   # initial Hessian: the usual s'y / y'y scaling
        s, y, _ = history[-1]
        yy = _dot(y, y)
        q = q * torch.where(yy > 0, _dot(s, y) / yy.clamp_min(1e-30), torch.ones_like(yy))[..., None, None]
    for (s, y, rho), a in zip(history, reversed(alphas)):
        q = q + (a - rho * _dot(y, q))[..., None, None] * s
    return -q


def _line_search(z, zd, theta, d, f, g, target, lam_pen, active):
    """Step (B, G) along d: the minimum of the objective's quadratic model, halved until Armijo's condition
    holds. z + step * zd are the new logits (zd = X d: no pass over X per trial). Returns step, f, residual."""
    import torch

    if z.shape[-1] == 1:
        p = torch.sigmoid(z[..., 0])
        curv = (p * (1 - p) * zd[..., 0] ** 2).mean(1)
    else:
        p = torch.softmax(z, -1)
        curv = ((p * zd * zd).sum(-1) - (p * zd).sum(-1) ** 2).mean(1)
    curv = curv + 2 * _dot(lam_pen * d, d)
    gd = _dot(g, d)
    step = torch.where(active & (curv > 0), -gd / curv.clamp_min(1e-30), torch.zeros_like(gd))
    # A decrease below the rounding of f (float32 logits) cannot be checked: the model's step is taken as is.
    noise = 10 * torch.finfo(z.dtype).eps * f.abs()
    for _ in range(30):
        s4 = step[:, None, :, None]
        fn, r = _loss(z + s4 * zd, target, theta + step[..., None, None] * d, lam_pen)
        bad = active & (fn > f + 1e-4 * (step * gd).double()) & (-(step * gd).double() > noise)
        if not bad.any():
            break
        step = torch.where(bad, step / 2, step)
    return step, fn, r


def batched_logistic_lbfgs(X, target, lam, K, tol=1e-4, max_iter=300, history=10, start=None):
    """Logistic regression for each layer of X (B, N, D) and each penalty lam (G,) at once: minimises
    mean logloss + lam ||W||^2 (intercept unpenalised) by L-BFGS, each problem with its own history and step,
    each stopping when max |gradient| <= tol. The products with X are shared by the G problems of a layer.

    target: (N,) class codes; K: 1 (two classes, one logit, as scikit-learn) or the number of classes (softmax).
    start: optional theta to begin from (B, G, K, D+1), taken per problem where it beats zero weights. Returns theta (B, G, K, D+1) (weights, then intercept) and the iterations each problem ran (B, G)."""
    import torch

    B, N, D = X.shape
    G = len(lam)
    target = target.to(X.dtype) if K == 1 else torch.nn.functional.one_hot(target, K).to(X.dtype)
    pen = torch.ones(D + 1, dtype=X.dtype, device=X.device)
    pen[D] = 0
    lam_pen = lam.to(X.dtype)[None, :, None, None] * pen        # (1, G, 1, D+1)
    theta = X.new_zeros(B, G, K, D + 1)
    z = X.new_zeros(B, N, G, K)
    f, r = _loss(z, target, theta, lam_pen)
    if start is not None:   # begin from `start` where its objective is below that of zero weights
        z1 = _logits(X, start)
        f1, r1 = _loss(z1, target, start, lam_pen)
        take = f1 < f
        f, r = torch.where(take, f1, f), torch.where(take[:, None, :, None], r1, r)
        theta = torch.where(take[..., None, None], start, theta)
        z = torch.where(take[:, None, :, None], z1, z)
    g = _gradient(X, r, theta, lam_pen)
    out, n_iter = theta.clone(), torch.zeros(B, G, dtype=torch.long, device=X.device)
    live = torch.arange(B, device=X.device)          # the layers still iterating (rows of out)
    pairs, it = [], torch.zeros(B, G, dtype=torch.long, device=X.device)
    active = g.abs().amax((2, 3)) > tol
    for _ in range(max_iter):
        done = ~active.any(1)
        if bool(done.any()):   # a layer whose problems all converged leaves the products with X
            out[live[done]], n_iter[live[done]] = theta[done], it[done]
            keep = ~done
            if not bool(keep.any()):
                return out, n_iter
            live, X, theta, z, f, g, active, it = (t[keep] for t in (live, X, theta, z, f, g, active, it))
            pairs = [(a[keep], b[keep], c[keep]) for a, b, c in pairs]
        d = _direction(g, pairs) * active[..., None, None]
        zd = _logits(X, d)
        step, f, r = _line_search(z, zd, theta, d, f, g, target, lam_pen, active)
        s = step[..., None, None] * d
        theta, z = theta + s, z + step[:, None, :, None] * zd
        g_new = _gradient(X, r, theta, lam_pen)
        y = g_new - g
        sy = _dot(s, y)
        pairs = (pairs + [(s, y, torch.where(sy > 0, 1 / sy.clamp_min(1e-30), torch.zeros_like(sy)))])[-history:]
        g = g_new
        it += active
        active = active & (g.abs().amax((2, 3)) > tol)
    out[live], n_iter[live] = theta, it
    return out, n_iter
