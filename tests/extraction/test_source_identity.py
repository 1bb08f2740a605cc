"""What a cache's values were computed from: the model folder (recorded absolute, however it was typed) and each
item's source (a fingerprint of its text or file, so that a changed manifest is never answered from stale values);
labels and splits follow the manifest."""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from featx.cache import open_cache
from featx.cli.main import main
from featx.errors import FeatxError
from featx.extraction.pipeline import extract

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fx(args, cwd):
    """`python -m featx ...` in its own process, run in folder `cwd`."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "featx", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _texts(path, texts, **columns):
    pd.DataFrame({"id": [f"t{k}" for k in range(len(texts))], "text": texts, **columns}).to_csv(path, index=False)
    return str(path)


def _mean(path):
    with open_cache(path) as c:
        return c.pooled("mean", only_done=False), c.done.copy()


WORDS = ["good movie", "the film was awful and boring", "i love it", "bad", "great fun, wonderful",
         "this is not very good at all", "ok", "funny and happy", "meh", "superb acting", "terrible plot", "nice"]


# ---------------------------------------------------------------- the model folder
def test_a_relative_model_folder_is_recorded_absolute_so_predict_elsewhere_runs_the_same_model(tmp_path, tiny_bert):
    """extract --model models/bert in projA, probe from the parent folder, predict from a folder whose
    models/bert is another checkpoint: the cache and the classifier record projA's folder, and predict runs it
    (it ran the other one: other predictions, exit 0)."""
    from featx.demo.tiny import build_tiny_bert
    from featx.probing.classifier import Classifier

    proj, other = tmp_path / "projA", tmp_path / "elsewhere"
    shutil.copytree(tiny_bert, proj / "models" / "bert")
    build_tiny_bert(str(other / "models" / "bert"), seed=1)
    labels = [float(k % 4) for k in range(len(WORDS))]
    _texts(proj / "m.csv", WORDS, label=labels, split=["train", "train", "dev", "test"] * 3)
    r = _fx(["extract", "m.csv", "--model", "models/bert", "--out", "cache", "-q"], proj)
    assert r.returncode == 0, r.stderr
    with open_cache(proj / "cache" / "m__bert.h5") as c:
        assert c.model == str(proj / "models" / "bert")
    r = _fx(["probe", "projA/cache/m__bert.h5", "--out", "projA/res", "--seeds", "1", "--save-classifier", "-q"],
            tmp_path)
    assert r.returncode == 0, r.stderr
    saved = proj / "res" / "classifier__bert.safetensors"
    assert Classifier.load(saved).blocks[0]["encoder"] == str(proj / "models" / "bert")
    _texts(tmp_path / "new.csv", ["a superb plot", "awful", "fine i guess"])
    right = _fx(["predict", str(tmp_path / "new.csv"), "--classifier", str(saved), "--out", "right.csv", "-q"], proj)
    here = _fx(["predict", str(tmp_path / "new.csv"), "--classifier", str(saved), "--out", "here.csv", "-q"], other)
    assert right.returncode == 0 and here.returncode == 0, (right.stderr, here.stderr)
    np.testing.assert_array_equal(pd.read_csv(other / "here.csv")["prediction"],
                                  pd.read_csv(proj / "right.csv")["prediction"])


def test_a_resume_from_another_folder_where_the_relative_path_is_another_checkpoint_is_refused(
        tmp_path, tiny_clip_vision, capsys):
    """A cache made in A with --model models/clip and a failed item, retried from B where models/clip is another
    checkpoint: refused in one line naming both folders (it was accepted and mixed two models' values)."""
    from featx.demo.tiny import build_tiny_clip
    from conftest import write_png

    a, b, data = tmp_path / "A", tmp_path / "B", tmp_path / "data"
    shutil.copytree(tiny_clip_vision, a / "models" / "clip")
    build_tiny_clip(str(b / "models" / "clip"), vision_only=True, seed=1)
    data.mkdir()
    for k in range(2):
        write_png(data / f"i{k}.png", seed=k)
    pd.DataFrame({"id": ["i0", "i1", "i2"], "image": ["i0.png", "i1.png", "i2.png"]}).to_csv(data / "m.csv",
                                                                                          index=False)
    cache = str(tmp_path / "cache")
    r = _fx(["extract", str(data / "m.csv"), "--model", "models/clip", "--out", cache, "-q"], a)
    assert r.returncode == 2, r.stderr  # i2.png is missing
    before, done = _mean(os.path.join(cache, "m__clip.h5"))
    write_png(data / "i2.png", seed=2)
    r = _fx(["extract", str(data / "m.csv"), "--model", "models/clip", "--out", cache, "-q"], b)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"model '{a / 'models' / 'clip'}' (now '{b / 'models' / 'clip'}')" in lines[0], lines
    after, still = _mean(os.path.join(cache, "m__clip.h5"))
    np.testing.assert_array_equal(after, before)
    assert list(still) == list(done) == [True, True, False]


def test_one_folder_typed_relative_or_absolute_is_one_model(tmp_path, tiny_bert, monkeypatch, capsys):
    """The same folder given relative, then absolute (and a cache of an earlier featx that recorded the relative
    path as typed, resolved against the current folder): resumed, not refused as other settings."""
    work = tmp_path / "work"
    shutil.copytree(tiny_bert, work / "models" / "bert")
    manifest = _texts(tmp_path / "m.csv", WORDS[:4])
    monkeypatch.chdir(work)
    extract(manifest, ["models/bert"], "cache", progress=False)
    path = str(work / "cache" / "m__bert.h5")
    values, _ = _mean(path)
    res = extract(manifest, [str(work / "models" / "bert") + "/"], "cache", progress=False)
    assert res.caches[0]["done"] == 4
    with h5py.File(path, "r+") as f:
        f.attrs["model"] = "models/bert"  # as an earlier featx recorded it: the path as typed, and no fingerprint
        del f.attrs["model_fingerprint"]  # of its weights (which would say that it is the same model anywhere)
    res = extract(manifest, [str(work / "models" / "bert")], "cache", progress=False)
    assert res.caches[0]["done"] == 4
    np.testing.assert_array_equal(_mean(path)[0], values)
    monkeypatch.chdir(tmp_path)  # from here that relative path names no folder: another model
    with pytest.raises(FeatxError) as e:
        extract(manifest, [str(work / "models" / "bert")], str(work / "cache"), progress=False)
    assert "model 'models/bert' (now " in str(e.value) and "different settings" in str(e.value)
    capsys.readouterr()


def test_a_hub_id_stays_a_hub_id_and_a_folder_becomes_absolute(tmp_path, monkeypatch):
    from featx.naming import resolve_model, same_model

    (tmp_path / "models" / "bert").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model("org/not-here") == "org/not-here"
    assert resolve_model("models/bert/") == str(tmp_path / "models" / "bert")
    assert resolve_model("./models/../models/bert") == str(tmp_path / "models" / "bert")
    assert same_model("models/bert", str(tmp_path / "models" / "bert"))
    assert not same_model("org/not-here", str(tmp_path / "models" / "bert"))


# ---------------------------------------------------------------- each item's source
def test_texts_changed_under_the_same_ids_are_extracted_again(tmp_path, tiny_bert, capsys):
    """Two texts replaced under the same ids: a second extract computes them again, says so in one line, and the
    cache equals a fresh extraction of the new manifest (it kept the old texts' values: 'nothing to do')."""
    manifest = _texts(tmp_path / "m.csv", WORDS[:5])
    extract(manifest, [tiny_bert], tmp_path / "c", progress=False)
    path = str(tmp_path / "c" / "m__tiny-bert.h5")
    old, _ = _mean(path)
    capsys.readouterr()
    new = list(WORDS[:5])
    new[1], new[3] = "an entirely different sentence about cats", "and another one about dogs"
    _texts(tmp_path / "m.csv", new)
    again = ["extract", manifest, "--model", tiny_bert, "--out", str(tmp_path / "c"), "-q"]
    assert main(again) == 0
    err = capsys.readouterr().err
    # with the command's name, as every other line (it said "featx: ...")
    assert (f"featx extract: {path}: the manifest's text of 2 item(s) changed since the cache was made, e.g. id t1; "
            "extracting them again") in err.splitlines(), err
    got, done = _mean(path)
    fresh_manifest = _texts(tmp_path / "fresh.csv", new)
    extract(fresh_manifest, [tiny_bert], tmp_path / "f", progress=False)
    fresh, _ = _mean(str(tmp_path / "f" / "fresh__tiny-bert.h5"))
    assert done.all()
    np.testing.assert_array_equal(got, fresh)
    np.testing.assert_array_equal(got[[0, 2, 4]], old[[0, 2, 4]])
    assert not np.array_equal(got[1], old[1])
    assert main(again) == 0  # now up to date: nothing said, nothing done
    assert "changed since" not in capsys.readouterr().err


def test_a_changed_image_file_is_extracted_again(tmp_path, tiny_clip_vision):
    """An image file rewritten under the same name (its size and mtime change): computed again."""
    from conftest import write_png

    for k in range(3):
        write_png(tmp_path / f"i{k}.png", seed=k)
    pd.DataFrame({"id": ["a", "b", "c"], "image": ["i0.png", "i1.png", "i2.png"]}).to_csv(tmp_path / "m.csv",
                                                                                       index=False)
    manifest = str(tmp_path / "m.csv")
    extract(manifest, [tiny_clip_vision], tmp_path / "c", progress=False)
    path = str(tmp_path / "c" / "m__tiny-clip-vision.h5")
    old, _ = _mean(path)
    write_png(tmp_path / "i2.png", seed=7, size=(50, 40))
    with pytest.warns(UserWarning, match=r"the image file \(its path from the manifest, size or modification time\) "
                                         r"of 1 item\(s\) changed since the cache was made, e.g. id c"):
        extract(manifest, [tiny_clip_vision], tmp_path / "c", progress=False)
    got, _ = _mean(path)
    np.testing.assert_array_equal(got[:2], old[:2])
    extract(manifest, [tiny_clip_vision], tmp_path / "f", progress=False, overwrite=True)
    np.testing.assert_array_equal(got, _mean(str(tmp_path / "f" / "m__tiny-clip-vision.h5"))[0])
    assert not np.array_equal(got[2], old[2])


def test_a_data_set_moved_with_its_manifest_is_not_extracted_again(tmp_path, tiny_clip_vision, recwarn):
    """Files are fingerprinted by their path from the manifest's folder: moving the folder (mv keeps each file's
    size and modification time) leaves every item done; a trial saw all of them extracted again."""
    import shutil

    from conftest import write_png

    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):
        write_png(data / f"i{k}.png", seed=k)
    pd.DataFrame({"id": ["a", "b", "c"], "image": ["i0.png", "i1.png", "i2.png"]}).to_csv(data / "m.csv", index=False)
    extract(str(data / "m.csv"), [tiny_clip_vision], tmp_path / "c", progress=False)
    shutil.move(str(data), str(tmp_path / "moved"))
    recwarn.clear()
    res = extract(str(tmp_path / "moved" / "m.csv"), [tiny_clip_vision], tmp_path / "c", progress=False)
    assert res.caches[0]["done"] == 3 and not [w for w in recwarn if "changed since" in str(w.message)]


def test_a_changed_item_whose_new_source_fails_keeps_no_old_value(tmp_path, tiny_bert, capsys):
    """A text replaced by an empty one: the item is failed, not left done with the old text's values (a success
    anywhere used to beat a failure anywhere)."""
    manifest = _texts(tmp_path / "m.csv", WORDS[:3])
    extract(manifest, [tiny_bert], tmp_path / "c", progress=False)
    _texts(tmp_path / "m.csv", [WORDS[0], "", WORDS[2]])
    res = extract(manifest, [tiny_bert], tmp_path / "c", progress=False)
    assert (res.caches[0]["done"], res.caches[0]["failed"]) == (2, 1)
    values, done = _mean(str(tmp_path / "c" / "m__tiny-bert.h5"))
    assert list(done) == [True, False, True] and not values[1].any()
    capsys.readouterr()


def test_a_cache_without_fingerprints_still_opens_and_resumes(tmp_path, tiny_bert, recwarn):
    """A cache of an earlier featx (no fingerprint dataset) with a failed item: it reads, resumes and finishes the
    item; its other items, whose sources are not known, are not compared (nor recomputed)."""
    manifest = _texts(tmp_path / "m.csv", [WORDS[0], "", WORDS[2]])
    extract(manifest, [tiny_bert], tmp_path / "c", progress=False)
    path = str(tmp_path / "c" / "m__tiny-bert.h5")
    with h5py.File(path, "r+") as f:
        del f["fingerprint"]
    old, _ = _mean(path)
    with open_cache(path) as c:
        assert not c.fingerprints.any()
    _texts(tmp_path / "m.csv", ["another first text", WORDS[1], WORDS[2]])
    res = extract(manifest, [tiny_bert], tmp_path / "c", progress=False)
    assert (res.caches[0]["done"], res.caches[0]["failed"]) == (3, 0)
    got, done = _mean(path)
    assert done.all() and not [w for w in recwarn if "changed since" in str(w.message)]
    np.testing.assert_array_equal(got[[0, 2]], old[[0, 2]])
    with open_cache(path) as c:  # the item computed now records its source; the others stay unknown
        assert c.fingerprints[1] != 0 and c.fingerprints[0] == 0 == c.fingerprints[2]


def test_predict_with_a_reused_cache_dir_predicts_the_new_texts(tmp_path, media, tiny_bert, capsys):
    """predict --cache-dir twice with other texts under the same ids: the second run predicts the new texts (it
    returned the old texts' predictions)."""
    assert main(["extract", media, "--model", tiny_bert, "--out", str(tmp_path / "cache"), "-q"]) == 0
    cache = str(tmp_path / "cache" / "manifest__tiny-bert.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--probe", "ridge", "--save-classifier", "-q"]) == 0
    saved = str(tmp_path / "res" / "classifier__tiny-bert.safetensors")
    new = _texts(tmp_path / "new.csv", ["great movie", "awful"])
    assert main(["predict", new, "--classifier", saved, "--cache-dir", str(tmp_path / "pc"), "--out",
                 str(tmp_path / "p1.csv"), "-q"]) == 0
    _texts(tmp_path / "new.csv", ["ok", "brilliant acting and a superb plot"])
    capsys.readouterr()
    assert main(["predict", new, "--classifier", saved, "--cache-dir", str(tmp_path / "pc"), "--out",
                 str(tmp_path / "p2.csv"), "-q"]) == 0
    assert (f"featx predict: {tmp_path / 'pc' / 'new__tiny-bert.h5'}: the manifest's text of 2 item(s) changed since "
            "the cache was made, e.g. id t0; extracting them again") in capsys.readouterr().err.splitlines()
    assert main(["predict", new, "--classifier", saved, "--out", str(tmp_path / "p3.csv"), "-q"]) == 0
    p2, p3 = (pd.read_csv(tmp_path / f"p{k}.csv")["prediction"].to_numpy() for k in (2, 3))
    np.testing.assert_array_equal(p2, p3)
    assert main(["extract", new, "--model", tiny_bert, "--out", str(tmp_path / "fresh"), "-q"]) == 0
    # the reused cache holds the new texts' values, as a fresh extraction with the training cache's settings
    np.testing.assert_array_equal(_mean(str(tmp_path / "pc" / "new__tiny-bert.h5"))[0],
                                  _mean(str(tmp_path / "fresh" / "new__tiny-bert.h5"))[0])
    capsys.readouterr()


# ---------------------------------------------------------------- labels and splits
def test_corrected_labels_and_splits_reach_a_complete_cache(tmp_path, tiny_bert, capsys):
    """Labels and splits corrected in the manifest (same ids, same texts), extract again: the complete cache takes
    them (it kept those of its creation, and probe scored against them), one line each on stderr; the values are
    not recomputed."""
    n = 8
    manifest = _texts(tmp_path / "m.csv", WORDS[:n], label=[0.0] * n, split=["train"] * n)
    extract(manifest, [tiny_bert], tmp_path / "c", progress=False)
    path = str(tmp_path / "c" / "m__tiny-bert.h5")
    old, _ = _mean(path)
    with open_cache(path) as c:
        prints = c.fingerprints.copy()
    labels = [float(k % 3) for k in range(n)]
    splits = ["train", "train", "dev", "test"] * 2
    _texts(tmp_path / "m.csv", WORDS[:n], label=labels, split=splits)
    capsys.readouterr()
    again = ["extract", manifest, "--model", tiny_bert, "--out", str(tmp_path / "c"), "-q"]
    assert main(again) == 0
    err = capsys.readouterr().err
    assert f"featx extract: {path}: the manifest's labels of 5 of {n} items differ from those the cache held; it " \
           "now holds the manifest's" in err.splitlines(), err
    assert f"featx extract: {path}: the manifest's splits of 4 of {n} items differ" in err, err
    assert f"featx extract: {tiny_bert}: {n} done, 0 failed" in err, err
    with open_cache(path) as c:
        assert list(c.labels) == labels and list(c.splits) == splits
        np.testing.assert_array_equal(c.fingerprints, prints)
    np.testing.assert_array_equal(_mean(path)[0], old)
    assert not os.path.exists(path + ".parts")
    assert main(again) == 0
    assert "differ from those" not in capsys.readouterr().err
