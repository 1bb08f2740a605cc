"""finetune and predict accept every family extract does, through the Encoder interface: for each family (the
ones on main built here, and every one in tests/tiny_models.BUILDERS), a branch cut at layer 1 gives the full
model's hidden state 1, a one-epoch finetune cut at layer 1 runs and its saved model predicts what was scored;
its layers and width read from the config alone (`featx models`) are the loaded encoder's. A CLIP checkpoint on
a text column fine-tunes its text tower; a family without a block list is refused with one line before any
weights load."""
import contextlib
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import tiny_models
from featx.demo.tiny import build_tiny_bert, build_tiny_clip, build_tiny_wavlm
from featx.encoders.base import quiet_libraries
from featx.errors import FeatxError

# Cheapest settings: one epoch, batch of 4, no dropout; the saved model is loaded back to predict.
FAST = dict(layers=["1"], epochs=1, batch_size=4, dropout=0.0, lr=1e-3, head_lr=1e-3, proj_size=8, hidden_size=16,
            heads=1, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on two busy cores: one thread is faster
    yield
    torch.set_num_threads(before)


def _build_distilbert(path):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    bert = build_tiny_bert(str(path) + "-tokenizer")
    tok = AutoTokenizer.from_pretrained(bert)
    torch.manual_seed(0)
    with quiet_libraries():
        DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                         max_position_embeddings=128)).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _build_vision(path, config_class, model_class, processor_class):
    torch.manual_seed(0)
    cfg = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)
    with quiet_libraries():
        model_class(cfg).eval().save_pretrained(path)
    processor_class(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def _build_vit(path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    return _build_vision(path, ViTConfig, ViTModel, ViTImageProcessor)


def _build_siglip(path):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    return _build_vision(path, SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor)


# The families on main; a builder in tests/tiny_models (the family helpers') replaces the one here.
LOCAL_BUILDERS = {"bert": build_tiny_bert, "distilbert": _build_distilbert, "clip-vision": build_tiny_clip,
                  "siglip-vision": _build_siglip, "vit": _build_vit, "wav2vec2": build_tiny_wavlm}
BUILDERS = {**LOCAL_BUILDERS, **tiny_models.BUILDERS}


def _family(name):
    from featx.encoders import families

    return next(f for f in families() if f.name == name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family name: tiny checkpoint folder}, built once."""
    d = tmp_path_factory.mktemp("families")
    return {name: build(str(d / name)) for name, build in BUILDERS.items()}


def _write_item(folder, modality, i):
    """A manifest cell for item i of `modality`: a text, or a file written to `folder`."""
    from PIL import Image

    if modality == "text":
        return ["good movie", "the film was awful and boring", "i love it", "bad", "great fun", "ok"][i]
    if modality == "image":
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (24 + 3 * i, 36, 3), dtype=np.uint8)).save(folder / f"i{i}.png")
        return f"i{i}.png"
    if modality == "audio":
        import soundfile as sf

        t = np.arange(int(16000 * (0.4 + 0.1 * i))) / 16000
        sf.write(str(folder / f"a{i}.wav"), (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
        return f"a{i}.wav"
    from featx.data.video import build_tiny_video

    return os.path.basename(build_tiny_video(folder / f"v{i}.mp4", seconds=1.0, size=(32, 32), tone_hz=None))


def _manifest(folder, modality, n=6):
    """n items, classes a/b alternating, splits train, dev and test (2 each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"x{i}", modality: _write_item(folder, modality, i), "label": "ab"[i % 2],
             "split": ["train", "train", "dev", "dev", "test", "test"][i]} for i in range(n)]
    pd.DataFrame(rows).to_csv(folder / "m.csv", index=False)
    return str(folder / "m.csv")


def _quiet(fn, *args, **kwargs):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        return fn(*args, **kwargs), err.getvalue()


def _raws(manifest, encoder):
    """Two decoded inputs of the manifest, as finetune decodes them."""
    from featx.data.manifest import read_manifest, source_column
    from featx.finetune.data import decode_items

    df = read_manifest(manifest).iloc[:2]
    items, _ = _quiet(decode_items, df, [encoder], [source_column(df, encoder.modality)], 30.0)
    return items.inputs[0]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_family_fine_tunes_cut_at_layer_1_and_predicts(name, checkpoints, tmp_path):
    from featx.encoders import load_config, load_encoder
    from featx.encoders.registry import describe_config
    from featx.finetune import EncoderBranch, finetune, load_finetuned

    family, path = _family(name), checkpoints[name]
    modality = family.modality
    manifest = _manifest(tmp_path / "data", modality)
    if not family.block_path:  # extract only (CNN stages, CLAP's Swin): refused in one line before training
        with pytest.raises(FeatxError, match="cannot be fine-tuned by featx"):
            _quiet(finetune, manifest, [path], str(tmp_path / "out"), modality=[modality], **FAST)
        assert not os.path.exists(tmp_path / "out" / "results.csv")
        return
    full = load_encoder(path, modality=modality)
    # What `featx models` reads from the config alone is what the loaded encoder has.
    assert describe_config(load_config(path), family) == {"num_layers": full.num_layers,
                                                          "hidden_size": full.hidden_size}
    # The branch cut at layer 1 gives the full model's hidden state 1 (also where a final norm follows the
    # last block: decoder LMs, Whisper, T5, pre-norm wav2vec2).
    inputs = full.prepare(_raws(manifest, full))
    with torch.no_grad():
        reference, ref_mask = full.forward(inputs)
        branch = EncoderBranch(load_encoder(path, modality=modality), layer=1, train_blocks=-1).eval()
        h, mask = branch(inputs)
    assert torch.equal(mask, ref_mask)
    assert float((h.float() - reference[1].float()).abs().max()) <= 1e-5, name
    assert branch.hidden_size == h.shape[-1] == (full.layer_widths[1] if full.layer_widths else full.hidden_size)

    pooling = "last" if "last" in family.poolings else "mean"
    result, err = _quiet(finetune, manifest, [path], str(tmp_path / "out"), pooling=pooling, modality=[modality],
                         **FAST)
    meta = json.load(open(os.path.join(result.out, "meta.json"), encoding="utf-8"))
    assert [(e["modality"], e["layer"], e["num_layers"]) for e in meta["encoders"]] == [(modality, 1, full.num_layers)]
    assert set(result.rows["split"]) == {"dev", "test"}, err
    saved = load_finetuned(result.model_path)
    assert saved.encoders[0].modality == modality and saved.model.branches[0].layer == 1
    pred, _ = _quiet(saved.predict_manifest, manifest)
    test = result.runs[0]["test"]
    assert pred.set_index("id").loc[test["ids"], "prediction"].tolist() == test["pred"]


# ------------------------------------------------------------------------------------------ towers
@pytest.fixture(scope="module")
def clip_with_text_tower(tmp_path_factory):
    """A full tiny CLIP checkpoint with a tokenizer, and a featx family for its text tower (a test-only one,
    unless a CLIP text family is registered)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from featx.encoders import Family, families_of, register_family
    from featx.encoders.registry import unregister_family

    d = tmp_path_factory.mktemp("clip")
    tok = AutoTokenizer.from_pretrained(build_tiny_bert(str(d / "bert")))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, projection_dim=16),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16),
                     projection_dim=16)
    path = str(d / "clip")
    with quiet_libraries():
        CLIPModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    added = None
    if "text" not in [f.modality for f in families_of(cfg)]:
        added = register_family(Family("test-clip-text", ("clip", "clip_text_model"), "text",
                                       f"{__name__}:CLIPTextTower", "text_model.encoder.layers|encoder.layers"))
    yield path
    if added is not None:
        unregister_family(added.name)


def _text_tower_class():
    from featx.encoders.text import TextEncoder

    class CLIPTextTower(TextEncoder):
        """CLIP's text tower, loaded with its own text config (a full checkpoint's config holds both towers')."""
        model_class = "CLIPTextModel"

        def __init__(self, name, *, config, **settings):
            super().__init__(name, config=getattr(config, "text_config", None) or config, **settings)
    return CLIPTextTower


CLIPTextTower = _text_tower_class()


def test_clip_on_a_text_column_fine_tunes_its_text_tower(clip_with_text_tower, tmp_path):
    from featx.finetune import finetune, load_finetuned

    clip = clip_with_text_tower
    manifest = _manifest(tmp_path / "data", "text")
    result, err = _quiet(finetune, manifest, [clip], str(tmp_path / "out"), train_blocks=[1], **FAST)
    meta = json.load(open(os.path.join(result.out, "meta.json"), encoding="utf-8"))
    assert [e["modality"] for e in meta["encoders"]] == ["text"], err
    saved = load_finetuned(result.model_path)
    branch = saved.model.branches[0]
    assert saved.encoders[0].modality == "text" and type(branch.encoder).__name__ == "CLIPTextModel"
    assert len(branch.encoder.encoder.layers) == 2  # cut at 1: one block, and the frozen one above
    pred, _ = _quiet(saved.predict_manifest, manifest)
    test = result.runs[0]["test"]
    assert pred.set_index("id").loc[test["ids"], "prediction"].tolist() == test["pred"]

    # With text and image columns, auto gives CLIP its primary (image) tower; --modality text its text tower.
    both = pd.read_csv(manifest)
    both["image"] = [_write_item(tmp_path / "data", "image", i) for i in range(len(both))]
    both.to_csv(tmp_path / "data" / "both.csv", index=False)
    for spec, expected in ((["auto"], "image"), (["text"], "text")):
        result, err = _quiet(finetune, str(tmp_path / "data" / "both.csv"), [clip], str(tmp_path / f"o-{spec[0]}"),
                             modality=spec, save_model=False, **FAST)
        meta = json.load(open(os.path.join(result.out, "meta.json"), encoding="utf-8"))
        assert [e["modality"] for e in meta["encoders"]] == [expected], err


# ------------------------------------------------------------------------------------------ refusals
def test_a_family_without_blocks_or_a_missing_pooling_is_refused_before_weights_load(tmp_path, capsys):
    from transformers import AlbertConfig

    from featx.cli.main import main

    albert = tmp_path / "albert"  # config only: the refusal must come before any weights or tokenizer load
    AlbertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64).save_pretrained(
        str(albert))
    manifest = _manifest(tmp_path / "text", "text")
    out = tmp_path / "out"
    assert main(["finetune", manifest, "--model", str(albert), "--out", str(out), "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be fine-tuned" in err[0] and "share weights" in err[0], err
    assert not out.exists()

    siglip = tmp_path / "siglip"
    from transformers import SiglipVisionConfig

    SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8).save_pretrained(str(siglip))
    manifest = _manifest(tmp_path / "image", "image")
    assert main(["finetune", manifest, "--model", str(siglip), "--out", str(out), "--pool", "cls"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not --pool cls" in err[0], err
    assert main(["finetune", manifest, "--model", str(siglip), "--out", str(out), "--modality", "text"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no text encoder" in err[0], err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ a final norm
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 (its last hidden state is ln_f's output) with a WordPiece tokenizer that pads, and a
    test-only family for it unless one serves GPT-2."""
    from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2Model

    from featx.encoders import Family, register_family
    from featx.encoders.registry import unregister_family

    d = tmp_path_factory.mktemp("gpt2")
    tok = AutoTokenizer.from_pretrained(build_tiny_bert(str(d / "bert")))
    torch.manual_seed(0)
    path = str(d / "gpt2")
    with quiet_libraries():
        GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                             bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)).eval().save_pretrained(path)
    tok.save_pretrained(path)
    added = None
    if not families_of_or_none(AutoConfig.from_pretrained(path)):
        added = register_family(Family("test-gpt2", ("gpt2",), "text", "featx.encoders.text:TextEncoder", "h",
                                       poolings=("mean", "last")))
    yield path
    if added is not None:
        unregister_family(added.name)


def families_of_or_none(config):
    from featx.encoders import families_of
    from featx.errors import FeatxError

    try:
        return families_of(config)
    except FeatxError:
        return []


def test_a_cut_below_a_final_norm_gives_the_hidden_state_extract_caches(tiny_gpt2):
    """GPT-2 normalises its last block's output (ln_f) into its last hidden state: a model cut to `layer` blocks
    would give ln_f(hidden state `layer`). The branch keeps one frozen block above the cut."""
    from featx.encoders import load_encoder
    from featx.finetune import EncoderBranch

    full = load_encoder(tiny_gpt2)
    inputs = full.prepare(["good movie", "the film was awful and boring"])
    with torch.no_grad():
        reference, _ = full.forward(inputs)
        for layer in (0, 1, 2, 3):
            branch = EncoderBranch(load_encoder(tiny_gpt2), layer=layer, train_blocks=-1).eval()
            h, _ = branch(inputs)
            assert float((h - reference[layer]).abs().max()) <= 1e-5, layer
            trainable = {n.split(".")[0] for n, p in branch.encoder.h.named_parameters() if p.requires_grad}
            assert trainable == {str(k) for k in range(layer)}, (layer, trainable)  # blocks below the cut only


def test_predict_applies_a_probe_of_clips_text_tower_to_its_text_cache(clip_with_text_tower, tmp_path):
    """extract writes one cache per tower (image and text) of a CLIP checkpoint: predict must use the one of
    the modality the probe was trained on."""
    from featx import extract
    from featx.predict import predict
    from featx.probing import run_probe
    from featx.probing.classifier import Classifier

    manifest = _manifest(tmp_path / "data", "text")
    df = pd.read_csv(manifest)
    df["image"] = [_write_item(tmp_path / "data", "image", i) for i in range(len(df))]
    df.to_csv(manifest, index=False)
    caches, _ = _quiet(extract, manifest, [clip_with_text_tower], str(tmp_path / "cache"), dtype="float32",
                       progress=False)
    text_cache = next(p for p in caches.paths if p.endswith("__text.h5"))
    assert len(caches.paths) == 2
    _quiet(run_probe, [text_cache], str(tmp_path / "res"), probe="linear", save_classifier=True, progress=False)
    saved = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "res") for f in fs if f.endswith(".safetensors")]
    _, expected = Classifier.load(saved[0]).predict_cache([text_cache])
    got, err = _quiet(predict, manifest, saved[0], cache_dir=str(tmp_path / "again"), progress=False)
    assert got["prediction"].tolist() == list(expected) and len(expected) == 6, err
