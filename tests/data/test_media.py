"""featx.data.media.load_audio on real files: segments, and bad segments failing with a one-line reason."""
import numpy as np
import pytest

from featx.errors import MediaError
from featx.data.media import load_audio

from conftest import write_wav


def test_audio_segment_is_the_same_samples_as_the_whole_file(tmp_path):
    path = write_wav(tmp_path / "a.wav", 2.0, rate=16000)
    whole = load_audio(path, 16000)
    assert whole.shape == (32000,)
    np.testing.assert_array_equal(load_audio(path, 16000, start=0.5, end=1.25), whole[8000:20000])
    np.testing.assert_array_equal(load_audio(path, 16000, start=1.5), whole[24000:])
    np.testing.assert_array_equal(load_audio(path, 16000, start=float("nan"), end=float("nan")), whole)
    np.testing.assert_array_equal(load_audio(path, 16000, start=1.5, end=2.2), whole[24000:])  # rounding slack


@pytest.mark.parametrize("start, end, reason", [(2.5, None, "after the end of the audio"),
                                                (1.0, 3.0, "ends after the audio"),
                                                (1.0, 1.0, "empty segment"),
                                                (-1.0, 1.0, "not a time")])
def test_audio_segment_outside_the_file_fails(tmp_path, start, end, reason):
    path = write_wav(tmp_path / "a.wav", 2.0, rate=16000)
    with pytest.raises(MediaError, match=reason) as err:
        load_audio(path, 16000, start=start, end=end)
    assert "\n" not in str(err.value) and "a.wav" in str(err.value)


def test_empty_file_is_zero_length_whatever_the_segment(tmp_path):
    import soundfile as sf
    sf.write(str(tmp_path / "e.wav"), np.zeros((0,), np.float32), 16000)
    for start, end in ((None, None), (0.5, 1.0)):
        with pytest.raises(MediaError, match="zero-length audio"):
            load_audio(str(tmp_path / "e.wav"), 16000, start=start, end=end)


@pytest.mark.parametrize("size, budget, said", [((80, 60), 2000, "80x60 = 0.0048 Mpx, over the budget of 0.002 Mpx"),
                                                ((1001, 1000), 10 ** 6, "1001x1000 = 1.001 Mpx, over the budget of "
                                                                        "1 Mpx")])
def test_an_image_over_the_pixel_budget_is_said_with_its_exact_size_and_budget(tmp_path, size, budget, said):
    from PIL import Image

    from featx.data.media import load_image

    Image.new("RGB", size).save(tmp_path / "img.png")
    with pytest.raises(MediaError) as err:
        load_image(str(tmp_path / "img.png"), max_pixels=budget)
    assert said in str(err.value)   # not "= 0.0 Mpx, over the budget of 0.002 Mpx"
    assert load_image(str(tmp_path / "img.png"), max_pixels=size[0] * size[1]).size == size   # at the budget: read


def _wav_with_list_chunk(path, rate, frames):
    """A PCM-16 WAV whose fmt chunk follows an odd-sized LIST chunk (padded to even, as RIFF says)."""
    import struct
    data = (np.arange(frames, dtype=np.int16) % 100).tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"LIST" + struct.pack("<I", 5) + b"abcde\0" + b"fmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_an_audio_files_duration_from_its_header_is_soundfiles(tmp_path):
    # the length sort's estimate reads a WAV's header (a tenth of libsndfile's open); anything else goes to
    # libsndfile: each equals soundfile.info's duration
    import soundfile as sf

    from featx.data.media import audio_seconds
    rng = np.random.default_rng(0)
    cases = [("pcm16.wav", "WAV", "PCM_16", 16000, 1), ("stereo24.wav", "WAV", "PCM_24", 44100, 2),
             ("float.wav", "WAV", "FLOAT", 22050, 1), ("double.wav", "WAV", "DOUBLE", 8000, 3),
             ("ext.wav", "WAVEX", "PCM_16", 48000, 2), ("u8.wav", "WAV", "PCM_U8", 11025, 1),
             ("adpcm.wav", "WAV", "IMA_ADPCM", 16000, 1), ("x.flac", "FLAC", "PCM_16", 16000, 1),
             ("x.ogg", "OGG", "VORBIS", 16000, 1)]
    paths = []
    for name, fmt, subtype, rate, channels in cases:
        frames = int(rng.integers(1, 3 * rate))
        sf.write(tmp_path / name, rng.uniform(-0.5, 0.5, (frames, channels)), rate, format=fmt, subtype=subtype)
        paths.append(tmp_path / name)
    _wav_with_list_chunk(tmp_path / "list.wav", 16000, 12345)
    cut = tmp_path / "cut.wav"  # its data chunk says more samples than the file holds
    cut.write_bytes((tmp_path / "pcm16.wav").read_bytes()[:-101])
    for path in paths + [tmp_path / "list.wav", cut]:
        assert audio_seconds(str(path)) == sf.info(str(path)).duration, path.name
