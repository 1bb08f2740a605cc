"""The parts folder of a cache being written: its files, settings.json, setting damaged files aside, and the
scan that says which file holds each item's values."""
from __future__ import annotations

import hashlib
import json
import os
import types
import warnings

import h5py
import numpy as np

from featx.cache import schema
from featx.cache.reader import check_dataset, fingerprints, open_file, reading, seq_offsets
from featx.checkpoint import MODEL_FINGERPRINT, fingerprint_diff
from featx.errors import FeatxError, first_line
from featx.naming import resolve_model, same_model

KNOWN_SUFFIXES = (schema.TMP_SUFFIX, schema.BAD_SUFFIX)


def part_files(path):
    """Finished parts of the cache `path`, oldest first."""
    folder = schema.parts_dir(path)
    if not os.path.isdir(folder):
        return []
    names = sorted((schema.part_counter(n), n) for n in os.listdir(folder) if schema.part_counter(n) is not None)
    return [os.path.join(folder, n) for _, n in names]


def foreign_files(path):
    """Files in the parts folder that featx did not put there (neither a part, settings, lock, .tmp nor .bad)."""
    folder = schema.parts_dir(path)
    if not os.path.isdir(folder):
        return []
    own = (schema.SETTINGS_FILE, schema.LOCK_FILE)
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n not in own and schema.part_counter(n) is None and not n.endswith(KNOWN_SUFFIXES)]


def set_aside(file, reason):
    """Rename a damaged or foreign file to <file>.bad, saying so in a warning; its items are then recomputed."""
    target = file + schema.BAD_SUFFIX
    k = 1
    while os.path.exists(target):
        target, k = f"{file}.{k}{schema.BAD_SUFFIX}", k + 1
    os.replace(file, target)
    warnings.warn(f"{file}: {reason}; set aside as {os.path.basename(target)} (its items will be computed again)")


# ---------------------------------------------------------------- settings
def ids_hash(ids):
    return hashlib.sha256("\0".join(ids).encode("utf-8")).hexdigest()


def resume_settings(attrs, poolings, dtype, seq, num_layers, hidden_size, ids):
    """What must match for a cache to be resumed: the caller's attrs, the layout, and the id list."""
    return {"attrs": dict(attrs), "poolings": list(poolings), "dtype": dtype, "seq": bool(seq),
            "num_layers": None if num_layers is None else int(num_layers),
            "hidden_size": None if hidden_size is None else int(hidden_size), "n_items": len(ids),
            "ids_sha256": ids_hash(ids)}


def file_settings(header):
    """resume_settings of a consolidated file's header (see featx.cache.reader.read_header)."""
    attrs = {k: v for k, v in header["attrs"].items() if k not in schema.OWN_ATTRS}
    return resume_settings(attrs, header["poolings"], header["dtype"], header["seq"], header["num_layers"],
                           header["hidden_size"], header["ids"])


def settings_diff(old, new):
    """One short phrase per setting that differs, e.g. "model 'a' (now 'b')"; a None in `new` matches anything.
    model_fingerprint is compared only when both have one, and two model paths with the same one are one model."""
    diffs = []
    keys = sorted(set(old["attrs"]) | set(new["attrs"]), key=lambda k: (k not in ("model", "modality"), k))
    prints = old["attrs"].get(MODEL_FINGERPRINT), new["attrs"].get(MODEL_FINGERPRINT)
    for k in keys:
        a, b = old["attrs"].get(k, schema.ATTRS_BEFORE_RECORDED.get(k)), new["attrs"].get(k)
        if k == MODEL_FINGERPRINT:  # the same folder's weights; not compared when either is not known
            if a is not None and b is not None and a != b:
                diffs.append(f"model weights: {fingerprint_diff(a, b)}")
        elif k == "model" and isinstance(a, str) and isinstance(b, str):
            if not same_model(a, b) and not (None not in prints and prints[0] == prints[1]):
                # a folder is one model however it is typed (featx.naming.resolve_model), or wherever it is
                # moved or copied to (the same weights' fingerprint, featx.checkpoint)
                here = resolve_model(a)
                diffs.append(f"model {a!r}{f' (from here {here!r})' if here != a else ''} (now {b!r})")
        elif a != b:  # the decoder with the option a user gave: "--image-decode device, decoded with torchvision"
            diffs.append(f"{schema.image_decode_words(a)} (now {schema.image_decode_words(b)})"
                         if k == "image_decode" else f"{k} {a!r} (now {b!r}"
                         f"{': ' + schema.UNCHOSEN_ATTRS[k] if k in schema.UNCHOSEN_ATTRS else ''})")
    for k in ("num_layers", "hidden_size", "dtype", "seq"):
        if new[k] is not None and old[k] != new[k]:
            diffs.append(f"{k} {old[k]!r} (now {new[k]!r})")
    if sorted(old["poolings"]) != sorted(new["poolings"]):
        diffs.append(f"poolings {','.join(old['poolings'])!r} (now {','.join(new['poolings'])!r})")
    if old["n_items"] != new["n_items"]:
        diffs.append(f"number of items {old['n_items']} (now {new['n_items']})")
    elif old["ids_sha256"] != new["ids_sha256"]:
        diffs.append("the id list differs")
    return diffs


def read_settings(path):
    """The parts folder's settings.json as a dict, or None when absent; ValueError when it is damaged."""
    file = os.path.join(schema.parts_dir(path), schema.SETTINGS_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            s = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable ({first_line(e)})") from None
    want = {"attrs": dict, "poolings": list, "dtype": str, "seq": bool, "num_layers": int, "hidden_size": int,
            "n_items": int, "ids_sha256": str}
    if not isinstance(s, dict) or any(not isinstance(s.get(k), t) for k, t in want.items()):
        raise ValueError("not featx's settings (a field is missing or of the wrong type)")
    return s


# ---------------------------------------------------------------- which file holds each item
def final_record(header):
    """(indices, ids, done, error, rows, seq lengths, fingerprints) of a consolidated file, one entry per item."""
    n, done = len(header["ids"]), header["done"].astype(bool)
    lengths = np.zeros(n, np.int64)
    if header["seq"]:
        lengths[done] = np.diff(header["offsets"])[done]
    return np.arange(n), header["ids"], done, header["error"], np.arange(n), lengths, header["fingerprints"]


def read_part(path, settings, ids=None, verify=False):
    """(indices, ids, done, error, rows, seq lengths, fingerprints) of one part file, checked against the schema and
    `settings` (its layout); rows: where each done item's arrays sit in the part. verify: also read its
    arrays, so that a failed checksum shows. Raises FeatxError naming what is wrong."""
    n, L, D, dtype = settings["n_items"], settings["num_layers"], settings["hidden_size"], settings["dtype"]
    with open_file(path) as f:
        B = f[schema.INDICES].shape[0] if isinstance(f.get(schema.INDICES), h5py.Dataset) else -1
        with reading(path, schema.INDICES):
            idx = check_dataset(f, schema.INDICES, path, (max(B, 0),), "int")[:].astype(np.int64)
            done = check_dataset(f, schema.DONE, path, (B,), "bool")[:]
            part_ids = check_dataset(f, schema.IDS, path, (B,), "str").asstr()[:].astype(object)
            error = check_dataset(f, schema.ERROR, path, (B,), "str").asstr()[:].astype(object)
            prints = fingerprints(f, path, B)
        if len(idx) and (idx.min() < 0 or idx.max() >= n or len(np.unique(idx)) != len(idx)):
            raise FeatxError(f"{path}: indices outside 0..{n - 1} or repeated")
        if ids is not None and (ids[idx] != part_ids).any():
            raise FeatxError(f"{path}: its ids are not the manifest's")
        K = int(done.sum())
        arrays = [check_dataset(f, schema.pooled_name(p), path, (K, L, D), "float", dtype)
                  for p in settings["poolings"]]
        lengths = np.zeros(B, np.int64)
        if settings["seq"]:
            lengths[done] = np.diff(seq_offsets(f, path, K, L, D, dtype))
            arrays.append(f[schema.SEQ_DATA])
        for ds in arrays if verify else ():
            with reading(path, ds.name.lstrip("/")):
                ds[()]
    return idx, part_ids, done, error, np.cumsum(done) - 1, lengths, prints


def check_parts(path, settings, ids=None):
    """([(good part path, its record)], [(bad part path, reason)]): every part read in full, checksums checked."""
    good, bad = [], []
    for p in part_files(path):
        try:
            good.append((p, read_part(p, settings, ids, verify=True)))
        except Exception as e:  # anything that fails reading a part means it is damaged
            bad.append((p, first_line(e).replace(f"{p}: ", "")))
    return good, bad


def scan(records, n, current=None):
    """Which source holds each item: the last one that has it done. A failure counts only where none has.

    records: one (indices, ids, done, error, rows, seq lengths, fingerprints) per source (final_record, read_part).
    current: None, or the (N,) uint64 fingerprints of the items' sources now: a value computed from another
    source (a recorded fingerprint, not 0, that differs) does not count as done.
    Returns a namespace of (N,) arrays: src (index into records, -1 if not done), row, seq_len, done, error,
    fp (the fingerprint recorded with the value taken, 0 if none), stale (not done, but done in some source from
    another source than today's), ids (None where no source names the item).
    """
    s = types.SimpleNamespace(src=np.full(n, -1, np.int32), row=np.zeros(n, np.int64),
                              seq_len=np.zeros(n, np.int64), error=np.full(n, "", object),
                              ids=np.full(n, None, object), fp=np.zeros(n, np.uint64), stale=np.zeros(n, bool))
    for k, (idx, ids, done, error, rows, lengths, prints) in enumerate(records):
        s.ids[idx] = ids
        failed = ~done & (error != "")
        s.error[idx[failed]] = error[failed]
        if current is not None:
            old = done & (prints != 0) & (prints != current[idx])
            s.stale[idx[old]] = True
            done = done & ~old
        s.src[idx[done]], s.row[idx[done]], s.seq_len[idx[done]] = k, rows[done], lengths[done]
        s.fp[idx[done]] = prints[done]
    s.done = s.src >= 0
    s.error[s.done] = ""  # a success anywhere beats a failure anywhere
    s.stale &= ~s.done
    return s


def counts(state, path):
    failed = int((state.error != "").sum())
    done = int(state.done.sum())
    return {"done": done, "failed": failed, "pending": len(state.done) - done - failed, "path": path}


def remove_parts(path):
    """Delete the parts folder: parts first, settings.json and the lock last, so a kill leaves a valid state.
    Files set aside (.bad) stay for the user to look at."""
    folder = schema.parts_dir(path)
    if not os.path.isdir(folder):
        return
    names = [n for n in os.listdir(folder) if not n.endswith(schema.BAD_SUFFIX)]
    for name in sorted(names, key=lambda n: (schema.part_counter(n) is None, n == schema.LOCK_FILE, n)):
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(folder)
    except OSError:
        pass  # another writer already started a new parts folder, or files were set aside
