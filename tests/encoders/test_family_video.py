"""Native video encoders (VideoMAE, V-JEPA 2, X-CLIP's vision tower) through featx.extract: one clip of the
model's frame count per item, each stored layer equal to a direct transformers forward of the same clip."""
import functools

import numpy as np
import pandas as pd
import pytest
import torch

av = pytest.importorskip("av")

from featx import extract  # noqa: E402
from featx.cache import open_cache  # noqa: E402
from featx.data.video import CLIP_SAMPLING, video_clip  # noqa: E402
from featx.encoders import family_of, load_config  # noqa: E402
from tiny_models.video import BUILDERS, FRAMES  # noqa: E402

FAMILIES = sorted(BUILDERS)
# id -> (file, start, end): whole videos of several lengths and sizes, two segments of one file, one video
# shorter than a clip (frames repeat), and two that fail as items.
ITEMS = {"long": ("long.mp4", None, None), "seg-a": ("long.mp4", 0.0, 1.0), "seg-b": ("long.mp4", 2.0, 3.0),
         "wide": ("wide.mp4", None, None), "tall": ("tall.mp4", 0.2, 1.1), "short": ("short.mp4", None, None),
         "junk": ("junk.mp4", None, None), "missing": ("missing.mp4", None, None)}
BAD = ("junk", "missing")


def write_video(path, seconds, size, fps=10, seed=0):
    """A textured video (a moving pattern plus noise, so resizing and cropping matter) written with PyAV."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[:height, :width]
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(round(seconds * fps)):
        base = np.stack([(x * 4 + i * 9) % 256, (y * 5 + i * 3) % 256, ((x + y) * 3 + i * 17) % 256], -1)
        frame = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
    container.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("video_models")
    return {name: BUILDERS[name](str(d / name)) for name in FAMILIES}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, models):
    """The manifest and the caches of every family, extracted at batch size 1 and 8 (the latter with --seq)."""
    d = tmp_path_factory.mktemp("video_data")
    write_video(d / "long.mp4", 3.0, (64, 48), seed=1)
    write_video(d / "wide.mp4", 1.5, (80, 40), seed=2)
    write_video(d / "tall.mp4", 1.2, (40, 56), seed=3)
    write_video(d / "short.mp4", 0.2, (48, 48), seed=4)  # 2 frames for a 4-frame clip
    (d / "junk.mp4").write_bytes(b"not a video at all" * 50)
    pd.DataFrame({"id": list(ITEMS), "video": [f for f, _, _ in ITEMS.values()],
                  "start": [s for _, s, _ in ITEMS.values()], "end": [e for _, _, e in ITEMS.values()],
                  "label": [i % 2 for i in range(len(ITEMS))]}).to_csv(d / "m.csv", index=False)
    paths = list(models.values())
    one = extract(d / "m.csv", paths, d / "b1", pool=["mean", "cls"], dtype="float32", batch_size=1,
                  device="cpu", progress=False)
    eight = extract(d / "m.csv", paths, d / "b8", pool=["mean", "cls"], dtype="float32", batch_size=8,
                    device="cpu", progress=False, seq=True)
    return d, dict(zip(FAMILIES, one.paths)), dict(zip(FAMILIES, eight.paths)), eight


@functools.lru_cache(maxsize=None)
def checkpoint(family, path):
    """(processor, model) of a family's tiny checkpoint, loaded with transformers' own classes."""
    import transformers as tf

    processor, model = {"videomae": (tf.VideoMAEImageProcessor, tf.VideoMAEModel),
                        "vjepa2": (tf.AutoVideoProcessor, tf.VJEPA2Model),
                        "xclip-vision": (tf.AutoImageProcessor, tf.XCLIPModel)}[family]
    return processor.from_pretrained(path), model.from_pretrained(path).eval()


def reference(family, path, frames):
    """Per layer, what featx must store for one clip (F, H, W, 3) uint8, from transformers alone:
    {'mean': (L, D), 'cls': (L, D) or None, 'seq': (T, L, D)}."""
    processor, model = checkpoint(family, path)
    with torch.no_grad():
        if family == "videomae":
            pixels = processor(list(frames), return_tensors="pt")
            hs = model(**pixels, output_hidden_states=True).hidden_states
        elif family == "vjepa2":
            pixels = processor(frames, return_tensors="pt")
            hs = model(**pixels, skip_predictor=True, output_hidden_states=True).hidden_states
        else:  # X-CLIP's own video path: the vision tower's hidden states over the clip's frames (F, 1+P, D)
            pixels = processor(list(frames), return_tensors="pt")
            frame_hs = model.get_video_features(**pixels, output_hidden_states=True).hidden_states
            hs = [h.reshape(1, -1, h.shape[-1]) for h in frame_hs]  # (1, F*(1+P), D), frame by frame
    seq = torch.stack([h[0] for h in hs], dim=1).numpy()
    cls = torch.stack([h[:, 0].mean(0) for h in frame_hs]).numpy() if family == "xclip-vision" else None
    return {"mean": seq.mean(0), "cls": cls, "seq": seq}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layer_equals_a_direct_forward_of_the_sampled_clip(family, models, caches, record_property):
    d, one, eight, _ = caches
    with open_cache(one[family]) as c1, open_cache(eight[family]) as c8:
        assert c1.modality == "video" and c1.attrs["source_column"] == "video"
        assert int(c1.attrs["num_frames"]) == FRAMES and c1.attrs["clip_sampling"] == CLIP_SAMPLING
        poolings = ["mean"] if family in ("videomae", "vjepa2") else ["mean", "cls"]
        assert list(c1.poolings) == poolings
        equal = batch = 0.0
        for k, item in enumerate(c1.ids):
            if item in BAD:
                continue
            file, start, end = ITEMS[item]
            frames, _ = video_clip(str(d / file), FRAMES, start=start, end=end)
            want = reference(family, models[family], frames)
            for pooling in poolings:
                got1, got8 = c1.pooled(pooling, only_done=False)[k], c8.pooled(pooling, only_done=False)[k]
                assert got1.shape == want[pooling].shape
                equal = max(equal, float(np.abs(got1 - want[pooling]).max()))
                batch = max(batch, float(np.abs(got1 - got8).max()))
            assert c8.sequence(k).shape == want["seq"].shape
            equal = max(equal, float(np.abs(c8.sequence(k) - want["seq"]).max()))
    record_property("max_abs_diff", {"family": family, "vs_transformers": equal, "batch1_vs_8": batch})
    print(f"\n{family}: max abs diff vs transformers {equal:.2e}, batch 1 vs 8 {batch:.2e}")
    assert equal <= 1e-4
    assert batch <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_files_fail_as_items_and_segments_differ(family, caches):
    _, one, _, _ = caches
    with open_cache(one[family]) as c:
        errors = dict(zip(c.ids, c.error))
        assert "junk.mp4" in errors["junk"] and "missing.mp4" in errors["missing"]
        assert all(errors[i] == "" for i in ITEMS if i not in BAD)
        mean = dict(zip(c.ids, c.pooled("mean", only_done=False)))
        # two segments of one file, and a segment against its whole file, give different values at every layer
        for a, b in (("seg-a", "seg-b"), ("seg-a", "long")):
            assert np.abs(mean[a] - mean[b]).max(axis=1).min() > 1e-3


def test_a_rerun_resumes_and_a_finished_cache_needs_no_model(models, caches, tmp_path):
    d, _, eight, result = caches
    assert [c["failed"] for c in result.caches] == [len(BAD)] * len(FAMILIES)
    again = extract(d / "m.csv", list(models.values()), d / "b8", pool=["mean", "cls"], dtype="float32",
                    batch_size=8, device="cpu", progress=False, seq=True)  # same settings: the bad items retried
    assert again.paths == [eight[f] for f in FAMILIES]
    assert [(c["done"], c["failed"]) for c in again.caches] == [(len(ITEMS) - len(BAD), len(BAD))] * len(FAMILIES)
    # the clip settings (num_frames, clip_sampling) are known from the config: a complete cache is not reopened
    # with the model, so a checkpoint whose weights are gone still reports it done
    import shutil

    model = shutil.copytree(models["videomae"], tmp_path / "videomae")
    pd.read_csv(d / "m.csv").iloc[:2].assign(video=lambda df: [str(d / v) for v in df.video]).to_csv(
        tmp_path / "ok.csv", index=False)
    first = extract(tmp_path / "ok.csv", model, tmp_path / "out", device="cpu", progress=False)
    (model / "model.safetensors").unlink()
    second = extract(tmp_path / "ok.csv", model, tmp_path / "out", device="cpu", progress=False)
    assert first.caches[0]["done"] == second.caches[0]["done"] == 2


def test_the_families_are_registered_as_video_encoders(models):
    for name, path in models.items():
        family = family_of(load_config(path))
        assert (family.name, family.modality) == (name, "video")
