"""LayerDrop does not reach extraction: a checkpoint whose config sets layerdrop (here 0.5) skips blocks at random
in train mode only, and extract runs the model in eval mode, so every run caches every layer, the same values each
time, equal to a plain eval-mode transformers forward of each item alone."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract
from featx.cache import open_cache

TOL = 1e-4


@pytest.fixture()
def wavlm_layerdrop(tmp_path):
    from featx.demo.tiny import build_tiny_wavlm, quiet_libraries

    with quiet_libraries():
        path = build_tiny_wavlm(str(tmp_path / "wavlm-layerdrop"))
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["layerdrop"] = 0.5
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


def _eval_forward(model, fe, path):
    """Mean over frames of every hidden state of one file alone, the model in eval mode."""
    import soundfile as sf
    import torchaudio.functional as AF

    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = torch.from_numpy(x.mean(1))
    x = AF.resample(x, sr, fe.sampling_rate) if sr != fe.sampling_rate else x
    inputs = fe(x.numpy(), sampling_rate=fe.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        hs = model(inputs["input_values"], output_hidden_states=True).hidden_states
    return np.stack([h[0].mean(0).numpy() for h in hs])


def test_extraction_of_a_layerdrop_checkpoint_is_the_eval_forward_every_time(wavlm_layerdrop, media, tmp_path):
    from transformers import AutoFeatureExtractor, AutoModel

    model = AutoModel.from_pretrained(wavlm_layerdrop)
    assert model.config.layerdrop == 0.5
    x = torch.randn(1, 8000)
    with torch.no_grad():   # not vacuous: in train mode this checkpoint returns fewer hidden states at times
        counts = set()
        for seed in range(10):
            torch.manual_seed(seed)
            counts.add(len(model.train()(x, output_hidden_states=True).hidden_states))
    assert min(counts) < 3, counts
    model.eval()

    runs = [extract(media, [wavlm_layerdrop], tmp_path / f"run{k}", dtype="float32", batch_size=3, device="cpu",
                    progress=False) for k in range(2)]
    assert all(r.failed == 0 for r in runs)
    with open_cache(runs[0].paths[0]) as a, open_cache(runs[1].paths[0]) as b:
        assert a.num_layers == b.num_layers == 3 and a.done.all() and b.done.all()
        first, second = a.pooled("mean"), b.pooled("mean")
    np.testing.assert_array_equal(first, second)
    fe = AutoFeatureExtractor.from_pretrained(wavlm_layerdrop)
    base = os.path.dirname(media)
    for k, row in enumerate(pd.read_csv(media).to_dict("records")):
        ref = _eval_forward(model, fe, os.path.join(base, row["audio"]))
        assert np.abs(first[k] - ref).max() <= TOL, row["id"]
