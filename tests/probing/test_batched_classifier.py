"""The batched classifier (BatchedLinearProbe on class labels): batched L-BFGS logistic regression against
scikit-learn's LogisticRegression, its dev selection, warm starts across layers and its warnings."""
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from _synthetic import planted
from featx.metrics import selection_score
from featx.probing.estimators import BatchedLinearProbe, batched_logistic_lbfgs, macro_f1


def _objective(Xs, codes, C, coef, intercept):
    """scikit-learn's objective: C * sum(logloss) + ||W||^2 / 2 (one logit for two classes, softmax otherwise)."""
    z = Xs @ coef.T + intercept
    if coef.shape[0] == 1:
        loss = np.logaddexp(0, z[:, 0]) - codes * z[:, 0]
    else:
        loss = logsumexp(z, 1) - z[np.arange(len(z)), codes]
    return C * loss.sum() + 0.5 * (coef * coef).sum()


@pytest.mark.parametrize("n_classes", [2, 3])
def test_each_layer_and_C_reaches_sklearn_optimum(n_classes):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((150, 3, 10)).astype(np.float32)
    codes = (X[:, 1, :3] @ np.array([1.5, -1.0, 0.5]) + rng.standard_normal(150) > 0).astype(int)
    if n_classes == 3:
        codes = codes + (X[:, 2, 0] > 0.8)
    Cs = (0.01, 0.1, 1.0)
    Xs = (X - X.mean(0)) / X.std(0)
    lam = torch.tensor([1 / (2 * c * 150) for c in Cs])
    K = 1 if n_classes == 2 else n_classes
    theta, n_iter = batched_logistic_lbfgs(torch.from_numpy(Xs.transpose(1, 0, 2).copy()), torch.as_tensor(codes),
                                           lam, K, tol=1e-5)
    assert theta.shape == (3, 3, K, 11) and (n_iter < 300).all()
    for layer in range(3):
        for g, C in enumerate(Cs):
            ref = LogisticRegression(C=C, tol=1e-9, max_iter=2000).fit(Xs[:, layer].astype(np.float64), codes)
            coef, b = theta[layer, g, :, :10].double().numpy(), theta[layer, g, :, 10].double().numpy()
            best = _objective(Xs[:, layer], codes, C, ref.coef_, ref.intercept_)
            assert _objective(Xs[:, layer], codes, C, coef, b) <= best * (1 + 1e-5), (layer, C)
            np.testing.assert_allclose(coef, ref.coef_, atol=2e-3)
            ours = Xs[:, layer] @ coef.T + b
            np.testing.assert_allclose(ours[:, 0] if K == 1 else ours, ref.decision_function(Xs[:, layer]),
                                       atol=5e-3)


def test_probe_matches_sklearn_on_layers_dev_choice_and_predictions():
    X, y = planted(n=300, num_layers=4, dim=16, k=2, task="classification", seed=4)
    tr, dev, te = np.arange(180), np.arange(180, 240), np.arange(240, 300)
    b = BatchedLinearProbe(device="cpu").fit(X[tr], y[tr], X[dev], y[dev])
    Xs = (X - b.mean_[None]) / b.scale_[None]
    for layer in range(4):
        ref = LogisticRegression(C=float(b.best_params_[layer]), max_iter=1000).fit(Xs[tr, layer], y[tr])
        assert (b.predict(X[te], layer) == ref.predict(Xs[te, layer])).mean() >= 0.98
        np.testing.assert_allclose(b.decision_layers(X[te])[layer], ref.decision_function(Xs[te, layer]), atol=0.02)
    # the dev scores are f1_macro of each (layer, C), as scikit-learn computes it
    assert b.dev_scores_.shape == (4, 4) and b.best_layer_ == 2
    assert b.scores_[2] == pytest.approx(selection_score("classification", y[dev], b.predict(X[dev], 2)), abs=1e-12)


def test_macro_f1_is_sklearns():
    rng = np.random.default_rng(1)
    classes = np.array(["a", "b", "c"], dtype=object)
    y_true = np.array(list("aabbccd") * 3, dtype=object)        # "d": a dev label the training part lacked
    codes = rng.integers(0, 3, (6, len(y_true)))
    codes[0] = 0                                                # a row predicting one class only
    got = macro_f1(y_true, classes, codes)
    want = [f1_score(y_true, classes[c], average="macro", zero_division=0) for c in codes]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_warm_start_deterministic_and_input_untouched():
    X, y = planted(n=200, num_layers=6, dim=12, k=3, task="classification", seed=2)
    X0 = X.copy()
    a = BatchedLinearProbe(device="cpu").fit(X[:120], y[:120], X[120:160], y[120:160])
    a2 = BatchedLinearProbe(device="cpu").fit(X[:120], y[:120], X[120:160], y[120:160])
    cold = BatchedLinearProbe(device="cpu", warm_start=False).fit(X[:120], y[:120], X[120:160], y[120:160])
    np.testing.assert_array_equal(a.coef_, a2.coef_)
    np.testing.assert_array_equal(X, X0)
    assert (a.best_params_ == cold.best_params_).all() and a.best_layer_ == cold.best_layer_
    np.testing.assert_allclose(a.decision_layers(X[160:]), cold.decision_layers(X[160:]), atol=0.02)
    one = BatchedLinearProbe(device="cpu").fit(X[:120, 3], y[:120], X[120:160, 3], y[120:160])   # (N, D): one layer
    np.testing.assert_array_equal(X, X0)
    assert (one.predict(X[160:, 3]) == a.predict(X[160:], 3)).mean() >= 0.95


def test_unconverged_fits_warn_as_logistic():
    X, y = planted(n=120, num_layers=2, dim=8, k=1, task="classification", seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BatchedLinearProbe(device="cpu", max_iter=1).fit(X[:80], y[:80], X[80:], y[80:])
    text = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(text) == 1 and "logistic" in text[0] and "max_iter=1" in text[0]
