"""featx.checkpoint: the fingerprint of a checkpoint's weights that caches and saved classifiers record, and
extract's resume checked against it."""
import json
import os
import shutil

import h5py
import numpy as np

from featx.checkpoint import fingerprint_diff, model_fingerprint
from featx.cli.main import main


def _checkpoint(folder, values, name="model.safetensors"):
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "bert", "hidden_size": 8, "transformers_version": "4.40.0"}, f)
    save_file({"w": values}, os.path.join(folder, name))
    return str(folder)


def test_a_copy_is_the_same_checkpoint_and_a_sampled_change_is_not(tmp_path):
    """8 MiB of weights: a copy (other path and modification time) and a config saved by another transformers
    version fingerprint the same; a changed 256 KiB run in the middle, or another size, does not."""
    values = np.random.default_rng(0).standard_normal(2 << 20).astype(np.float32)
    a = _checkpoint(tmp_path / "a", values)
    fp = model_fingerprint(a)
    assert fp.startswith("config=") and f"bytes={os.path.getsize(os.path.join(a, 'model.safetensors'))}" in fp
    b = shutil.copytree(a, tmp_path / "b")
    os.utime(os.path.join(b, "model.safetensors"), (1, 1))
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump({"hidden_size": 8, "transformers_version": "4.57.1", "model_type": "bert"}, f)
    assert model_fingerprint(b) == fp
    changed = values.copy()
    changed[1 << 20:(1 << 20) + (64 << 10)] += 1.0   # 256 KiB in the middle of the file
    c = _checkpoint(tmp_path / "c", changed)
    assert os.path.getsize(os.path.join(c, "model.safetensors")) == os.path.getsize(os.path.join(a, "model.safetensors"))
    assert fingerprint_diff(fp, model_fingerprint(c)) == "its weights differ (files of the same sizes, other values)"
    d = _checkpoint(tmp_path / "d", values[:-1])
    assert fingerprint_diff(fp, model_fingerprint(d)).startswith("its weight files differ (1 file(s) of ")


def test_the_weights_transformers_loads_count_and_nothing_without_them(tmp_path):
    """*.bin only when there is no *.safetensors; a folder without weights or config, and a hub id with no local
    copy, have no fingerprint (None: not compared)."""
    values = np.arange(64, dtype=np.float32)
    a = _checkpoint(tmp_path / "a", values)
    fp = model_fingerprint(a)
    with open(os.path.join(a, "pytorch_model.bin"), "wb") as f:
        f.write(b"other weights")
    assert model_fingerprint(a) == fp
    os.remove(os.path.join(a, "model.safetensors"))
    assert "files=1" in model_fingerprint(a) and model_fingerprint(a) != fp
    os.remove(os.path.join(a, "pytorch_model.bin"))
    assert model_fingerprint(a) is None
    assert model_fingerprint(_checkpoint(tmp_path / "e", values)) == fp
    os.remove(os.path.join(tmp_path / "e", "config.json"))
    assert model_fingerprint(str(tmp_path / "e")) is None
    assert model_fingerprint("featx-test/no-such-model") is None


def test_extract_records_the_fingerprint_and_refuses_a_resume_whose_weights_changed(tmp_path, media, tiny_bert,
                                                                                    capsys):
    """A model folder rewritten in place with other weights: its complete cache was taken as done (values of the
    old weights served as the new ones'); now refused in one line that names the weights. A cache made before
    featx recorded the fingerprint is still complete."""
    from featx.cache import open_cache
    from featx.demo.tiny import build_tiny_bert

    model = str(shutil.copytree(tiny_bert, tmp_path / "m" / "tiny-bert"))
    out = tmp_path / "cache"
    assert main(["extract", media, "--model", model, "--out", str(out), "-q"]) == 0
    cache = str(out / "manifest__tiny-bert.h5")
    with open_cache(cache) as c:
        assert c.attrs["model_fingerprint"] == model_fingerprint(model)
    with h5py.File(cache, "r+") as f:   # as made by an earlier featx
        del f.attrs["model_fingerprint"]
    stamp = os.stat(cache).st_mtime_ns
    capsys.readouterr()
    assert main(["extract", media, "--model", model, "--out", str(out), "-q"]) == 0
    assert os.stat(cache).st_mtime_ns == stamp
    assert main(["extract", media, "--model", model, "--out", str(out), "-q", "--overwrite"]) == 0
    build_tiny_bert(model, seed=1)
    capsys.readouterr()
    assert main(["extract", media, "--model", model, "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different settings: model weights: its weights differ" in err[0], err
