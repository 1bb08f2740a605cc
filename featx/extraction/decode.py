"""Decoding for extraction: one manifest row -> the encoder's inputs, and their hand-off from DataLoader workers.

An item's inputs are what one forward row takes: one text, one image, one window of a long audio file, or
one frame of a video. A worker decodes (and preprocesses) items; `pack_chunk` / `unpack_chunk` move a chunk
of them to the main process as one shared-memory block per dtype.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import torch

from featx.data.media import (MAX_IMAGE_PIXELS, audio_seconds, audio_windows, check_media_file, load_image,
                              load_text, segment, split_windows)
from featx.encoders.base import preprocess_many
from featx.errors import MediaError, first_line

__all__ = ["Decoder", "DecodedItems", "PackedChunk", "pack_chunk", "unpack_chunk", "keep_chunk"]


def _value(v):
    return None if v is None or (not isinstance(v, (list, np.ndarray)) and pd.isna(v)) else v


class Decoder:
    """Turns one manifest row into the encoder's decoded inputs: texts, RGB images, mono waveforms (T,).

    With `preprocess` (the encoder's preprocessor) each input is also made into model inputs. Holds no
    model, so it runs in DataLoader workers. max_image_pixels: images over it fail (None: no budget);
    shortest_side: the processor's image side, for decoding large JPEGs at a reduced scale (0: never).
    jpeg_bytes: hand over the bytes of the JPEGs a GPU decoder takes instead of decoding them (the model's device
    decodes them, featx.encoders.image).
    clip_frames: a native video encoder's frame count (modality "video": one clip per item).
    """

    def __init__(self, modality, column, sample_rate=None, max_audio_seconds=30.0, fps=3.0, preprocess=None, *,
                 max_image_pixels=MAX_IMAGE_PIXELS, shortest_side=0, jpeg_bytes=False, clip_frames=0):
        self.modality, self.column, self.clip_frames = modality, column, clip_frames
        self.sample_rate, self.max_audio_seconds, self.fps = sample_rate, max_audio_seconds, fps
        self.preprocess = preprocess
        self.max_image_pixels, self.shortest_side, self.jpeg_bytes = max_image_pixels, shortest_side, jpeg_bytes

    def __call__(self, row) -> list:
        """The row's inputs, decoded and (with `preprocess`) made into model inputs; MediaError when none."""
        inputs = self.decoded(row)
        return [self.preprocess(x) for x in inputs] if self.preprocess else inputs

    def decoded(self, row) -> list:
        """decode(row); MediaError when it gives no input."""
        inputs = self.decode(row)
        if not inputs:
            raise MediaError("the item decoded to no input")
        return inputs

    def preprocess_chunk(self, inputs) -> list:
        """[preprocess(x) for x in inputs], in one call of the preprocessor's `many` when it has one (a fast
        tokenizer's batch call over a chunk of texts); the inputs themselves without `preprocess`."""
        return preprocess_many(self.preprocess, inputs) if self.preprocess else list(inputs)

    def estimate(self, row) -> float:
        """A cheap cost of a row before decoding, for the length sort: characters of a text, seconds of an
        audio file (its header) or segment, the size of a video file; 0 for images and unreadable sources.
        Never opens a file that is not a regular one."""
        src = _value(row.get(self.column))
        if self.modality == "text":
            return float(len(src)) if isinstance(src, str) else 0.0
        if self.modality != "audio" or not isinstance(src, str):
            return 0.0
        start, end = _value(row.get("start")), _value(row.get("end"))
        try:
            check_media_file(src)
            if self.column == "video" and (start is None or end is None):
                return float(os.path.getsize(src))  # the length would need the container opened
            if self.column == "video":
                return max(0.0, float(end) - float(start))
            start, end = segment(start, end, audio_seconds(src), src, "audio")
            return end - start
        except Exception:  # the decoder reports the item's real error
            return 0.0

    def decode(self, row) -> list:
        """The row's decoded inputs: [text], [image], a video's frames, [a video clip], or an audio file's windows."""
        src = _value(row.get(self.column))
        start, end = _value(row.get("start")), _value(row.get("end"))
        if self.modality == "text":
            return [load_text(src)]
        if self.modality == "image" and self.column == "video":
            from featx.data.video import video_frames

            return list(video_frames(src, fps=self.fps, start=start, end=end)[0])
        if self.modality == "image":
            return [load_image(src, self.max_image_pixels, self.shortest_side, self.jpeg_bytes)]
        if self.modality == "video":  # a native video encoder: one clip of its frame count, (F, H, W, 3) uint8
            from featx.data.video import video_clip

            return [video_clip(src, self.clip_frames, start=start, end=end)[0]]
        if self.column != "video":  # read window by window, so memory follows the windows, not the file
            return audio_windows(src, self.sample_rate, start, end, self.max_audio_seconds)
        from featx.data.video import video_audio

        return split_windows(video_audio(src, self.sample_rate, start=start, end=end), self.sample_rate,
                             self.max_audio_seconds)


class DecodedItems(torch.utils.data.Dataset):
    """The manifest rows still to do, decoded on access: k -> (row index, inputs, None) or, for an item
    that cannot be decoded, (row index, None, one-line reason)."""

    def __init__(self, rows, indices, decoder):
        self.rows, self.indices, self.decoder = rows, indices, decoder

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        return _guarded(i, self.decoder, self.rows[i])

    def __getitems__(self, ks) -> list:
        """The items ks (as __getitem__ gives them): each decoded on its own, then all their inputs preprocessed
        together (Decoder.preprocess_chunk); if that fails, item by item, so only a bad item fails. DataLoader
        calls this for each chunk, in a worker or (num_workers 0) in the main process."""
        rows = [int(self.indices[k]) for k in ks]
        decoded = [_guarded(i, self.decoder.decoded, self.rows[i]) for i in rows]
        flat = [x for _, inputs, _ in decoded if inputs is not None for x in inputs]
        try:
            done = self.decoder.preprocess_chunk(flat)
        except Exception:
            return [item if item[1] is None else _guarded(item[0], self.decoder.preprocess_chunk, item[1])
                    for item in decoded]
        out, at = [], 0
        for i, inputs, why in decoded:
            if inputs is not None:
                inputs, at = done[at:at + len(inputs)], at + len(inputs)
            out.append((i, inputs, why))
        return out


def _guarded(i, fn, arg):
    """(i, fn(arg), None), or (i, None, a one-line reason) when it raises."""
    try:
        return i, fn(arg), None
    except MediaError as e:
        return i, None, str(e)
    except Exception as e:  # a decoder bug or an odd file must fail the item, not the batch
        return i, None, f"{type(e).__name__}: {first_line(e)}"


def keep_chunk(chunk):
    """The collate_fn without workers: the chunk of decoded items as it is."""
    return chunk


class _Slice:
    """Where a packed input lies in its chunk's block of its dtype, and its shape; `tensor`: it was a torch tensor."""
    __slots__ = ("dtype", "start", "shape", "tensor")

    def __init__(self, dtype, start, shape, tensor):
        self.dtype, self.start, self.shape, self.tensor = dtype, start, shape, tensor


class PackedChunk:
    """A chunk of decoded items as it crosses from a worker: `blocks` {dtype: flat tensor} and `items`
    [(row index, inputs with _Slice for the array inputs, reason)]. With the DataLoader's pin_memory, its pin
    thread calls pin_memory(), which copies the blocks alone to pinned memory (then the arrays cross to a
    CUDA device without another copy on the host, see ImageEncoder.pixels_of) and leaves the items as they are."""
    __slots__ = ("blocks", "items")

    def __init__(self, blocks, items):
        self.blocks, self.items = blocks, items

    def pin_memory(self, device=None):
        return PackedChunk({d: b.pin_memory() for d, b in self.blocks.items()}, self.items)


def pack_chunk(items):
    """The DataLoader's collate_fn in a worker: every array input of a chunk of items (pixels, waveforms) is
    copied into one flat block per dtype, so the chunk crosses to the main process as one shared-memory
    segment per dtype (each segment costs the receiver a socket handshake, ~0.2 ms). Other inputs (token
    dicts) travel as they are. unpack_chunk undoes this with views, no copy."""
    parts, out = {}, []
    for i, inputs, why in items:
        if inputs is not None:
            inputs = [_place(x, parts) for x in inputs]
        out.append((i, inputs, why))
    blocks = {d: torch.from_numpy(np.concatenate(arrays)) for d, (arrays, _) in parts.items()}
    return PackedChunk(blocks, out)


def _place(x, parts):
    tensor = isinstance(x, torch.Tensor)
    if tensor and (x.device.type != "cpu" or x.requires_grad or x.dtype == torch.bfloat16):
        return x
    a = x.numpy() if tensor else x
    if not isinstance(a, np.ndarray) or a.dtype == object:
        return x
    arrays, size = parts.setdefault(a.dtype.str, ([], [0]))
    arrays.append(a.ravel())
    size[0] += a.size
    return _Slice(a.dtype.str, size[0] - a.size, a.shape, tensor)


def unpack_chunk(chunk):
    """[(row index, inputs or None, reason or None)] from what pack_chunk made."""
    blocks, items = chunk.blocks, chunk.items

    def view(x):
        if not isinstance(x, _Slice):
            return x
        v = blocks[x.dtype][x.start:x.start + math.prod(x.shape)].view(x.shape)
        return v if x.tensor else v.numpy()

    return [(i, None if inputs is None else [view(x) for x in inputs], why) for i, inputs, why in items]
