"""Turn MMSA-format labels into a featx manifest.

MMSA (thuiar/MMSA) ships CMU-MOSI, CMU-MOSEI and CH-SIMS as `label.csv` (columns video_id, clip_id, text,
label, annotation, mode; CH-SIMS adds label_T, label_A, label_V) beside the segment videos at
`Raw/<video_id>/<clip_id>.mp4`.

The manifest has one row per segment whose video exists, in label.csv's order:
  id      `<video_id>$_$<clip_id>`, the key of MMSA's own feature files, so results join with theirs
  text    the transcript
  video   the segment's video, relative to the manifest's folder (absolute when that is not possible)
  label   the float score of `label_column` (MMSA's `label`, kept as `label_M` when another column is chosen)
  split   train / dev / test from `mode` (valid -> dev)
and then label.csv's other columns (video_id, clip_id, annotation, label_T, ...) as metadata; `mode` is dropped.

Rows whose video is missing are never dropped silently: they are left out of the manifest, returned, and
written one per line (`id<TAB>expected path`) to `<out>.missing.txt`; `featx manifest mmsa` then exits 2.
"""
from __future__ import annotations

import os

import pandas as pd

from featx.errors import FeatxError, first_line

__all__ = ["mmsa_manifest", "missing_report"]

SPLITS = {"train": "train", "valid": "dev", "val": "dev", "dev": "dev", "test": "test"}
ID_SEPARATOR = "$_$"  # MMSA's: the clip id of CMU-MOSI / MOSEI segments is a number, not unique on its own


def missing_report(out) -> str:
    """Where mmsa_manifest lists the rows whose video is missing, for a manifest written to `out`."""
    return os.fspath(out) + ".missing.txt"


def _read_labels(label_csv, label_column) -> pd.DataFrame:
    label_csv = os.fspath(label_csv)
    if not os.path.isfile(label_csv):
        raise FeatxError(f"label file not found: {label_csv}")
    try:
        # Ids as written: CH-SIMS clip ids have leading zeros ("0001") that a number would lose.
        df = pd.read_csv(label_csv, dtype={"video_id": "string", "clip_id": "string", "text": "string",
                                           "mode": "string"}, keep_default_na=False, na_values=[""])
    except Exception as e:  # pandas raises many kinds; the user needs one line
        raise FeatxError(f"cannot read {label_csv}: {first_line(e)}")
    name = os.path.basename(label_csv)
    need = [c for c in ("video_id", "clip_id", "mode", label_column) if c not in df.columns]
    if need:
        raise FeatxError(f"{name} has no {', '.join(need)} column(s) (columns: {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise FeatxError(f"{name} has no rows")
    for col in ("video_id", "clip_id"):
        df[col] = df[col].str.strip()
        if (df[col].isna() | (df[col] == "")).any():
            raise FeatxError(f"{name}: {int((df[col].isna() | (df[col] == '')).sum())} row(s) have an empty {col}")
    labels = pd.to_numeric(df[label_column], errors="coerce")
    bad = labels.isna()
    if bad.any():
        rows = (bad[bad].index[:5] + 2).tolist()  # +2: the header is line 1
        raise FeatxError(f"{name}: {int(bad.sum())} row(s) have no numeric {label_column} (lines {rows})")
    df[label_column] = labels.astype("float64")
    modes = df["mode"].fillna("").str.strip().str.lower()
    unknown = sorted(set(modes) - set(SPLITS))
    if unknown:
        raise FeatxError(f"{name}: unknown mode value(s) {unknown} (expected train, valid, test)")
    df["mode"] = modes
    return df


def mmsa_manifest(label_csv, raw_dir=None, out=None, *, ext: str = "mp4", label_column: str = "label"):
    """Build (and with `out`, write) the featx manifest of an MMSA-format dataset.

    label_csv: MMSA's label.csv. raw_dir: the folder holding `<video_id>/<clip_id>.<ext>` (default: `Raw`
    beside label_csv). out: the manifest to write, .csv, .jsonl or .parquet (None: only return it).
    Returns (manifest, missing): the DataFrame of the rows whose video exists (columns in the module docstring)
    and a list of (id, expected video path) for the others, also written to `missing_report(out)` when any.
    Raises FeatxError for an unreadable label file, missing columns, non-numeric labels, unknown modes,
    duplicate ids, or when no video at all is found (a wrong --raw or --ext).
    """
    df = _read_labels(label_csv, label_column)
    raw_dir = os.path.abspath(raw_dir if raw_dir is not None else
                              os.path.join(os.path.dirname(os.fspath(label_csv)), "Raw"))
    if not os.path.isdir(raw_dir):
        raise FeatxError(f"video folder not found: {raw_dir} (give it with --raw)")
    ext = ext.lstrip(".")
    if out is not None:
        out = os.fspath(out)
        fmt = os.path.splitext(out)[1].lower()
        if fmt not in (".csv", ".jsonl", ".parquet"):
            raise FeatxError(f"manifest {out}: unknown format {fmt!r} (use .csv, .jsonl or .parquet)")

    ids = df["video_id"] + ID_SEPARATOR + df["clip_id"]
    dup = ids[ids.duplicated()]
    if len(dup):
        raise FeatxError(f"{os.path.basename(os.fspath(label_csv))}: duplicate video_id/clip_id: "
                         f"{', '.join(sorted(set(dup))[:5])}")
    paths = [os.path.join(raw_dir, v, f"{c}.{ext}") for v, c in zip(df["video_id"], df["clip_id"])]
    found = pd.Series([os.path.isfile(p) for p in paths], index=df.index)
    missing = [(i, p) for i, p, ok in zip(ids, paths, found) if not ok]
    if not found.any():
        raise FeatxError(f"none of the {len(df)} videos is in {raw_dir} as <video_id>/<clip_id>.{ext} "
                         f"(first expected: {paths[0]}); check --raw and --ext")

    base = os.path.dirname(os.path.abspath(out)) if out is not None else None
    manifest = pd.DataFrame({
        "id": ids,
        "text": df["text"] if "text" in df.columns else pd.NA,
        "video": [_relative(p, base) for p in paths],
        "label": df[label_column],
        "split": df["mode"].map(SPLITS),
    })
    rest = df.drop(columns=[c for c in ("text", "mode", label_column) if c in df.columns])
    if label_column != "label" and "label" in rest.columns:
        rest = rest.rename(columns={"label": "label_M"})
    manifest = pd.concat([manifest, rest.drop(columns=[c for c in rest.columns if c in manifest.columns])], axis=1)
    manifest = manifest[found.to_numpy()].reset_index(drop=True)

    if out is not None:
        _write(manifest, out)
        report = missing_report(out)
        if missing:
            with open(report, "w", encoding="utf-8") as f:
                f.writelines(f"{i}\t{p}\n" for i, p in missing)
        elif os.path.exists(report):
            os.remove(report)  # from an earlier run: it would tell of videos that are there now
    return manifest, missing


def _relative(path, base):
    if base is None:
        return path
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive (Windows): no relative path exists
        return path


def _write(manifest, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fmt = os.path.splitext(out)[1].lower()
    if fmt == ".csv":
        manifest.to_csv(out, index=False)
    elif fmt == ".jsonl":
        manifest.to_json(out, orient="records", lines=True, force_ascii=False)
    else:
        manifest.to_parquet(out, index=False)
