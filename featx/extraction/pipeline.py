"""The extraction pipeline: manifest -> decode -> encoder -> pool -> HDF5 cache.

Items are decoded (in DataLoader workers when num_workers > 0) into units: one text, one image, one
window of a long audio file, or one frame of a video. Units are sorted by length and batched so padding
stays small, pooled on the device, and combined back into one value per item: a long audio file's
windows are weighted by their frame counts (so `mean` is the mean over all its frames) and a video's
frames equally (the mean over frames of the per-frame pooled values). Each finished group of items is
written to the cache as one atomic part, so a killed run loses nothing it had written.
"""
from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from featx.version import __version__
from featx.device import resolve_device, resolve_precision
from featx.encoders import load_config, load_encoder, modality_of
from featx.errors import FeatxError, MediaError, first_line
from featx.data.manifest import labels_and_splits, read_manifest, source_column
from featx.data.media import segment
from featx.encoders.pooling import POOLINGS, pool

CPU_BATCH_SECONDS = 8.0  # audio on the CPU: bigger padded batches only cost (WavLM-base: 8 s 7.4, 40 s 5.8 audio-s/s)

__all__ = ["extract", "ExtractResult", "cache_path"]


@dataclass
class ExtractResult:
    """What `extract` did: one entry per model with its cache path and item counts."""
    caches: list = field(default_factory=list)  # dicts: model, path, done, failed, pending

    @property
    def failed(self) -> int:
        return sum(c["failed"] for c in self.caches)

    @property
    def paths(self) -> list:
        return [c["path"] for c in self.caches]


def model_slug(name) -> str:
    """A file-name-safe short name for a hub id or a local folder."""
    name = str(name).rstrip("/\\")
    if os.path.isdir(name):
        name = os.path.basename(os.path.abspath(name))
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "model"


def cache_path(manifest, model, out) -> str:
    """`<out>/<manifest stem>__<model slug>.h5`."""
    stem = os.path.splitext(os.path.basename(os.fspath(manifest)))[0]
    return os.path.join(os.fspath(out), f"{stem}__{model_slug(model)}.h5")


def _value(v):
    return None if v is None or (not isinstance(v, (list, np.ndarray)) and pd.isna(v)) else v


class Decoder:
    """Turns one manifest row into the encoder's decoded inputs (units): texts, RGB images, mono waveforms.

    With `preprocess` (the encoder's preprocessor) each unit is also made into model inputs. Holds no
    model, so it runs in DataLoader workers.
    """

    def __init__(self, modality, column, sample_rate=None, max_audio_seconds=30.0, fps=3.0, preprocess=None):
        self.modality, self.column = modality, column
        self.sample_rate, self.max_audio_seconds, self.fps = sample_rate, max_audio_seconds, fps
        self.preprocess = preprocess

    def __call__(self, row) -> list:
        units = self.decode(row)
        return [self.preprocess(u) for u in units] if self.preprocess else units

    def estimate(self, row) -> float:
        """A cheap cost of a row before decoding, for the length sort: characters of a text, seconds of an
        audio file (its header) or segment, the size of a video file; 0 for images and unreadable sources."""
        src = _value(row.get(self.column))
        if self.modality == "text":
            return float(len(src)) if isinstance(src, str) else 0.0
        if self.modality != "audio" or not isinstance(src, str):
            return 0.0
        start, end = _value(row.get("start")), _value(row.get("end"))
        try:
            if self.column == "video" and (start is None or end is None):
                return float(os.path.getsize(src))  # the length would need the container opened
            if self.column == "video":
                return max(0.0, float(end) - float(start))
            import soundfile as sf

            start, end = segment(start, end, float(sf.info(src).duration), src, "audio")
            return end - start
        except Exception:  # the decoder reports the item's real error
            return 0.0

    def decode(self, row) -> list:
        src = _value(row.get(self.column))
        start, end = _value(row.get("start")), _value(row.get("end"))
        if self.modality == "text":
            from featx.data.media import load_text
            return [load_text(src)]
        if self.modality == "image":
            if self.column == "video":
                from featx.data.video import video_frames
                frames, _ = video_frames(src, fps=self.fps, start=start, end=end)
                return list(frames)
            from featx.data.media import load_image
            return [load_image(src)]
        if self.column == "video":
            from featx.data.video import video_audio
            wav = video_audio(src, self.sample_rate, start=start, end=end)
        else:
            from featx.data.media import load_audio
            wav = load_audio(src, self.sample_rate, start=start, end=end)
        # Long audio in near-equal windows no longer than max_audio_seconds, so memory stays bounded.
        limit = int(self.max_audio_seconds * self.sample_rate) if self.max_audio_seconds else 0
        if limit and wav.shape[0] > limit:
            n = math.ceil(wav.shape[0] / limit)
            return list(np.array_split(wav, n))
        return [wav]


class _Items(torch.utils.data.Dataset):
    """Decoded items for the DataLoader: (index, units) or (index, MediaError reason)."""

    def __init__(self, rows, indices, decoder):
        self.rows, self.indices, self.decoder = rows, indices, decoder

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        try:
            return i, self.decoder(self.rows[i]), None
        except MediaError as e:
            return i, None, str(e)
        except Exception as e:  # a decoder bug or an odd file must fail the item, not the batch
            return i, None, f"{type(e).__name__}: {first_line(e)}"


class _Distributed:
    """Under torchrun (WORLD_SIZE > 1): rank r takes items r, r+W, r+2W, ... and writes its own shard
    `<cache>.rank<r>-of-<W>.h5` (consolidated atomically by its writer); rank 0 then merges the shards
    and any earlier final file into the one cache and removes the shards. Resume works per shard."""

    def __init__(self):
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("FEATX_DIST_BACKEND")
                                  != "gloo" else "gloo")
        self.td, self.rank, self.world = td, td.get_rank(), td.get_world_size()

    @classmethod
    def current(cls):
        return cls() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    def shard_path(self, path):
        return f"{path[:-3]}.rank{self.rank:03d}-of-{self.world:03d}.h5"

    def shard_paths(self, path):
        return [f"{path[:-3]}.rank{r:03d}-of-{self.world:03d}.h5" for r in range(self.world)]

    def prepare_final(self, path, overwrite):
        if overwrite and self.rank == 0 and os.path.exists(path):
            os.remove(path)
        self.td.barrier()

    def my_todo(self, todo, path):
        """This rank's share of `todo`, less what an earlier run's final file already holds."""
        todo = todo[todo % self.world == self.rank]
        if os.path.exists(path):
            from featx.cache import open_cache

            with open_cache(path) as c:
                todo = todo[~c.done[todo]]
        return todo

    def merge(self, path):
        from featx.cache import merge_caches, open_cache

        self.td.barrier()
        if self.rank == 0:
            shards = self.shard_paths(path)
            missing = [p for p in shards if not os.path.exists(p)]
            if missing:
                raise FeatxError(f"shard(s) missing, not merged: {', '.join(map(os.path.basename, missing))}; "
                                 "run the same command again to finish them")
            sources = ([path] if os.path.exists(path) else []) + shards
            merge_caches(sources, path)
            for p in shards:
                os.remove(p)
        self.td.barrier()
        with open_cache(path) as c:
            failed = int(sum(1 for e in c.error if e))
            return {"done": int(c.done.sum()), "failed": failed, "pending": len(c.ids) - int(c.done.sum()) - failed}


class Runner:
    """Runs one encoder over the units of a group of items and combines them into per-item values."""

    def __init__(self, encoder, poolings, seq=False, seq_stride=1, batch_size=16, budget=None, video=False):
        self.encoder, self.poolings = encoder, list(poolings)
        self.seq, self.seq_stride, self.batch_size = seq, max(1, int(seq_stride)), max(1, int(batch_size))
        self.budget, self.video = budget, video  # video: units are frames, and a sequence is one row per frame

    def batches(self, units):
        """Length-sorted batches of unit numbers (longest first, so an out-of-memory shows up at once), each
        of at most batch_size inputs and, with a budget, at most `budget` padded positions (batch x longest,
        in Encoder.size units: tokens, samples); an input longer than the budget runs alone."""
        enc = self.encoder
        sizes = [enc.size(u[1]) for u in units]
        order = sorted(range(len(units)), key=lambda u: -sizes[u])  # stable: ties keep item order
        groups = {}
        for u in order:
            groups.setdefault(enc.batch_key(units[u][1]), []).append(u)
        for members in groups.values():
            batch = []
            for u in members:  # sorted longest first: batch[0] is the batch's longest
                if batch and (len(batch) == self.batch_size
                              or (self.budget and (len(batch) + 1) * sizes[batch[0]] > self.budget)):
                    yield batch
                    batch = []
                batch.append(u)
            if batch:
                yield batch

    @torch.inference_mode()
    def run_batch(self, raws):
        """Pooled values (B, L, D) per pooling and valid-position counts (B,), left on the device so the
        GPU runs on while the host collates the next batch, and the sequences (CPU arrays) with --seq.
        On CUDA out-of-memory the batch is halved and retried, down to one input.
        """
        enc = self.encoder
        try:
            inputs = enc.collate(raws)  # pinned on CUDA (Encoder.host_tensor)
            with enc.autocast():
                hidden, mask = enc.forward(inputs)
                pooled = pool(hidden, mask, self.poolings)
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

    def run(self, items):
        """items: list of (index, units). Returns (indices, pooled {name: (n, L, D)}, seqs | None, failures)."""
        enc = self.encoder
        units, failures = [], []
        for i, us in items:
            for u in us:
                units.append((i, u))
        if enc.modality == "audio":  # too short for the conv feature encoder: fail the item, not the batch
            short = {i for i, u in units if enc.num_frames(u.shape[0]) < 1}
            failures += [(i, "audio too short for the model (no frames)") for i in sorted(short)]
            units = [(i, u) for i, u in units if i not in short]
        n, shape = len(units), (enc.num_layers, enc.hidden_size)
        unit_pooled = {k: np.empty((n, *shape), np.float32) for k in self.poolings}
        unit_count = np.empty(n, np.int64)
        unit_seq = [None] * n
        on_device = []
        for batch in self.batches(units):
            pooled, seqs, counts = self.run_batch([units[u][1] for u in batch])
            on_device.append((np.asarray(batch), pooled, counts))
            for j, u in enumerate(batch if seqs else ()):
                unit_seq[u] = seqs[j]
        for batch, pooled, counts in on_device:  # one wait for the device per group, not per batch
            for k, v in pooled.items():
                unit_pooled[k][batch] = v.cpu().numpy()
            unit_count[batch] = counts.cpu().numpy()
        # Combine units into items: audio windows weighted by frames, video frames equally.
        by_item = {}
        for u, (i, _) in enumerate(units):
            by_item.setdefault(i, []).append(u)
        indices = sorted(i for i, _ in items if i in by_item)  # manifest order, as parts are stored
        first = np.array([by_item[i][0] for i in indices], np.int64)
        out = {k: v[first] for k, v in unit_pooled.items()}
        seq_out = [unit_seq[u] for u in first] if self.seq else None  # None per video item, filled below
        for row, i in enumerate(indices):
            us = by_item[i]
            if self.seq and self.video:  # the per-frame sequence of frame values, one-frame videos too
                seq_out[row] = unit_pooled["cls" if "cls" in unit_pooled else "mean"][us]
            if len(us) == 1:
                continue
            w = unit_count[us].astype(np.float64) if enc.modality == "audio" else np.ones(len(us))
            w = w / w.sum()
            for k in self.poolings:
                out[k][row] = np.tensordot(w, unit_pooled[k][us], axes=1)
            if self.seq and not self.video:
                seq_out[row] = np.concatenate([unit_seq[u] for u in us])
        return np.array(indices, np.int64), out, seq_out, failures


def extract(manifest, models, out, *, pool=("mean",), seq=False, seq_stride=1, batch_size=16, device="auto",
            dtype="float16", precision="auto", max_length=None, max_audio_seconds=30.0, fps=3.0,
            max_batch_tokens=None, max_batch_seconds=None, num_workers=None, trust_remote_code=False,
            overwrite=False, progress=True, group_size=None) -> ExtractResult:
    """Cache the hidden states of every layer of every item for each model; one HDF5 file per model.

    manifest: path of a CSV/JSONL/Parquet manifest. models: hub ids or local folders. out: folder.
    pool: poolings out of ('mean', 'cls'); cls is skipped for audio encoders (they have no CLS token).
    precision: auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16 (the last two CUDA only);
    stored with the cache, since it changes the numbers.
    Items run longest first (a cheap estimate, see Decoder.estimate) in batches of at most batch_size
    inputs and at most max_batch_tokens padded tokens (text) or max_batch_seconds padded audio seconds
    (default: CPU_BATCH_SECONDS on the CPU, none on CUDA); values are written back in manifest order.
    num_workers: decoding processes (default: 0 on the CPU, whose cores run the forward; on CUDA the CPUs
    this process may use less 2, shared among torchrun's local ranks, at most 16).
    Returns an ExtractResult; re-running resumes (done items are skipped, failed ones retried).
    Raises FeatxError for usage/configuration errors, before any model is loaded where it can.
    """
    from featx.cache import CacheWriter

    models = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    poolings = [pool] if isinstance(pool, str) else list(pool)
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        raise FeatxError(f"unknown pooling {bad[0] if bad else '(none)'!r}; choose from {', '.join(POOLINGS)}")
    if dtype not in ("float16", "float32"):
        raise FeatxError(f"--dtype must be float16 or float32, not {dtype!r}")
    if int(batch_size) < 1:
        raise FeatxError("--batch-size must be at least 1")
    for flag, v in (("--max-batch-tokens", max_batch_tokens), ("--max-batch-seconds", max_batch_seconds)):
        if v is not None and not float(v) > 0:
            raise FeatxError(f"{flag} must be positive, not {v}")
    if not float(fps) > 0:
        raise FeatxError(f"--fps must be positive, not {fps}")
    if not models:
        raise FeatxError("give at least one --model")
    df = read_manifest(manifest)
    name = os.path.basename(os.fspath(manifest))
    configs = [load_config(m, trust_remote_code) for m in models]
    columns = [source_column(df, modality_of(c), name) for c in configs]
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if num_workers is None:
        num_workers = default_workers(device)
    if int(num_workers) < 0:
        raise FeatxError(f"--num-workers must be 0 or more, not {num_workers}")
    if max_batch_seconds is None and not device.startswith("cuda"):
        max_batch_seconds = CPU_BATCH_SECONDS
    os.makedirs(out, exist_ok=True)
    rows = df.to_dict("records")
    ids = df["id"].tolist()
    labels, splits, meta = labels_and_splits(df)
    result, closing = ExtractResult(), []
    try:
        for model, config, column in zip(models, configs, columns):
            encoder = load_encoder(model, config=config, device=device, trust_remote_code=trust_remote_code,
                                   precision=precision, max_length=max_length)
            pools = [p for p in poolings if not (encoder.modality == "audio" and p == "cls")] or ["mean"]
            if len(pools) < len(poolings):
                print(f"featx extract: {model}: audio encoders have no CLS token; storing {','.join(pools)} only",
                      file=sys.stderr)
            modality = "video" if column == "video" and encoder.modality == "image" else encoder.modality
            attrs = {"model": str(model), "modality": modality, "source_column": column, "featx_version": __version__,
                     "poolings": ",".join(pools), "precision": precision, **encoder.attrs}
            if encoder.modality == "audio":
                attrs["max_audio_seconds"] = float(max_audio_seconds or 0)
            if modality == "video":
                attrs["fps"] = float(fps)
            if seq:
                attrs["seq_stride"] = int(seq_stride)
            path = cache_path(manifest, model, out)
            dist = _Distributed.current()
            shard = dist.shard_path(path) if dist else path
            if dist:
                dist.prepare_final(path, overwrite)
            for c in closing:
                if c.path == path:  # the same model twice: its first run must have closed before it reopens
                    c.join()
            writer = CacheWriter(shard, ids=ids, attrs=attrs, poolings=pools, num_layers=encoder.num_layers,
                                 hidden_size=encoder.hidden_size, dtype=dtype, seq=seq, labels=labels, splits=splits,
                                 meta=meta, overwrite=overwrite)
            todo = dist.my_todo(writer.todo, path) if dist else writer.todo
            decoder = Decoder(encoder.modality, column, getattr(encoder, "sample_rate", None), max_audio_seconds, fps,
                              preprocess=encoder.preprocessor())
            budget = (max_batch_tokens if encoder.modality == "text" else max_batch_seconds * encoder.sample_rate
                      if encoder.modality == "audio" and max_batch_seconds else None)
            runner = Runner(encoder, pools, seq=seq, seq_stride=seq_stride, batch_size=batch_size, budget=budget,
                            video=modality == "video")
            todo = longest_first(todo, rows, decoder)
            try:
                _run(writer, todo, runner, decoder, rows, num_workers, group_size or max(64, 8 * int(batch_size)),
                     progress and (not dist or dist.rank == 0), model)
            except BaseException:
                writer.close()  # consolidate what was written, also when interrupted
                raise
            if dist:
                writer.close()
                _record(result, model, path, dist.merge(path), dist.rank == 0)
            else:
                # Closing the cache (a copy of all it holds, an fsync, removing the parts: seconds for large
                # caches) overlaps the next model's load and run; h5py lets go of the GIL for its I/O.
                closing.append(_Closing(writer, model, path))
    finally:
        for c in closing:
            c.join()
            if c.error is None:
                _record(result, c.model, c.path, c.summary)
            elif sys.exc_info()[0] is not None:  # another error is on its way out: say this one too
                print(f"featx extract: {c.model}: closing {c.path} failed: {first_line(c.error)}", file=sys.stderr)
    errors = [c.error for c in closing if c.error is not None]
    if errors:
        raise errors[0]
    return result


class _Closing:
    """CacheWriter.close() in a thread of its own; join() waits for it, then .summary or .error is set."""

    def __init__(self, writer, model, path):
        import threading

        self.model, self.path, self.summary, self.error = model, path, None, None
        self._thread = threading.Thread(target=self._close, args=(writer,), name="featx-close")
        self._thread.start()

    def _close(self, writer):
        try:
            self.summary = writer.close()
        except BaseException as e:  # re-raised by extract() in the main thread
            self.error = e

    def join(self):
        self._thread.join()


def _record(result, model, path, summary, show=True):
    summary = {"model": str(model), "path": path, **{k: summary[k] for k in ("done", "failed", "pending")}}
    result.caches.append(summary)
    if show:
        _print_summary(summary, path)


def default_workers(device) -> int:
    """Decoding workers when none are asked for: 0 on the CPU; on CUDA this process's CPUs less 2 (the main
    thread and the writer), shared among the local ranks of a torchrun job, at most 16."""
    if not str(device).startswith("cuda"):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, cpus // local - 2))


def longest_first(todo, rows, decoder):
    """`todo` (manifest indices) ordered by Decoder.estimate, longest first, ties in manifest order: groups of
    neighbours then batch with little padding over the whole manifest, not only within a group."""
    if decoder.modality not in ("text", "audio") or len(todo) < 2:
        return todo
    cost = np.array([decoder.estimate(rows[int(i)]) for i in todo])
    return todo[np.argsort(-cost, kind="stable")]


def _run(writer, todo, runner, decoder, rows, num_workers, group_size, progress, model):
    """Decode (workers) -> forward (this thread) -> write (a writer thread behind a bounded queue)."""
    import queue
    import threading

    from tqdm.auto import tqdm

    if len(todo) == 0:
        return
    # Workers hand over lists of up to 16 decoded items; about two groups in flight keep the forward fed
    # without holding thousands of decoded images (600 KB each as CLIP pixels) in memory.
    chunk = max(1, min(16, int(group_size)))
    prefetch = max(2, math.ceil(2 * group_size / (chunk * int(num_workers)))) if num_workers else None
    loader = torch.utils.data.DataLoader(_Items(rows, todo, decoder), batch_size=chunk, shuffle=False,
                                         num_workers=int(num_workers), collate_fn=_pack if num_workers else _identity,
                                         prefetch_factor=prefetch)
    bar = tqdm(total=len(todo), unit="item", desc=os.path.basename(str(model).rstrip("/")), disable=not progress,
               dynamic_ncols=True)
    pending, errors = queue.Queue(maxsize=2), []

    def write_loop():
        while (job := pending.get()) is not None:
            if errors:
                continue  # drain after a failure so the producer never blocks
            try:
                indices, pooled, seqs, failed = job
                if len(indices):
                    writer.write(indices, pooled, seqs)
                if failed:
                    writer.fail([i for i, _ in failed], [why for _, why in failed])
                bar.update(len(indices) + len(failed))
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)

    thread = threading.Thread(target=write_loop, name="featx-writer", daemon=True)
    thread.start()
    group = []

    def flush():
        failed = [(i, why) for i, units, why in group if units is None]
        ok = [(i, units) for i, units, why in group if units is not None]
        indices, pooled, seqs = np.zeros(0, np.int64), None, None
        if ok:
            indices, pooled, seqs, more = runner.run(ok)
            failed += more
        pending.put((indices, pooled, seqs, failed))
        group.clear()
        if errors:
            raise errors[0]

    try:
        for items in loader:
            for item in _unpack(items) if num_workers else items:
                group.append(item)
                if len(group) >= group_size:
                    flush()
        if group:
            flush()
    finally:
        pending.put(None)
        thread.join()
        bar.close()
    if errors:
        raise errors[0]


def _identity(x):
    return x


class _Slice:
    """Where a packed unit lies in its chunk's block of its dtype, and its shape; `tensor`: it was a torch tensor."""
    __slots__ = ("dtype", "start", "shape", "tensor")

    def __init__(self, dtype, start, shape, tensor):
        self.dtype, self.start, self.shape, self.tensor = dtype, start, shape, tensor


def _pack(items):
    """The DataLoader's collate_fn in a worker: every array unit of a chunk of items (pixels, waveforms) is
    copied into one flat block per dtype, so the chunk crosses to the main process as one shared-memory
    segment per dtype. Sent one tensor at a time, each segment cost the main process ~0.2 ms (a socket
    connect and an authentication handshake to receive its file descriptor), about 40% of its host time per
    image. Other units (token dicts) travel as they are. _unpack undoes this with views, no copy."""
    parts, out = {}, []
    for i, units, why in items:
        if units is not None:
            units = [_place(u, parts) for u in units]
        out.append((i, units, why))
    blocks = {d: torch.from_numpy(np.concatenate(arrays)) for d, (arrays, _) in parts.items()}
    return blocks, out


def _place(unit, parts):
    tensor = isinstance(unit, torch.Tensor)
    if tensor and (unit.device.type != "cpu" or unit.requires_grad or unit.dtype == torch.bfloat16):
        return unit
    a = unit.numpy() if tensor else unit
    if not isinstance(a, np.ndarray) or a.dtype == object:
        return unit
    arrays, size = parts.setdefault(a.dtype.str, ([], [0]))
    arrays.append(a.ravel())
    size[0] += a.size
    return _Slice(a.dtype.str, size[0] - a.size, a.shape, tensor)


def _unpack(chunk):
    blocks, items = chunk

    def view(u):
        if not isinstance(u, _Slice):
            return u
        v = blocks[u.dtype][u.start:u.start + math.prod(u.shape)].view(u.shape)
        return v if u.tensor else v.numpy()

    return [(i, None if units is None else [view(u) for u in units], why) for i, units, why in items]


def _print_summary(summary, path):
    line = f"featx extract: {summary['model']}: {summary['done']} done, {summary['failed']} failed"
    if summary["pending"]:
        line += f", {summary['pending']} pending"
    print(f"{line} -> {path}", file=sys.stderr)
    if summary["failed"]:
        from featx.cache import open_cache

        with open_cache(path) as c:
            bad = [(i, e) for i, e in zip(c.ids, c.error) if e]
        for i, e in bad[:10]:
            print(f"  failed {i}: {e}", file=sys.stderr)
        if len(bad) > 10:
            print(f"  ... and {len(bad) - 10} more (see `featx info {path}`)", file=sys.stderr)
