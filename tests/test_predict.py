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
    """--cache-dir pointing at a folder where `featx extract` wrote the same manifest's cache with other settings
    (--max-length 4) than the classifier's training cache: refused in one line that names no option predict
    lacks (it said 'use --overwrite'). The training cache's own folder is reused: its settings are the same."""
    assert main(["extract", media, "--model", tiny_bert, "--out", str(tmp_path / "cache"), "-q"]) == 0
    assert main(["extract", media, "--model", tiny_bert, "--out", str(tmp_path / "other"), "--max-length", "4",
                 "-q"]) == 0
    cache = str(tmp_path / "cache" / "manifest__tiny-bert.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--probe", "ridge", "--save-classifier", "-q"]) == 0
    saved = str(tmp_path / "res" / "classifier__tiny-bert.safetensors")
    capsys.readouterr()
    code = main(["predict", media, "--classifier", saved, "--cache-dir", str(tmp_path / "other"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "different settings" in err[0] and "--overwrite" not in err[0] and "--cache-dir" in err[0], err
    assert main(["predict", media, "--classifier", saved, "--cache-dir", str(tmp_path / "pc"), "-q"]) == 0
    assert main(["predict", media, "--classifier", saved, "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0


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


def _train(tmp_path, media, model, *extract_args):
    """(training cache, saved classifier) of a ridge probe on `model`'s cache extracted with extract_args."""
    assert main(["extract", media, "--model", model, "--out", str(tmp_path / "cache"), "-q", *extract_args]) == 0
    cache = str(tmp_path / "cache" / "manifest__tiny-bert.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--probe", "ridge", "--save-classifier", "-q"]) == 0
    return cache, str(tmp_path / "res" / "classifier__tiny-bert.safetensors")


def _rewrite(saved, path, extraction):
    """A copy of a saved classifier whose blocks record other extraction settings (a dict updating the recorded
    ones), or none (None: as a file saved before featx kept them)."""
    from featx.probing.classifier import Classifier

    clf = Classifier.load(saved)
    for block in clf.blocks:
        if extraction is None:
            block.pop("extraction", None)
        else:
            block["extraction"].update(extraction)
    return clf.save(str(path))


def test_classifier_predicts_with_the_extraction_settings_of_its_training_cache(tmp_path, media, tiny_bert, capsys):
    """A probe trained on a --precision bf16-weights cache (float16 storage, --max-length 6) extracts new items
    the same way: predict ran the CPU's default (fp32, float32, the tokenizer's length) without a word, so the
    probe met features about 1% away from those it was trained on."""
    from featx.cache import open_cache
    from featx.probing.classifier import Classifier

    cache, saved = _train(tmp_path, media, tiny_bert, "--precision", "bf16-weights", "--max-length", "6")
    clf = Classifier.load(saved)
    assert clf.blocks[0]["extraction"] == {"precision": "bf16-weights", "dtype": "float16", "max_length": 6}
    out = tmp_path / "pred.csv"
    assert main(["predict", media, "--classifier", saved, "--cache-dir", str(tmp_path / "pc"), "--out", str(out),
                 "-q"]) == 0
    predicted = str(tmp_path / "pc" / "manifest__tiny-bert.h5")
    with open_cache(predicted) as c, open_cache(cache) as t:
        assert (c.attrs["precision"], c.dtype, int(c.attrs["max_length"])) == ("bf16-weights", "float16", 6)
        layer, pool = clf.blocks[0]["layers"][0], clf.blocks[0]["pooling"]
        np.testing.assert_array_equal(c.layer(layer, pool), t.layer(layer, pool))
    ids, expected = clf.predict_cache([cache])
    got = pd.read_csv(out).set_index("id").loc[list(ids), "prediction"]
    np.testing.assert_allclose(got.to_numpy(float), np.asarray(expected, float), rtol=1e-12)
    capsys.readouterr()


def test_autocast_precision_on_a_cpu_is_refused_unless_given(tmp_path, media, tiny_bert, capsys):
    """A classifier trained on a bf16-autocast cache (a GPU's) on this CPU: one line, nothing extracted;
    --precision fp32 runs it and says in one line that the features differ from those it was trained on."""
    _, saved = _train(tmp_path, media, tiny_bert, "--dtype", "float32")
    bf16 = _rewrite(saved, tmp_path / "bf16.safetensors", {"precision": "bf16"})
    capsys.readouterr()
    code = main(["predict", media, "--classifier", bf16, "--cache-dir", str(tmp_path / "pc"), "--device", "cpu",
                 "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert bf16 in err[0] and "bf16" in err[0] and "--precision" in err[0], err
    assert not os.path.exists(tmp_path / "pc" / "manifest__tiny-bert.h5")
    out = tmp_path / "pred.csv"
    assert main(["predict", media, "--classifier", bf16, "--cache-dir", str(tmp_path / "pc"), "--device", "cpu",
                 "--precision", "fp32", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "--precision fp32" in err and "bf16" in err, err
    assert pd.read_csv(out)["prediction"].notna().all()


def test_classifier_without_extraction_record_predicts_float32_at_the_default_precision(
        tmp_path, media, tiny_bert, capsys):
    """A file saved before featx recorded the extraction settings loads and predicts as it did: float32 storage,
    the device's default precision (fp32 on the CPU)."""
    from featx.cache import open_cache

    _, saved = _train(tmp_path, media, tiny_bert, "--precision", "bf16-weights")
    old = _rewrite(saved, tmp_path / "old.safetensors", None)
    assert main(["predict", media, "--classifier", old, "--cache-dir", str(tmp_path / "pc"), "--device", "cpu",
                 "-q"]) == 0
    with open_cache(str(tmp_path / "pc" / "manifest__tiny-bert.h5")) as c:
        assert (c.attrs["precision"], c.dtype) == ("fp32", "float32")
    capsys.readouterr()


def test_a_classifier_from_a_relative_model_folder_predicts_from_any_folder(tmp_path, media, tiny_bert, capsys,
                                                                           monkeypatch):
    # extract --model given relative to the working folder: the saved classifier records the folder absolute
    import shutil
    work = tmp_path / "work"
    shutil.copytree(tiny_bert, work / "mtext")
    monkeypatch.chdir(work)
    assert main(["extract", media, "--model", "mtext", "--out", "cache", "--no-progress"]) == 0
    assert main(["probe", "cache/manifest__mtext.h5", "--out", "res", "--probe", "ridge", "--save-classifier",
                 "-q"]) == 0
    from featx.probing.classifier import Classifier
    clf = Classifier.load("res/classifier__mtext.safetensors")
    assert clf.blocks[0]["encoder"] == str(work / "mtext")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", media, "--classifier", str(work / "res" / "classifier__mtext.safetensors"), "--out",
                 "p.csv", "--no-progress"]) == 0
    assert pd.read_csv(tmp_path / "p.csv")["prediction"].notna().all()
    capsys.readouterr()


def test_an_mlp_probe_saved_as_a_linear_one_is_said_on_the_console(tmp_path, capsys):
    from _synthetic import planted, standard_splits, write_cache
    X, y = planted(n=120, num_layers=3, dim=8, k=1)
    path = write_cache(tmp_path / "c.h5", X, [f"i{k}" for k in range(120)], y, standard_splits(120))
    assert main(["probe", str(path), "--out", str(tmp_path / "r"), "--probe", "mlp", "--save-classifier",
                 "--seeds", "1", "-q"]) == 0
    err = capsys.readouterr().err
    assert "the saved classifiers are linear probes (mlp has no linear weights to save)" in err
    assert main(["probe", str(path), "--out", str(tmp_path / "r2"), "--probe", "ridge", "--save-classifier",
                 "-q"]) == 0
    assert "linear probes" not in capsys.readouterr().err


def test_precision_with_a_fine_tuned_model_is_refused_not_ignored(tmp_path, media, capsys):
    (tmp_path / "model").mkdir()  # refused before the folder is read: --precision does not apply to it
    assert main(["predict", media, "--classifier", str(tmp_path / "model"), "--precision", "fp16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision is for a probe's classifier" in err[0]


def _moved_model_classifier(tmp_path, media, tiny_bert):
    """(classifier, its predictions as a DataFrame, the model folder it was trained on, moved elsewhere): a probe
    trained on a copy of tiny-bert in tmp_path/project/models, which is then moved to tmp_path/moved."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tiny_bert, project / "models" / "tiny-bert")
    _, saved = _train(project, media, str(project / "models" / "tiny-bert"), "--dtype", "float32")
    before = tmp_path / "before.csv"
    assert main(["predict", media, "--classifier", saved, "--out", str(before), "-q"]) == 0
    moved = tmp_path / "moved" / "tiny-bert"
    moved.parent.mkdir()
    shutil.move(str(project / "models" / "tiny-bert"), moved)
    return saved, pd.read_csv(before), str(project / "models" / "tiny-bert"), str(moved)


def test_a_moved_model_folder_is_given_with_model_and_predicts_the_same(tmp_path, media, tiny_bert, capsys):
    """The trial's case: the project's model folder moved after the probe. predict said only that the recorded
    folder does not exist; now it says to give --model, and --model with the folder where it is now gives the
    same predictions, checked to be the same checkpoint."""
    from featx.probing.classifier import Classifier

    saved, before, old, moved = _moved_model_classifier(tmp_path, media, tiny_bert)
    assert Classifier.load(saved).blocks[0]["model_fingerprint"].startswith("config=")
    capsys.readouterr()
    assert main(["predict", media, "--classifier", saved, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and old in err[0] and "does not exist" in err[0] and "--model" in err[0], err
    out = tmp_path / "after.csv"
    assert main(["predict", media, "--classifier", saved, "--model", moved, "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "cannot check" not in err, err
    after = pd.read_csv(out)
    assert before["prediction"].notna().all()
    pd.testing.assert_frame_equal(after, before)


def test_another_checkpoint_given_with_model_is_refused_naming_what_differs(tmp_path, media, tiny_bert, capsys):
    """A checkpoint of the same config and file sizes but another random initialisation is not the one the
    classifier was trained on: refused in one line before anything is extracted (its numbers would be silently
    wrong); one of another size says that its config and weight files differ."""
    from featx.demo.tiny import build_tiny_bert

    saved, _, _, _ = _moved_model_classifier(tmp_path, media, tiny_bert)
    other = build_tiny_bert(str(tmp_path / "other" / "tiny-bert"), seed=1)
    capsys.readouterr()
    assert main(["predict", media, "--classifier", saved, "--model", other, "--cache-dir", str(tmp_path / "pc"),
                 "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and other in err[0] and "is not the checkpoint the classifier was trained on" in err[0]
    assert "its weights differ" in err[0] and "config" not in err[0].split(": ", 2)[-1], err
    assert not os.path.exists(tmp_path / "pc")
    wider = build_tiny_bert(str(tmp_path / "wider" / "tiny-bert"), hidden_size=48)
    assert main(["predict", media, "--classifier", saved, "--model", wider, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json differs" in err[0] and "weight files differ" in err[0], err


def test_a_model_given_for_a_classifier_without_fingerprint_is_used_with_a_warning(tmp_path, media, tiny_bert,
                                                                                   capsys):
    """A classifier saved before featx recorded its model's fingerprint: a model given with --model is used (as
    the user asked) with one line saying it could not be checked; its predictions are those of that model."""
    from featx.probing.classifier import Classifier

    saved, before, _, moved = _moved_model_classifier(tmp_path, media, tiny_bert)
    clf = Classifier.load(saved)
    del clf.blocks[0]["model_fingerprint"]
    old = clf.save(str(tmp_path / "old.safetensors"))
    capsys.readouterr()
    out = tmp_path / "p.csv"
    assert main(["predict", media, "--classifier", old, "--model", moved, "--out", str(out), "-q"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "cannot check" in line]
    assert len(err) == 1 and "records no fingerprint" in err[0] and moved in err[0], err
    pd.testing.assert_frame_equal(pd.read_csv(out), before)


def test_model_is_given_once_per_encoder_and_not_for_a_fine_tuned_model(tmp_path, media, tiny_bert, capsys):
    saved, _, _, moved = _moved_model_classifier(tmp_path, media, tiny_bert)
    capsys.readouterr()
    assert main(["predict", media, "--classifier", saved, "--model", moved, "--model", moved, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 encoder(s)" in err[0] and "once for each" in err[0] and "(got 2)" in err[0], err
    (tmp_path / "model").mkdir()
    assert main(["predict", media, "--classifier", str(tmp_path / "model"), "--model", moved]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model is for a probe's classifier" in err[0], err


def test_a_cache_dir_made_before_the_model_moved_is_resumed_with_model(tmp_path, media, tiny_bert, capsys):
    """predict --cache-dir keeps its caches; after the model folder moves, --model with the new folder reuses
    the cache (the same checkpoint's fingerprint), where it refused it as made with another model."""
    import shutil

    from featx.cache import open_cache

    project = tmp_path / "project"
    shutil.copytree(tiny_bert, project / "tiny-bert")
    _, saved = _train(project, media, str(project / "tiny-bert"), "--dtype", "float32")
    pc = tmp_path / "pc"
    assert main(["predict", media, "--classifier", saved, "--cache-dir", str(pc), "--out",
                 str(tmp_path / "a.csv"), "-q"]) == 0
    cache = pc / "manifest__tiny-bert.h5"
    stamp = os.stat(cache).st_mtime_ns
    shutil.move(str(project / "tiny-bert"), tmp_path / "tiny-bert")
    capsys.readouterr()
    assert main(["predict", media, "--classifier", saved, "--model", str(tmp_path / "tiny-bert"), "--cache-dir",
                 str(pc), "--out", str(tmp_path / "b.csv"), "-q"]) == 0, capsys.readouterr().err
    assert os.stat(cache).st_mtime_ns == stamp   # complete: not written again
    with open_cache(str(cache)) as c:
        assert c.done.all()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b.csv"), pd.read_csv(tmp_path / "a.csv"))
