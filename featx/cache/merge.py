"""Merging caches of the same ids and settings (e.g. one shard per rank) into one consolidated file."""
from __future__ import annotations

import os

import numpy as np

from featx.cache import parts
from featx.cache.reader import open_validated
from featx.cache.writer import consolidate
from featx.errors import FeatxError

__all__ = ["merge_caches"]


def _header(path):
    f, header = open_validated(path)
    f.close()
    return header


def merge_caches(paths, out_path, fingerprints=None) -> dict:
    """Combine caches of the same ids and settings (e.g. one shard per rank) into one consolidated file.

    paths: consolidated cache files; an item done in several is taken from the last, and the labels, splits
    and metadata are the last file's (the newest: shards written after an earlier final file). out_path may be
    one of them (it is replaced atomically) but must not be another existing file. fingerprints: None, or the
    (N,) uint64 fingerprints of the items' sources now: a value computed from another source is not taken.
    Returns {"done": n, "failed": n, "pending": n, "path": out_path}.
    """
    paths, out_path = [os.fspath(p) for p in paths], os.fspath(out_path)
    if not paths:
        raise FeatxError("merge_caches needs at least one cache")
    if os.path.exists(out_path) and not any(os.path.exists(p) and os.path.samefile(p, out_path) for p in paths):
        raise FeatxError(f"{out_path} already exists; choose another output or remove it")
    header = _header(paths[0])
    base, records = parts.file_settings(header), [parts.final_record(header)]
    for p in paths[1:]:
        h = _header(p)
        diffs = parts.settings_diff(base, parts.file_settings(h))
        if diffs:
            raise FeatxError(f"cannot merge {p} with {paths[0]}: different settings: {', '.join(diffs)}")
        records.append(parts.final_record(h))
    current = None if fingerprints is None else np.asarray(fingerprints, np.uint64)
    state = parts.scan(records, len(header["ids"]), current)
    if len(paths) > 1:
        header = {**header, **{k: h[k] for k in ("labels", "splits", "meta")}}
    consolidate(out_path, paths, state, {**header, "fingerprints": current is not None})
    return parts.counts(state, out_path)
