"""Text families through the user's path (featx.extract over a real manifest) against a direct transformers
forward of each single item with the checkpoint's own tokenizer: decoder LMs (GPT-2, Llama, Qwen2/3), the T5
encoder, BERT-style encoders (BERT, RoBERTa, DeBERTa-v2, ModernBERT) and the text towers of CLIP and SigLIP (2)."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from featx.cache import open_cache
from featx.encoders.base import quiet_libraries
from featx.encoders import family_of, load_config
from featx.errors import FeatxError
from featx.extraction.pipeline import extract
from featx.naming import display_names
from tiny_models.text import BUILDERS, MORE_BUILDERS

# Very different lengths, so a batch of 8 is padded; the longest is truncated by CLIP's 48-token limit.
TEXTS = ["ok", "A fine film.", "The film was awful and boring; nobody should watch it, ever. Really!", "I love it",
         "hm", "Somewhat long review: great fun, wonderful acting, and a story that keeps you guessing."]
# checkpoint -> the transformers class a user would load for the text hidden states
LOADERS = {"bert": "AutoModel", "roberta": "AutoModel", "deberta-v2": "AutoModel", "modernbert": "AutoModel",
           "gpt2": "AutoModel", "llama": "AutoModel", "qwen2": "AutoModel", "qwen3": "AutoModel",
           "t5-encoder": "T5EncoderModel", "umt5": "UMT5EncoderModel", "clip-text": "CLIPTextModel",
           "siglip-text": "SiglipTextModel", "siglip2-text": "Siglip2TextModel"}
# What each tokenizer adds around a text: the cache attribute special_tokens (featx.encoders.text does not record it).
SPECIAL_TOKENS = {"gpt2": "none", "llama": "<s> + text", "qwen2": "none", "qwen3": "none",
                  "t5-encoder": "text + </s>", "umt5": "text + </s>",
                  "clip-text": "<|startoftext|> + text + <|endoftext|>",
                  "siglip-text": "text + </s>", "siglip2-text": "none"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_models")
    return {name: build(str(root / name)) for name, build in {**BUILDERS, **MORE_BUILDERS}.items()}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_manifest") / "m.csv"
    pd.DataFrame({"id": [f"t{i}" for i in range(len(TEXTS))], "text": TEXTS,
                  "label": [float(i % 2) for i in range(len(TEXTS))]}).to_csv(path, index=False)
    return str(path)


def _extract(manifest, model, out, batch_size):
    res = extract(manifest, [model], out, pool=["mean", "cls", "last"], batch_size=batch_size, device="cpu",
                  progress=False, num_workers=0, dtype="float32")
    assert res.failed == 0
    return res.paths[0]


def _pooled(path):
    with open_cache(path) as c:
        return {p: c.pooled(p) for p in c.poolings}, dict(c.attrs)


def _references(model_dir, name, texts):
    """Per text, {pooling: (L, D)} from a direct forward of the text alone, tokenized as the checkpoint's
    tokenizer does (SigLIP: padded to max_length, as its processor does)."""
    import transformers
    from transformers import AutoTokenizer

    with quiet_libraries():
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = getattr(transformers, LOADERS[name]).from_pretrained(model_dir).eval()
    extra = dict(padding="max_length", max_length=64) if name.startswith("siglip") else {}
    out = []
    for text in texts:
        enc = tok(text, truncation=True, return_tensors="pt", **extra)
        with torch.no_grad():
            hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states)[:, 0]  # (L, T, D)
        real = enc["attention_mask"][0].bool()
        out.append({"mean": hs[:, real].mean(1).numpy(), "cls": hs[:, 0].numpy(),
                    "last": hs[:, int(real.nonzero().max())].numpy()})
    return out


@pytest.mark.parametrize("name", list(LOADERS))
def test_every_layer_equals_a_direct_forward_and_batches_change_nothing(checkpoints, manifest, tmp_path, name):
    model = checkpoints[name]
    family = family_of(load_config(model), "text")
    single, attrs = _pooled(_extract(manifest, model, tmp_path / "b1", 1))
    batched, _ = _pooled(_extract(manifest, model, tmp_path / "b8", 8))
    assert sorted(single) == sorted(p for p in ("mean", "cls", "last") if p in family.poolings)
    assert attrs["modality"] == "text"
    assert attrs.get("special_tokens") == SPECIAL_TOKENS.get(name)
    refs = _references(model, name, TEXTS)
    eq = max(float(np.abs(single[p][i] - refs[i][p]).max()) for p in single for i in range(len(TEXTS)))
    batch = max(float(np.abs(single[p] - batched[p]).max()) for p in single)
    print(f"\n{name}: equivalence max abs diff {eq:.2e}, batch 1 vs 8 max abs diff {batch:.2e}")
    assert eq <= 1e-4, (name, eq)
    assert batch <= 1e-5, (name, batch)


def test_roberta_without_a_tokenizer_limit_truncates_at_its_positions_not_at_its_table_rows(tmp_path):
    """RoBERTa numbers its tokens from padding_idx + 1: 130 position rows embed 128 tokens. A tokenizer saved
    without model_max_length used to give max_length 130, and a text of more than 128 tokens stopped the whole
    run with a traceback (RuntimeError: index 130 is out of bounds, in the position embedding)."""
    from tiny_models.text import build_roberta

    model = build_roberta(str(tmp_path / "roberta"), model_max_length=None)
    texts = ["short", "x" * 300, "a fine film"]
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "text": texts, "label": [0.0, 1.0, 0.0]}).to_csv(path, index=False)
    pooled, attrs = _pooled(_extract(str(path), model, tmp_path / "out", 2))
    assert attrs["max_length"] == 128
    import transformers
    with quiet_libraries():
        tok = transformers.AutoTokenizer.from_pretrained(model)
        ref = transformers.AutoModel.from_pretrained(model).eval()
    enc = tok(texts[1], truncation=True, max_length=128, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 128
    with torch.no_grad():
        hs = torch.stack(ref(**enc, output_hidden_states=True).hidden_states)[:, 0]  # (L, 128, D)
    assert np.abs(pooled["mean"][1] - hs.mean(1).numpy()).max() <= 1e-4
    # a max_length beyond the positions is refused in one line, not a traceback mid-run
    with pytest.raises(FeatxError, match="more than the 128 positions"):
        extract(str(path), [model], tmp_path / "out2", device="cpu", progress=False, num_workers=0, max_length=130)


@pytest.mark.parametrize("name", ["llama", "qwen3", "modernbert"])
def test_a_max_length_past_a_rotary_models_trained_positions_is_refused_as_past_a_position_table(
        checkpoints, manifest, tmp_path, name):
    """Rotary positions run on past max_position_embeddings (128 here) without an error, at positions the model
    never saw: featx took any --max-length silently. It is refused in one line, as BERT's past its position table
    (test_roberta_without_a_tokenizer_limit_truncates_at_its_positions_not_at_its_table_rows), before any work;
    up to the limit it runs, and T5's relative positions (no max_position_embeddings) take any length."""
    from featx.cli.main import main

    out = tmp_path / "out"
    code = main(["extract", manifest, "--model", checkpoints[name], "--out", str(out), "--max-length", "129", "-q"])
    assert code == 1 and not list(out.glob("*.h5"))
    with pytest.raises(FeatxError, match="max_length 129 is more than the 128 positions the model was trained on"):
        extract(manifest, [checkpoints[name]], out, device="cpu", progress=False, num_workers=0, max_length=129)
    assert extract(manifest, [checkpoints[name]], out, device="cpu", progress=False, num_workers=0,
                   max_length=128).failed == 0
    assert extract(manifest, [checkpoints["t5-encoder"]], tmp_path / "t5", device="cpu", progress=False,
                   num_workers=0, max_length=600).failed == 0


def test_the_cli_refuses_it_in_one_line(checkpoints, manifest, tmp_path, capsys):
    from featx.cli.main import main

    capsys.readouterr()
    assert main(["extract", manifest, "--model", checkpoints["llama"], "--out", str(tmp_path / "o"),
                 "--max-length", "4096", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featx extract: error: ") and "give at most 128" in err[0], err


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # Qwen's adapter is Llama's
def test_decoder_lms_give_the_same_numbers_whatever_the_tokenizer_padding_side(checkpoints, manifest, tmp_path,
                                                                                 name):
    left = str(tmp_path / "left")
    shutil.copytree(checkpoints[name], left)
    cfg_path = os.path.join(left, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**cfg, "padding_side": "left"}, f)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(left).padding_side == "left"
    right, _ = _pooled(_extract(manifest, checkpoints[name], tmp_path / "r", 8))
    lefts, attrs = _pooled(_extract(manifest, left, tmp_path / "l", 8))
    assert max(float(np.abs(right[p] - lefts[p]).max()) for p in right) <= 1e-5
    refs = _references(left, name, TEXTS)
    assert max(float(np.abs(lefts["last"][i] - refs[i]["last"]).max()) for i in range(len(TEXTS))) <= 1e-4


def test_a_left_padded_batch_without_position_ids_is_wrong_so_featx_pads_on_the_right(checkpoints):
    """Why featx pads decoder LMs on the right: transformers numbers positions 0..T-1 whatever the mask, so a
    left-padded item's real tokens sit at shifted positions (GPT-2's learned positions)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["gpt2"], padding_side="left")
    tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(checkpoints["gpt2"]).eval()
    enc = tok(["ok", TEXTS[2]], padding=True, return_tensors="pt")
    alone = tok(["ok"], return_tensors="pt")
    with torch.no_grad():
        padded = model(**enc).last_hidden_state[0, -1]
        single = model(**alone).last_hidden_state[0, -1]
    assert float((padded - single).abs().max()) > 1e-3


def test_a_clip_without_a_tokenizer_runs_its_image_tower_only_and_says_so_for_a_text_column(tiny_clip, media,
                                                                                             tmp_path, capsys):
    from featx.cli.main import main

    out = tmp_path / "out"
    assert main(["extract", media, "--model", tiny_clip, "--out", str(out), "--device", "cpu", "-q"]) == 0
    assert os.listdir(out) == ["manifest__tiny-clip.h5"]
    with open_cache(out / "manifest__tiny-clip.h5") as c:
        assert c.modality == "image"
    # the column left out named, with the command's name (it said "no tokenizer ...: its text tower cannot run"
    # as if the run had asked for it)
    assert (f"featx extract: {tiny_clip}: the manifest's 'text' column is not extracted (no tokenizer saved with the "
            "checkpoint: its text tower cannot run)") in capsys.readouterr().err.splitlines()
    # an image-only manifest asks nothing of the text tower: nothing said
    image_only = os.path.join(os.path.dirname(media), "images.csv")
    pd.read_csv(media).drop(columns=["text"]).to_csv(image_only, index=False)
    assert main(["extract", image_only, "--model", tiny_clip, "--out", str(out), "--device", "cpu", "-q"]) == 0
    err = capsys.readouterr().err
    assert "tokenizer" not in err and "text" not in err, err


@pytest.mark.parametrize("family", ["siglip-text", "siglip2-text"])
def test_a_siglip_without_an_image_processor_runs_its_text_tower_and_says_so_for_an_image_column(
        checkpoints, media, tmp_path, capsys, family):
    # a full SigLIP saved with its tokenizer only: the whole run failed on the image processor the image column
    # asked for, the text column's features with it
    from featx.cli.main import main

    model, out = checkpoints[family], tmp_path / "out"
    assert main(["extract", media, "--model", model, "--out", str(out), "--device", "cpu", "-q"]) == 0
    name = os.path.basename(model)
    assert os.listdir(out) == [f"manifest__{name}__text.h5"]
    with open_cache(out / f"manifest__{name}__text.h5") as c:
        assert c.modality == "text" and c.done.all()
    assert (f"featx extract: {model}: the manifest's 'image' column is not extracted (no image processor saved with "
            "the checkpoint: its image tower cannot run)") in capsys.readouterr().err.splitlines()
    image_only = os.path.join(os.path.dirname(media), "images.csv")
    pd.read_csv(media).drop(columns=["text"]).to_csv(image_only, index=False)
    with pytest.raises(FeatxError, match="no image processor saved with the checkpoint") as e:
        extract(image_only, [model], tmp_path / "none", device="cpu", progress=False)
    assert "\n" not in str(e.value)


def test_a_text_only_manifest_for_a_clip_without_a_tokenizer_is_one_line(tiny_clip, manifest, tmp_path):
    with pytest.raises(FeatxError, match="no tokenizer saved") as e:
        extract(manifest, [tiny_clip], tmp_path / "out", device="cpu", progress=False)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_both_towers_of_one_clip_get_their_own_cache_and_display_name(checkpoints, media, tmp_path):
    model = checkpoints["clip-text"]
    res = extract(media, [model], tmp_path / "out", device="cpu", progress=False)
    names = [os.path.basename(p) for p in res.paths]
    assert names == ["manifest__clip-text.h5", "manifest__clip-text__text.h5"]
    modalities = []
    for p in res.paths:
        with open_cache(p) as c:
            modalities.append(c.modality)
            assert c.model == model
    assert modalities == ["image", "text"]
    shown = display_names([model, model], modalities)
    assert shown == ["clip-text (image)", "clip-text (text)"]
    assert display_names([model, model]) == ["clip-text", "clip-text"]  # one model, one tower: one name


def test_an_unsupported_text_model_type_fails_in_one_line_before_any_data_is_read(manifest, tmp_path):
    from transformers import BartConfig

    BartConfig(d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path / "bart")
    with pytest.raises(FeatxError, match="model type 'bart' is not supported") as e:
        extract(manifest, [tmp_path / "bart"], tmp_path / "out", device="cpu", progress=False)
    assert "\n" not in str(e.value)


def test_tower_names_carry_their_modality_once():
    from featx.naming import with_modality

    assert display_names(["/m/clip", "/m/clip", "/m/bert"], ["image", "text", "text"]) == \
        ["clip (image)", "clip (text)", "bert"]
    assert with_modality("clip (text)", "text") == "clip (text)"
    assert with_modality("bert", "text") == "bert (text)"
    assert with_modality("bert", None) == "bert"
