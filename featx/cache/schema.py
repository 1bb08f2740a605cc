"""The cache format, defined once: dataset names, shapes, dtypes, attributes, chunking and version.

A consolidated cache (one HDF5 file per manifest x encoder) holds, for N items, L layers, hidden size D:
  ids (N,) str, done (N,) bool, error (N,) str ("" where done or pending)
  pooled/<pooling> (N, L, D) float16|float32, zeros where not done, chunked (rows, 1, D) so one layer reads fast
  seq/data (T_total, L, D) and seq/offsets (N+1,) int64, optional: item i is data[offsets[i]:offsets[i+1]]
  label (N,) float64|str, split (N,) str, optional
  fingerprint (N,) uint64, optional: a hash of each done item's source when it was computed (its text, or its
      file's path, size and mtime; see featx.extraction.pipeline.source_fingerprints), 0 where none is known (not
      done, or computed before featx recorded them); a source that no longer has it is computed again
  meta/<k> (N,) str for k = 0, 1, ...: metadata columns, named by meta's attribute `columns` (a JSON list),
      so any column name round-trips ("a/b", "."); files of format 1.0 without the attribute name them by key
  root attrs: model, modality, num_layers, hidden_size, dtype, poolings (comma-separated), featx_version,
      format_version, and the caller's settings (str, bool, int or float), among them model_fingerprint (which
      weights, featx.checkpoint; absent in caches made before featx recorded it, and compared only when both
      sides have it: the same fingerprint is the same model under another path);
      layer_widths (comma-separated, L ints, the widest = D) only when layers differ in width (a CNN's stages):
      layer l's values are its first layer_widths[l] features, zero-padded to D; readers cut the padding off
Numeric datasets carry HDF5 Fletcher-32 checksums (HDF5 allows no filter on variable-length strings).

A part file (one per written batch, in `<path>.parts/part-NNNNNNNN.h5`) holds B items:
  indices (B,) int64 manifest indices, ids, done, error (B,), fingerprint (B,) uint64 (optional), and for its K
  done items only
  pooled/<pooling> (K, L, D) and seq/offsets (K+1,), seq/data (T, L, D), the arrays chunked in whole items
  (part_chunks; files written before that carry h5py's chunk shapes, read alike).
The parts folder also holds settings.json (what must match to resume) and the writer's lock file.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from featx.errors import FeatxError

FORMAT_VERSION = "1.0"
MODALITIES = ("text", "image", "audio", "video")
DTYPES = ("float16", "float32")
STR = h5py.string_dtype()

IDS, DONE, ERROR, LABEL, SPLIT, INDICES = "ids", "done", "error", "label", "split", "indices"
FINGERPRINT = "fingerprint"  # (N,) uint64, 0: not known
POOLED, SEQ, META = "pooled", "seq", "meta"
SEQ_DATA, SEQ_OFFSETS = "seq/data", "seq/offsets"
META_COLUMNS = "columns"  # attribute of the meta group

# Root attributes the writer sets itself, with their types; "model" and "modality" come from the caller.
OWN_ATTRS = ("num_layers", "hidden_size", "dtype", "poolings", "featx_version", "format_version", "layer_widths")
ATTR_TYPES = {"model": str, "modality": str, "num_layers": int, "hidden_size": int, "dtype": str,
              "poolings": str, "featx_version": str, "format_version": str, "layer_widths": str}
LAYER_WIDTHS = "layer_widths"
# Settings recorded only since featx offered a choice, and what a cache made before then ran: a cache that lacks
# one resumes under that value (--image-preprocess processor, --audio-attention eager, JPEGs decoded with Pillow),
# and only under it. audio_batching is no choice: caches of data2vec-audio, wav2vec2-conformer or a group-norm
# checkpoint with the attention mask made before featx batched them by equal lengths hold values that depend on
# their batch, and are not resumed.
ATTRS_BEFORE_RECORDED = {"image_preprocess": "processor", "audio_attention": "eager", "image_decode": "pil",
                         "audio_batching": "padded"}
# Why a setting that differs from a cache's own cannot be chosen back (said with the refusal).
UNCHOSEN_ATTRS = {"audio_batching": "this featx batches the model's inputs by equal lengths only: padded, its values "
                                    "depended on their batch, so the cache is extracted again with --overwrite"}
SETTING_TYPES = (str, bool, int, float)  # the caller's other attributes
# The featx extract --image-decode value that records each JPEG decoder as the image_decode attribute (Pillow in
# the workers; torchvision on a CPU or nvJPEG on CUDA, on the model's device): a user gave the option, not the name.
IMAGE_DECODE_OPTIONS = {"pil": "workers", "torchvision": "device", "nvjpeg": "device"}


def image_decode_words(decoder) -> str:
    """A recorded JPEG decoder (the image_decode attribute) with the option that chose it: "--image-decode device,
    decoded with torchvision"; an unknown value as 'value'."""
    if decoder in IMAGE_DECODE_OPTIONS:
        return f"--image-decode {IMAGE_DECODE_OPTIONS[decoder]}, decoded with {decoder}"
    return f"image_decode {decoder!r}"


PARTS_SUFFIX, SETTINGS_FILE, LOCK_FILE = ".parts", "settings.json", "lock"
TMP_SUFFIX, BAD_SUFFIX = ".tmp", ".bad"
CHUNK_BYTES = 512 * 1024  # one chunk of one layer; 256 KiB-1 MiB keeps reading one layer for all items fast
PART_CHUNK_BYTES = 256 * 1024  # about one chunk of a part's array: whole items (rows of all layers)
MAX_INFLATION = 1100  # no dataset declares more bytes than this many times its file's size (deflate peaks ~1032)


def pooled_name(pooling):
    return f"{POOLED}/{pooling}"


def meta_name(k):
    """The dataset of the k-th metadata column: an index, since column names may hold any character."""
    return f"{META}/{int(k)}"


def widths_text(widths):
    """The layer_widths attribute of a list of per-layer widths: "96,96,192,384,768"."""
    return ",".join(str(int(w)) for w in widths)


def parse_widths(text, num_layers, hidden_size, path=""):
    """The per-layer widths of a layer_widths attribute, checked: num_layers ints in 1..hidden_size, the widest
    equal to hidden_size; FeatxError (one line) otherwise."""
    try:
        widths = [int(w) for w in str(text).split(",")]
    except ValueError:
        widths = []
    if len(widths) != int(num_layers) or min(widths) < 1 or max(widths) != int(hidden_size):
        raise FeatxError(f"{path}: layer_widths {text!r} does not fit {num_layers} layers of at most "
                         f"{hidden_size} features, the widest {hidden_size}")
    return widths


def chunk_rows(hidden_size, dtype):
    """Rows per chunk so that one chunk (rows, 1, D) is about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (int(hidden_size) * np.dtype(dtype).itemsize))


def part_chunks(rows, num_layers, hidden_size, dtype):
    """Chunk shape of a part's (rows, L, D) array: whole items, about PART_CHUNK_BYTES, so that consolidation,
    which reads a part's items in runs in manifest order, reads each chunk once; None (h5py's choice) when
    rows is 0."""
    if rows == 0:
        return None
    per_item = int(num_layers) * int(hidden_size) * np.dtype(dtype).itemsize
    return int(min(rows, max(1, PART_CHUNK_BYTES // per_item))), int(num_layers), int(hidden_size)


def create(group, name, data=None, **kw):
    """A numeric dataset, with the format's filter: a Fletcher-32 checksum on every chunk."""
    return group.create_dataset(name, data=data, fletcher32=True, **kw)


def create_strings(group, name, values):
    """A (N,) str dataset (variable-length UTF-8)."""
    return group.create_dataset(name, data=np.asarray(values, dtype=object), dtype=STR)


def parse_version(text, path=""):
    """(major, minor) of a format version "M.m"; FeatxError when it is not one."""
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except ValueError:
        raise FeatxError(f"{path}: format_version {text!r} is not a version (MAJOR.MINOR)") from None


def check_version(attrs, path):
    """Refuse a file of a newer major format version; a file without the attribute is version 1.0."""
    found = attrs.get("format_version", "1.0")
    if not isinstance(found, str):
        raise FeatxError(f"{path}: attribute format_version is a {type(found).__name__}, not a str")
    if parse_version(found, path)[0] > parse_version(FORMAT_VERSION)[0]:
        raise FeatxError(f"{path} was written by a newer featx (cache format {found}; this featx reads "
                         f"{FORMAT_VERSION.split('.')[0]}.x): upgrade featx to read it")
    return found


def estimated_size(n, num_layers, hidden_size, dtype, poolings, seq_rows=0):
    """Bytes a consolidated file of n items needs, about: the arrays plus ~256 bytes per item of strings."""
    per_row = int(num_layers) * int(hidden_size) * np.dtype(dtype).itemsize
    return per_row * (int(n) * len(poolings) + int(seq_rows)) + 256 * int(n) + (1 << 20)


def parts_dir(path):
    return os.fspath(path) + PARTS_SUFFIX


def part_name(counter):
    return f"part-{int(counter):08d}.h5"


def part_counter(name):
    """The counter of a part file name, or None when `name` is not one."""
    if len(name) == 16 and name.startswith("part-") and name.endswith(".h5") and name[5:13].isdigit():
        return int(name[5:13])
    return None
