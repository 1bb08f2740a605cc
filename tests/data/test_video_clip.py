"""featx.data.video.video_clip: a clip of exactly n frames, taken at the centres of n equal segments of [start, end).

The test videos are written by PyAV: frame i is grey level 8 * i (mod 256) and is shown over [i / rate, (i + 1) / rate).
"""
import math
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")

from featx.data.video import CLIP_SAMPLING, build_tiny_video, clip_times, video_clip  # noqa: E402
from featx.errors import MediaError  # noqa: E402

RATE = 10


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    paths = {"mp4": build_tiny_video(d / "a.mp4", tone_hz=None),  # H.264, 3 s, a key frame a second
             "mkv": build_tiny_video(d / "a.mkv", tone_hz=None),  # FFV1
             "long": build_tiny_video(d / "long.mp4", seconds=30.0, tone_hz=None),  # far targets: seeks
             "faststart": build_tiny_video(d / "fs.mp4", tone_hz=None, faststart=True)}
    data = open(paths["faststart"], "rb").read()
    paths["truncated"] = str(d / "truncated.mp4")
    open(paths["truncated"], "wb").write(data[: len(data) // 2])  # header says 3 s, frames stop earlier
    paths["garbage"] = str(d / "garbage.mp4")
    open(paths["garbage"], "wb").write(np.random.default_rng(0).bytes(4000))
    paths["live"] = _write_live_mkv(d / "live.mkv")
    return paths


def _write_live_mkv(path, frames=30):
    """A Matroska file written as a live stream: its header gives no duration, so the clip's end is found
    from the packets' timestamps."""
    c = av.open(str(path), "w", format="matroska", options={"live": "1"})
    s = c.add_stream("ffv1", rate=RATE)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    for i in range(frames):
        c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24")))
    c.mux(s.encode())
    c.close()
    with av.open(str(path)) as check:
        assert check.duration is None and check.streams.video[0].duration is None
    return str(path)


def expected(n, start, end):
    """Indices of the frames shown at the segment centres, in exact arithmetic."""
    start, end = Fraction(start), Fraction(end)
    return [math.floor((start + (k + Fraction(1, 2)) * (end - start) / n) * RATE) for k in range(n)]


def grey_index(frame):
    return int(round(frame.astype(np.float64).mean() / 8))


def test_clip_times_are_the_centres_of_equal_segments():
    np.testing.assert_allclose(clip_times(1.0, 3.0, 4), [1.25, 1.75, 2.25, 2.75])
    assert clip_times(0.0, 1.0, 1).tolist() == [0.5]
    assert CLIP_SAMPLING == "segment-centres"


@pytest.mark.parametrize("kind", ["mp4", "mkv", "live"])
@pytest.mark.parametrize("n, start, end", [(4, None, None), (8, None, None), (4, 0.5, 1.5), (3, 2.0, None)])
def test_clip_takes_the_frame_shown_at_each_segment_centre(videos, kind, n, start, end):
    frames, times = video_clip(videos[kind], n, start=start, end=end)
    index = expected(n, start or 0.0, end or 3.0)
    assert frames.shape == (n, 48, 64, 3) and frames.dtype == np.uint8
    assert [grey_index(f) for f in frames] == index
    np.testing.assert_allclose(times, np.array(index) / RATE, atol=1e-9)


def test_a_segment_shorter_than_the_clip_repeats_frames(videos):
    frames, times = video_clip(videos["mp4"], 4, start=1.0, end=1.2)  # two frames shown in the segment
    assert [grey_index(f) for f in frames] == [10, 10, 11, 11]
    np.testing.assert_allclose(times, [1.0, 1.0, 1.1, 1.1], atol=1e-9)


def test_far_apart_targets_of_a_long_video(videos):
    # 30 s with a key frame a second: each target lies past the next key frame, so the clip seeks to it
    frames, times = video_clip(videos["long"], 6)
    assert [round(t * RATE) for t in times] == expected(6, 0, 30) == [25, 75, 125, 175, 225, 275]
    assert [grey_index(f) for f in frames] == [i % 32 for i in expected(6, 0, 30)]
    frames, times = video_clip(videos["long"], 4, start=20.0, end=22.0)
    assert [round(t * RATE) for t in times] == expected(4, 20, 22)


@pytest.mark.parametrize("kind, start, end, says", [
    ("garbage", None, None, "garbage.mp4"),
    ("truncated", None, None, "truncated"),
    ("mp4", 2.0, 5.0, "ends after the video"),
    ("mp4", 1.0, 1.0, "empty segment"),
])
def test_bad_videos_and_segments_fail_as_items(videos, kind, start, end, says):
    with pytest.raises(MediaError, match=says):
        video_clip(videos[kind], 4, start=start, end=end)


def test_a_missing_file_fails_as_an_item(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        video_clip(str(tmp_path / "nope.mp4"), 4)


def test_a_clip_needs_a_frame(videos):
    with pytest.raises(ValueError, match="at least one frame"):
        video_clip(videos["mp4"], 0)
