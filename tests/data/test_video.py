"""featx.data.video on small videos written by PyAV: frame i is grey level 8 * i, the audio a 440 Hz sine."""
import math
import sys
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("av")

# The extraction loop catches featx.errors.MediaError: the errors here must be that class.
from featx.errors import FeatxError, MediaError  # noqa: E402
from featx.data.video import build_tiny_video, probe_video, video_audio, video_frames  # noqa: E402

RATE = 10  # frames per second of the test videos; 3 s long


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    paths = {"mp4": build_tiny_video(d / "tone.mp4"),  # H.264 + stereo AAC at 44.1 kHz
             "mkv": build_tiny_video(d / "tone.mkv", sample_rate=16000, channels=1),  # MPEG-4 + mono PCM
             "silent": build_tiny_video(d / "silent.mp4", tone_hz=None),
             "faststart": build_tiny_video(d / "faststart.mp4", faststart=True)}
    for name in ("mp4", "faststart"):
        data = open(paths[name], "rb").read()
        paths[f"half_{name}"] = str(d / f"half_{name}.mp4")
        open(paths[f"half_{name}"], "wb").write(data[: len(data) // 2])
    paths["garbage"] = str(d / "garbage.mp4")
    open(paths["garbage"], "wb").write(np.random.default_rng(0).bytes(4000))
    return paths


def frame_index(image):
    return int(round(np.asarray(image, dtype=np.float64).mean() / 8))


def expected(fps, start=0.0, end=3.0):
    """Indices and times of the frames holding the centre-rule targets, in exact arithmetic."""
    start, end, fps = Fraction(start), Fraction(end), Fraction(fps)
    targets = [start + (k + Fraction(1, 2)) / fps for k in range(1000)]
    index = [math.floor(t * RATE) for t in targets if t < end]
    return index, np.array(index) / RATE


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
@pytest.mark.parametrize("fps", [3, 4, 20])
def test_frames_are_taken_at_the_centre_of_each_slice(videos, kind, fps):
    frames, times = video_frames(videos[kind], fps=fps)
    index, want_times = expected(fps)
    assert len(frames) == round(3 * fps)
    assert [frame_index(f) for f in frames] == index
    assert times.dtype == np.float64
    np.testing.assert_allclose(times, want_times, atol=1e-9)
    assert frames[0].mode == "RGB" and frames[0].size == (64, 48)


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_segment_is_respected(videos, kind):
    frames, times = video_frames(videos[kind], start=1.25, end=2.25)
    index, want_times = expected(3, 1.25, 2.25)
    assert [frame_index(f) for f in frames] == index == [14, 17, 20]
    np.testing.assert_allclose(times, want_times, atol=1e-9)


def test_short_segment_gives_its_midpoint_frame(videos):
    frames, times = video_frames(videos["mp4"], start=1.52, end=1.58)
    assert [frame_index(f) for f in frames] == [15]
    np.testing.assert_allclose(times, [1.5])


def test_empty_manifest_cells_mean_the_whole_file(videos):
    nan = float("nan")  # what pandas gives for an empty start / end cell
    assert len(video_frames(videos["mp4"], start=nan, end=nan)[0]) == 9
    assert video_audio(videos["mp4"], 16000, start=nan, end=nan).shape == (48000,)


def test_max_frames_lowers_the_rate_over_the_whole_segment(videos):
    frames, times = video_frames(videos["mp4"], fps=3, max_frames=3)
    assert [frame_index(f) for f in frames] == [5, 15, 25]


@pytest.mark.parametrize("start, end, reason", [(3.5, None, "after the end of the video"),
                                                (1.0, 5.0, "ends after the video"),
                                                (2.0, 2.0, "empty segment"),
                                                (-1.0, 1.0, "not a time")])
def test_segment_outside_the_file_fails(videos, start, end, reason):
    with pytest.raises(MediaError, match=reason) as err:
        video_frames(videos["mp4"], start=start, end=end)
    assert "\n" not in str(err.value)
    with pytest.raises(MediaError, match=reason.replace("video", "audio track")):
        video_audio(videos["mp4"], 16000, start=start, end=end)


def test_end_overshooting_by_rounding_is_clipped(videos):
    frames, _ = video_frames(videos["mp4"], start=2.0, end=3.1)
    assert [frame_index(f) for f in frames] == [21, 25, 28]
    assert video_audio(videos["mp4"], 16000, start=2.0, end=3.1).shape == (16000,)


def spectral_peak_hz(wave, rate):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.argmax(spectrum) * rate / len(wave)


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_audio_track_is_the_tone_resampled(videos, kind):
    wave = video_audio(videos[kind], 16000)
    assert wave.dtype == np.float32 and wave.shape == (48000,)
    assert abs(spectral_peak_hz(wave, 16000) - 440) < 1
    assert np.sqrt(np.mean(wave ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.03)


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_audio_segment_is_aligned_in_time(videos, kind):
    # The samples of [0.5, 1.5) s are the sine at those times: a shift of one sample would show.
    wave = video_audio(videos[kind], 16000, start=0.5, end=1.5)
    tone = 0.5 * np.sin(2 * np.pi * 440 * (0.5 + np.arange(16000) / 16000))
    assert wave.shape == (16000,)
    # AAC is lossy and the resampling filter has edges; mono 16-bit PCM at 16 kHz is exact.
    inner = slice(100, -100)
    np.testing.assert_allclose(wave[inner], tone[inner], atol=0.03 if kind == "mp4" else 1e-3)


def test_audio_segment_matches_the_same_samples_of_the_whole_track(videos):
    # Decoding from a seek point must give the samples a decode from the start gives.
    whole = video_audio(videos["mp4"], 44100)
    part = video_audio(videos["mp4"], 44100, start=1.3, end=2.1)
    np.testing.assert_allclose(part, whole[round(1.3 * 44100):round(2.1 * 44100)], atol=1e-6)


def test_no_audio_track_fails_audio_only(videos):
    frames, _ = video_frames(videos["silent"])
    assert len(frames) == 9
    with pytest.raises(MediaError, match="no audio track"):
        video_audio(videos["silent"], 16000)
    assert probe_video(videos["silent"])["has_audio"] is False


def test_probe(videos):
    info = probe_video(videos["mp4"])
    assert info["duration"] == pytest.approx(3.0, abs=0.05)
    assert (info["fps"], info["width"], info["height"]) == (10.0, 64, 48)
    assert (info["has_video"], info["has_audio"], info["audio_rate"], info["audio_channels"]) == (True, True, 44100, 2)


@pytest.mark.parametrize("bad, reason", [("half_mp4", "cannot open"), ("half_faststart", "truncated"),
                                         ("garbage", "cannot open"), ("missing", "file not found"),
                                         (None, "no file given")])
def test_bad_files_fail_alone(videos, bad, reason):
    items = [videos["mp4"], videos.get(bad, videos["mp4"] + ".missing.mp4") if bad else None, videos["mkv"]]
    results = []
    for path in items:  # as the extraction loop does: record the failure, go on
        try:
            results.append(len(video_frames(path)[0]))
        except MediaError as e:
            results.append(str(e))
    assert results[0] == results[2] == 9
    assert reason in results[1] and "\n" not in results[1]


def test_truncated_file_fails_audio_too(videos):
    with pytest.raises(MediaError, match="truncated"):
        video_audio(videos["half_faststart"], 16000)
    with pytest.raises(MediaError, match="cannot open"):
        video_audio(videos["garbage"], 16000)


def test_without_pyav_the_error_says_what_to_install(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` meets where PyAV is not installed
    with pytest.raises(FeatxError, match=r"pip install 'featx\[video\]'"):
        video_frames(videos["mp4"])


def test_audio_track_starting_late_is_padded_to_stay_aligned(tmp_path):
    # The track starts 0.2 s into the file: sample i of the waveform must still be time i / rate.
    path = build_tiny_video(tmp_path / "late.mkv", sample_rate=16000, channels=1, audio_start=0.2)
    wave = video_audio(path, 16000)
    assert wave.shape == (48000,)
    assert np.abs(wave[:3200]).max() == 0
    tone = 0.5 * np.sin(2 * np.pi * 440 * (np.arange(3200, 48000) - 3200) / 16000)
    np.testing.assert_allclose(wave[3200:], tone, atol=1e-3)
