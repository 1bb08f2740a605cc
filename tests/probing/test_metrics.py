"""featx.metrics against hand-computed cases (label 0, clipping, rounding) and scipy's Pearson."""
import numpy as np
import pytest
from scipy.stats import pearsonr

from featx import metrics

Y_TRUE = [-3.0, -1.0, 0.0, 0.4, 2.6]
Y_PRED = [-2.4, 0.5, -0.2, 1.0, 3.5]


def test_msa_regression_hand_computed():
    m = metrics.msa_regression(Y_TRUE, Y_PRED)
    assert m["mae"] == pytest.approx(3.8 / 5)
    assert m["corr"] == pytest.approx(pearsonr(Y_PRED, Y_TRUE)[0])
    # >= 0 over all items: true FFTTT, pred FTFTT
    assert m["acc2_has0"] == pytest.approx(3 / 5)
    assert m["f1_has0"] == pytest.approx((2 * 0.5 + 3 * 2 / 3) / 5)
    # item with true 0 dropped, then > 0: true FFTT, pred FTTT
    assert m["acc2_non0"] == pytest.approx(3 / 4)
    assert m["f1_non0"] == pytest.approx((2 / 3 + 0.8) / 2)
    # clipped + rounded: [-3,3] true -3,-1,0,0,3 pred -2,0,0,1,3 ; [-2,2] true -2,-1,0,0,2 pred -2,0,0,1,2
    assert m["acc7"] == pytest.approx(2 / 5)
    assert m["acc5"] == pytest.approx(3 / 5)


def test_non0_uses_true_zero_only_and_pred_zero_counts_as_negative():
    # pred 0 is "non-negative" for has0 but "not positive" for non0.
    m = metrics.msa_regression([1.0, -1.0, 0.0], [0.0, -2.0, 5.0])
    assert m["acc2_has0"] == pytest.approx(1.0)       # true T F T, pred T F T
    assert m["acc2_non0"] == pytest.approx(1 / 2)     # drop item 2; true TF, pred FF


def test_all_zero_labels_non0_is_nan_and_constant_corr_is_nan():
    m = metrics.msa_regression([0.0, 0.0], [0.3, -0.3])
    assert np.isnan(m["acc2_non0"]) and np.isnan(m["f1_non0"])
    assert np.isnan(metrics.msa_regression([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])["corr"])


def test_classification_hand_computed():
    m = metrics.classification(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert m["acc"] == pytest.approx(0.75)
    assert m["balanced_acc"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)


def test_chance_is_the_train_mean_or_majority():
    c = metrics.chance("regression", [1.0, 3.0], [0.0, 4.0])
    assert c["mae"] == pytest.approx(2.0)
    c = metrics.chance("classification", ["x", "x", "y"], ["x", "y"])
    assert c["acc"] == pytest.approx(0.5) and c["balanced_acc"] == pytest.approx(0.5)


def test_primary_metric_directions():
    assert metrics.PRIMARY["regression"] == "mae" and not metrics.higher_is_better("mae")
    assert metrics.higher_is_better(metrics.PRIMARY["classification"])


def test_chance_of_numeric_class_labels_scores_against_numeric_test_labels():
    # 0/1 labels stored as floats: the majority prediction must not become an object array that sklearn
    # calls "unknown" next to a binary y_true ("mix of binary and unknown targets")
    y_train, y_test = np.array([0.0, 1.0, 1.0, 1.0]), np.array([1.0, 0.0, 1.0])
    pred = metrics.chance_prediction("classification", y_train, len(y_test))
    assert pred.tolist() == [1.0, 1.0, 1.0]
    got = metrics.compute("classification", y_test, pred)
    assert got["acc"] == pytest.approx(2 / 3)


def test_run_probe_classifies_float_zero_one_labels_with_a_split(tmp_path):
    from _synthetic import planted, standard_splits, write_cache

    from featx.probing.sweep import run_probe

    X, y = planted(n=120, num_layers=3, dim=8, k=1, task="classification", seed=3)
    y01 = (y == "pos").astype(np.float64)
    path = write_cache(tmp_path / "c.h5", X, [f"i{k}" for k in range(120)], labels=y01,
                       splits=standard_splits(120, seed=3))
    run_probe([path], str(tmp_path / "out"), task="classification", progress=False)
    import pandas as pd
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(res["metric"]) >= {"acc", "f1_macro"} and res["value"].notna().all()
