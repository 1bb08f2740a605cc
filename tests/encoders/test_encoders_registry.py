"""The encoder-family registry: a new family and a new probe registered through the public registries run
end to end; unsupported models and misspelled model names fail with one line, at once."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract
from featx.cache import open_cache
from featx.encoders import Family, family_of, load_config, register_family
from featx.encoders.registry import block_path, unregister_family
from featx.errors import FeatxError

WORDS = "good bad great awful happy sad fun boring love hate fine ok".split()


def _manifest(path, n=36):
    rng = np.random.default_rng(0)
    rows = [{"id": f"t{k:02d}", "text": " ".join(rng.choice(WORDS, 1 + k % 5)), "label": float(k % 3),
             "split": ["train", "train", "train", "dev", "test", "train"][k % 6]} for k in range(n)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _retyped_bert(tiny_bert, folder, model_type):
    """A copy of the tiny BERT checkpoint whose config.json names `model_type`."""
    import shutil

    shutil.copytree(tiny_bert, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_a_registered_toy_family_and_probe_run_extract_and_probe_end_to_end(tiny_bert, tmp_path):
    from transformers import AutoConfig, BertConfig

    from featx.encoders.text import TextEncoder
    from featx.probing import LayerProbe
    from featx.probing.registry import register_probe, unregister_probe

    class ToyBertConfig(BertConfig):
        model_type = "featx-toy-bert"

    class ToyEncoder(TextEncoder):  # the family's adapter: BERT weights under a model type transformers lacks
        model_class = "BertModel"

    AutoConfig.register("featx-toy-bert", ToyBertConfig, exist_ok=True)
    sys.modules[__name__].ToyEncoder = ToyEncoder  # the registry imports adapters as "module:Class"
    model = _retyped_bert(tiny_bert, tmp_path / "toy", "featx-toy-bert")
    with pytest.raises(FeatxError, match="'featx-toy-bert' is not supported"):
        family_of(load_config(model))
    register_family(Family("toy", ("featx-toy-bert",), "text", f"{__name__}:ToyEncoder", "encoder.layer",
                           example="(a test checkpoint)"))
    register_probe("toy-ridge", lambda seed, device: LayerProbe(probe="ridge", grid=[1.0], random_state=seed),
                   help="ridge with a fixed alpha")
    try:  # the toy family and probe must not outlive the test (featx models, the README table read the registry)
        _run_toy(model, tiny_bert, tmp_path)
    finally:
        unregister_family("toy")
        unregister_probe("toy-ridge")


def _run_toy(model, tiny_bert, tmp_path):
    from featx.probing import run_probe

    assert block_path(load_config(model)) == "encoder.layer"

    manifest = _manifest(tmp_path / "m.csv")
    res = extract(manifest, [model], tmp_path / "cache", device="cpu", dtype="float32", progress=False)
    ref = extract(manifest, [tiny_bert], tmp_path / "ref", device="cpu", dtype="float32", progress=False)
    with open_cache(res.paths[0]) as toy, open_cache(ref.paths[0]) as bert:
        assert toy.done.all() and toy.num_layers == 3
        np.testing.assert_array_equal(toy.pooled("mean"), bert.pooled("mean"))  # the same weights ran
    df = run_probe(res.paths, tmp_path / "probe", probe="toy-ridge", progress=False)
    assert set(df["probe"]) == {"toy-ridge"} and sorted(df["layer"].unique()) == [0, 1, 2]


def test_an_unsupported_model_type_fails_with_one_line_before_any_item_is_read(tiny_bert, tmp_path, capsys):
    from featx.cli.main import main

    model = _retyped_bert(tiny_bert, tmp_path / "bart", "bart")  # a real type with no family: not text by default
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "text": ["x"]}).to_csv(manifest, index=False)
    code = main(["extract", str(manifest), "--model", model, "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "model type 'bart' is not supported" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_block_paths_come_from_the_registry(tiny_bert, tiny_clip, tiny_wavlm, tmp_path):
    from featx.encoders import load_encoder

    for path in (tiny_bert, tiny_clip, tiny_wavlm):
        model = load_encoder(path).model
        obj = model
        for part in block_path(load_config(path), model).split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, torch.nn.ModuleList) and len(obj) == 2
    from transformers import AlbertConfig, DistilBertConfig

    assert block_path(DistilBertConfig()) == "transformer.layer"
    with pytest.raises(FeatxError, match="cannot be fine-tuned"):
        block_path(AlbertConfig())


MISSPELLED = [
    ("/no/such/dir/tiny-clp", "model folder '/no/such/dir/tiny-clp' does not exist"),
    ("./tiny-clp", "does not exist"),
    ("~/models/tiny-clp", "does not exist"),
    ("a/b/c", "does not exist"),
    ("tiny clip", "neither an existing folder nor a valid hub id"),
    ("org/x..y", "neither an existing folder nor a valid hub id"),
]


@pytest.mark.parametrize("name,expect", MISSPELLED)
def test_a_misspelled_folder_or_impossible_hub_id_is_named_in_one_line(name, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeatxError, match=re.escape(expect)) as e:
        load_config(name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,expect", [MISSPELLED[1], MISSPELLED[4]])
def test_a_misspelled_folder_fails_online_as_fast_as_any_usage_error(name, expect, tmp_path, tiny_bert):
    # Online, with no network: the old code asked the hub (and retried for ~30 s) before failing. Timed against
    # a usage error found right after the config is read (a start of the same program on the same machine),
    # so that a loaded machine does not make it fail.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "image": ["x.png"]}).to_csv(manifest, index=False)

    def run(model):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "featx", "extract", str(manifest), "--model", model, "--out",
                            str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=env,
                           cwd=str(tmp_path))
        return r, time.perf_counter() - t

    base, base_seconds = run(tiny_bert)
    assert base.returncode == 1 and "'text' column" in base.stderr, base.stderr
    r, seconds = run(name)
    assert r.returncode == 1 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert seconds < base_seconds + 10


def test_loading_a_model_leaves_the_progress_bar_setting_as_it_was(tiny_bert):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from featx.encoders import load_encoder

    hf_logging.enable_progress_bar()
    load_encoder(tiny_bert)
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        load_encoder(tiny_bert)
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
