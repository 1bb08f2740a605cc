"""Layer-weighted sum and fusion: s3prl-style init, planted multimodal data where fusion beats each
modality, explicit handling of items missing from a modality, Ando's gated model over sequences."""
import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from _synthetic import planted, standard_splits, write_cache
from featx import metrics
from featx.probing.sweep import run_probe
from featx.errors import FeatxError
from featx.probing.fusion import GatedFusion, LayerWeightedSum, WeightedLayerProbe, align_by_id


def _two_modalities(n=360, seed=0):
    """Each modality carries one half of the label: y = z1 + z2 (clipped to [-3, 3])."""
    rng = np.random.default_rng(seed)
    z1, z2 = rng.standard_normal(n), rng.standard_normal(n)
    Xa, _ = planted(n=n, num_layers=4, dim=8, k=1, signal=z1, seed=seed + 1)
    Xb, _ = planted(n=n, num_layers=3, dim=8, k=2, signal=z2, seed=seed + 2)
    return Xa, Xb, np.clip(z1 + z2, -3, 3)


def test_layer_weighted_sum_starts_as_the_mean():
    m = LayerWeightedSum(5)
    x = torch.randn(3, 7, 5, 4)
    assert torch.allclose(m.weight, torch.zeros(5))
    assert torch.allclose(m(x), x.mean(dim=2), atol=1e-6)
    np.testing.assert_allclose(m.weights(), np.full(5, 0.2))


def test_weighted_probe_learns_the_planted_layer():
    X, y = planted(n=240, num_layers=5, dim=8, k=3)
    w = WeightedLayerProbe(max_epochs=100).fit(X, y)
    assert w.weights_.argmax() == 3 and w.weights_[3] > 0.5
    assert w.weights_.sum() == pytest.approx(1.0, abs=1e-5)


def test_align_by_id_reports_missing_items():
    ids, index, report = align_by_id([["a", "b", "c"], ["c", "a", "d"]], ["video", "text"])
    assert list(ids) == ["a", "c"] and index.tolist() == [[0, 2], [1, 0]]
    assert report == {"video": ["d"], "text": ["b"]}
    with pytest.raises(FeatxError, match="missing"):
        align_by_id([["a", "b"], ["a"]], missing="error")


def test_fusion_beats_each_modality_and_reports_missing(tmp_path):
    Xa, Xb, y = _two_modalities()
    n = len(y)
    ids = [f"clip{i:03d}" for i in range(n)]
    splits = standard_splits(n)
    a = write_cache(tmp_path / "a.h5", Xa, ids, y, splits, model="toy/video", modality="video")
    # Five items never made it into the audio cache: fusion reports them and uses the shared items.
    keep = np.ones(n, bool)
    keep[:5] = False
    b = write_cache(tmp_path / "b.h5", Xb[keep], np.asarray(ids)[keep], y[keep], splits[keep],
                    model="toy/audio", modality="audio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_probe([a, b], tmp_path / "out", fusion=["early", "late"], progress=False)
    assert any("missing per modality" in str(w.message) for w in caught)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["fusion"]["missing"]["audio"] == ids[:5] and meta["fusion"]["items"] == n - 5
    best = pd.read_csv(tmp_path / "out" / "best_layers.csv")
    mae = best[best.metric == "mae"].set_index("modality")
    assert mae.loc["video", "best_dev_layer"] == 1 and mae.loc["audio", "best_dev_layer"] == 2
    assert (mae.fusion_score < mae.best_layer_score - 0.1).all()
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    fused = df[(df.method == "fusion-late") & (df.split == "test") & (df.metric == "mae")]
    assert fused.encoder.iloc[0] == "toy/video+toy/audio" and (fused.layer == -1).all()
    with pytest.raises(FeatxError, match="missing"):
        run_probe([a, b], tmp_path / "out2", fusion=["early"], missing="error", progress=False)


def test_gated_fusion_over_sequences_learns_layer_weights():
    rng = np.random.default_rng(0)
    Xa, Xb, y = _two_modalities(n=300)
    # Sequences of 2..5 positions per item around the pooled vector; padding must not matter.
    def seqs(X):
        return [x[None] + 0.1 * rng.standard_normal((rng.integers(2, 6),) + x.shape).astype(np.float32) for x in X]
    Sa, Sb = seqs(Xa), seqs(Xb)
    tr, dev, te = np.arange(200), np.arange(200, 250), np.arange(250, 300)
    pick = lambda S, idx: [S[i] for i in idx]
    g = GatedFusion(hidden_size=32, lr=3e-3, max_epochs=60, patience=15).fit(
        [pick(Sa, tr), pick(Sb, tr)], y[tr], [pick(Sa, dev), pick(Sb, dev)], y[dev])
    mae = metrics.msa_regression(y[te], g.predict([pick(Sa, te), pick(Sb, te)]))["mae"]
    chance = metrics.chance("regression", y[tr], y[te])["mae"]
    assert mae < 0.8 * chance
    assert g.weights_[0].shape == (4,) and g.weights_[1].shape == (3,)
    assert g.weights_[0].argmax() == 1 and g.weights_[1].argmax() == 2


def test_fusion_on_the_best_layers_reuses_each_modalitys_own_fits(tmp_path, monkeypatch):
    # Same ids in the same order: fusion's folds are each modality's own, so the best dev layer per fold comes from
    # the modality's sweep instead of a second sweep; the results are those of fitting it again.
    import featx.probing.sweep as sweep
    from featx.probing.fusion import WeightedLayerProbe

    Xa, Xb, y = _two_modalities(n=240)
    ids, splits = [f"c{i}" for i in range(len(y))], standard_splits(len(y))
    a = write_cache(tmp_path / "a.h5", Xa, ids, y, splits, model="toy/video", modality="video")
    b = write_cache(tmp_path / "b.h5", Xb, ids, y, splits, model="toy/audio", modality="audio")
    calls = []
    refit, same = sweep._best_dev_layer, sweep.same_items
    monkeypatch.setattr(sweep, "_best_dev_layer", lambda *args: calls.append(1) or refit(*args))
    kw = dict(fusion=["early", "late"], seeds=2, train_sizes=(0.5, 1.0), progress=False)
    reused = run_probe([a, b], tmp_path / "reused", **kw)
    assert calls == []
    monkeypatch.setattr(sweep, "same_items", lambda *args: False)
    again = run_probe([a, b], tmp_path / "again", **kw)
    assert len(calls) == 2 * 2 * 2  # seeds x sizes x modalities, one test split each
    pd.testing.assert_frame_equal(reused, again)
    # a different order of ids in one cache: fusion's items are no longer the modality's own, so it fits again
    calls.clear()
    order = np.random.default_rng(0).permutation(len(y))
    c = write_cache(tmp_path / "c.h5", Xb[order], np.asarray(ids)[order], y[order], splits[order],
                    model="toy/audio", modality="audio")
    monkeypatch.setattr(sweep, "same_items", same)
    run_probe([a, c], tmp_path / "shuffled", fusion=["early"], progress=False)
    assert len(calls) == 2
    # fusion on the layer-weighted sums, with --weighted: the sweep's weighted probes serve fusion too
    fits = []
    fit = WeightedLayerProbe.fit
    monkeypatch.setattr(WeightedLayerProbe, "fit", lambda self, *args: fits.append(1) or fit(self, *args))
    kw = dict(fusion=["late"], fusion_layer="weighted", weighted=True, progress=False)
    reused = run_probe([a, b], tmp_path / "w-reused", **kw)
    assert len(fits) == 2  # one per modality, in its sweep
    monkeypatch.setattr(sweep, "same_items", lambda *args: False)
    again = run_probe([a, b], tmp_path / "w-again", **kw)
    assert len(fits) == 2 + 4
    pd.testing.assert_frame_equal(reused, again)


def test_caches_that_share_no_or_too_few_items_are_one_line_before_any_fit(tmp_path, capsys):
    """Fusing caches of different manifests (no shared id) was an IndexError traceback from numpy after every
    per-cache probe had run; too few shared items for fusion's folds is one line naming fusion, before any fit."""
    from featx.cli.main import main

    X, y = planted(n=60, num_layers=3, dim=6, k=1)
    splits = standard_splits(60)
    a = write_cache(tmp_path / "a.h5", X, [f"a{i}" for i in range(60)], y, splits, model="toy/a", modality="text")
    b = write_cache(tmp_path / "b.h5", X, [f"b{i}" for i in range(60)], y, splits, model="toy/b", modality="audio")
    out = tmp_path / "out"
    assert main(["fuse", a, b, "--out", str(out), "--probe", "batched", "-q"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "share no item id" in err[0] and not out.exists(), err
    ids = [f"a{i}" if i > 2 else f"b{i}" for i in range(60)]   # 3 shared items: too few for train/dev/test
    c = write_cache(tmp_path / "c.h5", X, ids, y, splits, model="toy/c", modality="audio")
    assert main(["fuse", b, c, "--out", str(out), "--probe", "batched", "-q"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "fusion of the 3 items the caches share" in err[0] and not out.exists(), err


def _one_error(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1, err
    return err[0]


def test_caches_whose_splits_disagree_are_refused_for_fusion_in_either_order(tmp_path, capsys):
    """Two caches of the same ids and labels whose manifests swapped train and test: fuse ran, and its score
    depended on the caches' order (fusion took the first cache's split) while each encoder's row was trained on
    its own split. Labels that disagree were refused; splits are now refused the same way, in one line naming an
    example id and both splits. probe (no fusion) warns in one line: its rows are on different items."""
    from featx.cli.main import main

    X, y = planted(n=60, num_layers=3, dim=6, k=1)
    ids = [f"u{i}" for i in range(60)]
    splits = np.asarray(["train", "train", "train", "dev", "test"] * 12, dtype=object)
    swapped = np.asarray([{"train": "test", "test": "train"}.get(s, s) for s in splits], dtype=object)
    a = write_cache(tmp_path / "a.h5", X, ids, y, splits, model="toy/a", modality="audio")
    b = write_cache(tmp_path / "b.h5", X, ids, y, swapped, model="toy/b", modality="text")
    for first, second in ((a, b), (b, a)):
        out = tmp_path / f"fused-{os.path.basename(first)}"
        assert main(["fuse", first, second, "--out", str(out), "--probe", "batched", "-q"]) == 1
        line = _one_error(capsys)
        assert "splits differ" in line and "48 of the 60 ids" in line and "item 'u0'" in line, line
        assert ("'test' here, 'train' there" if first == a else "'train' here, 'test' there") in line, line
        assert not out.exists()
    assert main(["probe", a, b, "--out", str(tmp_path / "probed"), "--probe", "batched", "-q"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "splits differ" in line]
    assert len(err) == 1 and "trained and scored on different items" in err[0], err


def test_items_held_without_a_label_are_not_called_missing(tmp_path):
    """A cache holding every item, five without a label, was reported as "missing per modality: {'text': 5}"."""
    X, y = planted(n=60, num_layers=3, dim=6, k=1)
    ids, splits = [f"c{i}" for i in range(60)], standard_splits(60)
    labels = np.asarray(y, dtype=np.float64).copy()
    labels[[1, 8, 20, 33, 41]] = np.nan
    a = write_cache(tmp_path / "a.h5", X, ids, y, splits, model="toy/audio", modality="audio")
    b = write_cache(tmp_path / "b.h5", X, ids, labels, splits, model="toy/text", modality="text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_probe([a, b], tmp_path / "out", probe="batched", fusion=["early"], progress=False)
    said = [str(w.message) for w in caught if "fusion uses" in str(w.message)]
    assert said == ["fusion uses the 55 labelled items present in every cache; held without a label per modality: "
                    "{'text': 5}"], said
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["fusion"]["missing"] == {"audio": [], "text": []}
    assert meta["fusion"]["unlabeled"] == {"text": ["c1", "c20", "c33", "c41", "c8"]}
    # --missing error is about missing items: items without a label do not trip it
    run_probe([a, b], tmp_path / "strict", probe="batched", fusion=["early"], missing="error", progress=False)
