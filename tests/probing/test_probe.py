"""Layer probes: the scikit-learn contract, batched vs scikit-learn, planted layers, test-split isolation,
learning curves, the CLI and saved classifiers."""
import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

from _synthetic import planted, standard_splits, write_cache
from featx.probing import BatchedLinearProbe, Classifier, LayerProbe, infer_task, run_probe
from featx.probing.results import COLUMNS
from featx.probing.splits import subsample


def _ids(n):
    return [f"item{i:04d}" for i in range(n)]


def test_infer_task():
    assert infer_task(np.array([-1.2, 0.0, 3.0])) == "regression"
    assert infer_task(np.array([0.0, 1.0, 1.0])) == "classification"
    assert infer_task(np.array(["pos", "neg"], dtype=object)) == "classification"


def test_estimator_contract():
    X, y = planted(n=200, num_layers=3, dim=8, k=1)
    p = LayerProbe(grid=(1.0, 100.0))
    assert clone(p).get_params() == p.get_params()
    with pytest.raises(NotFittedError):
        p.predict(X)
    assert p.fit(X, y) is p
    assert p.scores_.shape == (3,) and p.best_layer_ == 1 and len(p.estimators_) == 3
    assert p.predict(X).shape == (200,) and p.predict_layers(X).shape == (200, 3)
    gs = GridSearchCV(LayerProbe(), {"grid": [(0.01,), (100.0,)]}, cv=3).fit(X, y)
    assert gs.best_params_["grid"] in [(0.01,), (100.0,)]


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_batched_agrees_with_sklearn(task):
    X, y = planted(n=400, num_layers=4, dim=24, k=2, task=task, seed=3)
    tr, dev = np.arange(240), np.arange(240, 320)
    te = np.arange(320, 400)
    a = LayerProbe().fit(X[tr], y[tr], X[dev], y[dev])
    b = BatchedLinearProbe(device="cpu").fit(X[tr], y[tr], X[dev], y[dev])
    assert a.best_layer_ == b.best_layer_ == 2
    # Within one point: 0.01 on [0, 1] metrics, 0.01 MAE.
    np.testing.assert_allclose(a.scores_, b.scores_, atol=0.01)
    from featx import metrics
    for layer in range(4):
        ma = metrics.compute(task, y[te], a.predict(X[te], layer))
        mb = metrics.compute(task, y[te], b.predict(X[te], layer))
        for k in ma:  # one of 80 test items may fall on the other side: scikit-learn stops at tol 1e-4
            assert abs(ma[k] - mb[k]) <= 0.0125 + 1e-9 or (np.isnan(ma[k]) and np.isnan(mb[k])), (layer, k)
    if task == "classification":  # each layer's chosen problem solved to scikit-learn's optimum (tol 1e-10)
        from scipy.special import logsumexp
        from sklearn.linear_model import LogisticRegression
        codes = np.searchsorted(b.classes_, y[tr])
        for layer in range(4):
            Xs = ((X[tr][:, layer] - b.mean_[layer]) / b.scale_[layer]).astype(np.float64)
            C = float(b.best_params_[layer])

            def objective(W, w0):   # three classes: softmax, C * sum(logloss) + ||W||^2 / 2
                z = Xs @ W.T + w0
                return C * np.sum(logsumexp(z, 1) - z[np.arange(len(z)), codes]) + 0.5 * (W * W).sum()
            ref = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(Xs, codes)
            best = objective(ref.coef_, ref.intercept_)
            assert objective(b.coef_[layer], b.intercept_[layer]) <= best * (1 + 1e-5), layer


@pytest.mark.parametrize("probe,splits", [("linear", True), ("batched", False)])
def test_sweep_picks_the_planted_layer(tmp_path, probe, splits):
    X, y = planted(n=300, num_layers=6, dim=12, k=4, seed=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(300), y, standard_splits(300) if splits else None)
    df = run_probe([path], tmp_path / "out", probe=probe, seeds=2, progress=False)
    assert list(df.columns) == COLUMNS
    assert set(df.split) == ({"dev", "test"} if splits else {"dev", "cv"})
    best = pd.read_csv(tmp_path / "out" / "best_layers.csv")
    assert (best.best_dev_layer == 4).all()
    mae = best.set_index("metric").loc["mae"]
    assert mae.best_layer_score < mae.output_layer_score - 0.2
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["task"] == "regression" and meta["primary_metric"] == "mae" and not meta["higher_is_better"]
    assert mae.best_layer_score < meta["chance"]["mae"]


def test_test_labels_cannot_influence_selection(tmp_path):
    X, y = planted(n=300, num_layers=5, dim=12, k=2, seed=2)
    splits = standard_splits(300, seed=5)
    y2 = y.copy()
    test = splits == "test"
    y2[test] = np.random.default_rng(0).permutation(y2[test])[::-1] * -1   # scramble the test labels
    X2 = X.copy()
    X2[test] = np.random.default_rng(1).standard_normal(X2[test].shape)   # and the test features
    outs = []
    for name, (xx, yy) in {"a": (X, y), "b": (X2, y2)}.items():
        p = write_cache(tmp_path / f"{name}.h5", xx, _ids(300), yy, splits)
        df = run_probe([p], tmp_path / name, seeds=1, progress=False)
        outs.append((df[df.split == "dev"].reset_index(drop=True),
                     pd.read_csv(tmp_path / name / "best_layers.csv").best_dev_layer))
    pd.testing.assert_frame_equal(outs[0][0], outs[1][0])
    assert (outs[0][1] == outs[1][1]).all()


def test_learning_curve_sizes_and_k_per_class(tmp_path):
    X, y = planted(n=300, num_layers=3, dim=8, k=1, task="classification")
    y = np.asarray(y)
    train = np.arange(200)
    picked = subsample(train, y, "classification", 15, seed=0)   # a number of labels, stratified
    assert len(picked) == 15 and set(y[picked]) == set(y[train])
    assert len(subsample(train, y, "classification", 50, seed=0)) == 50
    path = write_cache(tmp_path / "c.h5", X, _ids(300), y, standard_splits(300))
    df = run_probe([path], tmp_path / "out", probe="batched", seeds=2, train_sizes=[15, 0.5, 1.0], progress=False)
    assert sorted(df.train_size.unique()) == ["0.5", "1.0", "15"]
    assert df.groupby("train_size").train_labels.first().to_dict() == {"0.5": 90.0, "1.0": 180.0, "15": 15.0}
    f1 = df[(df.split == "test") & (df.metric == "f1_macro") & (df.layer == 1)].groupby("train_size").value.mean()
    assert f1["1.0"] > f1["15"]


def test_cli_probe_writes_tables_and_recipe(tmp_path):
    from featx.cli.main import main

    X, y = planted(n=200, num_layers=4, dim=8, k=2, task="classification")
    path = write_cache(tmp_path / "c.h5", X, _ids(200), y, standard_splits(200))
    out = tmp_path / "out"
    assert main(["probe", path, "--out", str(out), "--layers", "1,2,3", "--weighted", "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert list(df.columns) == COLUMNS and set(df.method) == {"layer", "weighted"}
    assert set(df.layer) == {1, 2, 3, -1}
    w = pd.read_csv(out / "layer_weights.csv")
    assert list(w.columns) == ["encoder", "modality", "seed", "layer", "weight", "train_size", "method"]
    assert w.weight.sum() == pytest.approx(1.0, abs=1e-5)
    assert set(w.method) == {"weighted"} and set(w.train_size) == {1.0} and sorted(w.layer) == [1, 2, 3]
    assert list(pd.read_csv(out / "results.csv").columns) == COLUMNS
    recipe = tmp_path / "r.yaml"
    recipe.write_text("caches: [c.h5]\nout: out2\nprobe: batched\ntrain_sizes: [0.5, 1.0]\n")
    assert main(["probe", "--recipe", str(recipe), "--no-progress"]) == 0
    assert set(pd.read_csv(tmp_path / "out2" / "results.csv").train_size) == {0.5, 1.0}
    assert main(["probe", path, "--out", str(out), "--layers", "1,x"]) == 1
    assert main(["probe", path, "--out", str(out), "--layers", "9"]) == 1


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_classifier_roundtrip(tmp_path, task):
    X, y = planted(n=200, num_layers=4, dim=8, k=3, task=task)
    path = write_cache(tmp_path / "c.h5", X, _ids(200), y, standard_splits(200))
    run_probe([path], tmp_path / "out", probe="batched", save_classifier=True, progress=False)
    files = [f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]
    assert len(files) == 1
    clf = Classifier.load(str(tmp_path / "out" / files[0]))
    assert clf.blocks[0]["layers"] == [3] and clf.task == task
    new = write_cache(tmp_path / "new.h5", X[:50], _ids(50))   # unlabelled new items
    ids, pred = clf.predict_cache([new])
    assert list(ids) == _ids(50)
    splits = standard_splits(200)
    ref = BatchedLinearProbe().fit(X[splits == "train"][:, [3]], y[splits == "train"], X[splits == "dev"][:, [3]],
                                   y[splits == "dev"]).predict(X[:50, [3]])
    if task == "regression":
        np.testing.assert_allclose(pred, ref, atol=1e-4)
    else:
        assert (pred == ref).all()
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception):
        Classifier.load(str(tmp_path / "bad.safetensors"))


def test_layer_weights_rows_name_their_training_size_and_method(tmp_path, one_torch_thread):
    """Each weight row is tied to its results rows by (encoder, modality, seed, train_size, method)."""
    Xa, y = planted(n=200, num_layers=4, dim=8, k=3, seed=1)
    Xb, _ = planted(n=200, num_layers=3, dim=8, k=1, seed=2, signal=np.random.default_rng(1).standard_normal(200))
    splits = standard_splits(200)
    a = write_cache(tmp_path / "a.h5", Xa, _ids(200), y, splits, model="toy/a", modality="text")
    b = write_cache(tmp_path / "b.h5", Xb, _ids(200), y, splits, model="toy/b", modality="audio")
    df = run_probe([a, b], tmp_path / "out", probe="batched", weighted=True, fusion=["gated"],
                   fusion_layer="weighted", seeds=[0, 1], train_sizes=[0.25, 1.0], progress=False)
    w = pd.read_csv(tmp_path / "out" / "layer_weights.csv", dtype={"train_size": str})
    assert list(w.columns) == ["encoder", "modality", "seed", "layer", "weight", "train_size", "method"]
    keys = ["encoder", "modality", "seed", "train_size"]
    weighted = w[w.method == "weighted"]
    ran = df[df.method == "weighted"][keys].drop_duplicates()
    assert sorted(map(tuple, weighted[keys].drop_duplicates().values)) == sorted(map(tuple, ran.values))
    assert len(ran) == 2 * 2 * 2
    # One softmax per fit: each (run, method) group holds every layer once and sums to 1.
    for (enc, _, _, _, method), g in w.groupby(keys + ["method"]):
        assert sorted(g.layer) == list(range(4 if enc == "toy/a" else 3))
        assert g.weight.sum() == pytest.approx(1.0, abs=1e-5), (enc, method)
    gated = w[w.method == "fusion-gated"]
    fused = df[df.method == "fusion-gated"][["seed", "train_size"]].drop_duplicates()
    assert sorted(map(tuple, gated[["seed", "train_size"]].drop_duplicates().values)) == sorted(
        map(tuple, fused.values)) and set(gated.encoder) == {"toy/a", "toy/b"}
    # The full-data weighted sum of cache a favours its planted layer.
    full_a = weighted[(weighted.encoder == "toy/a") & (weighted.train_size == "1.0")].groupby("layer").weight.mean()
    assert full_a.idxmax() == 3


@pytest.mark.parametrize("probe", ["linear", "batched"])
def test_one_class_training_part_is_one_line_before_any_fit(tmp_path, capsys, probe):
    """Labels of one class (or a train split of one class) are refused with one line naming the cache, before any
    fit or output (the linear probe's scikit-learn fit used to raise a traceback)."""
    from featx.cli.main import main

    X, _ = planted(n=60, num_layers=3, dim=8, k=1)
    splits = standard_splits(60)
    y = np.where(splits == "train", "pos", np.where(np.arange(60) % 2, "pos", "neg")).astype(object)
    for name, labels in (("one", np.full(60, "pos", dtype=object)), ("train-one", y)):
        path = write_cache(tmp_path / f"{name}.h5", X, _ids(60), labels, splits)
        out = tmp_path / f"out-{name}"
        assert main(["probe", path, "--out", str(out), "--probe", probe, "-q"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "at least two classes" in err[0] and f"{name}.h5" in err[0], err
        assert "only 'pos'" in err[0] and not out.exists()


def test_few_labels_from_a_part_with_a_rare_class_keep_two_classes(tmp_path):
    """A training size of a few labels drawn from a training part with a class of one item still holds two classes,
    so the fit runs (it raised scikit-learn's one-class ValueError)."""
    X, _ = planted(n=150, num_layers=3, dim=8, k=1)
    splits = np.array(["train"] * 90 + ["dev"] * 30 + ["test"] * 30, dtype=object)
    y = np.where(np.arange(150) % 2, "pos", "neg").astype(object)
    y[:90] = "pos"
    y[0] = "neg"
    train = np.arange(90)
    for seed in range(5):
        for n in (2, 10):
            picked = subsample(train, y, "classification", n, seed)
            assert len(picked) == n and len(set(picked)) == n and set(y[picked]) == {"pos", "neg"}, (seed, n)
    path = write_cache(tmp_path / "rare.h5", X, _ids(150), y, splits)
    df = run_probe([path], tmp_path / "out", seeds=2, train_sizes=[2, 10, 1.0], progress=False)
    assert df.groupby("train_size").train_labels.first().to_dict() == {"1.0": 90.0, "10": 10.0, "2": 2.0}


def test_an_infinite_label_is_one_line_naming_the_item_as_written(tmp_path, capsys):
    """The line names the item as the manifest wrote it ('item0003'), not numpy's repr (np.str_('item0003'))."""
    from featx.cli.main import main

    X, y = planted(n=60, num_layers=3, dim=8, k=1)
    y = np.asarray(y, dtype=np.float64)
    y[3] = np.inf
    path = write_cache(tmp_path / "inf.h5", X, _ids(60), y, standard_splits(60))
    assert main(["probe", path, "--out", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featx probe: error: item 'item0003' has a non-finite label (inf); fix or remove it"], err
