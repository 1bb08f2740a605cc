"""Decode one manifest item into what an encoder's processor takes: text, an RGB image, or a mono waveform.

Every failure is a MediaError with a one-line reason; the pipeline records it for that item and goes on.
"""
from __future__ import annotations

import math
import os

import numpy as np

from featx.errors import MediaError, first_line

__all__ = ["MediaError", "load_text", "load_image", "load_audio", "resample", "segment"]

# Annotated segment ends often overshoot a clip by rounding; up to this many seconds past the end is clipped
# (audio files here, video files and their audio tracks in featx.data.video).
END_SLACK = 0.25


def _exists(path):
    if not isinstance(path, str) or not path:
        raise MediaError("no file given")
    if not os.path.exists(path):
        raise MediaError(f"file not found: {path}")


def load_text(text) -> str:
    """The item's text, stripped; MediaError when empty or only whitespace."""
    if text is None or _isnan(text) or not str(text).strip():
        raise MediaError("empty text")
    return str(text).strip()


def load_image(path):
    """An RGB PIL image; MediaError for a missing or undecodable file."""
    from PIL import Image, UnidentifiedImageError

    _exists(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot decode image {os.path.basename(path)}: {first_line(e)}")


def load_audio(path, sample_rate: int, start=None, end=None) -> np.ndarray:
    """Mono float32 waveform (T,) at `sample_rate`, of the segment [start, end) seconds when given.

    Decoded with soundfile (channels averaged to mono), resampled with torchaudio.functional.resample.
    """
    import soundfile as sf

    _exists(path)
    name = os.path.basename(path)
    try:
        with sf.SoundFile(path) as f:
            rate, first, last = f.samplerate, 0, f.frames
            if f.frames > 0:  # an empty file is reported as zero-length below, whatever the segment
                start, end = segment(start, end, f.frames / rate, name, "audio")
                first, last = int(round(start * rate)), min(f.frames, int(round(end * rate)))
                f.seek(first)
            wav = f.read(max(0, last - first), dtype="float32", always_2d=True)
    except MediaError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise MediaError(f"cannot decode audio {name}: {first_line(e)}")
    if wav.shape[0] == 0:
        raise MediaError("zero-length audio")
    wav = wav.mean(axis=1)
    if not np.isfinite(wav).all():
        raise MediaError("audio has non-finite samples (NaN or inf)")
    return resample(wav, rate, sample_rate)


def segment(start, end, duration, name, what):
    """Check the segment [start, end) seconds of a file against its `duration` (None: unknown); return it as
    floats, end clipped to the duration (inf when unknown and open). MediaError naming `name` and `what`."""
    start, end = (None if v is None or v != v else v for v in (start, end))  # an empty manifest cell is NaN
    start = 0.0 if start is None else float(start)
    if not math.isfinite(start) or start < 0:
        raise MediaError(f"{name}: segment start {start:g} s is not a time in the file")
    if end is None:
        end = duration if duration is not None else math.inf
    else:
        end = float(end)
        if not end > start:
            raise MediaError(f"{name}: empty segment [{start:g}, {end:g}) s")
        if duration is not None and end > duration + END_SLACK:
            raise MediaError(f"{name}: segment [{start:g}, {end:g}) s ends after the {what} ({duration:.3f} s)")
        if duration is not None:
            end = min(end, duration)
    if duration is not None and start >= duration:
        raise MediaError(f"{name}: segment starts at {start:g} s, after the end of the {what} ({duration:.3f} s)")
    return start, end


def resample(wav, rate: int, sample_rate: int) -> np.ndarray:
    """Mono waveform (T,) from `rate` to `sample_rate` Hz with torchaudio.functional.resample; float32 (T',)."""
    if rate != sample_rate:
        import torch
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), rate, sample_rate).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


def _isnan(x):
    return isinstance(x, float) and math.isnan(x)
