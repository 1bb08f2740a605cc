"""Caches made before a setting was recorded (--image-preprocess, --audio-attention) resume under the value
that made them, and only under it: the absent attribute reads as featx.cache.schema.ATTRS_BEFORE_RECORDED."""
import os

import h5py
import pandas as pd
import pytest

from featx import extract
from featx.cache.schema import ATTRS_BEFORE_RECORDED
from featx.errors import FeatxError


@pytest.mark.parametrize("model, attr, other", [("tiny_clip_vision", "image_preprocess", "batched-torch"),
                                                ("tiny_wavlm", "audio_attention", "sdpa")])
def test_an_old_cache_resumes_only_under_the_setting_that_made_it(model, attr, other, media, tmp_path, request):
    path = request.getfixturevalue(model)
    df = pd.read_csv(media)
    bad = {**df.iloc[0].to_dict(), "id": "missing", "image": "nowhere.png", "audio": "nowhere.wav"}
    manifest = os.path.join(os.path.dirname(media), "m.csv")  # beside the media: its paths are relative
    pd.concat([df, pd.DataFrame([bad])]).to_csv(manifest, index=False)  # one failed item: a rerun has work left
    old, out = ATTRS_BEFORE_RECORDED[attr], tmp_path / "out"
    first = extract(manifest, [path], out, progress=False, **{attr: old})
    assert first.failed == 1
    with h5py.File(first.paths[0], "a") as f:  # as a featx that did not record the setting left it
        del f.attrs[attr]
    with pytest.raises(FeatxError, match=f"{attr} '{old}' \\(now '{other}'\\).*run with the settings it was made"):
        extract(manifest, [path], out, progress=False, **{attr: other})
    again = extract(manifest, [path], out, progress=False, **{attr: old})
    assert again.caches[0]["done"] == first.caches[0]["done"] == len(df) and again.failed == 1
    with h5py.File(first.paths[0]) as f:
        assert f.attrs[attr] == old
