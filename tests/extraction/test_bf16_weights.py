"""--precision bf16-weights: the whole model in bf16 (as transformers' dtype=torch.bfloat16), for extraction only.

It runs on the CPU too, so its path (weights loaded in bf16, floating inputs cast to them, pooling in float32)
is tested here on tiny real models of each modality against the fp32 extract of the same items."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from featx import extract
from featx.cache import open_cache
from featx.encoders import load_encoder
from featx.errors import FeatxError

# bf16 keeps 8 significant bits: on these 2-layer models each stored layer is within 1% of its largest fp32
# value (0.2-0.85% measured over every family); real-size models drift further (the closing notes give figures)
REL_TOL = 0.02


@pytest.fixture(scope="module")
def tiny_models(tiny_bert, tiny_clip_vision, tiny_wavlm):
    return [tiny_bert, tiny_clip_vision, tiny_wavlm]


def test_bf16_weights_loads_the_model_in_bf16_and_casts_only_floating_inputs(tiny_wavlm):
    enc = load_encoder(tiny_wavlm, precision="bf16-weights")
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert enc.to_device(torch.zeros(2, 3)).dtype == torch.bfloat16
    assert enc.to_device(torch.zeros(2, 3, dtype=torch.long)).dtype == torch.long  # masks and ids as they are
    assert load_encoder(tiny_wavlm).to_device(torch.zeros(2, 3)).dtype == torch.float32


def test_bf16_weights_stores_values_close_to_fp32_for_every_modality(tmp_path, media, tiny_models, one_torch_thread):
    fp32 = extract(media, tiny_models, tmp_path / "fp32", device="cpu", dtype="float32", progress=False)
    half = extract(media, tiny_models, tmp_path / "bf16w", device="cpu", dtype="float32", precision="bf16-weights",
                   progress=False)
    assert fp32.failed == half.failed == 0
    for a_path, b_path in zip(fp32.paths, half.paths):
        with open_cache(a_path) as a, open_cache(b_path) as b:
            assert (a.attrs["precision"], b.attrs["precision"]) == ("fp32", "bf16-weights")
            for layer in range(a.num_layers):
                x, y = a.layer(layer), b.layer(layer)
                scale = np.abs(x).max()
                assert 0 < np.abs(x - y).max() <= REL_TOL * scale, (a.attrs["modality"], layer)


def test_a_cache_made_in_bf16_weights_is_not_resumed_in_fp32(tmp_path, media, tiny_bert):
    extract(media, [tiny_bert], tmp_path / "o", device="cpu", precision="bf16-weights", progress=False)
    with pytest.raises(FeatxError, match="precision"):
        extract(media, [tiny_bert], tmp_path / "o", device="cpu", precision="fp32", progress=False)


def test_fine_tuning_refuses_bf16_weights_in_one_line(tmp_path, media, tiny_bert):
    from featx.finetune import finetune
    with pytest.raises(FeatxError, match="bf16-weights is for extraction only"):
        finetune(media, [tiny_bert], tmp_path / "ft", precision="bf16-weights", device="cpu", progress=False)
    r = subprocess.run([sys.executable, "-m", "featx", "finetune", media, "--model", tiny_bert, "--out", str(tmp_path / "ft2"),
                        "--precision", "bf16-weights"], capture_output=True, text=True)
    assert r.returncode == 1 and "bf16-weights is for extraction only" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

