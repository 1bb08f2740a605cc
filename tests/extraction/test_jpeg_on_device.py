"""JPEGs decoded on the model's device (image_decode "device"): which files the workers hand over undecoded, the
pixels and hidden states against the checkpoint's processor and the workers' Pillow path, a file no decoder takes
failing alone, and the decoder as a setting of the cache. On the CPU the device's decoder is torchvision's
libjpeg-turbo in the main process; nvJPEG on CUDA is checked by tests/benchmarks/check_cuda_paths.py."""

import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract
from featx.cache import describe, open_cache
from featx.data.media import load_image
from featx.encoders import load_encoder
from featx.errors import FeatxError, MediaError
from featx.predict import extraction_options

PIXEL_TOL = 1e-5  # the same libjpeg-turbo decode on both sides; the processor's kernels as on the batched path
HIDDEN_TOL = 1e-5


def _image(seed, size):
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, size[1] // 8), max(2, size[0] // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _save(image, path, **kw):
    image.save(str(path), **kw)
    return str(path)


def _broken_huffman(path, good):
    """A JPEG whose header opens (Pillow reads no Huffman table to open it) but whose Huffman table is bogus."""
    data = bytearray(open(good, "rb").read())
    at = data.find(b"\xff\xc4")
    for k in range(at + 5, at + 25):
        data[k] = 0xFF if k % 2 else 0x00
    path.write_bytes(bytes(data))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("jpeg-on-device")
    f = {"baseline": _save(_image(0, (200, 150)), d / "a.jpg", quality=90),
         "gray": _save(_image(1, (48, 40)).convert("L"), d / "g.jpg"),
         "small": _save(_image(2, (33, 47)), d / "s.jpg"),
         "progressive": _save(_image(3, (64, 48)), d / "p.jpg", progressive=True),
         "cmyk": _save(_image(4, (40, 40)).convert("CMYK"), d / "c.jpg"),
         "png": _save(_image(5, (50, 30)), d / "i.png")}
    data = open(f["small"], "rb").read()
    (d / "t.jpg").write_bytes(data[:len(data) // 2])  # truncated: no end-of-image marker
    f["truncated"] = str(d / "t.jpg")
    f["bogus"] = _broken_huffman(d / "b.jpg", f["small"])
    return f


@pytest.fixture(scope="module")
def on_device(tiny_clip_vision):
    return load_encoder(tiny_clip_vision, image_decode="device")


def test_workers_hand_over_the_bytes_of_baseline_jpegs_only(files):
    for name in ("baseline", "gray", "small"):
        got = load_image(files[name], jpeg_bytes=True)
        assert got.dtype == np.uint8 and got.ndim == 1 and got.tobytes() == open(files[name], "rb").read()
    for name in ("progressive", "cmyk", "png"):  # Pillow decodes them in the workers, to RGB
        got = load_image(files[name], jpeg_bytes=True)
        assert got.mode == "RGB", name
    with pytest.raises(MediaError, match="cannot decode image t.jpg"):  # a truncated file fails in the worker
        load_image(files["truncated"], jpeg_bytes=True)
    with pytest.raises(MediaError, match="over the budget"):  # the pixel budget is checked from the header
        load_image(files["baseline"], max_pixels=100, jpeg_bytes=True)
    assert load_image(files["baseline"]).mode == "RGB"  # without jpeg_bytes: decoded, as before


def test_pixels_decoded_on_the_device_equal_the_checkpoint_processor_on_the_whole_image(files, on_device):
    from PIL import Image
    names = ("baseline", "gray", "small", "progressive", "png")
    inputs = [(k, on_device.preprocessor()(load_image(files[n], jpeg_bytes=True))) for k, n in enumerate(names)]
    assert sum(x.ndim == 1 for _, x in inputs) == 3  # three handed over as bytes, two decoded by Pillow
    admitted, failures = on_device.admit(inputs, batch_size=2)
    assert failures == [] and [i for i, _ in admitted] == list(range(5))
    got = on_device.collate([x for _, x in admitted])["pixel_values"]
    want = torch.stack([on_device.processor(images=Image.open(files[n]).convert("RGB"),
                                            return_tensors="pt")["pixel_values"][0] for n in names])
    assert got.shape == want.shape == (5, 3, 32, 32) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= PIXEL_TOL


def test_a_jpeg_no_decoder_takes_fails_alone(files, on_device):
    inputs = [(7, load_image(files["small"], jpeg_bytes=True)), (8, load_image(files["bogus"], jpeg_bytes=True)),
              (9, load_image(files["gray"], jpeg_bytes=True))]
    assert inputs[1][1].ndim == 1  # its header opens: it reaches the device's decoder
    admitted, failures = on_device.admit(inputs, batch_size=8)
    assert [i for i, _ in admitted] == [7, 9]
    assert len(failures) == 1 and failures[0][0] == 8 and failures[0][1].startswith("cannot decode the JPEG: ")


def _manifest(files, d, names):
    rows = [{"id": n, "image": files[n], "label": k % 2} for k, n in enumerate(names)]
    pd.DataFrame(rows).to_csv(d / "m.csv", index=False)
    return str(d / "m.csv")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_extraction_decoding_on_the_device_stores_what_the_workers_path_stores(files, tiny_clip_vision, tmp_path,
                                                                              num_workers):
    # the files too small for a reduced-scale decode (Pillow's draft, on the workers' path only) store equal values
    names = ["gray", "small", "progressive", "cmyk", "png", "bogus"]
    manifest = _manifest(files, tmp_path, names)
    kw = dict(pool=["mean", "cls"], dtype="float32", batch_size=2, device="cpu", progress=False,
              num_workers=num_workers)
    a = extract(manifest, [tiny_clip_vision], tmp_path / "a", **kw)
    b = extract(manifest, [tiny_clip_vision], tmp_path / "b", image_decode="device", **kw)
    assert a.failed == b.failed == 1  # the bogus JPEG, on both paths
    with open_cache(a.paths[0]) as ca, open_cache(b.paths[0]) as cb:
        assert ca.attrs["image_decode"] == "pil" and cb.attrs["image_decode"] == "torchvision"
        assert cb.error[list(cb.ids).index("bogus")].startswith("cannot decode")
        done = ca.done
        assert done.sum() == 5 and (cb.done == done).all()
        for p in ("mean", "cls"):
            assert np.abs(ca.pooled(p) - cb.pooled(p)).max() <= HIDDEN_TOL  # the done items


def test_the_decoder_is_a_setting_of_the_cache(files, tiny_clip_vision, tmp_path):
    manifest = _manifest(files, tmp_path, ["small", "png"])
    kw = dict(dtype="float32", batch_size=2, device="cpu", progress=False)
    first = extract(manifest, [tiny_clip_vision], tmp_path / "a", **kw)
    # said in the option's words (a user typed workers / device, not pil / torchvision), the decoder besides
    with pytest.raises(FeatxError) as refused:
        extract(manifest, [tiny_clip_vision], tmp_path / "a", image_decode="device", **kw)
    assert ("different settings: --image-decode workers, decoded with pil (now --image-decode device, decoded with "
            "torchvision); run with") in str(refused.value)
    assert "image_decode=pil (--image-decode workers)" in describe(first.paths[0])   # featx info
    again = extract(manifest, [tiny_clip_vision], tmp_path / "a", **kw)
    assert again.caches[0]["done"] == 2
    # the processor path makes pixels in the workers: JPEGs are decoded there, said on stderr, recorded as such
    c = extract(manifest, [tiny_clip_vision], tmp_path / "c", image_preprocess="processor", image_decode="device", **kw)
    with open_cache(c.paths[0]) as cache:
        assert cache.attrs["image_decode"] == "pil"


def test_predict_decodes_as_the_training_cache_did_and_says_when_it_cannot(capsys):
    block = {"encoder": "m", "extraction": {"dtype": "float16", "image_decode": "nvjpeg"}}
    options = extraction_options(block, "clf.safetensors", "cpu")
    assert options["image_decode"] == "device" and "image_decode" in options
    assert "decoded with torchvision here" in capsys.readouterr().err.replace("JPEGs are ", "")
    block = {"encoder": "m", "extraction": {"dtype": "float16", "image_decode": "pil"}}
    assert "image_decode" not in extraction_options(block, "clf.safetensors", "cpu")
    assert capsys.readouterr().err == ""


def test_the_advice_against_decoding_on_the_cpu_names_the_option_once_is_quiet_under_q_and_not_said_by_predict(
        files, tiny_clip_vision, tmp_path, capsys):
    # it said "image_decode device ... the workers decode faster" under -q on every run, and so did predict,
    # which has no --image-decode (it decodes as the classifier's training cache did)
    from featx.cli.main import main
    names = ["small", "gray", "baseline", "progressive", "png"] * 3
    rows = [{"id": f"x{k}", "image": files[n], "label": float(k % 4), "split": ["train", "train", "train", "dev",
                                                                                "test"][k % 5]}
            for k, n in enumerate(names)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    run = ["extract", str(tmp_path / "m.csv"), "--model", tiny_clip_vision, "--device", "cpu", "--image-decode",
           "device"]
    assert main([*run, "--out", str(tmp_path / "a")]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "decodes JPEGs in the main process" in line]
    assert said == [f"featx extract: {tiny_clip_vision}: --image-decode device on the CPU decodes JPEGs in the main "
                    "process, one by one; it is meant for CUDA (nvJPEG): --image-decode workers decodes faster on a "
                    "CPU"], said
    assert main([*run, "--out", str(tmp_path / "b"), "-q"]) == 0
    assert "JPEG" not in capsys.readouterr().err
    cache = str(tmp_path / "a" / "m__tiny-clip-vision.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--save-classifier", "-q"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.csv"), "--classifier",
                 str(tmp_path / "res" / "classifier__tiny-clip-vision.safetensors"), "--device", "cpu",
                 "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert "image-decode" not in err and "image_decode" not in err and "JPEG" not in err, err
    assert pd.read_csv(tmp_path / "p.csv")["prediction"].notna().all()


@pytest.mark.parametrize("where", ["forward", "decoding"])
def test_ctrl_c_keeps_the_groups_already_forwarded_and_a_resume_completes(files, tiny_clip_vision, tmp_path,
                                                                         monkeypatch, where):
    # 12 images in groups of 4 (batches of 2); Ctrl-C in the forward of the 4th batch, or while the device decodes
    # the 4th batch of JPEGs (a group's, before its forwards are queued)
    from featx.encoders.image import ImageEncoder
    from featx.extraction.batching import Runner
    names = ["small", "gray", "baseline", "progressive", "png", "small"] * 2
    rows = [{"id": f"x{k}", "image": files[n]} for k, n in enumerate(names)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    kw = dict(dtype="float32", batch_size=2, device="cpu", progress=False, group_size=4, image_decode="device")
    whole = extract(str(tmp_path / "m.csv"), [tiny_clip_vision], tmp_path / "whole", **kw).paths[0]
    owner, name = (Runner, "run_batch") if where == "forward" else (ImageEncoder, "_decode_jpegs")
    real, calls = getattr(owner, name), []

    def ctrl_c(self, arg):
        calls.append(len(arg))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, arg)
    monkeypatch.setattr(owner, name, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        extract(str(tmp_path / "m.csv"), [tiny_clip_vision], tmp_path / "c", **kw)
    monkeypatch.setattr(owner, name, real)
    cache = tmp_path / "c" / whole.split("/")[-1]
    with open_cache(cache) as c:
        kept = int(c.done.sum())
    assert 2 <= kept < 12  # what was forwarded before it is written
    again = extract(str(tmp_path / "m.csv"), [tiny_clip_vision], tmp_path / "c", **kw)
    assert again.caches[0]["done"] == 12
    with open_cache(cache) as c, open_cache(whole) as w:
        assert c.done.all()
        for p in c.poolings:
            assert np.abs(c.pooled(p) - w.pooled(p)).max() <= HIDDEN_TOL


def test_video_frames_are_never_jpegs_and_record_no_jpeg_decoder(tmp_path, tiny_clip_vision):
    from featx.data.video import build_tiny_video
    build_tiny_video(str(tmp_path / "a.mkv"), seconds=1.0, fps=10)
    pd.DataFrame({"id": ["a"], "video": ["a.mkv"]}).to_csv(tmp_path / "m.csv", index=False)
    kw = dict(dtype="float32", device="cpu", progress=False)
    a = extract(tmp_path / "m.csv", [tiny_clip_vision], tmp_path / "a", **kw)
    b = extract(tmp_path / "m.csv", [tiny_clip_vision], tmp_path / "b", image_decode="device", **kw)
    with open_cache(a.paths[0]) as ca, open_cache(b.paths[0]) as cb:
        assert "image_decode" not in ca.attrs and "image_decode" not in cb.attrs
        assert ca.done.all() and np.abs(ca.pooled("mean") - cb.pooled("mean")).max() == 0
    again = extract(tmp_path / "m.csv", [tiny_clip_vision], tmp_path / "a", image_decode="device", **kw)
    assert again.caches[0]["done"] == 1  # the same cache: nothing refused, nothing redone


def test_jpegs_are_decoded_a_bounded_number_of_bytes_at_a_time(files, on_device, monkeypatch):
    # large photos: a batch's decoded images could fill the GPU at once; calls hold about DECODE_BYTES of JPEG
    import featx.encoders.image as image
    inputs = [(k, load_image(files[n], jpeg_bytes=True)) for k, n in enumerate(["baseline", "small", "gray"] * 2)]
    want, _ = on_device.admit(inputs, batch_size=8)
    calls, real = [], image.ImageEncoder._decode_jpegs
    monkeypatch.setattr(image.ImageEncoder, "_decode_jpegs", lambda self, data: calls.append(len(data))
                        or real(self, data))
    monkeypatch.setattr(image, "DECODE_BYTES", inputs[0][1].nbytes + 1)  # the largest file and no other
    got, failures = on_device.admit(inputs, batch_size=8)
    assert failures == [] and sum(calls) == 6 and max(calls) <= 2 and calls[0] == 1  # never the whole batch
    assert [i for i, _ in got] == [i for i, _ in want]
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(got, want)) <= PIXEL_TOL


def test_a_decode_error_names_no_memory_address(tmp_path):
    # Pillow names the in-memory file it was given (<_io.BytesIO object at 0x...>): the recorded reason differed
    # from run to run
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"not an image at all")
    with pytest.raises(MediaError) as e:
        load_image(str(fake), jpeg_bytes=True)
    assert "0x" not in str(e.value) and "fake.jpg" in str(e.value), str(e.value)
