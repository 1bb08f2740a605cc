"""A damaged fine-tuned model/ folder: `load_finetuned` and `featx predict` name the file and what is wrong in
one line (FeatxError; the CLI exits 1 with one stderr line, no traceback), whatever part of the folder is hit."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from featx.cli.main import main
from featx.errors import FeatxError
from test_finetune import FAST, planted_manifest, run_quiet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_bert):
    """(manifest, model/ folder) of a short real fine-tuning run."""
    from featx.finetune import finetune

    d = tmp_path_factory.mktemp("saved")
    manifest = planted_manifest(d / "data", n=15, broken=False)
    result, _ = run_quiet(finetune, manifest, [tiny_bert], str(d / "out"), epochs=1, **FAST)
    return manifest, result.model_path


def _edit_config(edit):
    def damage(folder):
        path = folder / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(edit(config)))
    return damage


def _set(config, **kv):
    config.update(kv)
    return config


def _entry(config, **kv):
    config["encoders"][0].update(kv)
    return config


def _edit_head(edit):
    def damage(folder):
        from safetensors.torch import load_file, save_file

        path = str(folder / "head.safetensors")
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return damage


def _truncate(name, size=1000):
    def damage(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[:size])
    return damage


def _first(tensors):
    return sorted(tensors)[0]


def _reshape_first(tensors):
    k = _first(tensors)
    tensors[k] = torch.zeros(tuple(tensors[k].shape) + (2,))


def _nan_first(tensors):
    tensors[_first(tensors)][...] = float("nan")


# name -> (damage(folder), the file the message names (relative to the folder; "" = the folder), a word it says)
DAMAGE = {
    "head deleted": (lambda f: (f / "head.safetensors").unlink(), "head.safetensors", "missing"),
    "head truncated": (_truncate("head.safetensors"), "head.safetensors", "not a readable"),
    "head empty": (_truncate("head.safetensors", 0), "head.safetensors", "not a readable"),
    "head tensor missing": (_edit_head(lambda t: t.pop(_first(t))), "head.safetensors", "missing"),
    "head tensor extra": (_edit_head(lambda t: t.update(extra=torch.zeros(2))), "head.safetensors", "extra"),
    "head tensor mis-shaped": (_edit_head(_reshape_first), "head.safetensors", "shape"),
    "head tensor not finite": (_edit_head(_nan_first), "head.safetensors", "finite"),
    "config garbage": (lambda f: (f / "config.json").write_text("garbage"), "config.json", "JSON"),
    "config not utf-8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{\x00"), "config.json", "JSON"),
    "config a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json", "not a featx"),
    "config deleted": (lambda f: (f / "config.json").unlink(), "", "config.json"),
    "config a folder": (lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()), "config.json", ""),
    "no task": (_edit_config(lambda c: {k: v for k, v in c.items() if k != "task"}), "config.json", "task"),
    "unknown task": (_edit_config(lambda c: _set(c, task="ranking")), "config.json", "task"),
    "classes not a list": (_edit_config(lambda c: _set(c, classes=3)), "config.json", "classes"),
    "target_std a string": (_edit_config(lambda c: _set(c, target_std="x")), "config.json", "target_std"),
    "no encoders": (_edit_config(lambda c: _set(c, encoders=[])), "config.json", "encoders"),
    "encoders a dict": (_edit_config(lambda c: _set(c, encoders={"a": 1})), "config.json", "encoders"),
    "encoder entry a string": (_edit_config(lambda c: _set(c, encoders=["encoder-0"])), "config.json", "encoders"),
    "layer a string": (_edit_config(lambda c: _entry(c, layer="one")), "config.json", "layer"),
    "layer too deep": (_edit_config(lambda c: _entry(c, layer=7, num_layers=9)), "config.json", "layer"),
    "folder outside": (_edit_config(lambda c: _entry(c, folder="../x")), "config.json", "folder"),
    "head settings unknown": (_edit_config(lambda c: _set(c, head=dict(c["head"], wings=2))), "config.json", "head"),
    "head kind unknown": (_edit_config(lambda c: _set(c, head=dict(c["head"], head="bogus"))), "config.json",
                          "head"),
    "max_length a string": (_edit_config(lambda c: _set(c, max_length="long")), "config.json", "max_length"),
    "regression with classes": (_edit_config(lambda c: _set(c, task="regression")), "config.json", "classes"),
    "encoder folder deleted": (lambda f: shutil.rmtree(f / "encoder-0"), "encoder-0", "missing"),
    "encoder weights deleted": (lambda f: (f / "encoder-0" / "model.safetensors").unlink(), "encoder-0", ""),
    "encoder weights truncated": (_truncate("encoder-0/model.safetensors"), "encoder-0", ""),
    "encoder config garbage": (lambda f: (f / "encoder-0" / "config.json").write_text("garbage"), "encoder-0", ""),
}


def _damaged(saved, tmp_path, case):
    folder = tmp_path / "model"
    shutil.copytree(saved[1], folder)
    damage, _, _ = DAMAGE[case]
    damage(folder)
    return folder


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_file(saved, tmp_path, case, capsys):
    from featx.finetune import load_finetuned

    folder = _damaged(saved, tmp_path, case)
    _, where, word = DAMAGE[case]
    with pytest.raises(FeatxError) as err:
        load_finetuned(folder)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    assert str(folder / where).rstrip("/") in msg and word in msg, msg

    capsys.readouterr()
    rc = main(["predict", saved[0], "--classifier", str(folder), "--out", str(tmp_path / "pred.csv")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and msg in lines[0], lines
    assert not (tmp_path / "pred.csv").exists()


def test_the_undamaged_copy_still_loads(saved, tmp_path):
    from featx.finetune import load_finetuned

    folder = tmp_path / "model"
    shutil.copytree(saved[1], folder)
    assert load_finetuned(folder).predict([["good movie", "bad"]]).shape == (2,)


@pytest.mark.parametrize("case", ["head deleted", "config garbage", "head truncated"])
def test_featx_predict_on_a_damaged_folder_prints_no_traceback(saved, tmp_path, case):
    folder = _damaged(saved, tmp_path, case)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "featx", "predict", saved[0], "--classifier", str(folder),
                           "--out", str(tmp_path / "x.csv")], env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(folder / DAMAGE[case][1]) in lines[0], lines


def test_a_first_format_model_with_damaged_weights_is_one_line(tmp_path, tiny_bert):
    from safetensors.torch import save_model

    from featx.encoders import load_encoder
    from featx.finetune import HeadSettings, load_finetuned
    from featx.finetune.model import build_model

    save_model(build_model([load_encoder(tiny_bert)], [1], [0], HeadSettings(), 2), str(tmp_path / "model.safetensors"))
    config = {"format": "featx-finetune/1", "task": "classification", "classes": ["a", "b"],
              "target_mean": 0.0, "target_std": 1.0, "max_length": None, "max_audio_seconds": 30.0,
              "encoders": [{"model": tiny_bert, "modality": "text", "layer": 1, "num_layers": 3}],
              "head": vars(HeadSettings())}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_finetuned(tmp_path).predict([["good movie"]]).tolist()[0] in ("a", "b")
    _truncate("model.safetensors")(tmp_path)
    with pytest.raises(FeatxError, match="model.safetensors: not a readable safetensors file") as err:
        load_finetuned(tmp_path)
    assert len(str(err.value).splitlines()) == 1
