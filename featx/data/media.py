"""Decode one manifest item into what an encoder's processor takes: text, an RGB image, or a mono waveform.

Every failure is a MediaError with a one-line reason; the pipeline records it for that item and goes on.
"""
from __future__ import annotations

import math
import os
import stat
import warnings

import numpy as np

from featx.errors import MediaError, first_line
from featx.settings import MAX_IMAGE_PIXELS

__all__ = ["MediaError", "load_text", "load_image", "load_audio", "audio_windows", "resample", "segment",
           "check_media_file", "check_amplitude", "audio_seconds", "MAX_IMAGE_PIXELS", "MAX_AMPLITUDE"]

# Annotated segment ends often overshoot a clip by rounding; up to this many seconds past the end is clipped
# (audio files here, video files and their audio tracks in featx.data.video).
END_SLACK = 0.25
# Images with more pixels are refused before they are decoded: a 13300 x 13300 PNG of 21 KB decodes to 3.3 GB.
# Decoded samples are nominally within [-1, 1]; far beyond is a corrupt or mis-scaled file, not a waveform.
MAX_AMPLITUDE = 1e3
# A segment whose samples (float32, all channels) take more is read window by window, not whole.
AUDIO_WHOLE_BYTES = 64 << 20


def check_media_file(path) -> None:
    """MediaError unless `path` names an existing regular file; a FIFO, device or folder is never opened
    (a FIFO blocks whoever opens it until a writer comes)."""
    if not isinstance(path, str) or not path:
        raise MediaError("no file given")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise MediaError(f"file not found: {path}") from None
    if not stat.S_ISREG(mode):
        raise MediaError(f"not a regular file (a FIFO, device or folder): {path}")


def check_amplitude(wav, name) -> None:
    """MediaError when the waveform holds a non-finite sample or one beyond +-MAX_AMPLITUDE."""
    if not np.isfinite(wav).all():
        raise MediaError("audio has non-finite samples (NaN or inf)")
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    if peak > MAX_AMPLITUDE:
        raise MediaError(f"audio {name}: samples reach {peak:.3g}, beyond +-{MAX_AMPLITUDE:g} "
                         "(a corrupt or mis-scaled file, not a waveform)")


def load_text(text) -> str:
    """The item's text, stripped; MediaError when empty or only whitespace."""
    if text is None or _isnan(text) or not str(text).strip():
        raise MediaError("empty text")
    return str(text).strip()


def _mpx(pixels) -> str:
    """A pixel count in megapixels, exactly (4800 -> "0.0048", 100020001 -> "100.020001", 1e8 -> "100")."""
    from decimal import Decimal

    return format(Decimal(int(pixels)).scaleb(-6).normalize(), "f")


def load_image(path, max_pixels=MAX_IMAGE_PIXELS, shortest_side=0, jpeg_bytes=False):
    """An RGB PIL image; MediaError for a missing or undecodable file, or one over `max_pixels` pixels (checked
    from the header, before decoding; None or 0: no budget).

    shortest_side: the shortest side the encoder's processor resizes to; a JPEG at least twice as large on
    both sides is decoded at a reduced scale (Pillow's draft: 1/2, 1/4 or 1/8) that keeps its shortest side
    at least 2 x shortest_side, so the processor still downscales it.
    jpeg_bytes: a JPEG that a GPU decoder takes (see gpu_jpeg) is not decoded: its file's bytes come back as a
    (N,) uint8 array, for the model's device to decode (the header and the pixel budget are still checked).
    """
    from PIL import Image, UnidentifiedImageError

    check_media_file(path)
    name = os.path.basename(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below decides
            if jpeg_bytes:  # read whole; Pillow still opens the path, so that its errors name the file
                with open(path, "rb") as f:
                    data = f.read()
            with Image.open(path) as im:
                width, height = im.size
                if max_pixels and width * height > max_pixels:
                    raise MediaError(f"image {name} is {width}x{height} = {_mpx(width * height)} Mpx, over "
                                     f"the budget of {_mpx(max_pixels)} Mpx (max_image_pixels)")
                if jpeg_bytes and gpu_jpeg(im, data):
                    return np.frombuffer(data, np.uint8).copy()  # writable: it crosses in a shared block
                if shortest_side and im.format == "JPEG":
                    _draft(im, 2 * int(shortest_side))
                im.load()
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise MediaError(f"image {name} is too large to decode: {first_line(e)}")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot decode image {name}: {first_line(e)}")


def gpu_jpeg(im, data) -> bool:
    """Whether the opened image `im` (its file's bytes `data`) is a JPEG that nvJPEG's batched decoder takes
    whole: baseline (not progressive), 8-bit, grayscale or YCbCr colour, and ending with the end-of-image
    marker. Anything else (PNG, CMYK, progressive, a truncated or padded file) is decoded with Pillow, which
    also fails a damaged file as an item, where a GPU decoder may fill the missing part silently."""
    return (im.format == "JPEG" and im.mode in ("RGB", "L") and not im.info.get("progressive")
            and not im.info.get("progression") and im.bits == 8 and data[-2:] == b"\xff\xd9")


def _draft(im, side):
    """Ask the JPEG decoder for the smallest scale whose shortest side is still >= side (no-op if none)."""
    width, height = im.size
    scale = side / min(width, height)
    if scale <= 0.5:
        im.draft(im.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def load_audio(path, sample_rate: int, start=None, end=None) -> np.ndarray:
    """Mono float32 waveform (T,) at `sample_rate`, of the segment [start, end) seconds when given.

    Decoded with soundfile (channels averaged to mono), resampled with torchaudio.functional.resample.
    """
    return audio_windows(path, sample_rate, start, end)[0]


def split_windows(wav, sample_rate, max_seconds) -> list:
    """(T,) samples as near-equal windows no longer than max_seconds (one window when 0 or None)."""
    limit = int(max_seconds * sample_rate) if max_seconds else 0
    if limit and wav.shape[0] > limit:
        return list(np.array_split(wav, math.ceil(wav.shape[0] / limit)))
    return [wav]


def audio_windows(path, sample_rate: int, start=None, end=None, max_seconds=None,
                  whole_bytes=AUDIO_WHOLE_BYTES) -> list:
    """The mono float32 waveform at `sample_rate` of [start, end) seconds, as near-equal windows of at most
    max_seconds (one window when None): a list of (T_k,) arrays whose concatenation is the whole segment
    resampled at once (np.array_split's windows).

    A segment over `whole_bytes` (float32, all channels) is read one window (plus the resampling filter's
    context) at a time, so the memory it takes is the windows at `sample_rate`, not the file at its own
    rate and channels; resampled windows then equal the whole's up to float rounding (1 ulp). MediaError
    for a missing, undecodable or empty file, non-finite samples, or samples beyond +-MAX_AMPLITUDE.
    """
    import soundfile as sf

    check_media_file(path)
    name = os.path.basename(path)
    try:
        with sf.SoundFile(path) as f:
            rate, first, last = f.samplerate, 0, f.frames
            if f.frames > 0:  # an empty file is reported as zero-length below, whatever the segment
                start, end = segment(start, end, f.frames / rate, name, "audio")
                first, last = int(round(start * rate)), min(f.frames, int(round(end * rate)))
            plan = _ResamplePlan(rate, sample_rate, max(0, last - first))
            if plan.num_in == 0:
                raise MediaError("zero-length audio")
            limit = int(max_seconds * sample_rate) if max_seconds else 0
            if plan.num_in * f.channels * 4 <= whole_bytes:
                wav = plan.read(f, first, plan.num_in, name)
                if wav.shape[0] == 0:
                    raise MediaError("zero-length audio")
                return split_windows(resample(wav, rate, sample_rate), sample_rate, max_seconds)
            return [plan.window(f, first, a, b, name) for a, b in plan.windows(limit)]
    except MediaError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as e:
        raise MediaError(f"cannot decode audio {name}: {first_line(e)}")


class _ResamplePlan:
    """Windows of a resampled segment, each computed from only the input samples it depends on.

    torchaudio's resample (rates reduced by their gcd to orig -> new) is a strided convolution: output
    samples [m * new, (m + 1) * new) come from input samples [m * orig - w, (m + 1) * orig + w) with zeros
    beyond the ends, w the filter's half-width. Resampling a chunk that starts at a multiple of orig and
    holds a margin >= w of real samples around a window gives that window's samples of the whole.
    """

    def __init__(self, rate, sample_rate, num_in):
        g = math.gcd(int(rate), int(sample_rate))
        self.rate, self.sample_rate, self.num_in = int(rate), int(sample_rate), int(num_in)
        self.orig, self.new = self.rate // g, self.sample_rate // g
        same = self.rate == self.sample_rate
        self.num_out = num_in if same else math.ceil(self.new * num_in / self.orig)
        # torchaudio's half-width is ceil(6 * orig / (0.99 * min(orig, new))); one more filter span to spare
        self.margin = 0 if same else 2 * math.ceil(6 * self.orig / (0.99 * min(self.orig, self.new))) + self.orig

    def windows(self, limit):
        """(start, end) output samples of near-equal windows of at most `limit` samples (np.array_split's)."""
        n = self.num_out
        k = math.ceil(n / limit) if limit and n > limit else 1
        sizes = [n // k + (1 if j < n % k else 0) for j in range(k)]
        ends = np.cumsum(sizes)
        return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]

    def window(self, f, first, a, b, name):
        """Output samples [a, b) (T,) float32, read from the open SoundFile `f` whose segment starts at `first`."""
        if self.rate == self.sample_rate:
            return self.read(f, first + a, b - a, name)
        m0, m1 = a // self.new, (b - 1) // self.new
        lo = max(0, (m0 - math.ceil(self.margin / self.orig)) * self.orig)
        hi = min(self.num_in, (m1 + 1) * self.orig + self.margin)
        out = resample(self.read(f, first + lo, hi - lo, name), self.rate, self.sample_rate)
        offset = (lo // self.orig) * self.new
        return out[a - offset:b - offset].copy()  # not a view: the margins are let go

    @staticmethod
    def read(f, at, n, name):
        """Samples [at, at + n) of the open SoundFile `f`, channels averaged: (n,) float32."""
        f.seek(at)
        if f.channels == 1:  # as it is: the mean over one channel's axis costs half as much again as the read
            wav = f.read(n, dtype="float32")
        else:
            wav = f.read(n, dtype="float32", always_2d=True).mean(axis=1)
        check_amplitude(wav, name)
        return wav


_WAV_TAGS = (1, 3, 0xFFFE)  # PCM, IEEE float, WAVE_FORMAT_EXTENSIBLE: one block_align per frame


def audio_seconds(path) -> float:
    """An audio file's duration in seconds, as soundfile's info gives it: read from a PCM or float WAV's header
    (its fmt and data chunks) in a tenth of the time libsndfile takes to open the file, from libsndfile for
    anything else (another format, an odd or truncated header). For the length sort before decoding."""
    seconds = _wav_header_seconds(path)
    if seconds is not None:
        return seconds
    import soundfile as sf

    return float(sf.info(path).duration)


def _wav_header_seconds(path):
    """frames / rate of a plain WAV's header, the frames that its data chunk and the file's size both hold; None
    when the file is not one (RIFF/WAVE with a PCM or float fmt chunk before its data chunk)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        rate = align = None
        for _ in range(32):
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if kind == b"fmt ":
                body = f.read(size)
                if len(body) < 16 or int.from_bytes(body[:2], "little") not in _WAV_TAGS:
                    return None
                rate, align = int.from_bytes(body[4:8], "little"), int.from_bytes(body[12:14], "little")
                f.seek(size % 2, 1)
            elif kind == b"data":
                if not rate or not align or size == 0xFFFFFFFF:
                    return None
                held = os.fstat(f.fileno()).st_size - f.tell()  # a truncated file holds fewer than it says
                return (min(size, held) // align) / rate
            else:
                f.seek(size + size % 2, 1)
    return None


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
