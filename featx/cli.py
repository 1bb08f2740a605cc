"""The `featx` command line: argument parsing only; every command calls the library.

Each sub-command has one `_NAME(sub)` function that adds its parser and sets `func`, the library call.
Usage and configuration errors (FeatxError) print one line and exit 1; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from featx import __version__
from featx.errors import FeatxError


def _csv_list(text):
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _load_recipe(path):
    """A recipe is a YAML mapping whose keys are the command's long options (dashes or underscores)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise FeatxError(f"cannot read recipe {path}: {e.strerror}")
    except yaml.YAMLError as e:
        raise FeatxError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise FeatxError(f"recipe {path} must be a YAML mapping of option: value")
    base = os.path.dirname(os.path.abspath(path))
    return {k.replace("-", "_"): v for k, v in data.items()}, base


def apply_recipe(parser, args, path_keys=()):
    """Fill `args` from --recipe: command-line values win over the recipe, the recipe over defaults.

    Relative paths named in `path_keys` resolve against the recipe's folder.
    """
    if not getattr(args, "recipe", None):
        return args
    recipe, base = _load_recipe(args.recipe)
    known = {a.dest: a for a in parser._actions}
    for key, value in recipe.items():
        if key not in known or key in ("help", "recipe"):
            raise FeatxError(f"recipe {args.recipe}: unknown key {key!r}")
        if getattr(args, key) != parser.get_default(key):
            continue  # given on the command line
        if key in path_keys and value is not None:
            value = [v if os.path.isabs(str(v)) else os.path.join(base, str(v)) for v in value] \
                if isinstance(value, list) else (value if os.path.isabs(str(value)) else os.path.join(base, str(value)))
        setattr(args, key, value)
    return args


# ---------------------------------------------------------------- extract / info
def _extract(sub):
    p = sub.add_parser("extract", help="cache the hidden states of every layer to HDF5")
    p.add_argument("manifest", nargs="?", help="CSV, JSONL or Parquet manifest (id, text/image/audio, label, split)")
    p.add_argument("--model", action="append", default=None, help="hub id or local folder; repeat for several")
    p.add_argument("--out", help="output folder (one .h5 per manifest x model)")
    p.add_argument("--pool", default="mean", help="poolings, comma-separated: mean,cls")
    p.add_argument("--seq", action="store_true", default=False, help="also store the full per-position sequences")
    p.add_argument("--seq-stride", type=int, default=1, help="keep every k-th position of stored sequences (audio)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--max-length", type=int, default=None, help="text: max tokens (default: the tokenizer's)")
    p.add_argument("--max-audio-seconds", type=float, default=30.0, help="longer audio is processed in windows")
    p.add_argument("--num-workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--trust-remote-code", action="store_true", default=False)
    p.add_argument("--overwrite", action="store_true", default=False, help="start again over an existing cache")
    p.add_argument("--no-progress", action="store_true", default=False)
    p.add_argument("--recipe", help="YAML recipe with the same keys")

    def run(args):
        apply_recipe(p, args, path_keys=("manifest", "out"))
        if not args.manifest or not args.model or not args.out:
            raise FeatxError("featx extract needs MANIFEST, --model and --out (or a --recipe that gives them)")
        from featx.extract import extract

        models = args.model if isinstance(args.model, list) else [args.model]
        result = extract(args.manifest, models, args.out, pool=_csv_list(args.pool) if isinstance(args.pool, str)
                         else list(args.pool), seq=args.seq, seq_stride=args.seq_stride, batch_size=args.batch_size,
                         device=args.device, dtype=args.dtype, max_length=args.max_length,
                         max_audio_seconds=args.max_audio_seconds, num_workers=args.num_workers,
                         trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                         progress=not args.no_progress)
        return 2 if result.failed else 0

    p.set_defaults(func=run)


def _info(sub):
    p = sub.add_parser("info", help="print what a cache holds")
    p.add_argument("files", nargs="+")

    def run(args):
        from featx.store import describe

        for f in args.files:
            print(describe(f))
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- manifest
def _manifest(sub):
    p = sub.add_parser("manifest", help="write a featx manifest from a dataset's own label files")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    m = formats.add_parser("mmsa", help="MMSA label.csv (CMU-MOSI, CMU-MOSEI, CH-SIMS) with Raw/<video_id>/<clip_id>.mp4",
                           description="Rows whose video is missing are left out, listed in OUT.missing.txt, "
                                       "and the exit status is 2 (0 with --allow-missing).")
    m.add_argument("label_csv", metavar="LABEL_CSV", help="MMSA's label.csv")
    m.add_argument("--raw", help="folder holding <video_id>/<clip_id>.EXT (default: Raw beside LABEL_CSV)")
    m.add_argument("--out", required=True, help="manifest to write: .csv, .jsonl or .parquet")
    m.add_argument("--ext", default="mp4", help="video file extension")
    m.add_argument("--label-column", default="label", help="column giving `label`: label, or label_T/label_A/label_V")
    m.add_argument("--allow-missing", action="store_true", default=False,
                   help="exit 0 when some videos are missing (they are still left out and listed)")

    def run(args):
        from featx.mmsa import missing_report, mmsa_manifest

        manifest, missing = mmsa_manifest(args.label_csv, args.raw, args.out, ext=args.ext,
                                          label_column=args.label_column)
        counts = manifest["split"].value_counts()
        print(f"wrote {args.out}: {len(manifest)} items ("
              + ", ".join(f"{s} {counts.get(s, 0)}" for s in ("train", "dev", "test")) + ")")
        if not missing:
            return 0
        print(f"{len(missing)} video(s) not found, left out of the manifest: listed in {missing_report(args.out)}",
              file=sys.stderr)
        return 0 if args.allow_missing else 2

    m.set_defaults(func=run)


COMMANDS = [_extract, _info, _manifest]


def build_parser():
    parser = argparse.ArgumentParser(prog="featx", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FeatxError as e:
        print(f"featx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"featx {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
