"""Linear CKA against reference HSIC computations written straight from the papers, and its invariances."""
import numpy as np
import pytest

from featx.errors import FeatxError
from featx.report import cka as cka_mod
from featx.report.cka import cka_matrix, linear_cka


def _gram(X):
    return X @ X.T


def _hsic_biased(K, L):
    """HSIC_0 = tr(K H L H) / (n-1)^2 with an explicit centring matrix H = I - 11^T/n."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def _hsic_unbiased(K, L):
    """HSIC_1 of Song et al. 2012 (eq. 5): kernels with zeroed diagonals, no centring."""
    n = K.shape[0]
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def _reference_cka(X, Y, hsic):
    K, L = _gram(X), _gram(Y)
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _correlated(rng, n, dx, dy, noise):
    Z = rng.normal(size=(n, 5))
    X = Z @ rng.normal(size=(5, dx)) + noise * rng.normal(size=(n, dx)) + 3.0  # an offset: centring must matter
    Y = np.tanh(Z @ rng.normal(size=(5, dy))) + noise * rng.normal(size=(n, dy)) - 1.0
    return X, Y


@pytest.mark.parametrize("n,dx,dy,noise", [(10, 3, 7, 0.5), (40, 64, 16, 1.0), (25, 8, 8, 3.0)])
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_hsic_reference(n, dx, dy, noise, debiased):
    X, Y = _correlated(np.random.default_rng(n + dx), n, dx, dy, noise)
    ref = _reference_cka(X, Y, _hsic_unbiased if debiased else _hsic_biased)
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_debiased_removes_small_sample_bias_on_independent_data():
    # With few items and many features, plain CKA of independent data sits far above 0; debiased does not.
    rng = np.random.default_rng(0)
    biased, debiased = [], []
    for _ in range(20):
        X, Y = rng.normal(size=(30, 200)), rng.normal(size=(30, 200))
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert np.mean(biased) > 0.5
    assert abs(np.mean(debiased)) < 0.05


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    rng = np.random.default_rng(1)
    X, Y = _correlated(rng, 50, 12, 9, 0.7)
    base = linear_cka(X, Y, debiased=debiased)
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0)
    assert linear_cka(X @ Q, X, debiased=debiased) == pytest.approx(1.0)
    assert linear_cka(X @ Q, Y, debiased=debiased) == pytest.approx(base)
    assert linear_cka(7.5 * X + 2.0, Y, debiased=debiased) == pytest.approx(base)
    assert linear_cka(Y, X, debiased=debiased) == pytest.approx(base)
    # Not invariant to an anisotropic scaling: a check that the invariances above are not vacuous.
    assert linear_cka(X * np.linspace(0.1, 10, 12), Y, debiased=debiased) != pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_pairwise_and_both_paths_agree(debiased, monkeypatch):
    rng = np.random.default_rng(2)
    n = 30
    Z = rng.normal(size=(n, 6))
    A = np.stack([Z @ rng.normal(size=(6, 10)) + (l + 1) * rng.normal(size=(n, 10)) for l in range(4)], axis=1)
    B = rng.normal(size=(n, 3, 5)) + A[:, :3, :5]
    within = cka_matrix(A, debiased=debiased)
    across = cka_matrix(A, B, debiased=debiased)
    assert within.shape == (4, 4) and across.shape == (4, 3)
    for i in range(4):
        for j in range(4):
            assert within[i, j] == pytest.approx(_reference_cka(A[:, i], A[:, j], _hsic_unbiased if debiased
                                                                else _hsic_biased))
        for j in range(3):
            assert across[i, j] == pytest.approx(linear_cka(A[:, i], B[:, j], debiased=debiased))
    np.testing.assert_allclose(np.diag(within), 1.0)
    np.testing.assert_allclose(within, within.T)
    # Past the memory cap for n x n Gram matrices, D x D cross-products give the same numbers.
    monkeypatch.setattr(cka_mod, "_GRAM_BYTES", 0)
    np.testing.assert_allclose(cka_matrix(A, B, debiased=debiased), across, rtol=1e-9)
    np.testing.assert_allclose(cka_matrix(A, debiased=debiased), within, rtol=1e-9)


def test_usage_errors():
    rng = np.random.default_rng(3)
    with pytest.raises(FeatxError, match="at least 4 items"):
        linear_cka(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), debiased=True)
    with pytest.raises(FeatxError, match="same items"):
        linear_cka(rng.normal(size=(5, 2)), rng.normal(size=(6, 2)))
    with pytest.raises(FeatxError, match="items, layers, features"):
        cka_matrix(rng.normal(size=(5, 2)))
    assert np.isnan(linear_cka(np.ones((6, 3)), rng.normal(size=(6, 2))))
