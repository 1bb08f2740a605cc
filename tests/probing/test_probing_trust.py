"""Every number of a probe run is the one asked for, and named so that a reader can tell what it is:
training sizes, the headline at the full training part, labels with missing values, the saved classifier,
display names, best_layers.csv's columns and a strict meta.json."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from _synthetic import planted, standard_splits, write_cache
from featx.errors import FeatxError
from featx.probing import Classifier, run_probe
from featx.probing.registry import make_probe
from featx.probing.results import BEST_COLUMNS, load_results
from featx.probing.splits import make_folds


def _ids(n):
    return [f"item{i:04d}" for i in range(n)]


def _strict(path):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(open(path, encoding="utf-8").read(), parse_constant=refuse)


def test_mixed_counts_and_fractions_headline_is_the_full_training_part(tmp_path):
    X, y = planted(n=300, num_layers=4, dim=8, k=2, seed=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(300), y, standard_splits(300))
    out = tmp_path / "out"
    df = run_probe([path], out, probe="ridge", train_sizes=[10, 0.5, 1.0], progress=False)
    # Each size as given, and the number of labels it meant (180 training items).
    assert df.groupby("train_size").train_labels.first().to_dict() == {"10": 10.0, "0.5": 90.0, "1.0": 180.0}
    best = pd.read_csv(out / "best_layers.csv", dtype={"train_size": str})
    assert list(best.columns) == BEST_COLUMNS
    assert set(best.train_size) == {"1.0"} and set(best.split) == {"test"} and set(best.selected_on) == {"dev"}
    mae = best.set_index("metric").loc["mae"]
    full = df[(df.train_size == "1.0") & (df.method == "layer") & (df.split == "test") & (df.metric == "mae")]
    assert mae.best_layer_score == pytest.approx(full.set_index("layer").value[mae.best_dev_layer])
    # The report reads the same headline (not the 10-label run, which the old float max() picked).
    res = load_results(out)
    assert res.full_train_size == "1.0"
    from featx.report.results import learning_curves, summary_table
    assert summary_table(res).iloc[0]["best-layer score"] == pytest.approx(mae.best_layer_score)
    lc = learning_curves(res, "mae")
    for _, g in lc.groupby(["encoder", "line"]):
        assert list(g["labels"]) == [10.0, 90.0, 180.0]


def test_learning_curve_plot_is_in_number_of_labels_on_a_log_axis(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from featx.report import plots

    X, y = planted(n=200, num_layers=3, dim=8, k=1, seed=3)
    path = write_cache(tmp_path / "c.h5", X, _ids(200), y, standard_splits(200))
    run_probe([path], tmp_path / "out", probe="ridge", train_sizes=["50", "0.25", "1.0"], progress=False)
    fig = plots.plot_learning_curves(load_results(tmp_path / "out"), "mae")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel().startswith("training labels")
    xs = [list(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert xs and all(x == [30.0, 50.0, 120.0] for x in xs)


def test_a_count_larger_than_the_training_part_is_one_line(tmp_path):
    X, y = planted(n=100, num_layers=3, dim=8, k=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(100), y, standard_splits(100))
    with pytest.raises(FeatxError, match="larger than the training part") as e:
        run_probe([path], tmp_path / "out", train_sizes=[500, 1.0], progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "results.csv").exists()


def test_without_the_full_size_it_is_added_and_noted(tmp_path):
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(120), y, standard_splits(120))
    df = run_probe([path], tmp_path / "out", probe="ridge", train_sizes=[20], progress=False)
    assert set(df.train_size) == {"20", "1.0"}
    meta = _strict(tmp_path / "out" / "meta.json")
    assert any("full training part" in n for n in meta["notes"])


def test_saved_classifier_is_the_reported_fold_and_seed(tmp_path):
    """--folds 10 on a cache without splits: the saved probe is the one fitted on the first seed's first of
    10 folds (the old code refitted with 5 folds and seed 0)."""
    X, y = planted(n=200, num_layers=4, dim=8, k=2, seed=4)
    path = write_cache(tmp_path / "c.h5", X, _ids(200), y)
    run_probe([path], tmp_path / "out", probe="ridge", folds=10, seeds=[3], save_classifier=True, progress=False)
    files = [f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]
    assert files == ["classifier__toy-encoder.safetensors"]
    clf = Classifier.load(str(tmp_path / "out" / files[0]))
    s = clf.settings
    assert (s["folds"], s["fold"], s["seed"], s["probe"], s["train_size"], s["test_split"]) == \
        (10, 0, 3, "ridge", "1.0", "cv")
    layer = clf.blocks[0]["layers"][0]
    (train, dev, _), *_ = make_folds(np.asarray(y, float), None, "regression", 10, 3)[0]
    assert s["train_labels"] == len(train)
    ref = make_probe("ridge", 3).fit(X[train], y[train], X[dev], y[dev])
    np.testing.assert_allclose(clf.predict([X[:, [layer]]]), ref.predict(X, layer), atol=1e-5)  # float32 probe


def test_missing_labels_are_unlabeled_items_and_inf_is_one_line(tmp_path):
    X, y = planted(n=200, num_layers=3, dim=8, k=1)
    labels = np.asarray([f"{v:g}" for v in y], dtype=object)
    labels[[3, 50, 77]] = ["n/a", "NA", ""]
    path = write_cache(tmp_path / "c.h5", X, _ids(200), labels, standard_splits(200))
    df = run_probe([path], tmp_path / "out", probe="ridge", progress=False)
    # One stray 'n/a' no longer turns the regression into a 12-class classification.
    meta = _strict(tmp_path / "out" / "meta.json")
    assert meta["task"] == "regression" and "mae" in set(df.metric)
    assert meta["unlabeled"] == {"toy/encoder": 3} and meta["encoders"][0]["labelled_items"] == 197
    assert df.attrs["meta"]["unlabeled"] == {"toy/encoder": 3}
    labels[10] = "inf"
    bad = write_cache(tmp_path / "bad.h5", X, _ids(200), labels, standard_splits(200))
    with pytest.raises(FeatxError, match="item0010") as e:
        run_probe([bad], tmp_path / "out2", progress=False)
    assert "\n" not in str(e.value)


def test_task_forces_regression_or_classification(tmp_path):
    X, _ = planted(n=160, num_layers=3, dim=8, k=1)
    y01 = (np.arange(160) % 2).astype(float)   # 0/1 numbers: classification unless forced
    path = write_cache(tmp_path / "c.h5", X, _ids(160), y01, standard_splits(160))
    df = run_probe([path], tmp_path / "a", probe="ridge", task="regression", progress=False)
    assert "mae" in set(df.metric) and _strict(tmp_path / "a" / "meta.json")["task"] == "regression"
    yk = np.round(np.linspace(1, 3, 160))
    path = write_cache(tmp_path / "d.h5", X, _ids(160), yk, standard_splits(160))
    df = run_probe([path], tmp_path / "b", probe="logistic", task="classification", progress=False)
    assert "f1_macro" in set(df.metric)
    with pytest.raises(FeatxError, match="task"):
        run_probe([path], tmp_path / "c", task="numbers", progress=False)


def test_same_cache_twice_and_zero_seeds_are_one_line(tmp_path):
    X, y = planted(n=100, num_layers=3, dim=8, k=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(100), y, standard_splits(100))
    with pytest.raises(FeatxError, match="given twice"):
        run_probe([path, str(tmp_path / "." / "c.h5")], tmp_path / "out", fusion=["early"], progress=False)
    with pytest.raises(FeatxError, match="at least 1"):
        run_probe([path], tmp_path / "out", seeds=0, progress=False)


@pytest.mark.parametrize("names,error", [(["TRAIN", "Valid", "Test"], None), (["train", "holdout", "test"], "holdout")])
def test_split_names_map_or_fail_in_one_line(tmp_path, names, error):
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    splits = np.asarray([names[i % 3] for i in range(120)], dtype=object)
    path = write_cache(tmp_path / "c.h5", X, _ids(120), y, splits)
    if error is None:
        df = run_probe([path], tmp_path / "out", probe="ridge", progress=False)
        assert set(df.split) == {"dev", "test"}
        return
    with pytest.raises(FeatxError, match=error) as e:
        run_probe([path], tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


def test_a_split_with_one_item_is_one_line(tmp_path):
    X, y = planted(n=60, num_layers=3, dim=8, k=1)
    splits = np.asarray(["train"] * 40 + ["dev"] * 19 + ["test"], dtype=object)
    path = write_cache(tmp_path / "c.h5", X, _ids(60), y, splits)
    with pytest.raises(FeatxError, match="test split has 1 labelled item") as e:
        run_probe([path], tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


def test_display_names_in_tables_and_files_full_path_in_meta(tmp_path):
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    splits = standard_splits(120)
    a = write_cache(tmp_path / "a.h5", X, _ids(120), y, splits, model="/tmp/newcomer/v1/models/text")
    b = write_cache(tmp_path / "b.h5", X, _ids(120), y, splits, model="/tmp/newcomer/v2/models/text",
                    modality="audio")
    out = tmp_path / "out"
    df = run_probe([a, b], out, probe="ridge", save_classifier=True, progress=False)
    assert set(df.encoder) == {"v1/models/text", "v2/models/text"}
    assert set(pd.read_csv(out / "best_layers.csv").encoder) == {"v1/models/text", "v2/models/text"}
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == [
        "classifier__v1-models-text.safetensors", "classifier__v2-models-text.safetensors"]
    meta = _strict(out / "meta.json")
    assert [e["path"] for e in meta["encoders"]] == ["/tmp/newcomer/v1/models/text", "/tmp/newcomer/v2/models/text"]
    clf = Classifier.load(str(out / "classifier__v1-models-text.safetensors"))
    assert clf.blocks[0]["encoder"] == "/tmp/newcomer/v1/models/text"   # what predict runs


def test_two_caches_of_one_model_are_scored_apart_never_merged(tmp_path):
    # the same model extracted twice (at two precisions, say): before, both were named "text" and every table
    # showed one row, the mean of the two caches' scores
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    splits = standard_splits(120)
    (tmp_path / "fp32").mkdir()
    (tmp_path / "bf16").mkdir()
    a = write_cache(tmp_path / "fp32" / "m__text.h5", X, _ids(120), y, splits, model="/m/text")
    b = write_cache(tmp_path / "bf16" / "m__text.h5", X[:, :, ::-1] * 0.5, _ids(120), y, splits, model="/m/text")
    df = run_probe([a, b], tmp_path / "out", probe="ridge", progress=False)
    names = ["text [fp32/m__text.h5]", "text [bf16/m__text.h5]"]
    assert sorted(df.encoder.unique()) == sorted(names)
    best = pd.read_csv(tmp_path / "out" / "best_layers.csv")
    assert sorted(best.encoder.unique()) == sorted(names) and len(best) == 2 * best.metric.nunique()


def test_display_names():
    from featx.naming import display_names, slug

    assert display_names(["org/bert-base", "/m/x/text", "/m/y/text", "/m/clip"]) == \
        ["org/bert-base", "x/text", "y/text", "clip"]
    assert display_names(["/a/m", "/a/m"]) == ["m", "m"]
    from featx.naming import cache_names
    assert cache_names(["/a/m", "/a/m", "/b/n"], ["text"] * 3, ["/x/p/c.h5", "/x/q/c.h5", "/x/q/d.h5"]) == \
        ["m [p/c.h5]", "m [q/c.h5]", "n"]
    assert cache_names(["/a/m", "/a/m"], ["image", "text"], ["/x/c.h5", "/x/c_text.h5"]) == \
        ["m (image)", "m (text)"]  # a checkpoint's two towers: told apart by modality already
    assert slug("/tmp/newcomer/featx-demo/models/text") == "tmp-newcomer-featx-demo-models-text"
    assert slug("<>") == "x"


def test_meta_json_is_strict_and_records_the_run(tmp_path):
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(120), y, standard_splits(120))
    run_probe([path], tmp_path / "out", probe="ridge", seeds=[2, 5], train_sizes="0.5,1.0", progress=False)
    meta = _strict(tmp_path / "out" / "meta.json")   # the old file held NaN for Pearson r on constant folds
    assert meta["command"] and meta["settings"]["seeds"] == [2, 5]
    assert meta["settings"]["train_sizes"] == ["0.5", "1.0"] and meta["settings"]["task"] == "regression"
    assert {"featx", "torch", "transformers", "scikit-learn"} <= set(meta["versions"])
    from featx.runinfo import write_meta
    write_meta({"x": float("nan"), "y": [np.float32(np.inf)], "z": np.int64(3)}, tmp_path / "m.json")
    assert _strict(tmp_path / "m.json") == {"x": None, "y": [None], "z": 3}


def test_fewer_folds_than_asked_are_noted(tmp_path):
    X, _ = planted(n=40, num_layers=3, dim=8, k=1)
    y = np.asarray(["a"] * 37 + ["b"] * 3, dtype=object)
    path = write_cache(tmp_path / "c.h5", X, _ids(40), y)
    run_probe([path], tmp_path / "out", probe="logistic", folds=10, progress=False)
    meta = _strict(tmp_path / "out" / "meta.json")
    assert meta["encoders"][0]["folds_run"] == 3
    assert any("3 folds ran, not 10" in n for n in meta["notes"])


def test_fusion_rows_name_the_probe_fusion_fits(tmp_path):
    """With --probe batched, early fusion fits scikit-learn's ridge: the probe column says so."""
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    splits = standard_splits(120)
    a = write_cache(tmp_path / "a.h5", X, _ids(120), y, splits, model="toy/a")
    b = write_cache(tmp_path / "b.h5", X[:, ::-1].copy(), _ids(120), y, splits, model="toy/b", modality="audio")
    df = run_probe([a, b], tmp_path / "out", probe="batched", fusion=["early"], progress=False)
    assert set(df[df.method == "fusion-early"].probe) == {"concat-ridge"}
    best = pd.read_csv(tmp_path / "out" / "best_layers.csv")
    assert set(best.fusion_method) == {"fusion-early"}


def test_manifest_numeric_labels_with_missing_values_stay_numeric():
    from featx.data.manifest import labels_and_splits

    labels, _, _ = labels_and_splits(pd.DataFrame({"id": list("abcde"), "label": ["1.5", "n/a", "NA", "", "-2"]}))
    assert labels.dtype == np.float64 and labels[0] == 1.5 and labels[4] == -2 and np.isnan(labels[1:4]).all()
    labels, _, _ = labels_and_splits(pd.DataFrame({"id": list("abc"), "label": ["pos", "n/a", "neg"]}))
    assert labels.dtype == object


def test_one_encoder_on_two_modalities_saves_two_classifiers(tmp_path):
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    splits = standard_splits(120)
    a = write_cache(tmp_path / "a.h5", X, _ids(120), y, splits, model="org/clip", modality="image")
    b = write_cache(tmp_path / "b.h5", X, _ids(120), y, splits, model="org/clip", modality="video")
    run_probe([a, b], tmp_path / "out", probe="ridge", save_classifier=True, progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")) == [
        "classifier__org-clip-image.safetensors", "classifier__org-clip-video.safetensors"]


def test_labelled_items_with_no_split_are_counted_and_named_not_dropped_silently(tmp_path, capsys):
    """A manifest whose split column is blank for some items: those items are in no fold; probe says how many
    (stderr and meta.json), as it does for unlabeled items (they vanished without a word)."""
    from featx.cli.main import main

    X, y = planted(n=100, num_layers=3, dim=8, k=1)
    splits = standard_splits(100)
    splits[::10] = ""
    path = write_cache(tmp_path / "c.h5", X, _ids(100), y, splits)
    assert main(["probe", path, "--out", str(tmp_path / "out"), "--probe", "batched", "-q"]) == 0
    err = capsys.readouterr().err
    assert "featx probe: toy/encoder: 10 labelled item(s) with no split were left out of training and scoring" in err
    meta = _strict(tmp_path / "out" / "meta.json")
    assert meta["unsplit"] == {"toy/encoder": 10} and any("10 labelled item(s) with no split" in n for n in meta["notes"])
    full = write_cache(tmp_path / "full.h5", X, _ids(100), y, standard_splits(100))   # every item has a split
    assert main(["probe", full, "--out", str(tmp_path / "out2"), "--probe", "batched", "-q"]) == 0
    assert "no split" not in capsys.readouterr().err
    assert _strict(tmp_path / "out2" / "meta.json")["unsplit"] == {"toy/encoder": 0}


def test_items_that_failed_at_extraction_are_counted_and_named_not_dropped_silently(tmp_path, capsys):
    """42 items, 2 of them failed at extraction (a corrupt file): probe left them out with exit 0, nothing on
    stderr and labelled_items 40 in meta.json, with no count of the failed ones. Now they are counted like
    unlabeled items (stderr line, meta.json), and the exit status stays 0: extract already reported them."""
    from featx.cli.main import main

    X, y = planted(n=42, num_layers=3, dim=8, k=1)
    failed = np.zeros(42, bool)
    failed[[5, 17]] = True
    written = np.ones(42, bool)
    written[30] = False        # never extracted (no error recorded): pending, counted apart
    path = write_cache(tmp_path / "c.h5", X, _ids(42), y, standard_splits(42), failed=failed, done=written)
    assert main(["probe", path, "--out", str(tmp_path / "out"), "--probe", "batched", "-q"]) == 0
    err = capsys.readouterr().err
    assert "featx probe: toy/encoder: 2 item(s) that failed at extraction were left out of training and scoring" \
        in err, err
    assert "featx probe: toy/encoder: 1 item(s) not extracted (pending in the cache) were left out" in err, err
    meta = _strict(tmp_path / "out" / "meta.json")
    assert meta["failed"] == {"toy/encoder": 2} and meta["pending"] == {"toy/encoder": 1}
    enc = meta["encoders"][0]
    assert (enc["labelled_items"], enc["failed_items"], enc["pending_items"]) == (39, 2, 1)

    # Fusion: the cache that lacks them is named, on its own line and in the warning about the shared items.
    Xb, _ = planted(n=42, num_layers=3, dim=8, k=1, seed=3)
    full = write_cache(tmp_path / "b.h5", Xb, _ids(42), y, standard_splits(42), model="toy/image", modality="image")
    path = write_cache(tmp_path / "a.h5", X, _ids(42), y, standard_splits(42), failed=failed)
    assert main(["fuse", path, full, "--out", str(tmp_path / "fused"), "--probe", "batched", "--fusion", "early",
                 "-q"]) == 0
    err = capsys.readouterr().err
    assert "featx fuse: toy/encoder: 2 item(s) that failed at extraction were left out" in err, err
    assert "toy/image: " not in err.replace("missing per modality", ""), err
    assert "missing per modality: {'text': 2} (items not done at extraction per modality: {'text': 2})" in err, err
    meta = _strict(tmp_path / "fused" / "meta.json")
    assert meta["failed"] == {"toy/encoder": 2, "toy/image": 0}
    assert meta["fusion"]["missing"] == {"text": ["item0005", "item0017"], "image": []}
    with pytest.raises(FeatxError, match=r"items not done at extraction per modality: \{'text': 2\}"):
        run_probe([path, full], tmp_path / "strict", probe="batched", fusion=["early"], missing="error",
                  progress=False)


def test_best_layers_and_the_console_table_say_which_pooling_and_probe_made_the_scores(tmp_path):
    # a score without its pooling is not the number asked for: --pool cls and mean give different tables; and
    # each score is named with the probe that made it (the weighted sum and the fusion have their own)
    from featx.probing.results import best_layer_table
    rows = []
    for layer in range(3):
        for split, value in (("dev", 1.0 - 0.1 * layer), ("test", 2.0 - 0.1 * layer)):
            rows.append(dict(encoder="e", modality="text", num_layers=3, layer=layer, pooling="cls",
                             probe="ridge-batched", method="layer", train_size="1.0", train_labels=10.0, seed=0,
                             split=split, metric="mae", value=value))
    best = best_layer_table(pd.DataFrame(rows), "mae", higher_is_better=False)
    assert list(best.columns[:4]) == ["encoder", "modality", "pooling", "layer_probe"]
    assert (best.pooling.iloc[0], best.layer_probe.iloc[0], best.best_dev_layer.iloc[0]) == ("cls", "ridge-batched", 2)
    assert best.weighted_probe.isna().all() and best.fusion_probe.isna().all()  # none was run
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    a = write_cache(tmp_path / "a.h5", X, _ids(120), y, standard_splits(120), model="/m/a")
    b = write_cache(tmp_path / "b.h5", X, _ids(120), y, standard_splits(120), model="/m/b", modality="audio")
    run_probe([a, b], tmp_path / "out", probe="ridge", weighted=True, fusion="early", progress=False)
    best = pd.read_csv(tmp_path / "out" / "best_layers.csv")
    assert set(best.layer_probe) == {"ridge"} and set(best.fusion_method) == {"fusion-early"}
    assert set(best.weighted_probe) == {"weighted-linear"} and set(best.fusion_probe) == {"concat-ridge"}


def test_the_probe_command_prints_the_pooling_and_probe_of_its_scores(tmp_path, capsys):
    from featx.cli.main import main
    X, y = planted(n=120, num_layers=3, dim=8, k=2, seed=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(120), y, standard_splits(120))
    assert main(["probe", str(path), "--out", str(tmp_path / "out"), "--probe", "ridge", "-q"]) == 0
    head, row = capsys.readouterr().out.strip().splitlines()[:2]
    assert head.split()[:4] == ["encoder", "modality", "pooling", "layer_probe"] and row.split()[2:4] == ["mean", "ridge"]


def test_the_probe_command_says_when_the_full_training_part_was_added(tmp_path, capsys):
    # the console table's train_size 1.0 was not asked for (--train-sizes 10): say so where the table is shown
    from featx.cli.main import main
    X, y = planted(n=120, num_layers=3, dim=8, k=2, seed=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(120), y, standard_splits(120))
    assert main(["probe", str(path), "--out", str(tmp_path / "out"), "--probe", "ridge", "--train-sizes", "10",
                 "-q"]) == 0
    err = capsys.readouterr().err
    assert "featx probe: the full training part (1.0) was added to the training sizes: the headline uses it" in err
    assert main(["probe", str(path), "--out", str(tmp_path / "out2"), "--probe", "ridge", "-q"]) == 0
    assert capsys.readouterr().err == ""  # nothing to say when everything is as asked


def test_classification_of_labels_that_cannot_be_classes_is_one_line(tmp_path, capsys):
    """--task classification on continuous labels made one class per item and reported F1 0.000 with exit 0."""
    from featx.cli.main import main

    X, _ = planted(n=60, num_layers=3, dim=6, k=1)
    y = np.random.default_rng(0).normal(size=60)
    path = write_cache(tmp_path / "c.h5", X, _ids(60), y, standard_splits(60))
    assert main(["probe", path, "--out", str(tmp_path / "out"), "--task", "classification", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "60 labelled items hold 60 distinct labels" in err[0] and "regression" in err[0], err
    assert not (tmp_path / "out").exists()


def test_classification_with_fewer_than_two_training_items_per_class_is_said_and_fewer_than_one_refused(
        tmp_path, capsys):
    """Trial 3: ratings with 96 distinct values over 200 items (120 training) passed the half-the-items rule and
    reported f1_macro 0.000 with exit 0 and nothing said. One item per class (few-shot) is allowed, and said; more
    classes than training items are refused."""
    from featx.cli.main import main

    X, _ = planted(n=200, num_layers=3, dim=6, k=1)
    y = np.round(np.random.default_rng(0).uniform(-3, 3, size=200) * 16) / 16   # ~96 distinct values
    k = len(np.unique(y))
    assert 60 < k <= 100
    path = write_cache(tmp_path / "c.h5", X, _ids(200), y, standard_splits(200))
    assert main(["probe", path, "--out", str(tmp_path / "out"), "--task", "classification", "--probe", "batched",
                 "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert f"featx probe: {path}: its {k} classes come with 120 training items, fewer than two per class: most " \
           "classes are learned from one item; continuous labels are regression (--task regression)" in err, err
    assert any("are in a class the training part lacks" in line for line in err), err
    # more classes than training items: refused in one line
    splits = np.array(["train"] * 20 + ["dev"] * 90 + ["test"] * 90)
    y = np.round(np.random.default_rng(1).uniform(-3, 3, size=200) * 8) / 8   # ~48 classes, 20 training items
    k = len(np.unique(y))
    assert 20 < k <= 100
    path = write_cache(tmp_path / "d.h5", X, _ids(200), y, splits)
    assert main(["probe", path, "--out", str(tmp_path / "out2"), "--task", "classification", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its {k} classes come with 20 training items (so some class is never learned)" in \
        err[0], err
    assert "--task regression" in err[0] and not (tmp_path / "out2").exists()


def test_dev_and_test_items_of_a_class_the_training_part_lacks_are_said(tmp_path, capsys):
    from featx.cli.main import main

    X, y = planted(n=120, num_layers=3, dim=6, k=1, task="classification")
    y = np.asarray(y, dtype=object)
    splits = standard_splits(120)
    rare = np.flatnonzero(splits != "train")[:5]   # 5 dev/test items of a class no training item has
    y[rare] = "rare"
    n_dev, n_test = (splits[rare] == "dev").sum(), (splits[rare] == "test").sum()
    path = write_cache(tmp_path / "c.h5", X, _ids(120), y, splits)
    assert main(["probe", path, "--out", str(tmp_path / "out"), "--probe", "batched", "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    said = " and ".join(f"{m} of 24 {part} items" for part, m in (("test", n_test), ("dev", n_dev)) if m)
    assert err == [f"featx probe: {path}: {said} are in a class the training part lacks (e.g. 'rare'): a "
                   "classifier cannot predict such a class, so these items are scored as errors; their scores say "
                   "little (merge rare classes, or --task regression for scores)"], err
    # every class seen in training: nothing said
    y[rare] = np.asarray(planted(n=120, num_layers=3, dim=6, k=1, task="classification")[1], dtype=object)[rare]
    path = write_cache(tmp_path / "d.h5", X, _ids(120), y, splits)
    assert main(["probe", path, "--out", str(tmp_path / "out2"), "--probe", "batched", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_caches_that_disagree_on_the_task_are_each_named_with_theirs(tmp_path, capsys):
    from featx.cli.main import main

    X, y = planted(n=60, num_layers=3, dim=6, k=1)
    reg = write_cache(tmp_path / "reg.h5", X, _ids(60), y, standard_splits(60))
    cls = write_cache(tmp_path / "cls.h5", X, _ids(60), np.where(y > 0, "pos", "neg"), standard_splits(60))
    assert main(["probe", reg, cls, "--out", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"featx probe: error: the caches' labels disagree on the task ({reg}: regression; {cls}: "
                   "classification); set task to regression or classification"], err


def test_fusion_options_without_fusion_are_said_to_be_ignored(tmp_path, capsys):
    from featx.cli.main import main

    X, y = planted(n=60, num_layers=3, dim=6, k=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(60), y, standard_splits(60))
    assert main(["probe", path, "--out", str(tmp_path / "out"), "--probe", "batched", "--fusion-layer", "7",
                 "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featx probe: --fusion-layer 7 ignored: no fusion runs (give --fusion, or run featx fuse)"], err


def test_training_sizes_that_come_to_the_same_labels_are_said_and_run_once(tmp_path, capsys):
    """0.01 and 0.05 of 36 training items both became 2 labels: run twice, plotted at the same x, not a word."""
    from featx.cli.main import main
    from featx.report.results import learning_curves

    X, y = planted(n=60, num_layers=3, dim=6, k=1)
    splits = np.asarray(["train", "train", "train", "dev", "test"] * 12, dtype=object)   # 36 training items
    path = write_cache(tmp_path / "c.h5", X, _ids(60), y, splits)
    out = tmp_path / "out"
    assert main(["probe", path, "--out", str(out), "--probe", "batched", "--train-sizes", "0.01,0.05,0.5,1.0",
                 "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featx probe: training sizes 0.01 and 0.05 both come to 2 training label(s), so 0.05 was not run "
                   "(its fits would repeat those of 0.01)"], err
    meta = _strict(out / "meta.json")
    assert meta["train_labels"] == {"0.01": 2.0, "0.5": 18.0, "1.0": 36.0}
    assert meta["settings"]["train_sizes_run"] == ["0.01", "0.5", "1.0"]
    curves = learning_curves(load_results(out), "mae")
    assert not curves.duplicated(["encoder", "modality", "line", "labels"]).any()
    assert sorted(curves["labels"].unique()) == [2.0, 18.0, 36.0]


def test_label_counts_are_whole_numbers_in_meta_json_and_the_results_tables(tmp_path):
    # meta.json said {"0.01": 2.0, ...} and results.csv 2.0: a count of labels is a whole number; under
    # cross-validation (no test split) 61 items make folds of unequal training parts, whose mean is rounded
    from featx.cli.main import main

    X, y = planted(n=61, num_layers=3, dim=6, k=1)
    for name, splits in (("split", np.asarray(["train", "train", "train", "dev", "test"] * 12 + ["train"],
                                              dtype=object)), ("cv", None)):
        out = tmp_path / name
        path = write_cache(tmp_path / f"{name}.h5", X, _ids(61), y, splits)
        assert main(["probe", path, "--out", str(out), "--probe", "batched", "--train-sizes", "0.05,0.5", "-q"]) == 0
        counts = _strict(out / "meta.json")["train_labels"]
        assert set(counts) == {"0.05", "0.5", "1.0"} and all(type(v) is int for v in counts.values()), counts
        csv = pd.read_csv(out / "results.csv")
        assert csv["train_labels"].dtype.kind == "i" and pd.read_parquet(out / "results.parquet")[
            "train_labels"].dtype.kind == "i"
        assert dict(zip(csv["train_size"].astype(str), csv["train_labels"])) == counts


def test_probe_takes_one_pooling_and_says_so(tmp_path, capsys):
    from featx.cli.main import main

    X, y = planted(n=60, num_layers=3, dim=6, k=1)
    path = write_cache(tmp_path / "c.h5", X, _ids(60), y, standard_splits(60))
    assert main(["probe", path, "--out", str(tmp_path / "out"), "--pool", "cls,mean", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "featx probe takes one pooling per run, not 'cls,mean'" in err[0], err


def test_a_layer_subset_is_said_with_the_scores_it_made(tmp_path, capsys):
    """--layers 0,3 of 7: "best layer 3", "weighted sum" and "output layer –" read as the best of all 7 layers and
    the all-layer weighted sum; the console table, best_layers.csv and the report now say which layers."""
    from featx.cli.main import main
    from featx.report import build_report
    from featx.report.results import findings, summary_table

    X, y = planted(n=90, num_layers=7, dim=6, k=3)
    path = write_cache(tmp_path / "c.h5", X, _ids(90), y, standard_splits(90))
    out = tmp_path / "out"
    assert main(["probe", path, "--out", str(out), "--probe", "batched", "--layers", "0,3", "--weighted", "-q"]) == 0
    head, row = capsys.readouterr().out.strip().splitlines()[:2]
    cells = dict(zip(head.split(), row.split()))
    assert cells["layers_probed"] == "0,3" and cells["best_dev_layer"] == "3" and cells["output_layer"] == "6"
    best = pd.read_csv(out / "best_layers.csv", dtype={"layers_probed": str})
    assert set(best.layers_probed) == {"0,3"}
    res = load_results(out)
    table = summary_table(res)
    assert list(table.columns[3:5]) == ["best layer", "layers probed"] and table["layers probed"].iloc[0] == "0,3"
    said = findings(res)
    assert any(s.startswith("toy/encoder: layer 3 is the best on dev of the layers probed (0,3)")
               and "the output layer (6) was not probed" in s for s in said), said
    md = open(build_report([str(out)], str(tmp_path / "rep"), cka=False)["md"], encoding="utf-8").read()
    assert "| layers probed |" in md and "| 3 | 0,3 |" in md
    # all layers: the console says nothing of it; the file says "all"
    assert main(["probe", path, "--out", str(tmp_path / "all"), "--probe", "batched", "-q"]) == 0
    assert "layers_probed" not in capsys.readouterr().out
    assert set(pd.read_csv(tmp_path / "all" / "best_layers.csv").layers_probed) == {"all"}
    assert "layers probed" not in summary_table(load_results(tmp_path / "all")).columns


def test_numeric_labels_taken_as_classes_are_one_class_per_number():
    # --task classification named classes by f"{v:g}": -0.0 and 0.0 were two classes ("-0", "0"), and numbers
    # that six significant digits round alike were one
    from featx.probing.data import read_labels
    y, labelled = read_labels(np.array([-0.0, 0.0, 1.0, 2.5, 1.0000001, 1.0000002, np.nan]), _ids(7),
                              task="classification")
    assert labelled.tolist() == [True] * 6 + [False]
    assert y[:6].tolist() == ["0", "0", "1", "2.5", "1.0000001", "1.0000002"]
    y, _ = read_labels(np.array(["-0", "0", "3"], dtype=object), _ids(3), task="classification")
    assert y.tolist() == ["0", "0", "3"]
