"""A checkpoint's fingerprint: which weights a cache was extracted with, recorded so that a model folder given
elsewhere (moved, copied, shared) can be checked to be the same checkpoint before its numbers are used.

The fingerprint (the cache attribute and classifier block key MODEL_FINGERPRINT) is a short text,
"config=<16 hex> weights=<16 hex> bytes=<total> files=<count>", made of:
  config   sha256 of config.json read as JSON, without the keys that name where or with what it was saved
           (CONFIG_KEYS_IGNORED), keys sorted: the same model saved by another transformers version is the same
  weights  sha256 over the weight files transformers loads (the top-level *.safetensors files, or the *.bin files
           when there are none), in name order: each file's name and size, its first and last MiB and 64 KiB at
           each of SAMPLES evenly spaced offsets between them (a file of up to about 6 MiB is read whole)
  bytes, files: the weight files' total size and number.
It reads about 6 MiB per weight file whatever its size (a 2 GB checkpoint: well under a second), and tells apart
two random initialisations or two fine-tunings of one model (every layer is sampled several times in a
checkpoint of a few hundred MB and more). It does not cover the tokenizer or processor files, nor a change
confined to bytes that no sample reads (one tensor of many edited in place). A file's modification time is not
part of it: a copy is the same checkpoint.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os

MODEL_FINGERPRINT = "model_fingerprint"
HEAD = TAIL = 1 << 20
SAMPLE, SAMPLES = 64 << 10, 62
CONFIG_KEYS_IGNORED = ("transformers_version", "_name_or_path", "_commit_hash")


def checkpoint_folder(model):
    """The folder holding `model`'s files: a local folder as given, a hub id's snapshot in the local Hugging Face
    cache (None when it has none)."""
    text = os.path.expanduser(str(model))
    if os.path.isdir(text):
        return text
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model), "config.json")
    except Exception:  # not a valid hub id, or no cache: nothing to fingerprint
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def weight_files(folder) -> list:
    """The weight files transformers loads from `folder`: its *.safetensors files, or its *.bin files when it has
    none, sorted by name."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(f for f in glob.glob(os.path.join(glob.escape(folder), pattern)) if os.path.isfile(f))
        if files:
            return files
    return []


def model_fingerprint(model):
    """The fingerprint of checkpoint `model` (a local folder or a hub id in the local cache), see the module's
    docstring; None when its config.json or weight files are not on disk (a hub model not downloaded yet)."""
    folder = checkpoint_folder(model)
    if folder is None:
        return None
    files = weight_files(folder)
    try:
        config = _config_hash(os.path.join(folder, "config.json"))
        sized = [(f, os.stat(f)) for f in files]
        if config is None or not sized:
            return None
        weights = hashlib.sha256()
        for f, st in sized:
            weights.update(f"{os.path.basename(f)}\0{st.st_size}\0".encode())
            weights.update(_samples_hash(os.path.realpath(f), st.st_size, st.st_mtime_ns, st.st_ino))
    except OSError:
        return None
    total = sum(st.st_size for _, st in sized)
    return f"config={config} weights={weights.hexdigest()[:16]} bytes={total} files={len(sized)}"


def fingerprint_diff(old, new) -> str:
    """What differs between two fingerprints, in words ("" when they are equal): the config, the size of the
    weight files, or their contents."""
    if old == new:
        return ""
    a, b = _parse(old), _parse(new)
    parts = []
    if a.get("config") != b.get("config"):
        parts.append("its config.json differs")
    if (a.get("bytes"), a.get("files")) != (b.get("bytes"), b.get("files")):
        parts.append(f"its weight files differ ({a.get('files', '?')} file(s) of {a.get('bytes', '?')} bytes, "
                     f"now {b.get('files', '?')} of {b.get('bytes', '?')})")
    elif a.get("weights") != b.get("weights"):
        parts.append("its weights differ (files of the same sizes, other values)")
    return " and ".join(parts) or f"fingerprint {old!r} (now {new!r})"


def _parse(text) -> dict:
    return dict(p.split("=", 1) for p in str(text).split() if "=" in p)


def _config_hash(path):
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:   # not JSON: its bytes
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in CONFIG_KEYS_IGNORED}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _samples_hash(path, size, mtime_ns, inode) -> bytes:
    """sha256 digest of file `path`'s sampled bytes (size, mtime_ns and inode: the memo's key, so that a file
    rewritten in place is read again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= HEAD + TAIL + SAMPLES * SAMPLE:
            h.update(f.read())
            return h.digest()
        h.update(f.read(HEAD))
        span = size - HEAD - TAIL - SAMPLE
        for k in range(SAMPLES):
            f.seek(HEAD + span * k // (SAMPLES - 1))
            h.update(f.read(SAMPLE))
        f.seek(size - TAIL)
        h.update(f.read(TAIL))
    return h.digest()
