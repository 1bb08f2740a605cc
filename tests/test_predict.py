"""featx predict: a probe saved by featx probe, applied to new raw files through extraction."""
import os

import numpy as np
import pandas as pd

from featx.cli.main import main


def test_saved_probe_predicts_new_files_like_the_cache_it_was_trained_on(tmp_path, media, tiny_bert, capsys):
    assert main(["extract", media, "--model", tiny_bert, "--out", str(tmp_path / "cache"), "--dtype", "float32",
                 "--no-progress"]) == 0
    cache = str(tmp_path / "cache" / "manifest__tiny-bert.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--probe", "ridge", "--save-classifier",
                 "--no-progress"]) == 0
    saved = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "res") for f in fs if f.endswith(".safetensors")]
    assert len(saved) == 1
    from featx.probing.classifier import Classifier
    clf = Classifier.load(saved[0])
    _, expected = clf.predict_cache([cache])
    out = tmp_path / "pred.csv"
    assert main(["predict", media, "--classifier", saved[0], "--out", str(out), "--no-progress"]) == 0
    got = pd.read_csv(out)
    assert list(got["id"]) == list(pd.read_csv(media)["id"])
    np.testing.assert_allclose(got["prediction"].to_numpy(float), np.asarray(expected, float), atol=1e-6)
    capsys.readouterr()


def test_cache_dir_holding_another_settings_cache_is_one_line_with_advice_predict_can_follow(
        tmp_path, media, tiny_bert, capsys):
    """--cache-dir pointing at the folder where `featx extract` wrote the same manifest's cache (float16, the
    default): refused in one line that names no option predict lacks (it said 'use --overwrite')."""
    assert main(["extract", media, "--model", tiny_bert, "--out", str(tmp_path / "cache"), "-q"]) == 0
    cache = str(tmp_path / "cache" / "manifest__tiny-bert.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--probe", "ridge", "--save-classifier", "-q"]) == 0
    saved = str(tmp_path / "res" / "classifier__tiny-bert.safetensors")
    capsys.readouterr()
    code = main(["predict", media, "--classifier", saved, "--cache-dir", str(tmp_path / "cache"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "different settings" in err[0] and "--overwrite" not in err[0] and "--cache-dir" in err[0], err
    assert main(["predict", media, "--classifier", saved, "--cache-dir", str(tmp_path / "pc"), "-q"]) == 0


def test_predict_names_no_temporary_cache_that_is_gone_after_it(tmp_path, media, tiny_bert, capsys):
    assert main(["extract", media, "--model", tiny_bert, "--out", str(tmp_path / "cache"), "-q"]) == 0
    cache = str(tmp_path / "cache" / "manifest__tiny-bert.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--probe", "ridge", "--save-classifier", "-q"]) == 0
    saved = str(tmp_path / "res" / "classifier__tiny-bert.safetensors")
    capsys.readouterr()
    assert main(["predict", media, "--classifier", saved, "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "featx-predict-" not in err and ".h5" not in err, err
    assert f"featx predict: {tiny_bert}: 8 done, 0 failed -> a temporary folder, removed after the predictions" in err
    assert main(["predict", media, "--classifier", saved, "--cache-dir", str(tmp_path / "pc"), "-q"]) == 0
    kept = str(tmp_path / "pc" / "manifest__tiny-bert.h5")
    assert f"featx predict: {tiny_bert}: 8 done, 0 failed -> {kept}" in capsys.readouterr().err
    assert os.path.exists(kept)
