"""Manifest items decoded into the inputs of each encoder, and labels into training targets.

Decoded inputs are held in memory (low-resource data sets: hundreds to a few thousand items). A video gives
its middle frame to an image encoder; audio longer than `max_audio_seconds` is cut to its first
`max_audio_seconds`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from featx.data.manifest import labels_and_splits
from featx.errors import FeatxError, MediaError, first_line
from featx.extraction.pipeline import Decoder
from featx.settings import canonical_split

SHOWN_FAILURES = 20


@dataclass
class DecodedItems:
    """The items every encoder could decode, in manifest order.

    ids: (N,) ids. labels: (N,) labels or None. splits: (N,) train | dev | test | "" or None.
    inputs: one list of N decoded inputs (text, PIL image, waveform) per encoder.
    failed: {id: why} of the items that could not be decoded.
    """
    ids: np.ndarray
    labels: object
    splits: object
    inputs: list
    failed: dict = None


def item_input(encoder, decoded, max_audio_seconds):
    """The encoder's one input for an item from what the Decoder gave (a list): the middle frame of a video,
    the first max_audio_seconds of the audio (its pieces joined)."""
    if encoder.modality == "audio":
        wav = decoded[0] if len(decoded) == 1 else np.concatenate(decoded)
        limit = int(max_audio_seconds * encoder.sample_rate) if max_audio_seconds else 0
        wav = wav[:limit] if limit else wav
        if hasattr(encoder, "num_frames") and encoder.num_frames(wav.shape[0]) < 1:  # wav2vec2's conv front end
            raise MediaError("audio too short for the model (no frames)")
        return wav
    return decoded[len(decoded) // 2]


def _is_missing(label) -> bool:
    return (isinstance(label, float) and math.isnan(label)) or (isinstance(label, str) and not label)


def _decode_row(row, encoders, decoders, max_audio_seconds):
    """(inputs, None) for a row every encoder decodes, else (None, why)."""
    try:
        return [item_input(e, d(row), max_audio_seconds) for e, d in zip(encoders, decoders)], None
    except MediaError as e:
        return None, str(e)
    except Exception as e:  # an odd file must fail the item, not the run
        return None, f"{type(e).__name__}: {first_line(e)}"


def _report(what, failed, unlabelled, used):
    for item, why in failed[:SHOWN_FAILURES]:
        print(f"featx {what}: skipping {item}: {why}", file=sys.stderr)
    if len(failed) > SHOWN_FAILURES:
        print(f"featx {what}: ... and {len(failed) - SHOWN_FAILURES} more items skipped", file=sys.stderr)
    if unlabelled:
        print(f"featx {what}: {unlabelled} item(s) have no label and are not used", file=sys.stderr)
    if failed:
        print(f"featx {what}: {len(failed)} item(s) skipped (could not be decoded), {used} used", file=sys.stderr)


def decode_items(df, encoders, columns, max_audio_seconds, fps=3.0, labelled=True, what="finetune"):
    """DecodedItems of the manifest `df` for `encoders` (reading `columns`, one per encoder). Items that fail
    to decode, or have no label when `labelled`, are skipped and named on stderr."""
    decoders = [Decoder(e.modality, c, getattr(e, "sample_rate", None), None, fps,
                        clip_frames=getattr(e, "clip_frames", 0)) for e, c in zip(encoders, columns)]
    labels, splits, _ = labels_and_splits(df)
    if labelled and labels is None:
        raise FeatxError("the manifest has no 'label' column to fine-tune on")
    keep, inputs, failed, unlabelled = [], [[] for _ in encoders], [], 0
    for i, row in enumerate(df.to_dict("records")):
        if labelled and _is_missing(labels[i]):
            unlabelled += 1
            continue
        got, why = _decode_row(row, encoders, decoders, max_audio_seconds)
        if got is None:
            failed.append((row["id"], why))
            continue
        keep.append(i)
        for column, x in zip(inputs, got):
            column.append(x)
    _report(what, failed, unlabelled, len(keep))
    keep = np.asarray(keep, dtype=np.int64)
    kept_labels = None if labels is None else labels[keep]
    kept_splits = None if splits is None else np.asarray([canonical_split(s) for s in splits[keep]], dtype=object)
    return DecodedItems(df["id"].to_numpy(dtype=object)[keep], kept_labels, kept_splits, inputs,
                        {str(item): why for item, why in failed})


def batch_inputs(encoders, items: DecodedItems, idx) -> list:
    """One prepared batch (dict of CPU tensors) per encoder for the items at `idx`."""
    return [e.prepare([column[i] for i in idx]) for e, column in zip(encoders, items.inputs)]


def batches(encoders, items: DecodedItems, idx, batch_size):
    """Prepared batches of the items at `idx`, `batch_size` at a time."""
    for s in range(0, len(idx), batch_size):
        yield batch_inputs(encoders, items, idx[s:s + batch_size])


@dataclass(frozen=True)
class TargetCoding:
    """Labels <-> model outputs: class indices (classification) or standardised values (regression, with the
    training part's mean and std)."""
    task: str
    classes: tuple = None
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, task, classes, y_train):
        if task == "classification":
            return cls(task, tuple(classes))
        y = np.asarray(y_train, np.float64)
        return cls(task, None, float(y.mean()), float(y.std()) or 1.0)

    def encode(self, y) -> torch.Tensor:
        """(N,) long class indices or float32 standardised targets."""
        if self.task == "classification":
            lookup = {c: i for i, c in enumerate(self.classes)}
            return torch.tensor([lookup[v] for v in y], dtype=torch.long)
        return torch.tensor((np.asarray(y, np.float64) - self.mean) / self.std, dtype=torch.float32)

    def probabilities(self, out) -> np.ndarray:
        """(N, C) outputs (logits) -> (N, C) class probabilities (softmax; the training loss's), classes in order."""
        return torch.softmax(out.float(), dim=1).cpu().numpy().astype(np.float64)

    def decode(self, out) -> np.ndarray:
        """(N, C) outputs -> (N,) class labels (object) or values in the label's units (float64)."""
        out = out.float().cpu().numpy()
        if self.task == "classification":
            return np.asarray(self.classes, dtype=object)[out.argmax(1)]
        return out[:, 0].astype(np.float64) * self.std + self.mean

    def empty(self) -> np.ndarray:
        return np.asarray([], dtype=object if self.task == "classification" else np.float64)
