"""featx finetune: cut encoders, frozen blocks, a planted two-modality task, save/predict, resume after SIGKILL."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from featx.cli.main import main

POS = "good great happy love fun wonderful".split()
NEG = "bad awful sad hate boring terrible".split()
CLASSES = {0: "none", 1: "one", 2: "both"}
# Small and fast: tiny models, one CPU thread (two threads on two busy cores are far slower for tiny ops).
FAST = dict(lr=1e-3, head_lr=3e-3, batch_size=8, dropout=0.0, patience=100, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted_manifest(folder, n=60, splits=True, regression=False, audio=False, broken=True):
    """label = (text word is positive) + (image is red): each modality alone explains at most 3/4 of it.

    Texts use words of featx.demo.tiny's vocabulary; images are noisy red or blue squares. One extra item points
    at a missing image (it must be skipped, with a message)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pos, red = i % 2 == 0, (i // 2) % 2 == 0
        colour = np.array([200, 30, 30] if red else [30, 30, 200])
        pixels = np.clip(colour + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"i{i}.png")
        k = int(pos) + int(red)
        row = {"id": f"x{i}", "text": f"the movie was {(POS if pos else NEG)[i % 6]}", "image": f"i{i}.png",
               "label": float(k) - 1.0 + 0.1 * (i % 3) if regression else CLASSES[k]}
        if splits:
            row["split"] = ["train", "train", "train", "dev", "test"][i % 5]
        if audio:
            import soundfile as sf

            t = np.arange(4000) / 16000
            sf.write(str(folder / f"a{i}.wav"), (0.3 * np.sin(2 * np.pi * (200 + 40 * k) * t)).astype(np.float32),
                     16000)
            row["audio"] = f"a{i}.wav"
        rows.append(row)
    if broken:
        rows.append(dict(rows[0], id="broken", image="missing.png"))
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def run_quiet(fn, *args, **kwargs):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = fn(*args, **kwargs)
    return result, err.getvalue()


# ------------------------------------------------------------------------------------------ branches
def tiny_distilbert(path, bert):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(bert)
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                     max_position_embeddings=128)).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def raws_for(modality):
    from PIL import Image

    if modality == "text":
        return ["good movie", "the film was awful and boring"]
    if modality == "image":
        return [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 36), (0, 100, 10))]
    rng = np.random.default_rng(0)
    return [rng.standard_normal(8000).astype(np.float32), rng.standard_normal(6000).astype(np.float32)]


@pytest.mark.parametrize("family", ["bert", "clip", "wavlm", "distilbert"])
def test_cut_branch_gives_the_full_models_hidden_state_and_trains_only_top_blocks(family, request, tmp_path):
    from featx.encoders import load_encoder
    from featx.finetune import EncoderBranch

    path = tiny_distilbert(tmp_path / "distilbert", request.getfixturevalue("tiny_bert")) \
        if family == "distilbert" else request.getfixturevalue(f"tiny_{family}")
    full = load_encoder(path)
    inputs = full.prepare(raws_for(full.modality))
    with torch.no_grad():
        reference, ref_mask = full.forward(inputs)
    for layer in (0, 1, 2):
        branch = EncoderBranch(load_encoder(path), layer=layer, train_blocks=-1).eval()
        with torch.no_grad():
            h, mask = branch(inputs)
        assert torch.equal(h, reference[layer]) and torch.equal(mask, ref_mask), (family, layer)
        # Frozen weights may pick another attention kernel (WavLM: last-bit differences), so close, not equal.
        branch = EncoderBranch(load_encoder(path), layer=layer, train_blocks=1).eval()
        with torch.no_grad():
            torch.testing.assert_close(branch(inputs)[0], reference[layer], rtol=1e-5, atol=1e-6)
        trainable = {n for n, p in branch.named_parameters() if p.requires_grad}
        if layer == 0:
            assert not trainable
        else:  # exactly the top kept block: block layer-1
            block = {".layer.", ".layers."}
            assert trainable and all(any(f"{b}{layer - 1}." in f".{n}" for b in block) for n in trainable), trainable
    everything = EncoderBranch(load_encoder(path), layer=2, train_blocks=-1)
    frozen = {n for n, p in everything.named_parameters() if not p.requires_grad}
    if family == "wavlm":  # the conv feature encoder stays frozen, as usual for speech models
        assert frozen and all("feature_extractor" in n for n in frozen)
    elif family in ("bert", "clip"):  # only what never reaches the hidden states
        assert frozen and all("pooler" in n or "post_layernorm" in n for n in frozen)
    else:
        assert not frozen


# ------------------------------------------------------------------------------------------ planted task
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, tiny_clip):
    """bert + clip fine-tuned on the planted task, top block of each trained, the rest frozen."""
    from featx.finetune import finetune

    d = tmp_path_factory.mktemp("planted")
    manifest = planted_manifest(d / "data")
    result, err = run_quiet(finetune, manifest, [tiny_bert, tiny_clip], str(d / "out"), train_blocks=1,
                            epochs=12, **FAST)
    return manifest, result, err


def test_loss_falls(trained):
    _, result, _ = trained
    losses = [h["train_loss"] for h in result.runs[0]["history"]]
    assert len(losses) == 12
    assert losses[-1] < 0.3 * losses[0], losses


def test_planted_two_modality_task_is_learned(trained, tiny_bert, tiny_clip):
    _, result, err = trained
    rows = result.rows
    assert set(rows["method"]) == {"finetune"} and set(rows["probe"]) == {"finetune-concat"}
    assert set(rows["split"]) == {"dev", "test"}
    assert rows["encoder"].iloc[0] == "tiny-bert+tiny-clip" and rows["modality"].iloc[0] == "text+image"
    meta = json.load(open(os.path.join(result.out, "meta.json"), encoding="utf-8"))
    assert [(e["encoder"], e["path"]) for e in meta["encoders"]] == [("tiny-bert", tiny_bert), ("tiny-clip", tiny_clip)]
    acc = rows[(rows["split"] == "test") & (rows["metric"] == "acc")]["value"].item()
    # One modality alone gets at most 0.75 (the middle class is ambiguous half the time).
    assert acc >= 0.9, acc
    assert "skipping broken" in err
    out = result.out
    assert set(pd.read_csv(os.path.join(out, "results.csv")).columns) == set(rows.columns)
    assert pd.read_parquet(os.path.join(out, "results.parquet")).shape == rows.shape
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["task"] == "classification" and meta["primary_metric"] == "f1_macro" and meta["caches"] == []
    assert [e["layer"] for e in meta["encoders"]] == [2, 2] and meta["chance"]["acc"] < 0.6


def test_frozen_layers_are_bit_identical_after_training(trained, tiny_bert, tiny_clip):
    from featx.encoders import load_encoder
    from featx.finetune import load_finetuned

    _, result, _ = trained
    saved = load_finetuned(result.model_path)
    for branch, path in zip(saved.model.branches, (tiny_bert, tiny_clip)):
        fresh = dict(load_encoder(path).model.named_parameters())
        after = dict(branch.encoder.named_parameters())
        top = [n for n in after if "layer.1." in n or "layers.1." in n]  # the top block of two
        frozen = [n for n in after if n not in top]
        assert frozen and top
        assert all(torch.equal(after[n], fresh[n]) for n in frozen)
        assert not all(torch.equal(after[n], fresh[n]) for n in top)  # the trained block did move


def test_saved_model_predicts_what_was_scored(trained):
    from featx.finetune import load_finetuned

    manifest, result, _ = trained
    pred, err = run_quiet(load_finetuned(result.model_path).predict_manifest, manifest)
    probabilities = ["p_both", "p_none", "p_one"]
    assert list(pred.columns) == ["id", "prediction", *probabilities, "error"] and len(pred) == 61
    assert pred.set_index("id")["prediction"].isna()["broken"] and "skipping broken" in err
    broken = pred.set_index("id").loc["broken"]   # the reason it has no prediction, not only on stderr
    assert broken["error"] and broken["error"] in err and np.isnan(broken["p_one"])
    done = pred[pred["id"] != "broken"]
    p = done[probabilities].to_numpy(float)
    assert (done["error"] == "").all() and np.allclose(p.sum(1), 1.0)
    assert list(np.array(["both", "none", "one"])[p.argmax(1)]) == list(done["prediction"])
    test = result.runs[0]["test"]
    got = pred.set_index("id").loc[test["ids"], "prediction"].tolist()
    assert got == test["pred"]


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_reaches_the_same_weights(tmp_path, tiny_bert, tiny_clip):
    from safetensors.torch import load_file

    from featx.finetune import finetune

    manifest = planted_manifest(tmp_path / "data", n=40, broken=False)
    # dropout > 0 and accumulation: the resumed run must restore the RNG and optimizer states exactly.
    settings = dict(FAST, dropout=0.2, epochs=5, accumulate=2, train_blocks=-1)
    run_quiet(finetune, manifest, [tiny_bert, tiny_clip], str(tmp_path / "whole"), **settings)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "featx", "finetune", manifest, "--model", tiny_bert, "--model", tiny_clip,
           "--out", str(out), "--epochs", "5", "--accumulate", "2", "--train-blocks", "-1", "--lr", "1e-3",
           "--head-lr", "3e-3", "--batch-size", "8", "--dropout", "0.2", "--patience", "100", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "runs" / "n1.0-s0-f0" / "latest.json"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert json.loads(latest.read_text())["epoch"] < 4
    assert not (out / "runs" / "n1.0-s0-f0" / "done.json").exists()

    rc, err = run_quiet(main, cmd[3:] + ["--resume"])
    assert rc == 0, err
    for weights in ("head.safetensors", "encoder-0/model.safetensors", "encoder-1/model.safetensors"):
        a = load_file(str(tmp_path / "whole" / "model" / weights))
        b = load_file(str(out / "model" / weights))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    for table in ("results.csv", "history.csv"):  # history: every epoch's loss, also those after the best one
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / table), pd.read_csv(out / table))


# ------------------------------------------------------------------------------------------ CV, three modalities
def test_cv_regression_with_gated_head_over_three_modalities(tmp_path, tiny_bert, tiny_clip, tiny_wavlm):
    from featx.finetune import finetune, load_finetuned

    manifest = planted_manifest(tmp_path / "data", n=24, splits=False, regression=True, audio=True, broken=False)
    result, _ = run_quiet(finetune, manifest, [tiny_bert, tiny_clip, tiny_wavlm], str(tmp_path / "out"),
                          head="gated", folds=2, epochs=1, train_sizes=[0.5, 1.0], layers=["1", "last", "-2"],
                          **FAST)
    rows = result.rows
    assert set(rows["split"]) == {"dev", "cv"} and set(rows["train_size"]) == {"0.5", "1.0"}
    assert set(rows["probe"]) == {"finetune-gated"} and rows["modality"].iloc[0] == "text+image+audio"
    assert len(result.runs) == 4 and set(rows["metric"]) >= {"mae", "corr", "acc7"}
    meta = json.load(open(os.path.join(result.out, "meta.json")))
    assert [e["layer"] for e in meta["encoders"]] == [1, 2, 1] and meta["primary_metric"] == "mae"
    # The saved model predicts in the label's units (targets were standardised for training).
    model = load_finetuned(result.model_path)
    assert abs(model.config["target_mean"]) < 1.5 and model.config["target_std"] > 0.3
    pred, _ = run_quiet(model.predict_manifest, manifest)
    assert pred["prediction"].dtype == float and pred["prediction"].notna().all()
    test = next(r for r in result.runs if r["size"] == "1.0" and r["fold"] == 0)["test"]  # the saved run
    np.testing.assert_allclose(pred.set_index("id").loc[test["ids"], "prediction"], test["pred"], rtol=1e-5)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_errors_are_one_line(tmp_path, tiny_bert, tiny_clip, capsys):
    manifest = planted_manifest(tmp_path / "data", n=12, broken=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"manifest: data/manifest.csv\nmodel: [{tiny_bert}, {tiny_clip}]\nout: out\nhead: bogus\n")
    assert main(["finetune", "--recipe", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown head 'bogus'" in err[0]
    assert main(["finetune", manifest, "--model", tiny_bert, "--out", str(tmp_path / "o"), "--layers", "best"]) == 1
    assert "--probe-results" in capsys.readouterr().err
    assert main(["finetune", manifest, "--model", tiny_bert, "--out", str(tmp_path / "o"), "--layers", "7"]) == 1
    assert "out of range 0..2" in capsys.readouterr().err
    assert main(["finetune", manifest, "--model", tiny_bert, "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["finetune", manifest, "--model", tiny_bert, "--out", str(tmp_path / "o"), "--epochs", "2"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["finetune", manifest, "--model", tiny_bert, "--out", str(tmp_path / "o"), "--epochs", "2",
                 "--resume"]) == 1
    err = capsys.readouterr().err
    assert "settings differ" in err and "epochs" in err


def test_paper_recipe_keys_are_all_known():
    from featx.settings import FinetuneSettings, build_settings

    s = build_settings(FinetuneSettings, recipe=os.path.join(os.path.dirname(__file__), "..", "..", "probe", "finetune.yaml"))
    assert s.head == "concat" and s.lr == 3e-5 and s.folds == 10 and len(s.model) == 2
