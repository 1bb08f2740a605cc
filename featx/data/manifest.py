"""Read and validate manifests: CSV, JSONL or Parquet with one row per item.

Columns: `id` (required, unique), `text`, `image`, `audio`, `video` (paths, relative to the manifest's
folder), optional `start`/`end` (seconds), `label`, `split`; any other column is kept as metadata.
"""
from __future__ import annotations

import json
import os
import warnings

import pandas as pd

from featx.errors import FeatxError, first_line

PATH_COLUMNS = ("image", "audio", "video")
STRING_COLUMNS = ("id", "text", "split") + PATH_COLUMNS
KNOWN_COLUMNS = STRING_COLUMNS + ("start", "end", "label")


def read_manifest(path) -> pd.DataFrame:
    """The manifest as a DataFrame: `id` and path columns as strings, paths made absolute.

    Raises FeatxError (one line) for an unreadable file (a file that is not UTF-8 named as such), a column name
    given twice, a missing `id` column, empty or duplicate ids.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FeatxError(f"manifest not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    dtypes = {c: "string" for c in STRING_COLUMNS}
    name = os.path.basename(path)
    try:
        if ext in (".csv", ".tsv"):
            sep = "\t" if ext == ".tsv" else ","
            # Only empty cells are missing: an id or a text "nan" or "NA" is a real value.
            df = pd.read_csv(path, sep=sep, dtype=dtypes, keep_default_na=False, na_values=[""])
            # pandas renames a repeated column ('text', 'text.1'): the header as written says so
            _refuse_repeated(name, pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str,
                                               keep_default_na=False).iloc[0].tolist())
        elif ext in (".jsonl", ".json", ".ndjson"):
            df = pd.read_json(path, lines=ext != ".json", dtype=False)
            _refuse_repeated_keys(path, name, lines=ext != ".json")   # the JSON reader keeps the last one
        elif ext in (".parquet", ".pq"):
            try:
                df = pd.read_parquet(path)
            except Exception:   # pyarrow refuses a repeated column in several lines: one of ours first
                _refuse_repeated(name, _parquet_columns(path))
                raise
        else:
            raise FeatxError(f"manifest {path}: unknown format {ext!r} (use .csv, .jsonl or .parquet)")
    except FeatxError:
        raise
    except UnicodeDecodeError as e:
        raise FeatxError(not_utf8(path, e)) from None
    except Exception as e:  # pandas raises many kinds; the user needs one line
        raise FeatxError(f"cannot read manifest {path}: {first_line(e)}")
    _refuse_repeated(name, list(df.columns))
    if "id" not in df.columns:
        raise FeatxError(f"manifest {name} has no 'id' column (columns: {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise FeatxError(f"manifest {name} has no rows")
    for col in STRING_COLUMNS:
        if col in df.columns:
            df[col] = df[col].astype("string")
    ids = df["id"].str.strip()
    empty = ids.isna() | (ids == "")
    if empty.any():
        rows = (empty[empty].index[:5] + 1).tolist()
        raise FeatxError(f"manifest {name}: {int(empty.sum())} row(s) have no id (rows {rows})")
    nul = ids.str.contains("\0", regex=False)
    if nul.any():  # HDF5 strings end at a NUL: such an id cannot be stored
        rows = (nul[nul].index[:5] + 1).tolist()
        raise FeatxError(f"manifest {name}: {int(nul.sum())} id(s) contain a NUL character (rows {rows})")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        raise FeatxError(f"manifest {name}: duplicate ids: {', '.join(sorted(set(dup.tolist()))[:5])}")
    df["id"] = ids
    for col in df.columns:   # 'Label' or ' split' is metadata: say so, or probe finds no labels much later
        known = str(col).strip().lower()
        if col not in KNOWN_COLUMNS and known in KNOWN_COLUMNS and known not in df.columns:
            warnings.warn(f"manifest {name}: column {col!r} is kept as metadata; featx reads {known!r} "
                          "(column names are exact: rename it to use it)")
    base = os.path.dirname(os.path.abspath(path))
    for col in PATH_COLUMNS:
        if col in df.columns:
            df[col] = df[col].map(lambda p: p if pd.isna(p) or os.path.isabs(p) else os.path.join(base, p))
    return df.reset_index(drop=True)


def _refuse_repeated(name, columns):
    """A one-line FeatxError when a column name is given twice (its second column would be kept as metadata, or
    replace the first). Blank names are pandas' to number ('Unnamed: 2'), not repeats."""
    seen = set()
    for c in columns:
        if c in seen and str(c).strip():
            raise FeatxError(f"manifest {name}: column {str(c)!r} is given twice (columns: "
                             f"{', '.join(map(str, columns))}); give each column once")
        seen.add(c)


class _Object(dict):
    """A JSON object that remembers its keys in order, repeats included."""
    def __init__(self, pairs):
        super().__init__(pairs)
        self.keys_given = [k for k, _ in pairs]


def _refuse_repeated_keys(path, name, lines):
    """_refuse_repeated on each record of a JSON Lines file (or of a .json file: a list of records, or one object
    of columns)."""
    with open(path, encoding="utf-8-sig") as f:
        texts = (line for line in f if line.strip()) if lines else [f.read()]
        for text in texts:
            try:
                got = json.loads(text, object_pairs_hook=_Object)
            except ValueError:   # pandas read it; what Python's json cannot, it does not check
                continue
            for record in got if isinstance(got, list) else [got]:
                if isinstance(record, _Object):
                    _refuse_repeated(name, record.keys_given)


def _parquet_columns(path):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception:
        return []


def not_utf8(path, error: UnicodeDecodeError) -> str:
    """One line for a manifest that is not UTF-8: the first line holding a byte UTF-8 cannot decode (the error's
    own position counts from the start of a chunk pandas read, not of the file), and how to re-encode it."""
    line, byte = None, error.object[error.start:error.start + 1]
    with open(path, "rb") as f:
        for number, text in enumerate(f, 1):
            try:
                text.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                line, byte = number, e.object[e.start:e.start + 1]
                break
    where = f"line {line} holds" if line else "it holds"
    shown = f"byte 0x{byte.hex()}" if byte else "a byte"
    base = os.path.basename(path)
    return (f"manifest {path} is not UTF-8 text: {where} {shown}, which UTF-8 cannot decode; re-encode the file as "
            f"UTF-8 (e.g. iconv -f latin1 -t utf-8 {base} > utf8-{base})")


def source_column(df: pd.DataFrame, modality: str, name: str = "manifest") -> str:
    """The column an encoder of `modality` reads: text->text, image->image (else video frames),
    audio->audio (else the video's audio track), video->video (native video encoders). FeatxError when the manifest has none."""
    options = {"text": ["text"], "image": ["image", "video"], "audio": ["audio", "video"], "video": ["video"]}[modality]
    for col in options:
        if col in df.columns:
            return col
    article = "an" if modality[0] in "aeiou" else "a"
    raise FeatxError(f"{name} has no {' or '.join(repr(c) for c in options)} column, which {article} {modality} encoder "
                     f"needs (columns: {', '.join(map(str, df.columns))})")


def labels_and_splits(df: pd.DataFrame):
    """(labels, splits, meta): labels as float64 when numeric else str, or None; splits as str or None;
    meta = the other columns as strings."""
    labels = None
    if "label" in df.columns:
        # "n/a", "NA", "" and the like are missing labels, so one of them does not make a numeric column text.
        text = df["label"].astype("string").str.strip()
        present = df["label"].notna() & ~text.str.lower().isin(["", "n/a", "na", "nan", "none", "null", "-"])
        numeric = pd.to_numeric(df["label"].where(present), errors="coerce")
        if present.any() and numeric.notna().sum() == present.sum():
            labels = numeric.to_numpy(dtype="float64")
        else:
            labels = df["label"].astype("string").fillna("").to_numpy(dtype=object)
    splits = df["split"].fillna("").to_numpy(dtype=object) if "split" in df.columns else None
    meta = {c: df[c].astype("string").fillna("").to_numpy(dtype=object)
            for c in df.columns if c not in KNOWN_COLUMNS}
    return labels, splits, meta
