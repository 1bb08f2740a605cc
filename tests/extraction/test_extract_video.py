"""featx extract on a `video` column: frames through the image encoder, the audio track through WavLM."""
import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract
from featx.cache import open_cache

pytest.importorskip("av")


def test_video_items_pool_frames_and_read_the_audio_track(tmp_path, tiny_clip, tiny_wavlm):
    from featx.data.video import build_tiny_video, video_audio, video_frames
    build_tiny_video(str(tmp_path / "a.mkv"), seconds=2.0, fps=10)
    build_tiny_video(str(tmp_path / "silent.mkv"), seconds=1.0, fps=10, tone_hz=None)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    pd.DataFrame({"id": ["a", "a-seg", "a-one", "silent", "junk"],
                  "video": ["a.mkv", "a.mkv", "a.mkv", "silent.mkv", "junk.mp4"],
                  "start": [None, 0.5, 0.0, None, None], "end": [None, 1.5, 0.2, None, None]}).to_csv(
        tmp_path / "m.csv", index=False)
    res = extract(tmp_path / "m.csv", [tiny_clip, tiny_wavlm], tmp_path / "out", pool=["mean", "cls"],
                  dtype="float32", device="cpu", seq=True, progress=False)
    image, audio = (open_cache(p) for p in res.paths)
    assert image.modality == "video" and audio.modality == "audio"
    err_i, err_a = dict(zip(image.ids, image.error)), dict(zip(audio.ids, audio.error))
    assert err_i["a"] == err_i["silent"] == "" and "junk.mp4" in err_i["junk"]
    assert "no audio track" in err_a["silent"] and err_a["a"] == ""
    # per item: the mean over frames of each frame's pooled value; --seq keeps one row per frame
    from transformers import AutoImageProcessor, CLIPModel
    proc, model = AutoImageProcessor.from_pretrained(tiny_clip), CLIPModel.from_pretrained(tiny_clip).vision_model
    for row, (item, start, end) in enumerate([("a", None, None), ("a-seg", 0.5, 1.5), ("a-one", 0.0, 0.2)]):
        frames, _ = video_frames(str(tmp_path / "a.mkv"), fps=3.0, start=start, end=end)
        assert len(frames) == (1 if item == "a-one" else 6 if item == "a" else 3)
        with torch.no_grad():
            hs = model(**proc(images=frames, return_tensors="pt"), output_hidden_states=True).hidden_states
        cls = torch.stack([h[:, 0] for h in hs], dim=1).numpy()  # (F, L, D)
        mean = torch.stack([h.mean(1) for h in hs], dim=1).numpy()
        k = list(image.ids).index(item)
        assert np.abs(image.pooled("cls", only_done=False)[k] - cls.mean(0)).max() <= 1e-4
        assert np.abs(image.pooled("mean", only_done=False)[k] - mean.mean(0)).max() <= 1e-4
        assert image.sequence(k).shape == cls.shape  # one row per frame, a one-frame video too
        assert np.abs(image.sequence(k) - cls).max() <= 1e-4
    assert len(video_frames(str(tmp_path / "a.mkv"), fps=3.0)[0]) == 6
    # the audio track, resampled to the model's 16 kHz, is what WavLM saw
    k = list(audio.ids).index("a-seg")
    assert audio.sequence(k).shape[0] > 0
    wav = video_audio(str(tmp_path / "a.mkv"), 16000, start=0.5, end=1.5)
    assert abs(wav.shape[0] - 16000) <= 160
    image.close()
    audio.close()
