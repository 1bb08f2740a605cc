"""Strict JSON files written atomically, and the provenance a run records in meta.json (command line, versions)."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

VERSIONED = ("featx", "torch", "transformers", "scikit-learn")


def strict(value):
    """`value` with numpy scalars and arrays as Python values, tuples as lists and NaN / inf as None (JSON
    has no NaN)."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [strict(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, obj):
    """Write `obj` as strict JSON to `path` through a temporary file and a rename (never half a file)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(strict(obj), f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def package_versions() -> dict:
    """Installed versions of featx and the libraries that change the numbers (None when not installed)."""
    from importlib import metadata

    from featx.version import __version__

    out = {"featx": __version__}
    for name in VERSIONED[1:]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance() -> dict:
    """What reproduces a run: the command line as typed (sys.argv) and the package versions."""
    return {"command": list(sys.argv), "versions": package_versions()}
