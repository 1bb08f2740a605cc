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


def test_an_audio_cache_begun_with_padded_batches_of_a_model_that_pads_inexactly_is_not_resumed(media, tmp_path,
                                                                                                 tiny_wavlm):
    # data2vec-audio's values depended on their batch while featx padded its inputs: a cache begun then (no
    # audio_batching attribute) is refused on a resume, with why and the way out; other audio models record none
    from tiny_models.audio import build_tiny_wav2vec2_family
    model = str(build_tiny_wav2vec2_family(tmp_path / "d2v", "data2vec-audio"))
    df = pd.read_csv(media)
    bad = {**df.iloc[0].to_dict(), "id": "missing", "audio": "nowhere.wav"}
    manifest = os.path.join(os.path.dirname(media), "m.csv")
    pd.concat([df, pd.DataFrame([bad])]).to_csv(manifest, index=False)  # one failed item: a rerun has work left
    out = tmp_path / "out"
    first = extract(manifest, [model, tiny_wavlm], out, progress=False)
    assert first.failed == 2
    with h5py.File(first.paths[0]) as f, h5py.File(first.paths[1]) as g:
        assert f.attrs["audio_batching"] == "equal-lengths" and "audio_batching" not in g.attrs
    assert extract(manifest, [model], out, progress=False).caches[0]["done"] == len(df)  # resumes as it is
    with h5py.File(first.paths[0], "a") as f:  # as a featx that padded them left it
        del f.attrs["audio_batching"]
    with pytest.raises(FeatxError, match="audio_batching 'padded' \\(now 'equal-lengths': this featx batches .* "
                                         "depended on their batch, so the cache is extracted again with "
                                         "--overwrite\\)") as e:
        extract(manifest, [model], out, progress=False)
    assert "\n" not in str(e.value)
    again = extract(manifest, [model], out, progress=False, overwrite=True)
    assert again.caches[0]["done"] == len(df)
