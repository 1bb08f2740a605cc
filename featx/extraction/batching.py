"""Batching for extraction: items longest first, inputs in length-sorted batches, pooled values per item.

An input is one text, one image, one window of a long audio file or one frame of a video. Inputs of a
group of items are sorted by length and batched so padding stays small, pooled on the device, and
combined back into one value per item: a long audio file's windows are weighted by their frame counts
(so `mean` is the mean over all its frames) and a video's frames equally (the mean over frames of the
per-frame pooled values).
"""
from __future__ import annotations

import numpy as np
import torch

from featx.encoders.pooling import pool

__all__ = ["Runner", "Launched", "Interrupted", "longest_first"]


def longest_first(todo, rows, decoder):
    """`todo` (manifest indices) ordered by Decoder.estimate, longest first, ties in manifest order: groups of
    neighbours then batch with little padding over the whole manifest, not only within a group."""
    if decoder.modality not in ("text", "audio") or len(todo) < 2:
        return todo
    cost = np.array([decoder.estimate(rows[int(i)]) for i in todo])
    return todo[np.argsort(-cost, kind="stable")]


class Runner:
    """Runs one encoder over the inputs of a group of items and combines them into per-item values."""

    def __init__(self, encoder, poolings, seq=False, seq_stride=1, batch_size=16, budget=None, video=False,
                 store_dtype="float32"):
        self.encoder, self.poolings = encoder, list(poolings)
        self.seq, self.seq_stride, self.batch_size = seq, max(1, int(seq_stride)), max(1, int(batch_size))
        self.budget, self.video = budget, video  # video: inputs are frames, and a sequence is one row per frame
        # the cache's dtype: pooled values of one-input items are cast to it on the device, before the copy to
        # the host (half the bytes for float16, and the same rounding as a cast on the host)
        self.store_dtype = store_dtype

    def batches(self, inputs):
        """Length-sorted batches of input numbers (longest first, so an out-of-memory shows up at once), each
        of at most batch_size inputs and, with a budget, at most `budget` padded positions (batch x longest,
        in Encoder.size units: tokens, samples); an input longer than the budget runs alone.
        inputs: [(item index, preprocessed input)]."""
        enc = self.encoder
        sizes = [enc.size(x[1]) for x in inputs]
        order = sorted(range(len(inputs)), key=lambda k: -sizes[k])  # stable: ties keep item order
        groups = {}
        for k in order:
            groups.setdefault(enc.batch_key(inputs[k][1]), []).append(k)
        for members in groups.values():
            batch = []
            for k in members:  # sorted longest first: batch[0] is the batch's longest
                if batch and (len(batch) == self.batch_size
                              or (self.budget and (len(batch) + 1) * sizes[batch[0]] > self.budget)):
                    yield batch
                    batch = []
                batch.append(k)
            if batch:
                yield batch

    # no_grad, not inference_mode: models cache tensors process-wide (BEiT's lru_cached relative position index),
    # and one made in inference mode breaks a later fine-tuning in the same process
    @torch.no_grad()
    def run_batch(self, raws):
        """Pooled values (B, L, D) per pooling and valid-position counts (B,), left on the device so the
        GPU runs on while the host collates the next batch, and the sequences (CPU arrays) with --seq.
        On CUDA out-of-memory the batch is halved and retried, down to one input.
        """
        enc = self.encoder
        try:
            # pinned on CUDA (Encoder.host_tensor); never under autocast, which _forward holds open for the group:
            # collate may preprocess on the device (images), in the processor's own precision
            with torch.autocast(enc.device.type, enabled=False):
                batch = enc.collate(raws)
            with enc.autocast():
                hidden, mask = enc.forward(batch)
                pooled = pool(hidden, mask, self.poolings, enc.hidden_size if enc.layer_widths else None)
            seqs = None
            if self.seq and not self.video:  # a video's sequence is its frames' pooled values (see run)
                valid = mask.cpu()
                stacked = [torch.stack([h[b] for h in hidden], dim=1).float().cpu() for b in range(len(raws))]
                seqs = [s[valid[b]][::self.seq_stride].numpy() for b, s in enumerate(stacked)]
            return pooled, seqs, mask.sum(1)
        except torch.cuda.OutOfMemoryError:
            if len(raws) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(raws) // 2
            a, b = self.run_batch(raws[:half]), self.run_batch(raws[half:])
            pooled = {k: torch.cat([a[0][k], b[0][k]]) for k in a[0]}
            seqs = (a[1] + b[1]) if self.seq else None
            return pooled, seqs, torch.cat([a[2], b[2]])

    def run(self, items, done=None):
        """items: list of (index, inputs). Returns (indices, pooled {name: (n, L, D)}, seqs | None, failures).
        done(n), when given, is called as n more items are finished: failed, or their last input forwarded.
        A KeyboardInterrupt (Ctrl-C) during the forward is raised as Interrupted, whose `result` is the same
        tuple for the items finished before it, so that the caller can keep them. run = finish(start(...))."""
        return self.finish(self.start(items, done))

    def start(self, items, done=None) -> "Launched":
        """Queue the forward of every input of `items` on the device and the copies of its pooled values to the
        host, without waiting for them: the caller can decode and start the next group while the device works
        (finish() waits). A Ctrl-C during it stops the batches; finish() then raises Interrupted."""
        done = done or (lambda n: None)
        inputs, failures = self._flatten(items)
        done(len(failures))
        return Launched(inputs, failures, *self._forward(inputs, done), device=self.encoder.device)

    def finish(self, launched) -> tuple:
        """run's tuple for the items `launched` held, once the device has finished them."""
        inputs, failures, stopped = launched.inputs, launched.failures, launched.stopped
        pooled, counts, seqs, ran = launched.wait()
        unfinished = {i for k, (i, _) in enumerate(inputs) if not ran[k]}
        by_item = {}
        for k, (i, _) in enumerate(inputs):
            if i not in unfinished:
                by_item.setdefault(i, []).append(k)
        indices = sorted(by_item)  # manifest order, as parts are stored
        first = np.array([by_item[i][0] for i in indices], np.int64)
        out = {name: v[first] for name, v in pooled.items()}
        seq_out = [seqs[k] for k in first] if self.seq else None  # None per video item, filled below
        for row, i in enumerate(indices):
            ks = by_item[i]
            if self.seq and self.video:  # the per-frame sequence of frame values, one-frame videos too
                seq_out[row] = pooled["cls" if "cls" in pooled else "mean"][ks]
            if len(ks) == 1:
                continue
            # audio windows weighted by their frames, video frames equally
            w = counts[ks].astype(np.float64) if self.encoder.modality == "audio" else np.ones(len(ks))
            w = w / w.sum()
            for name in self.poolings:
                out[name][row] = np.tensordot(w, pooled[name][ks], axes=1)
            if self.seq and not self.video:
                seq_out[row] = np.concatenate([seqs[k] for k in ks])
        result = np.array(indices, np.int64), out, seq_out, failures
        if stopped is not None:
            raise Interrupted(result) from stopped
        return result

    def _flatten(self, items):
        """[(item index, input)] of every item's inputs, and failures [(index, reason)] for items that have none
        the model can take."""
        enc = self.encoder
        inputs = [(i, x) for i, xs in items for x in xs]
        failures = [(i, "the item decoded to no input") for i, xs in items if not len(xs)]
        inputs, bad = enc.admit(inputs, self.batch_size)  # images: JPEGs decoded on the device
        failures += bad
        if enc.modality == "audio":  # too short for the conv feature encoder: fail the item, not the batch
            frames = enc.frames_of([x.shape[0] for _, x in inputs])
            short = {i for (i, _), f in zip(inputs, frames) if f < 1}
            failures += [(i, "audio too short for the model (no frames)") for i in sorted(short)]
            inputs = [(i, x) for i, x in inputs if i not in short]
        return inputs, failures

    def _forward(self, inputs, done):
        """Launch the batches of `inputs`: (copies, pooled, seqs, ran, stopped). copies: per batch (input numbers,
        {pooling: host tensor}, host counts) being copied from the device (pinned memory on CUDA, asynchronously);
        pooled: {pooling: (n, L, D)} arrays to fill with them (float32; the store dtype when every item is one
        input); seqs: per input, the sequence (list, None without seq); ran (n,) bool: forwarded; stopped: the
        KeyboardInterrupt that stopped the batches early (None: every input ran). done(n) after each batch: the
        items whose last input it held."""
        enc = self.encoder
        left = {}  # item index -> its inputs not yet forwarded
        for i, _ in inputs:
            left[i] = left.get(i, 0) + 1
        n = len(inputs)
        # items of several inputs (audio windows, video frames) are combined on the host, in float32
        half = self.store_dtype == "float16" and len(left) == n
        seqs = [None] * n
        ran, stopped, copies = np.zeros(n, bool), None, []
        # one autocast context for the group: autocast casts each weight to bf16/fp16 once and keeps it for the
        # context's life, where a context per batch cast every weight again for every batch
        with enc.autocast():
            try:
                for batch in self.batches(inputs):
                    batch_pooled, batch_seqs, batch_counts = self.run_batch([inputs[k][1] for k in batch])
                    copies.append((np.asarray(batch), {name: _to_host(enc, v.half() if half else v)
                                                       for name, v in batch_pooled.items()},
                                   _to_host(enc, batch_counts)))
                    for j, k in enumerate(batch if batch_seqs else ()):
                        seqs[k] = batch_seqs[j]
                    ran[batch] = True
                    finished = 0
                    for k in batch:
                        left[inputs[k][0]] -= 1
                        finished += left[inputs[k][0]] == 0
                    done(finished)
            except KeyboardInterrupt as e:  # keep the batches that finished (see run)
                stopped = e
        pooled = {name: np.empty((n, enc.num_layers, enc.hidden_size), np.float16 if half else np.float32)
                  for name in self.poolings}
        return copies, pooled, seqs, ran, stopped


def _to_host(enc, tensor):
    """A host copy of a device tensor, made asynchronously into pinned memory on CUDA (read it after
    Launched.wait()); on the CPU the tensor itself."""
    if tensor.device.type != "cuda":
        return tensor
    host = enc.host_tensor(tensor.shape, tensor.dtype)
    host.copy_(tensor, non_blocking=True)
    return host


class Launched:
    """A group's batches queued on the device by Runner.start: its inputs, failures, the Ctrl-C that stopped it
    (or None), and its pooled values on their way to the host; wait() gives them once the device is done."""

    def __init__(self, inputs, failures, copies, pooled, seqs, ran, stopped, device=None):
        self.inputs, self.failures, self.stopped = inputs, failures, stopped
        self._copies, self._pooled, self._seqs, self._ran = copies, pooled, seqs, ran
        self._event, self._result = None, None
        if copies and copies[-1][2].is_pinned():  # queued on the device's current stream, after its forwards
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))

    def wait(self):
        """(pooled {name: (n, L, D)} per input, counts (n,), seqs, ran), after the device's copies are done: one
        wait per group, not per batch."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            pooled, counts = self._pooled, np.empty(len(self.inputs), np.int64)
            for batch, values, batch_counts in self._copies:
                for name, v in values.items():
                    pooled[name][batch] = v.numpy()
                counts[batch] = batch_counts.numpy()
            self._result, self._copies = (pooled, counts, self._seqs, self._ran), None
        return self._result


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a group's forward; `result`: what the group finished before it (Runner.run's tuple, or
    the pipeline's group tuple)."""

    def __init__(self, result):
        super().__init__()
        self.result = result
