"""Layers of differing widths (ConvNeXt stages) through the cache: the writer stores layer_widths, every reader
of pooled layers cuts the zero padding off (Cache, load_cache, CKA, fusion inputs, saved classifiers, info)."""
import json

import h5py
import numpy as np
import pandas as pd
import pytest

from featx import extract, open_cache
from featx.cache import describe, inspect, merge_caches, read_layer
from featx.errors import FeatxError
from tiny_models.image import build_convnext

WIDTHS = [8, 8, 16, 24, 32]  # the stem's output, then the 4 stages of build_convnext


def _convnext_cache(d, n):
    """A real ConvNeXt V2 cache of n labelled PNG images (train / dev / test) in folder d."""
    from PIL import Image

    rows = []
    for k in range(n):
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 255, (30 + k, 40, 3), dtype=np.uint8)).save(d / f"i{k}.png")
        rows.append({"id": f"i{k}", "image": f"i{k}.png", "label": ["cat", "dog"][k % 2],
                     "split": ["train", "train", "dev", "test"][k % 4]})
    pd.DataFrame(rows).to_csv(d / "m.csv", index=False)
    model = build_convnext(str(d / "convnext"))
    return extract(str(d / "m.csv"), [model], d / "out", dtype="float32", device="cpu", progress=False).paths[0]


@pytest.fixture(scope="module")
def convnext_cache(tmp_path_factory):
    return _convnext_cache(tmp_path_factory.mktemp("widths"), 12)


@pytest.fixture(scope="module")
def convnext_cache_40(tmp_path_factory):
    """40 items: enough for an MLP's early-stopping part of the training items."""
    return _convnext_cache(tmp_path_factory.mktemp("widths40"), 40)


def test_the_cache_records_the_widths_and_its_reader_cuts_the_padding_off(convnext_cache):
    with h5py.File(convnext_cache, "r") as f:
        assert f.attrs["layer_widths"] == "8,8,16,24,32" and f.attrs["hidden_size"] == 32
        stored = f["pooled/mean"][:]
    with open_cache(convnext_cache) as c:
        assert c.layer_widths == WIDTHS and c.hidden_size == 32
        for layer, w in enumerate(WIDTHS):
            x = c.layer(layer)
            assert x.shape == (12, w) and np.abs(x).sum() > 0
            assert np.array_equal(x, stored[:, layer, :w])
            assert not stored[:, layer, w:].any()  # what was cut off is padding only
        assert c.layer(2, dtype=None).shape == (12, 16)
        assert c.pooled("mean", [2]).shape == (12, 1, 16)
        assert c.pooled("mean", [1, 3]).shape == (12, 2, 24)
    assert read_layer(convnext_cache, -1).features.shape == (12, 32)
    assert read_layer(convnext_cache, 0).features.shape == (12, 8)


def test_a_probe_on_one_stage_sees_exactly_its_width(convnext_cache):
    from featx.probing.data import load_cache

    one = load_cache(convnext_cache, layers=[2])
    assert one.X.shape == (12, 1, 16) and one.layer_widths == [16] and one.width(0) == 16
    every = load_cache(convnext_cache)
    assert every.X.shape == (12, 5, 32) and every.layer_widths == WIDTHS
    assert [every.features(j).shape[1] for j in range(5)] == WIDTHS
    assert np.array_equal(every.features(2), one.X[:, 0])


def test_saved_classifier_and_prediction_use_the_layer_width(convnext_cache, tmp_path):
    from featx.probing import run_probe
    from featx.probing.classifier import Classifier

    run_probe([convnext_cache], tmp_path / "p", probe="linear", seeds=1, save_classifier=True, progress=False)
    best = pd.read_csv(tmp_path / "p" / "best_layers.csv").best_dev_layer.iloc[0]
    (file,) = (tmp_path / "p").glob("classifier__*.safetensors")
    clf = Classifier.load(str(file))
    assert clf.blocks[0]["hidden_size"] == WIDTHS[int(best)] == clf.arrays["coef"].shape[1]
    ids, pred = clf.predict_cache([convnext_cache])
    assert len(ids) == 12 and len(pred) == 12


@pytest.mark.parametrize("probe", ["mlp", "linear"])
def test_a_sweep_over_every_stage_scores_each_as_a_sweep_on_that_stage_alone(convnext_cache_40, tmp_path, probe):
    """Each stage's probe fits its own features: an MLP on a stage zero-padded to the widest one drew other
    initial weights (its first layer is as wide as its input), so a stage's scores changed with the stages
    probed beside it (the linear probes give the padding zero weights: the same numbers either way)."""
    from featx.probing import run_probe

    def scores(layers, name):
        run_probe([convnext_cache_40], tmp_path / name, probe=probe, seeds=1, layers=layers, weighted=False,
                  progress=False)
        rows = pd.read_csv(tmp_path / name / "results.csv")
        return rows[rows.method == "layer"].set_index(["layer", "split", "metric"])["value"]

    every = scores("all", "every")
    for layer in (0, 2, 3):  # widths 8, 16, 24 of 32
        alone = scores(str(layer), f"layer{layer}")
        assert np.array_equal(every.loc[layer].sort_index().to_numpy(), alone.loc[layer].sort_index().to_numpy())
    # meta.json shows the widths the probes saw: hidden_size is the cache's (its widest layer's)
    for name, widths in (("every", WIDTHS), ("layer2", [16])):
        (encoder,) = json.load(open(tmp_path / name / "meta.json"))["encoders"]
        assert encoder["layer_widths"] == widths and encoder["hidden_size"] == 32


def test_cka_reads_each_stage_at_its_width(convnext_cache):
    from featx.report.cka import cache_cka, cka_matrix

    got = cache_cka(convnext_cache, debiased=False)
    with open_cache(convnext_cache) as c:
        layers = [c.layer(k) for k in range(c.num_layers)]
        padded = c.pooled("mean")
    assert got.matrix.shape == (5, 5)
    assert np.allclose(got.matrix, cka_matrix(layers), atol=1e-10)
    assert np.allclose(got.matrix, cka_matrix(padded), atol=1e-8)  # zero columns leave linear CKA as it is
    assert np.allclose(np.diag(got.matrix), 1.0)


def test_info_shows_the_widths_and_merge_keeps_them(convnext_cache, tmp_path):
    assert "layer widths 8, 8, 16, 24, 32" in describe(convnext_cache, verify=False)
    d = inspect(convnext_cache, verify=False)
    assert json.loads(json.dumps(d))["layer_widths"] == WIDTHS and "layer_widths" not in d["settings"]
    merge_caches([convnext_cache], tmp_path / "merged.h5")
    with open_cache(tmp_path / "merged.h5") as c:
        assert c.layer_widths == WIDTHS and c.layer(0).shape == (12, 8)


def test_widths_that_do_not_fit_the_layers_are_refused(convnext_cache, tmp_path):
    import shutil

    from featx.cache import CacheWriter

    bad = tmp_path / "bad.h5"
    shutil.copy(convnext_cache, bad)
    with h5py.File(bad, "a") as f:
        f.attrs["layer_widths"] = "8,8,16,24"
    with pytest.raises(FeatxError, match="layer_widths"):
        open_cache(bad)
    with pytest.raises(FeatxError, match="layer_widths"):
        CacheWriter(tmp_path / "w.h5", ids=["a"], attrs={"model": "m", "modality": "image"}, poolings=["mean"],
                    num_layers=3, hidden_size=8, layer_widths=[4, 8, 16])
