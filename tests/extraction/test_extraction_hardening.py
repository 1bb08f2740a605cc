"""Extraction on hostile input: FIFOs, still images named .mp4, huge images, long and mis-scaled audio, caches
that are already complete (read-only output), and manifests that share a stem."""
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

from featx import extract
from featx.cache import open_cache
from featx.data.media import load_audio, load_image
from featx.errors import FeatxError, MediaError

from conftest import write_png, write_wav

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _errors(path):
    with open_cache(path) as c:
        return dict(zip(c.ids, c.error)), dict(zip(c.ids, c.done))


# ---------------------------------------------------------------- non-regular files (issue 13.4)
def test_a_fifo_as_media_fails_per_item_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    script = textwrap.dedent(f"""
        from featx.data.media import load_audio, load_image
        from featx.extraction.decode import Decoder
        from featx.errors import FeatxError, MediaError
        for call in (lambda: load_audio({str(fifo)!r}, 16000), lambda: load_image({str(fifo)!r})):
            try:
                call()
            except MediaError as e:
                print("refused:", e)
        print("estimate:", Decoder("audio", "audio", 16000).estimate({{"audio": {str(fifo)!r}}}))
        try:
            from featx.data.video import video_frames
            video_frames({str(fifo)!r})
        except ImportError:
            print("refused: no PyAV")
        except MediaError as e:
            print("refused:", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("refused:") == 3 and "estimate: 0.0" in r.stdout
    assert r.stdout.count("not a regular file") >= 2


def test_extract_over_a_fifo_ends_with_the_item_failed(tmp_path, tiny_wavlm):
    os.mkfifo(tmp_path / "pipe.wav")
    write_wav(tmp_path / "ok.wav", 0.5)
    pd.DataFrame({"id": ["pipe", "ok"], "audio": ["pipe.wav", "ok.wav"]}).to_csv(tmp_path / "m.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "featx", "extract", str(tmp_path / "m.csv"), "--model", tiny_wavlm,
                        "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors, done = _errors(tmp_path / "out" / "m__tiny-wavlm.h5")
    assert "not a regular file" in errors["pipe"] and done["ok"]


# ---------------------------------------------------------------- video with no frames (issue 13.2)
def test_a_still_image_named_mp4_fails_with_a_reason(tmp_path, tiny_clip):
    pytest.importorskip("av")
    from featx.data.video import video_frames

    write_png(tmp_path / "still.png")
    shutil.copy(tmp_path / "still.png", tmp_path / "still.mp4")
    with pytest.raises(MediaError, match="no video frame"):
        video_frames(str(tmp_path / "still.mp4"))
    pd.DataFrame({"id": ["still"], "video": ["still.mp4"]}).to_csv(tmp_path / "m.csv", index=False)
    for _ in range(2):  # a re-run retries it, and fails it again
        res = extract(tmp_path / "m.csv", [tiny_clip], tmp_path / "out", device="cpu", progress=False)
        assert res.caches[0]["failed"] == 1 and res.caches[0]["pending"] == 0
    assert "no video frame" in _errors(res.paths[0])[0]["still"]


# ---------------------------------------------------------------- images (issue 13.5)
def test_an_image_over_the_pixel_budget_is_refused_before_it_is_decoded(tmp_path, tiny_clip, media):
    from PIL import Image

    Image.new("L", (10001, 10001)).save(tmp_path / "huge.png")  # 100.02 Mpx, a few hundred KB on disk
    t = time.perf_counter()
    with pytest.raises(MediaError, match="over the budget of 100 Mpx"):
        load_image(str(tmp_path / "huge.png"))
    assert time.perf_counter() - t < 1.0  # the header only: decoding takes seconds and 300 MB
    assert load_image(str(tmp_path / "huge.png"), max_pixels=None).size == (10001, 10001)
    res = extract(media, [tiny_clip], tmp_path / "out", device="cpu", progress=False, max_image_pixels=1500)
    errors, done = _errors(res.paths[0])
    sizes = {f"u{k}": (30 + 7 * k) * (20 + 5 * k) for k in range(8)}  # the fixture's image sizes
    assert {i for i, e in errors.items() if "over the budget" in e} == {i for i, s in sizes.items() if s > 1500}
    assert all(done[i] for i, s in sizes.items() if s <= 1500)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_the_processor_still_downscales(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    full = load_image(str(tmp_path / "big.jpg"))
    small = load_image(str(tmp_path / "big.jpg"), shortest_side=224)
    assert full.size == (2000, 1500) and small.size == (1000, 750)  # 1/2 keeps the short side >= 2 x 224
    assert load_image(str(tmp_path / "big.jpg"), shortest_side=700).size == (2000, 1500)  # 1/2 would be < 1400
    a = np.asarray(full.resize((224, 168), Image.BICUBIC), np.float32)
    b = np.asarray(small.resize((224, 168), Image.BICUBIC), np.float32)
    assert np.abs(a - b).mean() < 8  # the same picture after the processor's resize, up to JPEG's DCT scaling


# ---------------------------------------------------------------- audio (issues 13.6 and 13.15)
def test_long_audio_is_read_window_by_window(tmp_path):
    import tracemalloc

    import soundfile as sf

    from featx.data.media import audio_windows, resample

    rate, seconds = 48000, 120
    t = np.arange(rate * seconds) / rate
    x = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    sf.write(tmp_path / "long.wav", x.astype(np.float32), rate, subtype="PCM_16")
    del x, t
    decoded_whole = rate * seconds * 2 * 4  # float32 stereo: what reading the whole file allocates
    tracemalloc.start()
    windows = audio_windows(str(tmp_path / "long.wav"), 16000, max_seconds=10, whole_bytes=8 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [len(w) for w in windows] == [16000 * 10] * 12
    assert peak < 0.4 * decoded_whole, peak
    # the windows are the whole file's resampled samples, split as before, up to float rounding
    whole = resample(sf.read(tmp_path / "long.wav", dtype="float32")[0].mean(axis=1), rate, 16000)
    np.testing.assert_allclose(np.concatenate(windows), whole, rtol=0, atol=1e-6)
    assert audio_windows(str(tmp_path / "long.wav"), 16000, max_seconds=10)[0].shape == (160000,)  # 46 MB: whole


@pytest.mark.parametrize("rate", [16000, 22050, 44100])
@pytest.mark.parametrize("whole_bytes", [0, 1 << 30])  # read window by window, or whole
def test_audio_windows_equal_the_whole_file_split_in_equal_parts(tmp_path, rate, whole_bytes):
    from featx.data.media import audio_windows

    path = write_wav(tmp_path / "a.wav", 5.3, rate=rate, channels=2)
    whole = load_audio(path, 16000, start=0.2, end=5.1)
    windows = audio_windows(path, 16000, start=0.2, end=5.1, max_seconds=1.0, whole_bytes=whole_bytes)
    parts = np.array_split(whole, int(np.ceil(len(whole) / 16000)))
    assert [len(w) for w in windows] == [len(p) for p in parts]
    for w, p in zip(windows, parts):
        np.testing.assert_allclose(w, p, rtol=0, atol=0 if whole_bytes else 1e-6)


def test_audio_samples_beyond_a_sane_amplitude_fail_the_item(tmp_path, tiny_wavlm):
    import soundfile as sf

    x = np.full(8000, 1e30, np.float32)
    sf.write(tmp_path / "loud.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(MediaError, match="beyond"):
        load_audio(str(tmp_path / "loud.wav"), 16000)
    write_wav(tmp_path / "ok.wav", 0.5)
    pd.DataFrame({"id": ["loud", "ok"], "audio": ["loud.wav", "ok.wav"]}).to_csv(tmp_path / "m.csv", index=False)
    res = extract(tmp_path / "m.csv", [tiny_wavlm], tmp_path / "out", device="cpu", progress=False)
    errors, done = _errors(res.paths[0])
    assert "beyond" in errors["loud"] and not done["loud"] and done["ok"]


# ---------------------------------------------------------------- nothing left to do (issue 13.9)
def test_a_complete_cache_loads_no_model_and_writes_nothing(tmp_path, tiny_bert, media):
    model = str(tmp_path / "tiny-bert")
    shutil.copytree(tiny_bert, model)
    out = tmp_path / "out"
    first = extract(media, [model], out, device="cpu", progress=False)
    os.remove(os.path.join(model, "model.safetensors"))  # loading the model would now fail
    before = (sorted(os.listdir(out)), os.stat(out).st_mtime_ns, os.stat(first.paths[0]).st_mtime_ns)
    if os.geteuid() != 0:  # root writes anywhere; the unchanged folder below shows nothing was written
        os.chmod(out, 0o555)
    try:
        r = subprocess.run([sys.executable, "-m", "featx", "extract", media, "--model", model, "--out", str(out),
                            "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=120,
                           env=ENV)
    finally:
        os.chmod(out, 0o755)
    assert r.returncode == 0 and "8 done, 0 failed" in r.stderr, r.stderr[-2000:]
    assert (sorted(os.listdir(out)), os.stat(out).st_mtime_ns, os.stat(first.paths[0]).st_mtime_ns) == before
    # other settings are refused (before the model loads); with --overwrite they need the model
    with pytest.raises(FeatxError, match="manifest__tiny-bert.h5 was made with different settings: poolings"):
        extract(media, [model], out, device="cpu", progress=False, pool=["mean", "cls"])
    with pytest.raises(Exception, match="weights|model"):
        extract(media, [model], out, device="cpu", progress=False, pool=["mean", "cls"], overwrite=True)


def test_a_complete_siglip2_cache_loads_no_model(tmp_path, media):
    """SigLIP 2 makes its own per-image inputs, so it runs the processor path whatever --image-preprocess says
    (as does a processor without torchvision) and its cache records that path: a resume of the complete cache,
    with either --image-preprocess, is told done without the weights; other settings are refused before the
    model loads, and with --overwrite need it."""
    from tiny_models.image import build_siglip2

    model = build_siglip2(str(tmp_path / "siglip2"))
    out = tmp_path / "out"
    first = extract(media, [model], out, device="cpu", progress=False, num_workers=0)
    with open_cache(first.paths[0]) as c:
        assert c.attrs["image_preprocess"] == "processor" and c.done.all()
    os.remove(os.path.join(model, "model.safetensors"))  # loading the model would now fail
    stamp = os.stat(first.paths[0]).st_mtime_ns
    for preprocess in ("batched-torch", "processor"):
        again = extract(media, [model], out, device="cpu", progress=False, num_workers=0,
                        image_preprocess=preprocess)
        assert again.caches[0]["done"] == 8 and again.failed == 0
    assert os.stat(first.paths[0]).st_mtime_ns == stamp
    with pytest.raises(FeatxError, match="dtype 'float16' \\(now 'float32'\\)"):  # other settings: refused
        extract(media, [model], out, device="cpu", progress=False, num_workers=0, dtype="float32")
    with pytest.raises(Exception, match="weights|model"):  # ... or, with --overwrite, they need the model
        extract(media, [model], out, device="cpu", progress=False, num_workers=0, dtype="float32", overwrite=True)


# ---------------------------------------------------------------- cache names (issue 12.17)
def test_manifests_that_share_a_stem_get_caches_of_their_own(tmp_path, tiny_bert):
    from featx.extraction.pipeline import cache_path

    pd.DataFrame({"id": ["a", "b"], "text": ["good", "bad"]}).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame({"id": ["c", "d", "e"], "text": ["fun", "sad", "ok"]}).to_json(
        tmp_path / "m.jsonl", orient="records", lines=True)
    a = extract(tmp_path / "m.csv", [tiny_bert], tmp_path / "out", device="cpu", progress=False)
    b = extract(tmp_path / "m.jsonl", [tiny_bert], tmp_path / "out", device="cpu", progress=False)
    assert os.path.basename(a.paths[0]) == "m__tiny-bert.h5"  # CSV caches keep their names
    assert os.path.basename(b.paths[0]) == "m.jsonl__tiny-bert.h5"
    with open_cache(a.paths[0]) as x, open_cache(b.paths[0]) as y:
        assert list(x.ids) == ["a", "b"] and list(y.ids) == ["c", "d", "e"] and x.done.all() and y.done.all()
    names = {cache_path(f"/d/{n}", "bert", "o") for n in ("m.csv", "m.jsonl", "m.parquet", "m.jsonl.csv", "m.tsv")}
    assert len(names) == 5
