"""The `featx` command line: argument parsing only; every command calls the library.

Each sub-command has one `_NAME(sub)` function that adds its parser and sets `func`, the library call.
Usage and configuration errors (FeatxError) print one line and exit 1; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from featx.version import __version__
from featx.errors import FeatxError, first_line


def _csv_list(value):
    """A comma-separated string (command line) or a list (recipe) as a list of non-empty strings."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [t for t in (str(x).strip() for x in items) if t]


def _load_recipe(path):
    """A recipe is a YAML mapping whose keys are the command's long options (dashes or underscores)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise FeatxError(f"cannot read recipe {path}: {e.strerror}")
    except yaml.YAMLError as e:
        raise FeatxError(f"recipe {path} is not valid YAML: {first_line(e)}")
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
        action = known[key]
        if value is not None and not isinstance(value, list) and (action.nargs in ("*", "+")
                                                                  or isinstance(action, argparse._AppendAction)):
            value = [value]  # a list-valued option given one value in the recipe
        if key in path_keys and value is not None:
            value = [v if os.path.isabs(str(v)) else os.path.join(base, str(v)) for v in value] \
                if isinstance(value, list) else (value if os.path.isabs(str(value)) else os.path.join(base, str(value)))
        if key == "model" and value is not None:  # local model folders beside the recipe; hub ids stay as given
            value = [m if os.path.isabs(str(m)) or not os.path.exists(os.path.join(base, str(m)))
                     else os.path.join(base, str(m)) for m in value]
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
    p.add_argument("--batch-size", type=int, default=16, help="most inputs per forward")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="text: most padded tokens per forward (batch x longest); default: no limit")
    p.add_argument("--max-batch-seconds", type=float, default=None,
                   help="audio: most padded seconds per forward (batch x longest); default 8 on the CPU, "
                        "no limit on CUDA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU; stored with the cache")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--max-length", type=int, default=None, help="text: max tokens (default: the tokenizer's)")
    p.add_argument("--max-audio-seconds", type=float, default=30.0, help="longer audio is processed in windows")
    p.add_argument("--fps", type=float, default=3.0, help="video: frames sampled per second for image encoders")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decoding worker processes (default: 0 on the CPU; on CUDA the CPUs less 2, at most 16)")
    p.add_argument("--trust-remote-code", action="store_true", default=False)
    p.add_argument("--overwrite", action="store_true", default=False, help="start again over an existing cache")
    p.add_argument("--no-progress", action="store_true", default=False)
    p.add_argument("--recipe", help="YAML recipe with the same keys")

    def run(args):
        apply_recipe(p, args, path_keys=("manifest", "out"))
        if not args.manifest or not args.model or not args.out:
            raise FeatxError("featx extract needs MANIFEST, --model and --out (or a --recipe that gives them)")
        from featx.extraction.pipeline import extract

        result = extract(args.manifest, args.model, args.out, pool=_csv_list(args.pool), seq=args.seq, seq_stride=args.seq_stride, batch_size=args.batch_size,
                         device=args.device, dtype=args.dtype, precision=args.precision,
                         max_length=args.max_length, max_batch_tokens=args.max_batch_tokens,
                         max_batch_seconds=args.max_batch_seconds, max_audio_seconds=args.max_audio_seconds,
                         fps=args.fps, num_workers=args.num_workers,
                         trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                         progress=not args.no_progress)
        return 2 if result.failed else 0

    p.set_defaults(func=run)


def _info(sub):
    p = sub.add_parser("info", help="print what a cache holds, or a killed run's progress")
    p.add_argument("files", nargs="+", help="cache files (.h5), or folders: every cache in them")
    p.add_argument("--json", action="store_true", default=False,
                   help="print one JSON list with a dict per cache (strict JSON)")
    p.add_argument("--no-verify", action="store_true", default=False,
                   help="skip reading every chunk to check its checksum (faster on large caches)")

    def run(args):
        import json

        from featx.cache import caches_in, describe, inspect

        paths = []
        for f in args.files:
            f = f.rstrip("/") or f
            f = f[:-len(".parts")] if f.endswith(".h5.parts") else f
            if os.path.isdir(f):
                found = caches_in(f)
                if not found:
                    raise FeatxError(f"no featx caches in {f}")
                paths += found
            else:
                paths.append(f)
        if len(paths) == 1 and not args.json:
            print(describe(paths[0], verify=not args.no_verify))  # one cache: its error is the command's
            return 0
        out, failed = [], 0
        for path in paths:
            try:
                out.append(inspect(path, verify=not args.no_verify) if args.json
                           else describe(path, verify=not args.no_verify))
            except FeatxError as e:
                failed += 1
                out.append({"path": path, "error": str(e)} if args.json else f"{path}\n  error      {e}")
        print(json.dumps(out, indent=2, allow_nan=False) if args.json else "\n".join(out))
        return 1 if failed else 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- manifest
def _manifest(sub):
    p = sub.add_parser("manifest", help="write a featx manifest from a dataset's own label files")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    m = formats.add_parser("mmsa", help="MMSA label.csv (CMU-MOSI, MOSEI, CH-SIMS) with Raw/<video_id>/<clip_id>.mp4",
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
        from featx.data.mmsa import missing_report, mmsa_manifest

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


def _report(sub):
    p = sub.add_parser("report", help="layer-wise plots, CKA heatmaps and a summary table as HTML + Markdown")
    p.add_argument("results", nargs="+", help="results directories written by `featx probe`, `fuse` or `finetune`; "
                   "several share one page and one summary table")
    p.add_argument("--out", required=True, help="output folder: report.html, summary.md, figures/*.png")
    p.add_argument("--relative-depth", action="store_true", default=False,
                   help="plot layers as relative depth (layer / output layer) to compare encoders of other depths")
    p.add_argument("--no-cka", action="store_true", default=False, help="skip the CKA heatmaps")
    p.add_argument("--biased-cka", action="store_true", default=False,
                   help="plain CKA estimator instead of the debiased one")
    p.add_argument("--cache", action="append", default=None,
                   help="HDF5 cache for CKA (repeat; default: the caches listed in meta.json)")
    p.add_argument("--note", action="append", default=[],
                   help="text shown at the top of the report, e.g. which models are randomly initialised (repeat)")

    def run(args):
        from featx.report import build_report

        paths = build_report(args.results, args.out, caches=args.cache, relative_depth=args.relative_depth,
                             notes=args.note, cka=not args.no_cka, debiased=not args.biased_cka)
        print(paths["html"])
        print(paths["md"])
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- probe / fuse
def _probe_args(p):
    p.add_argument("caches", nargs="*", default=[], help="HDF5 caches written by featx extract")
    p.add_argument("--out", help="output folder for results.csv/.parquet, best_layers.csv, meta.json")
    p.add_argument("--probe", default="linear", choices=["linear", "ridge", "logistic", "mlp", "batched"],
                   help="linear = ridge or logistic by task; batched = all layers at once in torch")
    p.add_argument("--layers", default="all", help="all, or layer indices: 3,7,11")
    p.add_argument("--pool", default="mean", help="pooling stored in the cache")
    p.add_argument("--seeds", type=int, default=1, help="repeat over this many seeds")
    p.add_argument("--train-sizes", default="1.0", help="fractions <= 1 or counts > 1 (k per class): 0.05,0.1,1.0")
    p.add_argument("--folds", type=int, default=5, help="CV folds when the cache has no split column")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--save-classifier", action="store_true", default=False,
                   help="save the best dev layer's linear probe per cache (safetensors)")
    p.add_argument("--weighted", action="store_true", default=False,
                   help="also learn a softmax-weighted sum over layers (per modality)")
    p.add_argument("--layer", default="best", help="fusion input per modality: best (dev), weighted or an index")
    p.add_argument("--missing", default="intersect", choices=["intersect", "error"],
                   help="items missing from a modality: fuse the shared items (reported) or stop")
    p.add_argument("--late-rule", default="mean", choices=["mean", "stack"])
    p.add_argument("--no-progress", action="store_true", default=False)
    p.add_argument("--recipe", help="YAML recipe with the same keys")


def _run_probe(p, args, fusion_key):
    apply_recipe(p, args, path_keys=("caches", "out"))
    fusion = _csv_list(getattr(args, fusion_key) or "")  # read after the recipe: it may set the methods
    if not args.caches or not args.out:
        raise FeatxError(f"featx {args.command} needs CACHE.h5 and --out (or a --recipe that gives them)")
    from featx.probing.sweep import run_probe

    sizes = _csv_list(args.train_sizes)
    try:
        sizes = [float(s) for s in sizes]
    except ValueError:
        raise FeatxError(f"--train-sizes must be numbers, got {args.train_sizes!r}")
    layers = args.layers if isinstance(args.layers, str) else ",".join(map(str, args.layers))
    if layers != "all" and not all(t.lstrip("-").isdigit() for t in _csv_list(layers)):
        raise FeatxError(f"--layers must be 'all' or integers like 3,7,11, got {layers!r}")
    fusion_layer = args.layer
    run_probe(args.caches, args.out, probe=args.probe, layers=layers, pool=args.pool, seeds=args.seeds,
              train_sizes=sizes, folds=args.folds, weighted=args.weighted, fusion=fusion,
              fusion_layer=int(fusion_layer) if str(fusion_layer).lstrip("-").isdigit() else fusion_layer,
              missing=args.missing, late_rule=args.late_rule, device=args.device,
              save_classifier=args.save_classifier, progress=not args.no_progress)
    print(f"featx {args.command}: results in {args.out}")
    return 0


def _probe(sub):
    p = sub.add_parser("probe", help="fit a probe per layer of each cache; dev selects, test reports")
    _probe_args(p)
    p.add_argument("--fusion", default="", help="also fuse the caches: early,late,gated")
    p.set_defaults(func=lambda args: _run_probe(p, args, "fusion"))


def _fuse(sub):
    p = sub.add_parser("fuse", help="probe each modality's layers, then fuse the modalities")
    _probe_args(p)
    p.add_argument("--method", default="early,late,gated", help="fusion methods: early,late,gated")
    p.set_defaults(func=lambda args: _run_probe(p, args, "method"))


# ---------------------------------------------------------------- finetune
def _finetune(sub):
    p = sub.add_parser("finetune", help="fine-tune encoders jointly with a fusion head (Toledo & Marcacini 2022)")
    p.add_argument("manifest", nargs="?", help="CSV, JSONL or Parquet manifest (id, text/image/audio, label, split)")
    p.add_argument("--model", action="append", default=None, help="hub id or local folder; one per modality")
    p.add_argument("--out", help="output folder: results.csv/.parquet, meta.json, history.csv, model/, runs/")
    p.add_argument("--layer", default="last", help="cut layer per model (comma list or one for all): "
                   "an index, last, or best (from --probe-results)")
    p.add_argument("--probe-results", default=None, help="a `featx probe` output folder, for --layer best")
    p.add_argument("--train-blocks", default="-1", help="top blocks trained per model (-1 all, 0 frozen encoder)")
    p.add_argument("--head", default="concat", choices=["concat", "gated"])
    p.add_argument("--task", default="auto", choices=["auto", "regression", "classification"])
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="concat head: pooling of each branch")
    p.add_argument("--proj-size", type=int, default=32, help="concat head: per-modality projection size")
    p.add_argument("--hidden-size", type=int, default=128, help="head MLP / gated fusion size")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the head")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate of the encoders")
    p.add_argument("--head-lr", type=float, default=None, help="learning rate of the head (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--lr-decay", type=float, default=0.95, help="exponential decay of the learning rate per epoch")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without a better dev score")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation: micro-batches per step")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--loss", default="l1", choices=["l1", "mse"], help="regression loss")
    p.add_argument("--folds", type=int, default=5, help="CV folds when the manifest has no train/test split")
    p.add_argument("--train-sizes", default="1.0", help="fractions <= 1 or counts > 1 (k per class): 0.1,1.0")
    p.add_argument("--seeds", type=int, default=1, help="repeat over this many seeds (0..n-1)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-length", type=int, default=None, help="text: max tokens (default: the tokenizer's)")
    p.add_argument("--max-audio-seconds", type=float, default=30.0, help="longer audio is cut to its start")
    p.add_argument("--no-save-model", action="store_true", default=False, help="do not save model/ for predict")
    p.add_argument("--resume", action="store_true", default=False, help="continue a run from its checkpoints")
    p.add_argument("--overwrite", action="store_true", default=False, help="start again over an existing run")
    p.add_argument("--no-progress", action="store_true", default=False)
    p.add_argument("--recipe", help="YAML recipe with the same keys")

    def run(args):
        apply_recipe(p, args, path_keys=("manifest", "out", "probe_results"))
        if not args.manifest or not args.model or not args.out:
            raise FeatxError("featx finetune needs MANIFEST, --model and --out (or a --recipe that gives them)")
        from featx.finetune.train import finetune

        try:
            sizes = [float(s) for s in _csv_list(args.train_sizes)]
            blocks = [int(b) for b in _csv_list(args.train_blocks)]
        except ValueError:
            raise FeatxError(f"--train-sizes and --train-blocks take numbers, got {args.train_sizes!r} and "
                             f"{args.train_blocks!r}")
        result = finetune(args.manifest, args.model, args.out, layers=_csv_list(args.layer), train_blocks=blocks,
                          head=args.head, task=args.task, pooling=args.pooling, proj_size=args.proj_size,
                          hidden_size=args.hidden_size, heads=args.heads, dropout=args.dropout, lr=args.lr,
                          head_lr=args.head_lr, weight_decay=args.weight_decay, lr_decay=args.lr_decay,
                          epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                          accumulate=args.accumulate, clip_grad=args.clip_grad, loss=args.loss, folds=args.folds,
                          train_sizes=sizes, seeds=args.seeds, precision=args.precision, device=args.device,
                          max_length=args.max_length, max_audio_seconds=args.max_audio_seconds,
                          probe_results=args.probe_results, save_model=not args.no_save_model, resume=args.resume,
                          overwrite=args.overwrite, progress=not args.no_progress)
        print(f"featx finetune: results in {result.out}" + (f"; model in {result.model_path}"
                                                           if result.model_path else ""))
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- demo
def _demo(sub):
    p = sub.add_parser("demo", help="offline end-to-end run on a synthetic data set; prints where the report is")
    p.add_argument("--out", default="featx-demo", help="folder for data, models, caches, results and report")
    p.add_argument("--items", type=int, default=120, help="size of the synthetic data set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", default=False)

    def run(args):
        from featx.demo.run import run_demo

        html = run_demo(args.out, n=args.items, seed=args.seed, progress=not args.no_progress)
        print(f"featx demo: report at {html}")
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- predict
def _predict(sub):
    p = sub.add_parser("predict", help="run a saved classifier (probe or fine-tuned model) on new raw files")
    p.add_argument("manifest", help="manifest of the new items (same columns as for extract)")
    p.add_argument("--classifier", required=True,
                   help="a .safetensors probe (featx probe --save-classifier) or a featx finetune model/ folder")
    p.add_argument("--out", help="predictions file, CSV or .parquet (default: print CSV)")
    p.add_argument("--cache-dir", help="keep the extracted caches here (default: a temporary folder)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true", default=False)

    def run(args):
        from featx.predict import predict

        result = predict(args.manifest, args.classifier, out=args.out, cache_dir=args.cache_dir, device=args.device,
                         batch_size=args.batch_size, progress=not args.no_progress)
        if not args.out:
            print(result.to_csv(index=False), end="")
        missing = int(result["prediction"].isna().sum())
        return 2 if missing else 0

    p.set_defaults(func=run)


COMMANDS = [_extract, _info, _manifest, _report, _probe, _fuse, _finetune, _predict, _demo]


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
