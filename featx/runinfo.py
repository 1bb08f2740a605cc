"""What a run records about itself, written as strict JSON atomically: meta.json's command line and package
versions, and the one JSON writer every run file (meta.json, finetune.json, checkpoints' state) goes through."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

VERSIONED = ("featx", "torch", "transformers", "scikit-learn", "numpy")


def strict_json(value):
    """`value` with NaN and infinities as None, numpy scalars and arrays as Python values, tuples as lists and
    anything else as its str (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [strict_json(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    return value if value is None or isinstance(value, str) else str(value)


def write_json(path, obj):
    """Write `obj` as strict JSON to `path` through a synced temporary file and a rename (never half a file)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


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


def provenance(settings) -> dict:
    """What reproduces a run, as meta.json records it: the command line (sys.argv, with the program named
    `featx` when it ran as `featx` or `python -m featx`), the resolved settings (JSON values) and the package
    versions."""
    return {"command": command_line(), "settings": settings, "versions": package_versions()}


def command_line() -> list:
    """sys.argv as a user would type it again: `python -m featx` and the console script both read `featx`."""
    argv = list(sys.argv)
    if argv and (argv[0].endswith(os.path.join("featx", "__main__.py")) or os.path.basename(argv[0]) == "featx"):
        argv[0] = "featx"
    return argv


def write_meta(meta, path):
    """Write a run's meta.json (`meta`, with provenance(settings) among its keys) as strict JSON, atomically."""
    return write_json(path, meta)
