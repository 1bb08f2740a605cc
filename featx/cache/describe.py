"""What a cache holds, for `featx info`: `inspect` (a dict, also for --json), `describe` (text), `caches_in`.

A killed run (parts, no final file) is shown from its parts; nothing here writes or renames a file.
"""
from __future__ import annotations

import math
import os

import h5py
import numpy as np

from featx.cache import parts, schema
from featx.cache.reader import check_regular_file, no_cache_error, open_file, read_header, verify_checksums
from featx.cache.writer import size_text
from featx.errors import FeatxError

__all__ = ["inspect", "describe", "caches_in"]

SHOWN_ERRORS = 5


def caches_in(folder):
    """The caches in `folder` (not below it): its .h5 files, and the parts folders of killed first runs."""
    folder = os.fspath(folder)
    out = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.endswith(".h5") and not os.path.isdir(full):
            out.append(full)
        elif name.endswith(".h5" + schema.PARTS_SUFFIX) and os.path.isdir(full):
            final = full[:-len(schema.PARTS_SUFFIX)]
            if not os.path.exists(final):
                out.append(final)
    return out


def _has_checksums(f):
    found = []
    f.visititems(lambda name, obj: found.append(obj.fletcher32) if isinstance(obj, h5py.Dataset) else None)
    return any(found)


def _final(path, verify):
    """(settings-like summary, record) of the consolidated file at `path`."""
    with open_file(path) as f:
        h = read_header(f, path)
        has = _has_checksums(f)
        checksums = "verified" if has and verify else "not checked" if has else "none"
        if verify:
            verify_checksums(f, path)  # also reads unprotected datasets: a damaged string heap shows too
    s = {"attrs": h["attrs"], "n_items": len(h["ids"]), "format_version": h["version"], "checksums": checksums,
         **{k: h[k] for k in ("poolings", "dtype", "seq", "num_layers", "hidden_size", "layer_widths")}}
    return s, parts.final_record(h)


def _parts_summary(path, settings):
    """(records of the good parts, [(file, reason)] damaged or foreign, [set-aside .bad files])."""
    folder = schema.parts_dir(path)
    if settings is not None:
        good, bad = parts.check_parts(path, settings)
    else:
        good, bad = [], [(p, f"no {schema.SETTINGS_FILE} says what it was made with") for p in parts.part_files(path)]
    bad += [(f, "not a file featx writes") for f in parts.foreign_files(path)]
    aside = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
             if n.endswith(schema.BAD_SUFFIX)] if os.path.isdir(folder) else []
    return good, bad, aside


def _stored_settings(path):
    try:
        return parts.read_settings(path), ""
    except ValueError as e:
        return None, f"{schema.SETTINGS_FILE} is {e}"


def inspect(path, verify=True) -> dict:
    """What the cache at `path` holds, as strict-JSON-able plain values.

    Works on a consolidated file and on a killed run's parts folder alone. verify: read every chunk so that
    damage (a failed Fletcher-32 checksum) raises FeatxError naming the dataset. Keys: path, status
    ("complete" | "unmerged parts" | "in progress"), model, modality, format_version, checksums ("verified" |
    "not checked" | "none": a file written before checksums), items, done, failed,
    pending, num_layers, hidden_size, layer_widths (per-layer widths, or null when all are hidden_size),
    poolings, dtype, sequences, size_bytes, settings, parts, damaged, set_aside, errors ([{id, error}], the
    first few).
    """
    path = os.fspath(path)
    exists = os.path.exists(path)
    if exists:
        check_regular_file(path)
    settings, settings_problem = _stored_settings(path)
    if exists:
        s, final = _final(path, verify)
    elif settings is not None:
        # a killed run's parts alone: check_parts reads each in full, checksums checked (--no-verify too)
        s, final = {**settings, "format_version": schema.FORMAT_VERSION, "checksums": "verified"}, None
    else:
        if settings_problem:
            raise FeatxError(f"{path}: no cache yet, and its parts folder's {settings_problem}; "
                             "the next run sets its parts aside")
        raise no_cache_error(path)
    good, bad, aside = _parts_summary(path, settings)
    if settings_problem:
        bad.insert(0, (os.path.join(schema.parts_dir(path), schema.SETTINGS_FILE), settings_problem))
    records = ([final] if final else []) + [r for _, r in good]
    state = parts.scan(records, s["n_items"])
    c = parts.counts(state, path)
    sources = ([path] if exists else []) + [p for p, _ in good]
    failed = np.flatnonzero(state.error != "")
    return {"path": path, "status": "complete" if exists and not good else ("unmerged parts" if good
                                                                           else "in progress"),
            "model": s["attrs"].get("model"), "modality": s["attrs"].get("modality"),
            "format_version": s["format_version"], "checksums": s["checksums"], "items": int(s["n_items"]),
            "done": c["done"], "failed": c["failed"], "pending": c["pending"],
            "num_layers": int(s["num_layers"]), "hidden_size": int(s["hidden_size"]),
            "layer_widths": s.get("layer_widths"),
            "poolings": list(s["poolings"]), "dtype": s["dtype"], "sequences": bool(s["seq"]),
            "size_bytes": int(sum(os.path.getsize(p) for p in sources)),
            "settings": {k: None if isinstance(v, float) and not math.isfinite(v) else v  # strict JSON
                         for k, v in sorted(s["attrs"].items()) if k not in ("model", "modality") + schema.OWN_ATTRS},
            "parts": len(good), "damaged": [{"file": f, "reason": r} for f, r in bad], "set_aside": aside,
            "errors": [{"id": str(state.ids[i]), "error": str(state.error[i])} for i in failed[:SHOWN_ERRORS]]}


def describe(path, verify=True) -> str:
    """Multi-line summary of a cache for `featx info` (see inspect); a killed run's parts count too."""
    d = inspect(path, verify)
    other = ", ".join(f"{k}={v}" + (f" (--image-decode {schema.IMAGE_DECODE_OPTIONS[v]})"   # the option that chose it
                                     if k == "image_decode" and v in schema.IMAGE_DECODE_OPTIONS else "")
                      for k, v in d["settings"].items())
    lines = [d["path"],
             f"  model      {d['model']} ({d['modality']})",
             f"  items      {d['items']}: {d['done']} done, {d['failed']} failed, {d['pending']} pending",
             f"  layers     {d['num_layers']} (hidden size {d['hidden_size']}"
             + (f"; layer widths {', '.join(map(str, d['layer_widths']))})" if d["layer_widths"] else ")"),
             f"  poolings   {', '.join(d['poolings'])}",
             f"  dtype      {d['dtype']}",
             f"  sequences  {'yes' if d['sequences'] else 'no'}",
             f"  size       {size_text(d['size_bytes'])}",
             f"  format     {d['format_version']} (checksums: {d['checksums']})"]
    if other:
        lines.append(f"  settings   {other}")
    folder = schema.parts_dir(d["path"])
    if d["parts"]:
        lines.append(f"  unmerged   {d['parts']} parts in {folder} (a killed run? run the same "
                     "extraction again to resume and merge them)")
    elif d["status"] == "in progress":
        lines.append("  unmerged   a run started here but stored nothing yet")
    for x in d["damaged"]:
        lines.append(f"  damaged    {x['file']}: {x['reason']} (the next run sets it aside and recomputes)")
    if d["set_aside"]:
        lines.append(f"  set aside  {len(d['set_aside'])} file(s) in {folder}: {', '.join(map(os.path.basename, d['set_aside']))}")
    if d["failed"]:
        lines.append(f"  errors     first {len(d['errors'])} of {d['failed']}:")
        lines += [f"    {e['id']}: {e['error']}" for e in d["errors"]]
    return "\n".join(lines)
