"""Decode the frames and the audio track of a video file with PyAV (the optional extra `featx[video]`).

Times are seconds from the start of the file (the container's start time is subtracted), float64.
Frame sampling: for a segment [start, end) and a rate `fps`, the target times are the centres of the
1/fps-long slices of the segment, t_k = start + (k + 0.5) / fps for every k with t_k < end; each target
takes the decoded frame whose presentation interval [pts, next pts) contains it. A non-empty segment
shorter than half a slice still gives one frame, at its midpoint. So a 3 s clip at 3 fps gives 9 targets,
1/6, 1/2, 5/6, ... 17/6 s, and from a 10 fps video the frames shown at 0.1, 0.5, 0.8, ... 2.8 s.

Clip sampling (native video encoders, `video_clip`): a clip of exactly n frames (the model's frame count)
over [start, end) (the whole video without start/end) takes the frames shown at the centres of n equal
segments, t_k = start + (k + 0.5) (end - start) / n for k = 0..n-1, each the decoded frame whose presentation
interval [pts, next pts) contains t_k (a target before the first frame takes the first frame). A segment
holding fewer than n frames therefore repeats frames: each target still takes the frame shown at its time.
This rule is CLIP_SAMPLING, stored with the cache with n (both change the numbers).

One bad file (missing, corrupt, truncated, no such stream, a segment outside its duration) raises
MediaError with a one-line reason; the caller records it and goes on with the other items.
"""
from __future__ import annotations

import itertools
import math
import os
from contextlib import contextmanager

import numpy as np

from featx.errors import FeatxError, MediaError
from featx.data.media import END_SLACK, check_amplitude, check_media_file, resample, segment

__all__ = ["MediaError", "video_frames", "video_clip", "clip_times", "CLIP_SAMPLING", "video_audio", "probe_video",
           "build_tiny_video"]

# Audio decoders (AAC, Opus) need the frames before a seek point to rebuild the first samples after it.
_AUDIO_PREROLL = 0.5
# The name of video_clip's sampling rule (the module docstring), stored in native video caches.
CLIP_SAMPLING = "segment-centres"
# video_clip seeks to a target, rather than decoding on to it, when the target lies more than this (or the
# longest key-frame interval seen, if longer) past the last key frame decoded: a key frame then lies between.
_SEEK_GAP = 1.0


def _av():
    try:
        import av
    except ImportError:
        raise FeatxError("video input needs PyAV: pip install 'featx[video]'") from None
    return av


def _reason(err) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.splitlines()[0]


@contextmanager
def _open(path):
    """Open `path` with PyAV; FFmpeg errors while open or decoding become MediaError naming the file."""
    av = _av()
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    check_media_file(path)
    name = os.path.basename(path)
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise MediaError(f"cannot open video {name}: {_reason(e)}") from None
    try:
        yield container
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot decode video {name}: {_reason(e)} (corrupt or truncated file)") from None
    finally:
        container.close()


def _origin(container) -> float:
    """The file's start time in seconds: subtracted from every timestamp."""
    return container.start_time / 1e6 if container.start_time is not None else 0.0


def _stream_end(container, stream) -> float | None:
    """When `stream` ends, in seconds from the file start; None when neither stream nor container says."""
    if stream.duration:
        first = stream.start_time or 0
        return float((first + stream.duration) * stream.time_base) - _origin(container)
    if container.duration:
        return container.duration / 1e6
    return None


def _video_stream(container, name):
    """The file's first video stream, decoded with threads; MediaError when it has none."""
    if not container.streams.video:
        raise MediaError(f"{name}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _frame_length(stream, frame) -> float:
    """How long `frame` is shown, in seconds: its duration, else one period of the stream's average rate."""
    if frame.duration:
        return float(frame.duration * stream.time_base)
    rate = stream.average_rate
    return 1 / float(rate) if rate else 0.0


def _targets(start, end, fps, max_frames):
    """Yield the sampling times of [start, end) (the centre rule of the module docstring)."""
    if not fps > 0:
        raise FeatxError(f"frame rate must be positive, got {fps}")
    if math.isfinite(end):
        if max_frames and (end - start) * fps > max_frames:
            fps = max_frames / (end - start)  # keep the whole segment covered: lower the rate
        n = max(0, math.ceil((end - start) * fps - 0.5))
        times = [t for t in (start + (k + 0.5) / fps for k in range(n + 1)) if t < end]
        yield from (times or [(start + end) / 2])
        return
    k = 0  # duration unknown: sample until the frames run out
    while not max_frames or k < max_frames:
        yield start + (k + 0.5) / fps
        k += 1


def _seek(container, stream, start):
    # Land on the key frame at or before `start`; decoding from there reaches `start` exactly.
    if start > 0:
        container.seek(int((start + _origin(container)) / stream.time_base), stream=stream, backward=True)


def video_frames(path, fps: float = 3.0, start: float | None = None, end: float | None = None,
                 max_frames: int | None = None):
    """Sample RGB frames of the video at `path` at `fps` within [start, end) seconds (the whole file when None).

    Returns (frames, times): a list of F PIL.Image (RGB, the video's size) and a float64 array (F,) of each
    frame's presentation time in seconds from the file start (times repeat when fps exceeds the video's rate).
    With `max_frames`, a segment that would give more frames is sampled at the lower rate that gives max_frames.
    Raises MediaError for a missing, corrupt or truncated file, no video stream, or a segment outside the video.
    """
    name = os.path.basename(str(path))
    with _open(path) as container:
        stream = _video_stream(container, name)
        origin = _origin(container)
        start, end = segment(start, end, _stream_end(container, stream), name, "video")
        targets = _targets(start, end, fps, max_frames)
        target = next(targets)
        images, times = [], []
        prev = prev_time = None
        last_image = last_frame = None

        def take(frame, time):
            nonlocal last_frame, last_image
            if frame is not last_frame:  # several targets in one frame's interval share one image
                last_frame, last_image = frame, frame.to_image()
            images.append(last_image)
            times.append(time)

        _seek(container, stream, start)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            time = float(frame.pts * stream.time_base) - origin
            while target is not None and target < time:
                # The target lies before this frame, so in the previous frame's interval (or before the first frame).
                take(*((prev, prev_time) if prev is not None else (frame, time)))
                target = next(targets, None)
            if target is None:
                break
            prev, prev_time = frame, time
        if target is not None:
            if prev is None:
                raise MediaError(f"{name}: no video frame could be decoded in [{start:g}, {end:g}) s")
            last_end = prev_time + _frame_length(stream, prev)
            # A known end may overshoot the last frame by END_SLACK; an unknown one stops at the last frame.
            while target is not None and target < last_end + (END_SLACK if math.isfinite(end) else 0.0):
                take(prev, prev_time)
                target = next(targets, None)
            if target is not None and math.isfinite(end):
                raise MediaError(f"{name}: video frames end at {last_end:.3f} s, before {target:.3f} s "
                                 "(truncated or corrupt file)")
    if not images:  # e.g. a still image named .mp4: one frame, no duration, ending before the first target
        raise MediaError(f"{name}: no video frame at {fps:g} fps in [{start:g}, {end:g}) s "
                         "(a still image or an empty stream?)")
    return images, np.asarray(times, dtype=np.float64)


def clip_times(start: float, end: float, num_frames: int) -> np.ndarray:
    """The n = num_frames sampling times of a clip over [start, end) seconds: the centres of n equal segments,
    t_k = start + (k + 0.5) (end - start) / n, float64 (n,)."""
    return start + (np.arange(num_frames, dtype=np.float64) + 0.5) * ((end - start) / num_frames)


def _scan_end(container, stream, name) -> float:
    """When the video stream ends, from its packets' timestamps (no decoding): for files whose header has no
    duration. The caller seeks before decoding."""
    origin, last = _origin(container), None
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = float((packet.pts + (packet.duration or 0)) * stream.time_base) - origin
            last = end if last is None else max(last, end)
    if last is None:
        raise MediaError(f"{name}: the video stream has no timed frames")
    return last


def _decode_from(container, stream, t):
    """(frame, time) pairs of the video stream from the key frame at or before `t`; from the file start when
    the demuxer's seek lands after `t` (some seek imprecisely) or fails."""
    av, origin, base = _av(), _origin(container), stream.time_base
    for at in dict.fromkeys((max(0.0, t), 0.0)):
        try:
            if at > 0:
                container.seek(int((at + origin) / base), stream=stream, backward=True)
            else:
                container.seek(0)
        except av.error.FFmpegError:
            continue
        frames = ((f, float(f.pts * base) - origin) for f in container.decode(stream) if f.pts is not None)
        first = next(frames, None)
        if first is not None and (first[1] <= t or at == 0):
            return itertools.chain([first], frames)
    return iter(())


def _frames_at(container, stream, targets, name):
    """The frame shown at each of the ascending `targets` (seconds): a list of uint8 (H, W, 3) RGB arrays (one
    array per distinct frame) and their presentation times. Decodes on from one target to the next, and seeks
    instead when the next target lies past the next key frame (see _SEEK_GAP)."""
    frames, times = [], []
    decoded = None
    prev = ahead = None  # (frame, time): the last frame at or before the target, the first one after it
    last_key, key_gap = -math.inf, _SEEK_GAP
    rgb = (None, None)  # the latest frame taken and its array: a repeated frame is converted once
    for t in targets:
        if decoded is None or (ahead is not None and t > ahead[1] and t - key_gap > last_key):
            decoded, prev, ahead = _decode_from(container, stream, t), None, None
            last_key = -math.inf
        if ahead is not None and ahead[1] <= t:
            prev, ahead = ahead, None
        while ahead is None:
            got = next(decoded, None)
            if got is None:
                break  # the stream ended
            if got[0].key_frame:
                if math.isfinite(last_key):
                    key_gap = max(key_gap, got[1] - last_key)
                last_key = got[1]
            prev, ahead = (got, None) if got[1] <= t else (prev, got)
        shown = prev or ahead  # a target before the first frame takes the first frame
        if shown is None:
            raise MediaError(f"{name}: no video frame could be decoded at {t:.3f} s")
        last_end = shown[1] + _frame_length(stream, shown[0])
        if ahead is None and t > last_end + END_SLACK:
            raise MediaError(f"{name}: video frames end at {last_end:.3f} s, before {t:.3f} s "
                             "(truncated or corrupt file)")
        if rgb[0] is not shown[0]:  # targets ascend, so only the latest frame taken can repeat
            rgb = (shown[0], shown[0].to_ndarray(format="rgb24"))
        frames.append(rgb[1])
        times.append(shown[1])
    return frames, times


def video_clip(path, num_frames: int, start: float | None = None, end: float | None = None):
    """A clip of exactly `num_frames` RGB frames of the video at `path`, sampled over [start, end) seconds (the
    whole video when None) by the segment-centre rule of the module docstring (CLIP_SAMPLING).

    Returns (frames, times): uint8 (num_frames, H, W, 3) and the float64 (num_frames,) presentation times (s from
    the file start) of the frames taken; a segment holding fewer than num_frames frames repeats frames.
    Decodes only what the targets need: it seeks to a far target instead of decoding up to it.
    Raises MediaError for a missing, corrupt or truncated file, no video stream, or a segment outside the video.
    """
    if int(num_frames) < 1:
        raise ValueError(f"a clip needs at least one frame, got num_frames={num_frames}")
    name = os.path.basename(str(path))
    with _open(path) as container:
        stream = _video_stream(container, name)
        duration = _stream_end(container, stream)
        if duration is None and end is None:
            duration = _scan_end(container, stream, name)
        start, end = segment(start, end, duration, name, "video")
        frames, times = _frames_at(container, stream, clip_times(start, end, int(num_frames)), name)
    return np.stack(frames), np.asarray(times, dtype=np.float64)


def video_audio(path, sample_rate: int, start: float | None = None, end: float | None = None) -> np.ndarray:
    """The audio track of the video at `path` as a mono float32 waveform (T,) at `sample_rate`.

    Only [start, end) seconds when given; channels are averaged; resampled with torchaudio when the track's
    rate differs. Raises MediaError for a missing or corrupt file, no audio track, a truncated track,
    or a segment outside the track.
    """
    av = _av()
    name = os.path.basename(str(path))
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{name}: no audio track")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        if not rate:
            raise MediaError(f"{name}: the audio track has no sample rate")
        origin = _origin(container)
        start, end = segment(start, end, _stream_end(container, stream), name, "audio track")
        # Decoders give int or float, planar or packed samples; this gives float planar (channels, n).
        to_float = av.AudioResampler(format="fltp")
        chunks, first, time = [], None, None
        _seek(container, stream, start - _AUDIO_PREROLL)
        for frame in container.decode(stream):
            if frame.pts is not None:
                time = float(frame.pts * stream.time_base) - origin
            elif time is None:
                time = 0.0
            if time >= end:
                break
            if time + frame.samples / rate > start:
                first = time if first is None else first
                chunks += [f.to_ndarray() for f in to_float.resample(frame)]
            time += frame.samples / rate  # for frames without a pts
        if first is not None:
            chunks += [f.to_ndarray() for f in to_float.resample(None)]
    if first is None:
        raise MediaError(f"{name}: no audio could be decoded in [{start:g}, {end:g}) s")
    wave = np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32)
    check_amplitude(wave, name)
    if first > start:  # the track starts after the segment does: silence keeps it aligned with the frames
        wave = np.concatenate([np.zeros(round((first - start) * rate), np.float32), wave])
        first = start
    got_end = first + wave.shape[0] / rate
    if math.isfinite(end) and got_end + END_SLACK < end:
        raise MediaError(f"{name}: audio ends at {got_end:.3f} s, before {end:.3f} s (truncated or corrupt file)")
    i0 = max(0, round((start - first) * rate))
    i1 = wave.shape[0] if not math.isfinite(end) else round((end - first) * rate)
    return resample(wave[i0:i1], rate, sample_rate)


def probe_video(path) -> dict:
    """What the file at `path` holds, without decoding it.

    Returns {"duration": s or None, "has_video", "fps": average frame rate or None, "width", "height",
    "num_frames": from the header or None, "has_audio", "audio_rate": Hz or None, "audio_channels"}.
    """
    with _open(path) as container:
        info = {"duration": container.duration / 1e6 if container.duration else None,
                "has_video": bool(container.streams.video), "fps": None, "width": None, "height": None,
                "num_frames": None, "has_audio": bool(container.streams.audio), "audio_rate": None,
                "audio_channels": None}
        if container.streams.video:
            v = container.streams.video[0]
            info.update(fps=float(v.average_rate) if v.average_rate else None, width=v.codec_context.width,
                        height=v.codec_context.height, num_frames=v.frames or None)
        if container.streams.audio:
            a = container.streams.audio[0]
            info.update(audio_rate=a.codec_context.sample_rate or None, audio_channels=a.codec_context.channels)
    return info


def build_tiny_video(path, seconds: float = 3.0, fps: int = 10, size=(64, 48), tone_hz: float | None = 440.0,
                     sample_rate: int = 44100, channels: int = 2, audio_start: float = 0.0,
                     faststart: bool = False) -> str:
    """Write a small test video to `path` (.mp4: H.264 + AAC; .mkv: lossless FFV1 + 16-bit PCM) and return `path`.

    Frame i is a solid grey of level 8 * i (mod 256), so a decoded frame tells its index despite compression;
    the audio track (none when tone_hz is None) is a sine of amplitude 0.5 at `tone_hz` from `audio_start`
    seconds to the end.
    Used by the tests and the demo, where no dataset can be downloaded.
    """
    av = _av()
    width, height = size
    mkv = str(path).endswith(".mkv")
    container = av.open(os.fspath(path), "w", options={"movflags": "faststart"} if faststart else {})
    try:
        codec = "ffv1" if mkv or "libx264" not in av.codecs_available else "libx264"
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.gop_size = fps  # a key frame a second, as in real videos, so seeking is exercised
        video.options = {"crf": "0"} if codec == "libx264" else {}  # lossless: frame i decodes to grey 8 * i
        audio = None
        if tone_hz is not None:
            audio = container.add_stream("pcm_s16le" if mkv else "aac", rate=sample_rate)
            audio.layout = "stereo" if channels == 2 else "mono"
        for i in range(round(seconds * fps)):
            grey = np.full((height, width, 3), (8 * i) % 256, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")))
        container.mux(video.encode())
        if audio is not None:
            n, offset = round((seconds - audio_start) * sample_rate), round(audio_start * sample_rate)
            tone = (0.5 * np.sin(2 * np.pi * tone_hz * np.arange(n) / sample_rate)).astype(np.float32)
            block = 1024  # AAC's frame size; PCM takes any
            for s in range(0, n, block):
                planes = np.ascontiguousarray(np.repeat(tone[None, s:s + block], channels, axis=0))
                frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=audio.layout.name)
                frame.sample_rate, frame.pts = sample_rate, offset + s
                container.mux(audio.encode(frame))
            container.mux(audio.encode())
    finally:
        container.close()
    return os.fspath(path)
