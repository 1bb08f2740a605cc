"""Host-side paths of extraction: images preprocessed in batches on the device (against the checkpoint's
processor per image), texts tokenized a chunk at a time (against one text at a time), and which image path
ran as a setting of the cache."""
import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract
from featx.cache import open_cache
from featx.data.media import load_image
from featx.encoders import load_encoder
from featx.encoders.image import ImageEncoder, torchvision_processor
from featx.encoders.text import TextEncoder
from featx.errors import FeatxError
from featx.extraction.decode import DecodedItems, Decoder
from featx.settings import ExtractSettings, build_settings

# On the CPU the batched path runs the same torchvision kernels as the processor per image: equal to float
# rounding. (On CUDA the kernels differ; the stored hidden states are the check that matters there.)
PIXEL_TOL = 1e-5
HIDDEN_TOL = 1e-5


def _jpeg(path, size, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, size[1] // 8), max(2, size[0] // 8), 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(str(path), quality=90)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """JPEG files of varied sizes (two large enough for a reduced-scale decode at the tiny CLIP's 32-pixel side)
    and a manifest of them."""
    d = tmp_path_factory.mktemp("jpegs")
    sizes = [(200, 150), (640, 480), (33, 47), (64, 64), (7, 300), (90, 60)]
    rows = [{"id": f"i{k}", "image": _jpeg(d / f"i{k}.jpg", s, k), "label": k % 2} for k, s in enumerate(sizes)]
    pd.DataFrame(rows).to_csv(d / "m.csv", index=False)
    return str(d / "m.csv"), [r["image"] for r in rows]


@pytest.fixture(scope="module")
def both_paths(tiny_clip_vision):
    return (load_encoder(tiny_clip_vision, image_preprocess="batched-torch"),
            load_encoder(tiny_clip_vision, image_preprocess="processor"))


def test_batched_pixels_equal_the_checkpoint_processor_per_image(images, both_paths):
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil
    # only a torchvision processor takes batches of uint8 tensors on a device; a PIL one runs per image
    assert torchvision_processor(CLIPImageProcessor()) and not torchvision_processor(CLIPImageProcessorPil())
    batched, per_image = both_paths
    assert (batched.image_preprocess, per_image.image_preprocess) == ("batched-torch", "processor")
    assert batched.attrs["image_preprocess"] == "batched-torch" and per_image.attrs["image_preprocess"] == "processor"
    decoded = [load_image(p, shortest_side=batched.shortest_side()) for p in images[1]]
    assert decoded[1].size == (160, 120)  # 640x480 decoded at 1/4: still downscaled by the processor
    # workers hand over uint8 only on the batched path, finished pixel values on the other
    assert batched.preprocessor()(decoded[0]).dtype == np.uint8
    got = batched.prepare(decoded)["pixel_values"]
    want = torch.stack([per_image.processor(images=im, return_tensors="pt")["pixel_values"][0] for im in decoded])
    assert got.shape == want.shape == (6, 3, 32, 32) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= PIXEL_TOL


def test_both_paths_store_the_same_hidden_states_and_a_resume_with_the_other_is_refused(images, tiny_clip_vision,
                                                                                        tmp_path):
    manifest = images[0]
    kw = dict(pool=["mean", "cls"], dtype="float32", batch_size=4, device="cpu", progress=False)
    a = extract(manifest, [tiny_clip_vision], tmp_path / "a", **kw)
    b = extract(manifest, [tiny_clip_vision], tmp_path / "b", image_preprocess="processor", **kw)
    assert a.failed == b.failed == 0
    with open_cache(a.paths[0]) as ca, open_cache(b.paths[0]) as cb:
        assert ca.attrs["image_preprocess"] == "batched-torch" and cb.attrs["image_preprocess"] == "processor"
        for p in ("mean", "cls"):
            assert np.abs(ca.pooled(p) - cb.pooled(p)).max() <= HIDDEN_TOL
    with pytest.raises(FeatxError, match="image_preprocess 'batched-torch' \\(now 'processor'\\)"):
        extract(manifest, [tiny_clip_vision], tmp_path / "a", image_preprocess="processor", **kw)
    again = extract(manifest, [tiny_clip_vision], tmp_path / "a", **kw)  # the same path resumes (nothing left)
    assert again.caches[0]["done"] == 6


@pytest.mark.parametrize("name, default, value, bad, choices", [
    ("image_preprocess", "batched-torch", "processor", "pil", "image preprocessing 'pil'; choose from batched-torch, processor"),
    ("image_decode", "workers", "device", "gpu", "image decoding 'gpu'; choose from workers, device")])
def test_the_image_options_are_one_option_each_for_the_command_line_recipes_and_python(tmp_path, capsys, name, default,
                                                                                      value, bad, choices):
    flag = name.replace("_", "-")
    assert getattr(ExtractSettings(manifest="m.csv", model=["x"], out="o"), name) == default
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"manifest: m.csv\nmodel: [x]\nout: o\n{flag}: {value}\n")
    settings = build_settings(ExtractSettings, recipe=str(recipe))
    assert getattr(settings, name) == value and settings.kwargs()[name] == value
    with pytest.raises(FeatxError, match=f"unknown {choices}"):
        build_settings(ExtractSettings, given={"manifest": "m.csv", "model": ["x"], "out": "o", name: bad})
    from featx.cli.main import main
    assert main(["extract", "--help"]) == 0
    assert f"--{flag} {name.upper()}" in capsys.readouterr().out


class _OwnPixels(ImageEncoder):
    """A subclass that makes its own per-image inputs: it keeps them (the processor path)."""

    def preprocessor(self):
        return _half_pixels(self.processor)


class _half_pixels:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0] / 2


def test_a_subclass_with_its_own_preprocessor_keeps_it(tiny_clip_vision, both_paths, tmp_path):
    from transformers import AutoConfig
    own = _OwnPixels(tiny_clip_vision, config=AutoConfig.from_pretrained(tiny_clip_vision))
    assert own.image_preprocess == "processor" and own.attrs["image_preprocess"] == "processor"
    im = load_image(_jpeg(tmp_path / "own.jpg", (50, 40), 0))
    want = both_paths[1].prepare([im])["pixel_values"] / 2
    assert torch.equal(own.prepare([im])["pixel_values"], want)


TEXTS = ["good", "the film was awful and boring, i hate it", "caf\u00e9 na\u00efve \u2014 \u65e5\u672c",
         "ok then", "word " * 400, "a"]


def test_a_chunk_of_texts_tokenized_in_one_call_equals_one_text_at_a_time(tiny_bert):
    enc = load_encoder(tiny_bert)
    pre = enc.preprocessor()
    many, one = pre.many(TEXTS), [pre(t) for t in TEXTS]
    assert len(many) == len(TEXTS) and pre.many([]) == []
    assert len(one[4]["input_ids"]) == enc.max_length  # truncated
    for m, o in zip(many, one):
        assert set(m) == set(o) == {"input_ids", "token_type_ids", "attention_mask"}
        for k in o:
            assert m[k].dtype == np.int64 and np.array_equal(m[k], o[k]), k
    for k, v in enc.prepare(TEXTS).items():
        assert torch.equal(v, enc.collate(one)[k]), k


def test_decoded_chunks_equal_items_one_by_one_and_a_bad_item_fails_alone(tiny_bert):
    enc = load_encoder(tiny_bert)
    rows = [{"text": t} for t in TEXTS[:3]] + [{"text": "   "}] + [{"text": t} for t in TEXTS[3:]]
    items = DecodedItems(rows, np.arange(len(rows)), Decoder("text", "text", preprocess=enc.preprocessor()))
    chunk = items.__getitems__(list(range(len(rows))))
    assert [c[0] for c in chunk] == list(range(len(rows)))
    assert chunk[3][1] is None and chunk[3][2] == "empty text"
    for k, (i, inputs, why) in enumerate(chunk):
        single = items[k]
        assert why == single[2]
        if inputs is not None:
            assert len(inputs) == 1 and all(np.array_equal(inputs[0][n], single[1][0][n]) for n in inputs[0])


class _Picky:
    """A preprocessor whose chunk call fails when any text is 'bad', and whose one-text call fails only on it."""

    def __call__(self, text):
        if text == "bad":
            raise ValueError("cannot take 'bad'")
        return np.array([len(text)], np.int64)

    def many(self, texts):
        return [self(t) for t in texts]


def test_a_failing_chunk_call_falls_back_to_item_by_item():
    rows = [{"text": t} for t in ("one", "bad", "three")]
    items = DecodedItems(rows, np.arange(3), Decoder("text", "text", preprocess=_Picky()))
    chunk = items.__getitems__([0, 1, 2])
    assert [int(c[1][0][0]) if c[1] else None for c in chunk] == [3, None, 5]
    assert chunk[1][2] == "ValueError: cannot take 'bad'"


class _PerText(TextEncoder):
    """A subclass whose preprocessor is a plain per-text callable (no `many`): chunks call it once per text."""

    def preprocessor(self):
        return _reversed_ids(self.tokenizer)


class _reversed_ids:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text):
        return {k: np.asarray(v[::-1], np.int64) for k, v in self.tokenizer(text).items()}


def test_a_text_subclass_with_its_own_per_text_preprocessor_keeps_it(tiny_bert):
    from transformers import AutoConfig
    enc = _PerText(tiny_bert, config=AutoConfig.from_pretrained(tiny_bert))
    got = Decoder("text", "text", preprocess=enc.preprocessor()).preprocess_chunk(["good film", "bad"])
    assert [list(g["input_ids"]) for g in got] == [enc.tokenizer("good film")["input_ids"][::-1],
                                                   enc.tokenizer("bad")["input_ids"][::-1]]
    assert list(enc.prepare(["bad"])["input_ids"][0]) == enc.tokenizer("bad")["input_ids"][::-1]


def test_groups_ramp_up_from_one_batch_while_decoding_runs_beside_the_forward():
    from itertools import islice

    from featx.extraction.pipeline import group_sizes
    assert list(islice(group_sizes(256, 2048, ramp=True), 6)) == [256, 512, 1024, 2048, 2048, 2048]
    assert list(islice(group_sizes(256, 2048, ramp=False), 3)) == [2048] * 3
    assert list(islice(group_sizes(16, 3, ramp=True), 3)) == [3] * 3  # a batch larger than a group
    assert list(islice(group_sizes(3, 10, ramp=True), 4)) == [3, 6, 10, 10]


def test_ramped_groups_with_workers_store_what_one_process_stores(media, tiny_bert, tiny_wavlm, tmp_path):
    # batch 2, groups 2, 4, 8, ... with workers against groups of 8 without: other batches, the same values
    kw = dict(dtype="float32", device="cpu", batch_size=2, group_size=8, max_audio_seconds=0.5, progress=False)
    here = extract(media, [tiny_bert, tiny_wavlm], tmp_path / "w0", **kw)
    workers = extract(media, [tiny_bert, tiny_wavlm], tmp_path / "w2", num_workers=2, **kw)
    for a_path, b_path in zip(here.paths, workers.paths):
        with open_cache(a_path) as a, open_cache(b_path) as b:
            assert list(a.ids) == list(b.ids) and a.done.all() and b.done.all()
            assert np.abs(a.pooled("mean") - b.pooled("mean")).max() <= HIDDEN_TOL


def test_pooled_values_cast_to_the_store_dtype_before_the_copy_equal_the_host_cast(tiny_bert, tiny_wavlm):
    from featx.data.media import split_windows
    from featx.extraction.batching import Runner

    bert = load_encoder(tiny_bert)
    texts = ["a short one", "a somewhat longer text than the first", "x", "big numbers 1 2 3 4 5 6 7 8 9"]
    items = [(i, [bert.preprocessor()(t)]) for i, t in enumerate(texts)]
    _, wide, _, _ = Runner(bert, ["mean", "cls"], batch_size=3).run(items)
    _, half, _, _ = Runner(bert, ["mean", "cls"], batch_size=3, store_dtype="float16").run(items)
    for p in ("mean", "cls"):
        assert wide[p].dtype == np.float32 and half[p].dtype == np.float16
        np.testing.assert_array_equal(half[p], wide[p].astype(np.float16))  # the rounding a host cast gives
    # an item of several inputs (audio windows) is combined on the host in float32, then cast by the writer
    wavlm = load_encoder(tiny_wavlm)
    rng = np.random.default_rng(0)
    waves = [split_windows(rng.standard_normal(n).astype(np.float32), 16000, 0.5) for n in (20000, 6000)]
    audio = [(i, [wavlm.preprocessor()(w) for w in ws]) for i, ws in enumerate(waves)]
    assert len(audio[0][1]) > 1
    _, a32, _, _ = Runner(wavlm, ["mean"], batch_size=4).run(audio)
    _, a16, _, _ = Runner(wavlm, ["mean"], batch_size=4, store_dtype="float16").run(audio)
    assert a16["mean"].dtype == np.float32 and np.abs(a16["mean"] - a32["mean"]).max() == 0


@pytest.mark.parametrize("family", ["bert", "modernbert", "t5-encoder", "clip-text", "siglip-text"])
def test_a_batch_without_padding_runs_without_its_mask_and_gives_the_masked_forward(family, tmp_path):
    # Left out, an all-ones mask spares transformers a check on the device per batch; the values are those of
    # the model given the mask. A padded batch keeps its mask.
    from tiny_models import BUILDERS

    enc = load_encoder(BUILDERS[family](str(tmp_path / family)), modality="text")
    tokenize = enc.preprocessor()
    texts = ["abc def", "xyz uvw", "one two three four five", "a"]
    feats = [tokenize(t) for t in texts]
    same = [f for f in feats if len(f["input_ids"]) == len(feats[0]["input_ids"])]
    assert len(same) >= 2
    for batch in (same, feats):
        x = enc.collate(batch)
        # (SigLIP pads every text to max_length, as it was trained: its batches always keep their mask)
        assert bool(x["attention_mask"].all()) == (batch is same and family != "siglip-text")
        got, mask = enc.forward(x)
        with torch.no_grad():
            want = enc.model(**x, output_hidden_states=True).hidden_states
        assert torch.equal(mask, x["attention_mask"].bool())
        for g, w in zip(got, want):
            assert (g - w)[mask].abs().max().item() <= 1e-6


def test_a_group_casts_the_weights_for_autocast_once_not_once_per_batch(tiny_bert):
    # bf16 autocast (CUDA's default; run here on the CPU): a cast weight is kept for the life of the autocast
    # context, so the group's batches share one context. Counted: the casts (aten::_to_copy) of 1 batch and of 3.
    from torch.profiler import ProfilerActivity, profile

    from featx.extraction.batching import Runner
    enc = load_encoder(tiny_bert, precision="bf16")
    items = [(i, [enc.preprocessor()(t)]) for i, t in enumerate(["one text", "another text", "a third text"])]

    def casts(n):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            Runner(enc, ["mean"], batch_size=1).run(items[:n])
        return sum(e.count for e in p.key_averages() if e.key == "aten::_to_copy")

    one, three = casts(1), casts(3)
    weights = sum(1 for _, w in enc.model.named_parameters() if w.dim() == 2)  # the linear layers' and embeddings'
    assert three <= 3 * one - 2 * (weights // 2)  # the later batches reuse the weights cast by the first


def test_collate_runs_outside_the_groups_autocast(tiny_bert):
    # the group's autocast context (kept open so weights are cast once) must not reach collate, where images
    # are preprocessed on the device in the processor's own precision
    from featx.extraction.batching import Runner
    enc = load_encoder(tiny_bert, precision="bf16")
    seen, collate = [], enc.collate

    def recording(feats):
        seen.append(torch.is_autocast_enabled("cpu"))
        return collate(feats)

    enc.collate = recording
    items = [(i, [enc.preprocessor()(t)]) for i, t in enumerate(["one text", "another text", "a third text"])]
    Runner(enc, ["mean"], batch_size=1).run(items)
    assert seen == [False, False, False]


def _counting(n, seen, fail_at=None):
    """0..n-1 (forever with n None), noting each value and the thread it was made in; ValueError at fail_at."""
    import itertools
    import threading

    for k in itertools.count() if n is None else range(n):
        if k == fail_at:
            raise ValueError(f"bad chunk {k}")
        seen.append((k, threading.current_thread().name))
        yield k


def _decode_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "featx-decode" and t.is_alive()]


def test_without_workers_chunks_decode_in_a_thread_of_their_own_ahead_of_the_consumer():
    import time

    from featx.extraction.pipeline import decoded_ahead
    seen = []
    chunks = decoded_ahead(_counting(50, seen), depth=3)
    assert next(chunks) == 0
    deadline = time.monotonic() + 10
    while len(seen) < 5 and time.monotonic() < deadline:  # 1 taken + 3 queued + 1 waiting to be queued
        time.sleep(0.01)
    assert len(seen) == 5  # ahead by the depth, and no further
    assert list(chunks) == list(range(1, 50))  # in order, all of them
    assert {name for _, name in seen} == {"featx-decode"}
    assert not _decode_threads()


def test_an_error_while_decoding_reaches_the_consumer_after_the_chunks_before_it():
    from featx.extraction.pipeline import decoded_ahead
    got = []
    with pytest.raises(ValueError, match="bad chunk 3"):
        for x in decoded_ahead(_counting(10, [], fail_at=3), depth=2):
            got.append(x)
    assert got == [0, 1, 2] and not _decode_threads()


def test_leaving_the_loop_stops_the_decoding_thread():
    from featx.extraction.pipeline import decoded_ahead
    chunks = decoded_ahead(_counting(None, []), depth=2)  # endless: the thread waits on a full queue
    with pytest.raises(RuntimeError, match="forward failed"):
        for x in chunks:
            if x == 4:
                raise RuntimeError("forward failed")
    chunks.close()
    assert not _decode_threads()
    chunks = decoded_ahead(_counting(None, []), depth=2)
    assert next(chunks) == 0
    chunks.close()
    assert not _decode_threads()


@pytest.mark.parametrize("torch_threads", ["all", 1])
def test_without_workers_media_decode_in_the_decoding_thread_and_texts_where_a_cpu_is_free(
        media, tiny_bert, tiny_clip_vision, tiny_wavlm, tmp_path, monkeypatch, torch_threads):
    # texts tokenize in the decoding thread (their tokenizer on that thread alone) when torch's threads leave a
    # CPU free, inline when the forward takes every CPU; the values stored are the same either way
    import os
    import threading

    from featx.extraction.pipeline import process_cpus, tokenize_beside
    cpus = process_cpus()
    if torch_threads == 1 and cpus < 2:
        pytest.skip("one CPU: the forward always takes it")
    threads, parallel = {}, set()
    decoded = Decoder.decoded

    def noting(self, row):  # the real decoder, noting the thread it runs in
        threads.setdefault(self.modality, set()).add(threading.current_thread().name)
        if self.modality == "text":
            parallel.add(os.environ.get("TOKENIZERS_PARALLELISM"))
        return decoded(self, row)

    monkeypatch.setattr(Decoder, "decoded", noting)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(cpus if torch_threads == "all" else 1)
    try:
        beside = tokenize_beside("cpu")
        res = extract(media, [tiny_bert, tiny_clip_vision, tiny_wavlm], tmp_path / "c", device="cpu", num_workers=0,
                      batch_size=2, group_size=4, max_audio_seconds=0.5, dtype="float32", progress=False)
    finally:
        torch.set_num_threads(before)
    assert beside == (torch_threads == 1)
    assert [(c["done"], c["failed"]) for c in res.caches] == [(8, 0)] * 3
    text_thread = "featx-decode" if beside else "MainThread"
    assert threads == {"text": {text_thread}, "image": {"featx-decode"}, "audio": {"featx-decode"}}
    assert parallel == ({"false"} if beside else {None})  # one thread beside the forward; all cores inline
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # as it was before the run
    assert not _decode_threads()
    texts = pd.read_csv(media).set_index("id")["text"]
    with open_cache(res.paths[0]) as c:  # against one text at a time through the model, by transformers
        ref = _plain_text_means(tiny_bert, [texts[i] for i in c.ids])
        assert np.abs(c.pooled("mean") - ref).max() <= HIDDEN_TOL


def _plain_text_means(model_dir, texts):
    """(N, L+1, D): the mean of each layer's hidden states over each text's tokens, one text at a time, by
    transformers alone."""
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            hs = model(**tok([text], return_tensors="pt", truncation=True), output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0].mean(0) for h in hs]).numpy())
    return np.stack(out)


def test_default_group_sizes_by_modality(tiny_bert, tiny_wavlm, tiny_clip_vision):
    from featx.extraction.batching import Runner
    from featx.extraction.pipeline import TEXT_GROUP_MAX, default_group_size
    text, audio, image = (load_encoder(m) for m in (tiny_bert, tiny_wavlm, tiny_clip_vision))
    # images: 2 batches (no sorting; their decoded pixels wait in memory), at least 64
    assert default_group_size("image", Runner(image, ["mean"], batch_size=256), False) == 512
    assert default_group_size("video", Runner(image, ["mean"], batch_size=16), False) == 64
    # audio: 8 batches, sorted by length within the group
    assert default_group_size("audio", Runner(audio, ["mean"], batch_size=32), False) == 256
    # texts without --seq: as many as fit the part's bytes, at most TEXT_GROUP_MAX; with --seq, 8 batches
    assert default_group_size("text", Runner(text, ["mean"], batch_size=16), False) == TEXT_GROUP_MAX
    assert default_group_size("text", Runner(text, ["mean"], batch_size=16), True) == 128


def test_only_chunks_of_images_are_pinned_on_cuda(tiny_bert, tiny_wavlm, tiny_clip_vision):
    # images cross to the device straight from pinned chunks; texts and audio are padded into a pinned batch by
    # collate anyway, so their chunks are not pinned first (a copy of every waveform, in the pin thread)
    from featx.extraction.pipeline import pins_chunks
    image, audio, text = (load_encoder(m) for m in (tiny_clip_vision, tiny_wavlm, tiny_bert))
    assert pins_chunks(image, 4, "cuda") and pins_chunks(image, 4, "cuda:1")
    assert not any(pins_chunks(e, 4, "cuda") for e in (audio, text))
    assert not pins_chunks(image, 0, "cuda") and not pins_chunks(image, 4, "cpu")
