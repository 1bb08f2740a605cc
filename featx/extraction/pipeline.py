"""The extraction pipeline: manifest -> decode -> encoder -> pool -> HDF5 cache, one cache per model.

Items are decoded (featx.extraction.decode; in DataLoader workers when num_workers > 0) into inputs,
batched and pooled (featx.extraction.batching), and each finished group of items is written to the cache
as one atomic part by a writer thread, so a killed run loses nothing it had written. Under torchrun the
items are sharded over the ranks (featx.extraction.distributed).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from featx.checkpoint import MODEL_FINGERPRINT, model_fingerprint
from featx.data.manifest import labels_and_splits, read_manifest, source_column
from featx.data.video import CLIP_SAMPLING
from featx.device import resolve_device, resolve_precision
from featx.encoders import families_of, family_of, load_config, load_encoder
from featx.encoders.video import clip_frames
from featx.errors import Advice, FeatxError, first_line
from featx.extraction.batching import Interrupted, Runner, longest_first
from featx.extraction.decode import DecodedItems, Decoder, keep_chunk, pack_chunk, unpack_chunk
from featx.extraction.distributed import Distributed, has_shards
from featx.naming import last_name, model_slug, resolve_model
from featx.settings import ExtractSettings
from featx.version import __version__

CPU_BATCH_SECONDS = 8.0  # audio on the CPU: bigger padded batches only cost (WavLM-base: 8 s 7.4, 40 s 5.8 audio-s/s)
TEXT_PART_BYTES = 64 << 20  # texts without --seq: pooled float32 values a group may hold (see default_group_size)
TEXT_GROUP_MAX = 1024
# Once the pace of a run is known, a group (written as one part when it is done) holds about this many seconds of
# work at most: what a kill -9 can lose (on a 2-core CPU, 1,024 of the longest texts through all-MiniLM-L6-v2 took
# 24 s; through BERT-large, minutes). At a GPU's pace the cap is tens of thousands of items: it never binds there.
GROUP_SECONDS = 10.0

__all__ = ["extract", "print_summary", "ExtractResult", "ResolvedSettings", "cache_path", "Decoder", "Runner",
           "longest_first", "CPU_BATCH_SECONDS"]


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


@dataclass(frozen=True)
class ResolvedSettings:
    """`featx extract`'s options (featx.settings.ExtractSettings: each default and parser declared once) as one
    call runs them: device, precision, workers and the audio batch budget resolved for this machine."""
    poolings: tuple
    seq: bool
    seq_stride: int
    batch_size: int
    device: str                 # cpu | cuda | cuda:<rank>
    dtype: str
    precision: str              # fp32 | bf16 | fp16 | bf16-weights
    max_length: int | None
    max_audio_seconds: float
    audio_attention: str        # WavLM: sdpa | eager
    fps: float
    max_batch_tokens: int | None
    max_batch_seconds: float | None  # CPU_BATCH_SECONDS on the CPU when not given
    num_workers: int
    max_image_pixels: int | None
    image_preprocess: str       # batched-torch | processor (featx.settings.IMAGE_PREPROCESS)
    image_decode: str           # workers | device (featx.settings.IMAGE_DECODES)
    trust_remote_code: bool
    overwrite: bool
    progress: bool
    group_size: int | None      # None: default_group_size, per model

    @classmethod
    def of(cls, options: ExtractSettings, group_size=None) -> "ResolvedSettings":
        """Resolve parsed options; FeatxError (one line) for a precision the device cannot run."""
        device = resolve_device(options.device)
        max_batch_seconds = options.max_batch_seconds
        if max_batch_seconds is None and not device.startswith("cuda"):
            max_batch_seconds = CPU_BATCH_SECONDS
        return cls(poolings=tuple(options.pool), seq=options.seq, seq_stride=options.seq_stride,
                   batch_size=options.batch_size, device=device, dtype=options.dtype,
                   precision=resolve_precision(options.precision, device), max_length=options.max_length,
                   max_audio_seconds=options.max_audio_seconds, audio_attention=options.audio_attention,
                   fps=options.fps,
                   max_batch_tokens=options.max_batch_tokens, max_batch_seconds=max_batch_seconds,
                   num_workers=default_workers(device) if options.num_workers is None else options.num_workers,
                   max_image_pixels=options.max_image_pixels or None, image_preprocess=options.image_preprocess,
                   image_decode=options.image_decode, trust_remote_code=options.trust_remote_code,
                   overwrite=options.overwrite, progress=not options.quiet,
                   group_size=int(group_size) if group_size else None)


@dataclass(frozen=True)
class _Job:
    """One model's share of an extract call: its config, the manifest column it reads, its cache."""
    model: str
    config: object
    modality: str   # the family's (the tower's): text | image | audio | video
    column: str
    path: str

    @property
    def family(self):
        return family_of(self.config, self.modality)

    @property
    def per_frame(self) -> bool:
        """An image encoder over a video's frames (the item's value combines its frames')."""
        return self.column == "video" and self.modality == "image"

    @property
    def cache_modality(self) -> str:
        return "video" if self.per_frame else self.modality


@dataclass
class _Manifest:
    rows: list
    ids: list
    labels: object
    splits: object
    meta: dict
    prints: dict = field(default_factory=dict)  # column -> its source_fingerprints, computed once
    base: str = ""  # the manifest's folder, which its relative paths start from

    def fingerprints(self, column) -> np.ndarray:
        if column not in self.prints:
            self.prints[column] = source_fingerprints(self.rows, column, self.base)
        return self.prints[column]


def source_fingerprints(rows, column, base="") -> np.ndarray:
    """(N,) uint64: a hash of each row's source in `column`, recorded in the cache with the item's values so
    that a source changed since (same id, another text or file) is computed again: a text as the encoder reads
    it (stripped), a file by its path from `base` (the manifest's folder: a data set moved with its manifest keeps
    its fingerprints), size and modification time (and a segment's start and end). Never 0, which stands for
    "not known"."""
    import hashlib

    import pandas as pd

    def text(v):
        return "" if v is None or (not isinstance(v, (list, np.ndarray)) and pd.isna(v)) else str(v)

    out = np.empty(len(rows), np.uint64)
    for k, row in enumerate(rows):
        src = text(row.get(column))
        if column == "text":
            key = "text\0" + src.strip()
        else:
            try:
                st = os.stat(src) if src else None
                found = f"{st.st_size}\0{st.st_mtime_ns}" if st else "none"
            except OSError:
                found = "missing"
            segment = "" if column == "image" else f"\0{text(row.get('start'))}\0{text(row.get('end'))}"
            try:
                where = os.path.relpath(src, base) if base and src and os.path.isabs(src) else src
            except ValueError:  # another drive (Windows)
                where = src
            key = f"file\0{where}\0{found}{segment}"
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        out[k] = h or 1
    return out


_MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".ndjson", ".parquet", ".pq")


def cache_path(manifest, model, out, tower=None) -> str:
    """`<out>/<manifest name>__<model slug>.h5`; the manifest name is its stem for a .csv file and its whole
    file name otherwise (m.csv -> m__model.h5, m.jsonl -> m.jsonl__model.h5), so manifests that share a stem
    never share a cache. tower: the modality of a checkpoint's other tower (CLIP's text tower:
    m__model__text.h5); None for its primary one."""
    name = os.path.basename(os.fspath(manifest))
    stem, ext = os.path.splitext(name)
    if ext.lower() == ".csv" and not stem.lower().endswith(_MANIFEST_EXTENSIONS):
        name = stem
    suffix = f"__{tower}" if tower else ""
    return os.path.join(os.fspath(out), f"{name}__{model_slug(model)}{suffix}.h5")


def default_workers(device) -> int:
    """Decoding workers when none are asked for: 0 on the CPU; on CUDA this process's CPUs less 2 (the main
    thread and the writer), shared among the local ranks of a torchrun job, at most 16."""
    if not str(device).startswith("cuda"):
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, process_cpus() // local - 2))


def process_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def extract(manifest, models, out, *, progress=True, group_size=None, summary=True, **options) -> ExtractResult:
    """Cache the hidden states of every layer of every item for each model; one HDF5 file per model.

    manifest: path of a CSV/JSONL/Parquet manifest. models: hub ids or local folders (a folder is recorded as its
    absolute path, featx.naming.resolve_model). out: folder.
    options: those of featx.settings.ExtractSettings (`featx extract`'s, with their defaults), e.g.
    pool: poolings out of ('mean', 'cls', 'last'); each family stores only those it supports (Family.poolings:
    no cls for audio or SigLIP, which have no class token; last for decoder LMs).
    precision: auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16 (the last two CUDA only);
    stored with the cache, since it changes the numbers.
    Items run longest first (a cheap estimate, see Decoder.estimate) in batches of at most batch_size
    inputs and at most max_batch_tokens padded tokens (text) or max_batch_seconds padded audio seconds
    (default: CPU_BATCH_SECONDS on the CPU, none on CUDA); values are written back in manifest order.
    num_workers: decoding processes (default: 0 on the CPU, whose cores run the forward; on CUDA the CPUs
    this process may use less 2, shared among torchrun's local ranks, at most 16).
    group_size: items written to the cache as one part (default: default_group_size). max_image_pixels: images
    with more pixels fail as items, before they are decoded (0 or None: no budget). image_preprocess:
    batched-torch (workers only decode images to uint8; the checkpoint's torchvision processor resizes and
    normalises each batch on the device) or processor (the checkpoint's processor per image in the workers);
    stored with the cache. image_decode: workers (Pillow decodes JPEGs in the workers) or device (the model's
    device decodes them in batches: nvJPEG on CUDA; batched-torch only); stored with the cache.
    Returns an ExtractResult; re-running resumes (done items are skipped, failed ones retried). A model
    whose cache is already complete with these settings is not loaded. summary: print each model's line (done,
    failed, pending -> the cache; the failed items) to stderr (a caller that reports them itself: False; see
    print_summary).
    Raises FeatxError for usage/configuration errors, before any data is read or model loaded where it can: a
    cache of any of the models made with other settings is refused before the first model loads, as far as the
    settings are known without its model (those only the loaded encoder knows, when it loads).
    """
    models = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    parsed = ExtractSettings(manifest=os.fspath(manifest), model=[os.fspath(m) for m in models], out=os.fspath(out),
                             quiet=not progress, **options)
    settings = ResolvedSettings.of(parsed, group_size)
    if not models:
        raise FeatxError("give at least one --model")
    # A local folder is recorded (cache attribute `model`, and from it a saved classifier) as its absolute path:
    # typed relative, it would name another folder, or nothing, from another working folder.
    models = [resolve_model(m) for m in models]
    df = read_manifest(manifest)  # a bad manifest is named first, then a bad model: both before any item is read
    configs = [load_config(m, settings.trust_remote_code) for m in models]
    jobs = [job for m, c in zip(models, configs) for job in _jobs_of(m, c, df, manifest, out)]
    for job in jobs if settings.seq else ():
        if not job.family.adapter_class().sequences:
            raise FeatxError(f"{job.model}: --seq is not supported for {job.family.name} models (its layers differ "
                             "in width and in positions, so there is no per-position sequence); leave --seq out")
    labels, splits, meta = labels_and_splits(df)
    data = _Manifest(df.to_dict("records"), df["id"].tolist(), labels, splits, meta,
                     base=os.path.dirname(os.path.abspath(manifest)))
    return _run_jobs(jobs, data, out, settings, announce=summary)


def _jobs_of(model, config, df, manifest, out) -> list:
    """One job per tower of `model` whose column the manifest has (CLIP: its image tower for an image or video
    column, its text tower for a text column), the primary tower's cache named as before; FeatxError (one
    line) when the manifest has no column for any of them. A tower of a checkpoint of several that cannot run for
    it (its adapter's `unavailable(model)` says why: no tokenizer, or no image processor saved) is skipped with a
    one-line warning that names the column left out; FeatxError when no tower is left to run."""
    towers = families_of(config)
    name = os.path.basename(os.fspath(manifest))
    jobs, skipped = [], []
    for family in towers:
        try:
            column = source_column(df, family.modality, name)
        except FeatxError:
            if len(towers) == 1:
                raise
            continue
        tower = None if family is towers[0] else family.modality
        why = len(towers) > 1 and getattr(family.adapter_class(), "unavailable", lambda m: "")(model)
        if why:  # e.g. a CLIP saved without a tokenizer: its image tower still runs (a SigLIP without an image
            # processor: its text tower)
            skipped.append((column, why))
            continue
        jobs.append(_Job(str(model), config, family.modality, column, cache_path(manifest, model, out, tower)))
    if skipped and not jobs:
        raise FeatxError(f"{model}: {skipped[0][1]}")
    for column, why in skipped:  # said only for a column the manifest has: an image-only manifest asks no text
        warnings.warn(f"{model}: the manifest's {column!r} column is not extracted ({why})")
    if not jobs:
        raise FeatxError(f"{name} has no column for any tower of {model} "
                         f"({', '.join(f.modality for f in towers)}): add a "
                         f"{' or '.join(repr(f.modality) for f in towers)} column")
    return jobs


def _run_jobs(jobs, data, out, settings, announce=True) -> ExtractResult:
    """Run each model in turn; a cache closes in a thread of its own while the next model loads and runs. Every
    job's cache is checked against the settings first, so that a clash stops the run before any model loads."""
    for job in jobs:
        _check_settings(job, data.ids, settings)
    finished = [_finished(job, data, settings) for job in jobs]  # decided before any model loads
    if any(summary is None for summary in finished):
        os.makedirs(out, exist_ok=True)
    entries = []  # per job: (a summary, or a _Closing that gives one once closed; print it)
    try:
        for job, summary in zip(jobs, finished):
            if summary is not None:
                entries.append((summary, True))
                continue
            for entry, _ in entries:
                if isinstance(entry, _Closing) and entry.path == job.path:
                    entry.join()  # the same model twice: its first run must have closed before it reopens
            entries.append(_run_model(job, data, settings))
    except BaseException:
        _collect(jobs, entries, failing=True, announce=announce)
        raise
    return _collect(jobs, entries, failing=False, announce=announce)


def _collect(jobs, entries, failing, announce=True):
    """The ExtractResult of the jobs' entries, in model order, once every cache has closed; raises the first
    closing error (when no other error is on its way out: then each is printed). announce: print each
    model's summary line."""
    result, errors = ExtractResult(), []
    for job, (entry, show) in zip(jobs, entries):
        if isinstance(entry, _Closing):
            entry.join()
            if entry.error is not None:
                errors.append(entry.error)
                if failing:
                    print(f"featx extract: {job.model}: closing {job.path} failed: {first_line(entry.error)}",
                          file=sys.stderr)
                continue
            entry = entry.summary
        _record(result, job.model, job.path, entry, show and announce)
    if errors and not failing:
        raise errors[0]
    return result


def _check_settings(job, ids, settings):
    """FeatxError (CacheWriter's one line) when a cache this job resumes was made with other settings, as far as
    they are known before its model loads (_known_attrs, the poolings, dtype, seq and the ids); the attributes
    only the loaded encoder knows (encoder.attrs) are compared when its CacheWriter opens. Nothing to check
    with --overwrite (it starts again) or where nothing is stored yet. Under torchrun this rank resumes its
    own shard (and its parts folder), and rank 0 merges the shards with the final file (not its parts folder)."""
    from featx.cache import check_settings
    from featx.cache.schema import parts_dir

    dist = Distributed.current()
    caches = [(dist.shard_path(job.path), True), (job.path, False)] if dist else [(job.path, True)]
    caches = [(path, folder) for path, folder in caches
              if os.path.exists(path) or (folder and os.path.exists(parts_dir(path)))]
    if settings.overwrite or not caches:
        return
    known = dict(attrs=_known_attrs(job, settings), poolings=_poolings(job, settings), dtype=settings.dtype,
                 seq=settings.seq, attrs_given_only=True)
    for path, folder in caches:
        check_settings(path, ids, parts_folder=folder, **known)


def _finished(job, data, settings):
    """The cache's summary when it already holds every item done with these settings, each from its source as
    the manifest gives it now (then the model need not load, nor any value be written: labels or splits that
    differ from the manifest's are rewritten, by rank 0 under torchrun); None when there is work left or
    anything to check with the model."""
    from featx.cache import is_complete, update_columns

    if settings.overwrite or has_shards(job.path) or not os.path.isfile(job.path):
        return None
    ids = data.ids
    done = is_complete(job.path, ids, attrs=_known_attrs(job, settings), poolings=_poolings(job, settings),
                       dtype=settings.dtype, seq=settings.seq, attrs_given_only=True,
                       fingerprints=data.fingerprints(job.column))
    if not done:
        return None
    dist = Distributed.current()
    if not dist or dist.rank == 0:
        update_columns(job.path, ids, labels=data.labels, splits=data.splits, meta=data.meta)
    return {"done": len(ids), "failed": 0, "pending": 0}


def _poolings(job, settings) -> list:
    """The poolings stored for `job`: those its encoder family supports (featx.encoders.Family.poolings)."""
    allowed = job.family.poolings
    return [p for p in settings.poolings if p in allowed] or ["mean"]


def _known_attrs(job, settings) -> dict:
    """The cache attributes that follow from the settings and the config alone (no model loaded; an image
    encoder's processor is read)."""
    attrs = {"model": job.model, "modality": job.cache_modality, "source_column": job.column,
             "poolings": ",".join(_poolings(job, settings)), "precision": settings.precision}
    if job.modality == "audio":
        attrs["max_audio_seconds"] = float(settings.max_audio_seconds or 0)
    if job.per_frame:
        attrs["fps"] = float(settings.fps)
    if job.modality == "video":  # a native video encoder's clip: its frame count and how frames are sampled
        attrs.update(num_frames=clip_frames(job.config), clip_sampling=CLIP_SAMPLING)
    if job.modality == "image":  # which path made the pixels (they may round differently on CUDA): a setting;
        # the one the encoder runs (SigLIP 2, or a processor without torchvision: processor), from its processor
        adapter = job.family.adapter_class()
        known = getattr(adapter, "preprocess_path", None)
        attrs["image_preprocess"] = (known(job.model, settings.image_preprocess, settings.trust_remote_code)
                                     if known else settings.image_preprocess)
        if hasattr(adapter, "jpeg_decoder") and job.column != "video":  # video frames: the video decoder's
            on_device = adapter.decode_path(settings.image_decode, attrs["image_preprocess"]) == "device"
            attrs["image_decode"] = adapter.jpeg_decoder(on_device, torch.device(settings.device).type)
    if settings.seq:
        attrs["seq_stride"] = int(settings.seq_stride)
    if job.modality == "text" and settings.max_length:
        attrs["max_length"] = int(settings.max_length)
    fingerprint = model_fingerprint(job.model)  # which weights (featx.checkpoint); None: not on disk yet
    if fingerprint is not None:
        attrs[MODEL_FINGERPRINT] = fingerprint
    return attrs


def _run_model(job, data, settings):
    """Load job's model and run it over the items its cache lacks. Returns (entry, show): a _Closing, or under
    torchrun the merged cache's summary (shown by rank 0)."""
    from featx.cache import CacheWriter

    frames = job.column == "video"  # video frames come from the video decoder: no JPEG to decode
    options = ({"image_preprocess": settings.image_preprocess,
                "image_decode": "workers" if frames else settings.image_decode} if job.modality == "image" else {})
    options.update({"audio_attention": settings.audio_attention} if job.modality == "audio" else {})
    encoder = load_encoder(job.model, config=job.config, device=settings.device,
                           trust_remote_code=settings.trust_remote_code, precision=settings.precision,
                           max_length=settings.max_length, modality=job.modality, **options)
    if settings.progress:  # no advice under -q; a warning is said once per run ("featx COMMAND: ..." by the CLI)
        for line in encoder.advice:
            warnings.warn(f"{job.model}: {line}", type(line) if isinstance(line, Advice) else Advice)
    pools = _poolings(job, settings)
    if set(pools) != set(settings.poolings):  # some asked for are not the family's (none: mean instead)
        instead = "only" if set(pools) & set(settings.poolings) else f"instead of {','.join(settings.poolings)}"
        print(f"featx extract: {job.model}: {job.family.name} encoders support the poolings "
              f"{','.join(job.family.poolings)}; storing {','.join(pools)} {instead}", file=sys.stderr)
    attrs = {**_known_attrs(job, settings), "featx_version": __version__, **encoder.attrs}
    if frames:
        attrs.pop("image_decode", None)
    dist = Distributed.current()
    if dist:
        dist.prepare_final(job.path, settings.overwrite)
    writer = CacheWriter(dist.shard_path(job.path) if dist else job.path, ids=data.ids, attrs=attrs,
                         poolings=pools, num_layers=encoder.num_layers, hidden_size=encoder.hidden_size,
                         dtype=settings.dtype, seq=settings.seq, labels=data.labels, splits=data.splits,
                         meta=data.meta, overwrite=settings.overwrite, layer_widths=encoder.layer_widths,
                         fingerprints=data.fingerprints(job.column))
    todo = dist.my_todo(writer.todo, job.path, data.fingerprints(job.column)) if dist else writer.todo
    decoder = _decoder(encoder, job, settings)
    try:
        _run(writer, longest_first(todo, data.rows, decoder), _runner(encoder, job, pools, settings), decoder,
             data.rows, settings, settings.progress and (not dist or dist.rank == 0), job.model)
    except BaseException:
        writer.close()  # consolidate what was written, also when interrupted
        raise
    if dist:
        writer.close()
        return dist.merge(job.path, data.fingerprints(job.column)), dist.rank == 0
    # Closing the cache (a copy of all it holds, an fsync, removing the parts: seconds for large caches)
    # overlaps the next model's load and run; h5py lets go of the GIL for its I/O.
    return _Closing(writer, job.model, job.path), True


def _window_seconds(encoder, max_audio_seconds):
    """Audio window length: --max-audio-seconds (0: none), capped at the longest window a fixed-length model takes
    (encoder.max_window_seconds: Whisper 30 s, recorded in the cache attrs), so that nothing is cut off."""
    cap = getattr(encoder, "max_window_seconds", None)
    return cap if cap and (not max_audio_seconds or max_audio_seconds > cap) else max_audio_seconds


def _decoder(encoder, job, settings) -> Decoder:
    side = encoder.shortest_side() if hasattr(encoder, "shortest_side") else 0
    return Decoder(encoder.modality, job.column, getattr(encoder, "sample_rate", None),
                   _window_seconds(encoder, settings.max_audio_seconds), settings.fps,
                   preprocess=encoder.preprocessor(), max_image_pixels=settings.max_image_pixels, shortest_side=side,
                   jpeg_bytes=getattr(encoder, "decode_on_device", False) and job.column != "video",
                   clip_frames=getattr(encoder, "clip_frames", 0))


def _runner(encoder, job, pools, settings) -> Runner:
    if encoder.modality == "text":
        budget = settings.max_batch_tokens
    elif encoder.modality == "audio" and settings.max_batch_seconds:
        budget = settings.max_batch_seconds * encoder.sample_rate
    else:
        budget = None
    return Runner(encoder, pools, seq=settings.seq, seq_stride=settings.seq_stride, batch_size=settings.batch_size,
                  budget=budget, video=job.per_frame, store_dtype=settings.dtype)


class _WriteThread:
    """Writes finished groups to the cache in a thread of its own, behind a queue of at most two groups;
    put() re-raises the thread's first error in the caller."""

    def __init__(self, writer):
        import queue
        import threading

        self.writer, self.errors = writer, []
        self.pending = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._loop, name="featx-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while (job := self.pending.get()) is not None:
            if self.errors:
                continue  # drain after a failure so the producer never blocks
            try:
                indices, pooled, seqs, failed = job
                if len(indices):
                    self.writer.write(indices, pooled, seqs)
                if failed:
                    self.writer.fail([i for i, _ in failed], [why for _, why in failed])
            except BaseException as e:  # re-raised in the main thread
                self.errors.append(e)

    def put(self, group):
        self.pending.put(group)
        self.raise_error()

    def raise_error(self):
        if self.errors:
            raise self.errors[0]

    def finish(self):
        self.pending.put(None)
        self.thread.join()


def _run(writer, todo, runner, decoder, rows, settings, progress, model):
    """Decode (workers; without them a thread of this process, texts inline) -> forward (this thread) -> write (a
    writer thread behind a bounded queue)."""
    from featx.progress import progress_bar

    if len(todo) == 0:
        return
    group_size = settings.group_size or default_group_size(decoder.modality, runner, settings.seq)
    workers = settings.num_workers
    # Without workers, images, video and audio decode in a thread of this process beside the forward: PIL's, PyAV's
    # and libsndfile's decoders and numpy's loops let go of the GIL. Texts tokenize there too when the forward
    # leaves a CPU to it (tokenize_beside), one thread each: the fast tokenizer's batch call lets go of the GIL.
    # (a 2-core CPU, torch on one thread, a tiny BERT, 4,000 texts: featx's host cost 0.25 and 0.20 ms per text
    # inline, 0.13 and 0.12 beside, interleaved runs). Otherwise they tokenize inline, where the tokenizer's own
    # thread pool has all the cores between forwards: beside a forward that holds every core it slowed both (best
    # of 9 interleaved runs: 4,000 texts 3.05 s inline, 3.17 s in the thread; 480 audio files 2.72 s inline,
    # 2.63 s in the thread; best of 5: 100 JPEGs 0.49 s inline, 0.43 s in the thread. The machine's noise was about
    # 10%: the audio gain is within it).
    threaded = not workers and (decoder.modality != "text" or tokenize_beside(settings.device))
    # Workers (or the decoding thread) hand over lists of up to 16 decoded items, texts up to 256 (one batch call
    # of the tokenizer each; a text is small); inline, a chunk of texts is a whole group. About two groups in
    # flight keep the forward fed without holding thousands of decoded images in memory.
    if decoder.modality != "text":
        chunk = max(1, min(16, int(group_size)))
    else:
        chunk = max(1, min(256, int(group_size)) if workers or threaded else int(group_size))
    prefetch = max(2, math.ceil(2 * group_size / (chunk * workers))) if workers else None
    pin = pins_chunks(runner.encoder, workers, settings.device)
    loader = torch.utils.data.DataLoader(DecodedItems(rows, todo, decoder), batch_size=chunk, shuffle=False,
                                         num_workers=workers, collate_fn=pack_chunk if workers else keep_chunk,
                                         pin_memory=pin,
                                         prefetch_factor=prefetch, worker_init_fn=_one_thread_tokenizers if workers
                                         else None)
    bar = progress_bar(len(todo), last_name(model), "item", enabled=progress)
    out = _WriteThread(writer)
    # The first groups ramp up from one batch where decoding runs beside the forward, and wherever featx picks the
    # group size: then the first part is written after one batch of the longest items, and later groups are
    # capped at GROUP_SECONDS of work (_Pace). A group_size given by the caller is kept as it is.
    chosen = not settings.group_size
    group, sizes = [], group_sizes(runner.batch_size, group_size, ramp=bool(workers) or threaded or chosen)
    pace = _Pace(runner.batch_size) if chosen else None
    size = next(sizes)
    chunks = decoded_ahead(loader, math.ceil(group_size / chunk),
                           one_thread_tokenizer=decoder.modality == "text" and str(settings.device).startswith("cpu")
                           ) if threaded else iter(loader)
    # Group k+1 is queued on the device before group k's values are fetched (the wait for k, in _finish_group,
    # comes while k+1 runs): with k+1 decoded in time, the device does not wait for the host between groups.
    queued = []  # groups on the device, not yet handed to the writer, oldest first

    def hand(started):  # queue a group (None: the end); write the ones before it, or all at the end or on Ctrl-C
        if started is not None:
            queued.append(started)
        stopped = started is not None and started[1] is not None and started[1].stopped is not None
        while queued and (len(queued) > 1 or started is None or stopped):
            finished = _finish_group(runner, queued[0])  # on Ctrl-C in that forward: raises Interrupted
            out.put(finished)
            queued.pop(0)
            if pace is not None:
                pace.finished(len(finished[0]) + len(finished[3]))

    try:
        for items in chunks:
            for item in unpack_chunk(items) if workers else items:
                group.append(item)
                if len(group) >= size:
                    hand(_start_group(runner, group, bar.update))
                    group, size = [], next(sizes) if pace is None else pace.cap(next(sizes))
        if group:
            hand(_start_group(runner, group, bar.update))
        hand(None)
    except Interrupted as e:  # Ctrl-C: the items the progress bar counted as done are written before it stops
        out.put(e.result)
        raise
    except KeyboardInterrupt:  # Ctrl-C between forwards: the groups on the device are written before it stops
        for started in queued:
            out.put(_finish_group(runner, started))
        raise
    finally:
        if threaded:
            chunks.close()  # stops the decoding thread
        out.finish()
        bar.close()
    out.raise_error()


_DONE = object()


class _Pace:
    """The items a group may hold: about GROUP_SECONDS of work at the pace of the run so far (seconds since it
    began per item finished; the start-up counts too, so early caps err small), a whole number of batches, one at
    least; no cap before the first group is finished."""

    def __init__(self, batch_size):
        self.batch, self.began, self.done = max(1, int(batch_size)), time.perf_counter(), 0

    def finished(self, n):
        self.done += int(n)

    def cap(self, size):
        if not self.done:
            return size
        per_item = (time.perf_counter() - self.began) / self.done
        most = int(GROUP_SECONDS / max(per_item, 1e-9)) // self.batch * self.batch
        return min(int(size), max(self.batch, most))


def pins_chunks(encoder, workers, device) -> bool:
    """Whether the DataLoader's pin thread copies the workers' chunks to pinned memory: on CUDA, with workers, for
    an encoder whose collate reads pinned inputs straight (images: they then cross to the device with no
    host-side stack, off the main thread, PackedChunk.pin_memory). Texts and audio are padded into a pinned batch
    by collate anyway: pinning their chunks first only copied every waveform once more, in one thread."""
    return bool(workers) and str(device).startswith("cuda") and encoder.pinned_inputs


def tokenize_beside(device) -> bool:
    """Whether texts tokenize in a thread beside the forward when there are no workers: on a GPU (the forward
    hardly needs this process's CPU), or on the CPU when torch's intra-op threads leave one of this process's CPUs
    free (OMP_NUM_THREADS=1 or torch.set_num_threads, as in a cluster job of several tasks): the tokenizer then
    runs on that CPU (on one thread: _tokenizers_on_one_thread) while the forward runs on its own, instead of
    between forwards."""
    if not str(device).startswith("cpu"):
        return True
    return torch.get_num_threads() < process_cpus()


@contextlib.contextmanager
def _tokenizers_on_one_thread():
    """Fast tokenizers' batch calls on the calling thread alone while inside (TOKENIZERS_PARALLELISM, read at each
    call; restored after): beside the forward, their thread pool over all the cores would take the forward's."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def decoded_ahead(chunks, depth, one_thread_tokenizer=False):
    """The items of `chunks` (an iterable: the single-process DataLoader), in order, iterated in a thread of their
    own up to `depth` ahead, so that decoding overlaps the forward in this thread (PIL's, PyAV's and libsndfile's
    decoders, numpy's loops and fast tokenizers' batch calls let go of the GIL, as torch's kernels do). With
    one_thread_tokenizer, fast tokenizers run on that thread alone meanwhile. An error raised while iterating is
    raised here; closing the generator (or leaving it by an exception) stops the thread after the chunk it
    decodes."""
    import queue
    import threading

    ready, stop = queue.Queue(maxsize=max(1, int(depth))), threading.Event()

    def hand(x) -> bool:  # False once the consumer stopped
        while not stop.is_set():
            try:
                ready.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for x in chunks:
                if not hand(x):
                    return
            hand(_DONE)
        except BaseException as e:  # re-raised in the consumer
            hand(_Raised(e))

    thread = threading.Thread(target=produce, name="featx-decode", daemon=True)
    with _tokenizers_on_one_thread() if one_thread_tokenizer else contextlib.nullcontext():
        thread.start()
        try:
            while (x := ready.get()) is not _DONE:
                if isinstance(x, _Raised):
                    raise x.error
                yield x
        finally:
            stop.set()
            thread.join(timeout=10.0)  # at most the chunk being decoded; a daemon, so a stuck decoder cannot hang exit


class _Raised:
    def __init__(self, error):
        self.error = error


def default_group_size(modality, runner, seq) -> int:
    """Items per group (a part of the cache) when extract is not given group_size: 8 batches (images and video
    frames 2), at least 64.

    Images and video frames need no sorting, and a group's decoded pixels wait in memory (pinned on CUDA) until its
    forward, about two groups ahead: 2,048 JPEGs of 640x480 are 1.9 GB. On an H200 with 14 workers (ViT-L/14,
    bf16-weights, 4,000 such JPEGs, batches of 256), groups of 2 batches ran at 951 images/s, of 8 at 847.

    Texts without --seq: as many as hold TEXT_PART_BYTES of pooled float32 values, at most TEXT_GROUP_MAX. Each part
    costs a file and an fsync whatever it holds, and a group of texts holds little else (token ids, where a group of
    images or audio holds their decoded pixels and samples until its forward): on a 2-core CPU, 4,000 texts
    through a tiny BERT wrote their parts in 0.09 s instead of 0.39 s and closed the cache in 0.08 s instead of
    0.22 s with groups of 1,024 instead of 128, against 2.2 s of forward. (BERT-large, mean and cls: 320 texts.)"""
    if modality in ("image", "video"):
        return max(64, 2 * runner.batch_size)
    size = max(64, 8 * runner.batch_size)
    if modality != "text" or seq:
        return size
    enc = runner.encoder
    per_item = 4 * len(runner.poolings) * enc.num_layers * enc.hidden_size
    return max(size, min(TEXT_GROUP_MAX, TEXT_PART_BYTES // max(1, per_item)))


def group_sizes(batch_size, group_size, ramp):
    """Items per group (a part of the cache, and the items whose batches are length-sorted together), forever.
    With `ramp` (decoding runs beside the forward: workers, or the decoding thread) the first groups are smaller,
    one batch, then doubling up to group_size: the forward starts on the first batch instead of idling until a
    whole group is decoded."""
    size = min(int(group_size), max(1, int(batch_size))) if ramp else int(group_size)
    while True:
        yield size
        size = min(int(group_size), 2 * size)


def _one_thread_tokenizers(worker_id):
    """In each decoding worker, fast tokenizers' batch calls run on one thread: the workers are the parallelism
    (a thread pool per worker would put workers x CPUs threads on the CPUs)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _start_group(runner, group, done):
    """(failures, Runner.start's Launched | None) of a group of decoded items [(index, inputs | None, reason |
    None)], its batches queued on the device; done(n) as items finish (progress per item, not per group)."""
    failed = [(i, why) for i, inputs, why in group if inputs is None]
    ok = [(i, inputs) for i, inputs, why in group if inputs is not None]
    done(len(failed))
    return failed, (runner.start(ok, done) if ok else None)


def _finish_group(runner, started):
    """(indices, pooled, seqs, failures) of a group _start_group queued, once the device is done with it. If Ctrl-C
    stopped its forward, Interrupted with that tuple for the items finished before it."""
    failed, launched = started
    if launched is None:
        return np.zeros(0, np.int64), None, None, failed
    try:
        indices, pooled, seqs, more = runner.finish(launched)
    except Interrupted as e:
        indices, pooled, seqs, more = e.result
        raise Interrupted((indices, pooled, seqs, failed + more)) from e.__cause__
    return indices, pooled, seqs, failed + more


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
        print_summary(summary)


def print_summary(summary, where=None):
    """One model's line of an ExtractResult's caches entry on stderr (done, failed, pending -> its cache, or
    `where` in words), then up to 10 of its failed items with their reasons."""
    path = summary["path"]
    line = f"featx extract: {summary['model']}: {summary['done']} done, {summary['failed']} failed"
    if summary["pending"]:
        line += f", {summary['pending']} pending"
    print(f"{line} -> {where or path}", file=sys.stderr)
    if summary["failed"]:
        from featx.cache import open_cache

        with open_cache(path) as c:
            bad = [(i, e) for i, e in zip(c.ids, c.error) if e]
        for i, e in bad[:10]:
            print(f"  failed {i}: {e}", file=sys.stderr)
        if len(bad) > 10:
            print(f"  ... and {len(bad) - 10} more" + ("" if where else f" (see `featx info {path}`)"),
                  file=sys.stderr)
