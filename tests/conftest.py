"""Shared fixtures: tiny real models saved with their processors, and small media files on disk."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_bert(models_dir):
    from featx.demo.tiny import build_tiny_bert
    return build_tiny_bert(str(models_dir / "tiny-bert"))


@pytest.fixture(scope="session")
def tiny_clip(models_dir):
    from featx.demo.tiny import build_tiny_clip
    return build_tiny_clip(str(models_dir / "tiny-clip"))


@pytest.fixture(scope="session")
def tiny_clip_vision(models_dir):
    from featx.demo.tiny import build_tiny_clip
    return build_tiny_clip(str(models_dir / "tiny-clip-vision"), vision_only=True)


@pytest.fixture(scope="session")
def tiny_wavlm(models_dir):
    from featx.demo.tiny import build_tiny_wavlm
    return build_tiny_wavlm(str(models_dir / "tiny-wavlm"))


@pytest.fixture(scope="session")
def tiny_wavlm_group(models_dir):
    from featx.demo.tiny import build_tiny_wavlm
    return build_tiny_wavlm(str(models_dir / "tiny-wavlm-group"), norm="group")


def write_wav(path, seconds, rate=16000, channels=1, freq=220.0, seed=0):
    """A tone plus a little noise, written with soundfile (PCM16)."""
    import soundfile as sf
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.shape)
    if channels > 1:
        x = np.stack([x * (1 + 0.1 * c) for c in range(channels)], axis=1)
    sf.write(str(path), x.astype(np.float32), rate)
    return str(path)


def write_png(path, seed=0, size=(40, 30)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(str(path))
    return str(path)


@pytest.fixture()
def media(tmp_path):
    """A small manifest of texts, images and audio files of varied lengths, with labels and splits."""
    import pandas as pd
    d = tmp_path / "data"
    d.mkdir()
    words = ["good movie", "the film was awful and boring", "i love it", "bad", "great fun, wonderful",
             "this is not very good at all, i hate that movie", "ok", "funny and happy"]
    rows = []
    for k, text in enumerate(words):
        rows.append({"id": f"u{k}", "text": text, "image": f"img{k}.png", "audio": f"a{k}.wav",
                     "label": float(k % 3 - 1), "split": ["train", "dev", "test"][k % 3]})
        write_png(d / f"img{k}.png", seed=k, size=(30 + 7 * k, 20 + 5 * k))
        write_wav(d / f"a{k}.wav", 0.3 + 0.17 * k, rate=[16000, 22050, 8000][k % 3], channels=1 + k % 2, seed=k)
    path = d / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.fixture()
def one_torch_thread():
    """Torch on one thread: the tiny fits here are far slower with two threads on two busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
