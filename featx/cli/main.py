"""featx: find which layer of a pretrained encoder carries what your labels need.

featx caches the hidden states of every layer of pretrained encoders (CLIP-ViT, WavLM, BERT, ...) to HDF5,
then fits a probe per layer (chosen on dev, scored on test), fuses modalities, fine-tunes, and writes a report.
A typical run:
  featx extract data.csv --model bert-base-uncased --out cache
  featx probe cache/data__bert-base-uncased.h5 --out results
  featx report results --out report
Every command takes --recipe FILE.yaml with the same option names; options written on the command line win.
"""
from __future__ import annotations

import os
import sys
import warnings

from featx.cli.options import HelpFormatter, Parser, add_settings, aligned, exit_status, interrupted, print_table, \
    probe_exit_status, registered_probe, settings_from
from featx.errors import FeatxError, first_line
from featx.settings import (DemoSettings, ExtractSettings, FinetuneSettings, FuseSettings, MmsaSettings,
                            ModelsSettings, PredictSettings, ProbeSettings, ReportSettings, check_out_dir,
                            check_out_file)
from featx.version import __version__


def _command(sub, name, cls, help_text, recipe=True, status=None):
    """A sub-command whose options are the fields of settings class `cls`; its --help ends with `status` (default:
    exit_status(name))."""
    p = sub.add_parser(name, help=help_text, description=f"{help_text}.\n\n{status or exit_status(name)}",
                       formatter_class=HelpFormatter)
    add_settings(p, cls, recipe=recipe)
    return p


# ---------------------------------------------------------------- extract / info
def _extract(sub):
    p = _command(sub, "extract", ExtractSettings, "cache the hidden states of every layer to HDF5")

    def run(args):
        s = settings_from(args, ExtractSettings)
        check_out_dir(s.out)
        if s.trust_remote_code:
            print(f"featx extract: --trust-remote-code: the Python code shipped with {', '.join(s.model)} will run "
                  "on this machine", file=sys.stderr)
        from featx.extraction.pipeline import extract

        result = extract(s.manifest, s.model, s.out, **s.kwargs())
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


# ---------------------------------------------------------------- models
def _describe_model(d) -> str:
    """featx models MODEL's lines: the model and, per tower, what featx would run (featx.encoders.registry.
    describe_model's dict)."""
    lines = [f"{d['model']}", f"  model type  {d['model_type']}"]
    several = len(d["towers"]) > 1
    for i, t in enumerate(d["towers"]):
        head = f"  tower {i + 1}     " if several else "  family      "
        lines.append(f"{head}{t['family']} ({t['modality']}{', primary' if several and i == 0 else ''}): "
                     f"{t['adapter']}")
        pad = "    " if several else "  "
        tune = (f"yes (blocks at {t['block_path']})" if t["finetune"] else f"no ({t['note'] or 'no block list'})")
        lines += [f"{pad}layers      {t['num_layers']} ({t['num_layers'] - 1} blocks + the embedding output)",
                  f"{pad}hidden size {t['hidden_size']}",
                  f"{pad}poolings    {', '.join(t['poolings'])}",
                  f"{pad}fine-tune   {tune}"]
        if t["note"] and t["finetune"]:
            lines.append(f"{pad}note        {t['note']}")
    return "\n".join(lines)


def _models(sub):
    p = _command(sub, "models", ModelsSettings, "list the supported encoder families, or say what featx runs for "
                 "MODEL (its config only: no weights are downloaded)", recipe=False)

    def run(args):
        import json

        from featx.encoders.registry import (TABLE_COLUMNS, describe_model, families, family_info, family_rows,
                                             load_config, markdown_table)

        s = settings_from(args, ModelsSettings)
        if s.model is None:
            if s.json:
                print(json.dumps([family_info(f) for f in families()], indent=1))
            else:
                rows = [[r[c] for c in TABLE_COLUMNS] for r in family_rows()]
                print(markdown_table() if s.markdown else aligned([list(TABLE_COLUMNS)] + rows), end="")
            return 0
        if s.markdown:
            raise FeatxError("--markdown lists the families; it takes no MODEL")
        if s.trust_remote_code:
            print(f"featx models: --trust-remote-code: Python code shipped with {s.model} may run on this machine",
                  file=sys.stderr)
        d = describe_model(s.model, load_config(s.model, s.trust_remote_code))
        print(json.dumps(d, indent=1) if s.json else _describe_model(d))
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- manifest
def _manifest(sub):
    p = sub.add_parser("manifest", help="write a featx manifest from a data set's own label files",
                       description="write a featx manifest from a data set's own label files")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    m = formats.add_parser("mmsa", help="MMSA label.csv (CMU-MOSI, MOSEI, CH-SIMS) with Raw/<video_id>/<clip_id>.mp4",
                           description="Rows whose video is missing are left out, listed in OUT.missing.txt, "
                                       "and the exit status is 2 (0 with --allow-missing).\n\n"
                                       + exit_status("manifest"),
                           formatter_class=HelpFormatter)
    add_settings(m, MmsaSettings, recipe=False)

    def run(args):
        s = settings_from(args, MmsaSettings)
        check_out_file(s.out, inputs=[s.label_csv])
        from featx.data.mmsa import missing_report, mmsa_manifest

        manifest, missing = mmsa_manifest(s.label_csv, s.raw, s.out, ext=s.ext, label_column=s.label_column)
        counts = manifest["split"].value_counts()
        print(f"wrote {s.out}: {len(manifest)} items ("
              + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "dev", "test")) + ")")
        if not missing:
            return 0
        print(f"{len(missing)} video(s) not found, left out of the manifest: listed in {missing_report(s.out)}",
              file=sys.stderr)
        return 0 if s.allow_missing else 2

    m.set_defaults(func=run)


def _report(sub):
    p = _command(sub, "report", ReportSettings, "layer-wise plots, CKA heatmaps and a summary table as HTML + "
                 "Markdown")

    def run(args):
        s = settings_from(args, ReportSettings)
        check_out_dir(s.out)
        from featx.report import build_report

        paths = build_report(s.results, s.out, **s.kwargs())
        print(paths["html"])
        print(paths["md"])
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- probe / fuse
def _summary_of_probe(out):
    """best_layers.csv's rows for the primary metric (every metric is in the file)."""
    import pandas as pd

    from featx.runinfo import read_json

    table = pd.read_csv(os.path.join(out, "best_layers.csv"), dtype={"train_size": str})  # as given: 1.0, 200
    try:
        primary = read_json(os.path.join(out, "meta.json")).get("primary_metric")
    except (OSError, ValueError):
        primary = None
    if primary and "metric" in table and (table["metric"] == primary).any():
        table = table[table["metric"] == primary]
    return table


def _run_probe(cls, args):
    s = settings_from(args, cls, parsers={"probe": registered_probe})
    check_out_dir(s.out)
    from featx.probing.sweep import run_probe

    df = run_probe(s.caches, s.out, **s.kwargs())
    meta = df.attrs.get("meta", {})
    for key, items in (("failed", "item(s) that failed at extraction"),
                       ("pending", "item(s) not extracted (pending in the cache)"),
                       ("unlabeled", "item(s) without a label")):
        for name, count in (meta.get(key) or {}).items():
            if count:
                print(f"featx {args.command}: {name}: {count} {items} were left out of training and scoring",
                      file=sys.stderr)
    for note in meta.get("notes") or ():  # what differs from what was asked: fewer folds, a training size added,
        print(f"featx {args.command}: {note}", file=sys.stderr)  # items with no split left out
    table = _summary_of_probe(s.out)
    if not s.json and "layers_probed" in table and (table["layers_probed"].astype(str) == "all").all():
        table = table.drop(columns="layers_probed")   # said only when some encoder's layers were a subset
    print_table(table, s.json, f"featx {args.command}: results in {os.path.normpath(s.out)}")
    return 0


def _probe(sub):
    p = _command(sub, "probe", ProbeSettings, "fit a probe per layer of each cache; dev selects, test reports",
                 status=probe_exit_status("probe"))
    p.set_defaults(func=lambda args: _run_probe(ProbeSettings, args))


def _fuse(sub):
    p = _command(sub, "fuse", FuseSettings, "probe each modality's layers, then fuse the modalities",
                 status=probe_exit_status("fuse"))
    p.set_defaults(func=lambda args: _run_probe(FuseSettings, args))


# ---------------------------------------------------------------- finetune
def _summary_of_finetune(out):
    """The test-split rows of out/results.csv, averaged over seeds: one row per training size."""
    import pandas as pd

    table = pd.read_csv(os.path.join(out, "results.csv"), dtype={"train_size": str})  # as given, as probe's
    test = table[table["split"].isin(["test", "cv"])]
    keys = ["encoder", "modality", "train_size", "split"]
    return test.groupby(keys + ["metric"], sort=False)["value"].mean().unstack("metric").reset_index()


def _finetune(sub):
    p = _command(sub, "finetune", FinetuneSettings, "fine-tune encoders jointly with a fusion head (Toledo & "
                 "Marcacini 2022)")

    def run(args):
        s = settings_from(args, FinetuneSettings)
        check_out_dir(s.out)
        from featx.finetune import finetune

        result = finetune(s.manifest, s.model, s.out, **s.kwargs())
        for note in result.notes:  # what differs from what was asked: a training size added
            print(f"featx finetune: {note}", file=sys.stderr)
        status = f"featx finetune: results in {os.path.normpath(result.out)}" + (
            f"; model in {os.path.normpath(result.model_path)}" if result.model_path else "")
        print_table(_summary_of_finetune(result.out), s.json, status)
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- demo
def _demo(sub):
    p = _command(sub, "demo", DemoSettings, "offline end-to-end run on real review snippets with human ratings "
                 "(real all-MiniLM-L6-v2; random tiny image and audio models); prints where the report is",
                 recipe=False)

    def run(args):
        s = settings_from(args, DemoSettings)
        check_out_dir(s.out)
        from featx.demo.run import run_demo

        html = run_demo(s.out, n=s.items, seed=s.seed, progress=not s.quiet, synthetic=s.synthetic)
        print(f"featx demo: report at {html}")
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------- predict
class _AsPredict:
    """stderr seen through featx predict: the extraction it runs logs under predict's name."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        return self.stream.write(s.replace("featx extract:", "featx predict:"))

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _predict(sub):
    p = _command(sub, "predict", PredictSettings, "run a saved classifier (probe or fine-tuned model) on new raw "
                 "files")

    def run(args):
        import contextlib

        s = settings_from(args, PredictSettings)
        check_out_file(s.out, inputs=[s.manifest, s.classifier])
        if s.cache_dir:
            check_out_dir(s.cache_dir, "--cache-dir")
        from featx.predict import predict

        with contextlib.redirect_stderr(_AsPredict(sys.stderr)):
            result = predict(s.manifest, s.classifier, out=s.out, cache_dir=s.cache_dir, device=s.device,
                             batch_size=s.batch_size, progress=not s.quiet, precision=s.precision,
                             models=s.model)
        missing = int(result["prediction"].isna().sum())
        if s.out:
            print(f"featx predict: {len(result) - missing} predictions written to {s.out}"
                  + (f"; {missing} item(s) without a prediction" if missing else ""), file=sys.stderr)
        else:
            print(result.to_csv(index=False), end="")
            if missing:
                print(f"featx predict: {missing} item(s) without a prediction", file=sys.stderr)
        return 2 if missing else 0

    p.set_defaults(func=run)


COMMANDS = [_extract, _info, _models, _manifest, _report, _probe, _fuse, _finetune, _predict, _demo]


def build_parser():
    parser = Parser(prog="featx", description=__doc__ + "\n" + exit_status(), formatter_class=HelpFormatter,
                    allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"featx {__version__}",
                        help="print featx's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.allow_abbrev = False   # an option is its full name: --layer is never read as --layers
    return parser


def _featx_warning(command, show):
    """A warnings.showwarning that prints featx's own warnings as one `featx COMMAND: message` line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package + os.sep):
            print(f"featx {command}: {message}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _after_interrupt(command, argv=None) -> str:
    """What to do after Ctrl-C (options.INTERRUPTED); for finetune, the command line that continues the run
    (`argv`: main's arguments, None: sys.argv)."""
    if command != "finetune":
        return interrupted(command)
    import shlex

    from featx.runinfo import command_line

    given = command_line() if argv is None else ["featx", *argv]
    again = [a for a in given if a != "--overwrite"]   # --overwrite would start the run again
    again += [] if "--resume" in again else ["--resume"]
    return f"to continue from the last finished epoch, run: {shlex.join(again)}"


# Set to 1 to get the traceback of an unexpected error (a bug) instead of its one line.
TRACEBACK_VARIABLE = "FEATX_TRACEBACK"


def _unexpected(command, err) -> str:
    """The one line an unexpected exception (not a FeatxError: a bug in featx or in a library it calls) is shown
    as: its type, its first line and where it was raised (with the innermost featx line that led there, when it
    was raised in a library), and how to see the traceback. An OSError (a file that cannot be read or written, a
    full disk) and running out of memory are said as they are, not as bugs."""
    import traceback

    head = f"featx {command}: error:"
    if isinstance(err, OSError):
        return f"{head} {first_line(err)}"
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        smaller = "; a smaller --batch-size needs less" if command in ("extract", "finetune", "predict") else ""
        return f"{head} out of memory ({type(err).__name__}: {first_line(err)}){smaller}"
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = traceback.extract_tb(err.__traceback__)
    ours = [i for i, f in enumerate(frames) if os.path.abspath(f.filename).startswith(package + os.sep)]
    at = []   # where it was raised, then the innermost featx line that led there when that is not featx's
    if frames and (not ours or ours[-1] != len(frames) - 1):
        at.append(f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}")
    if ours:
        f = frames[ours[-1]]
        at.append(f"{os.path.relpath(os.path.abspath(f.filename), os.path.dirname(package))}:{f.lineno}")
    where = f" at {at[0]}" + (f" (from {at[1]})" if len(at) > 1 else "") if at else ""
    return (f"{head} unexpected {type(err).__name__}: {first_line(err)}{where}. This is a bug: please report it "
            f"with this line (run again with {TRACEBACK_VARIABLE}=1 for the traceback)")


def main(argv=None):
    """Run one featx command; returns its exit status (0 done, 1 usage error or unexpected error, 2 some items
    failed, 130 interrupted, 141 stdout closed by its reader). An unexpected error is one line (_unexpected), or
    raised with its traceback when the environment sets FEATX_TRACEBACK=1."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # --help, --version (0) or a usage error (1, one line already printed)
        return e.code if isinstance(e.code, int) else 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _featx_warning(args.command, warnings.showwarning)
            status = args.func(args)
            sys.stdout.flush()   # here, so that a reader gone early is the BrokenPipeError below
            return status
    except BrokenPipeError:  # stdout's reader went away (`featx info c.h5 | head -3`): no traceback, 128 + SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing left to flush at exit
        return 141
    except FeatxError as e:
        print(f"featx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"featx {args.command}: interrupted; {_after_interrupt(args.command, argv)}", file=sys.stderr)
        return 130
    except Exception as e:  # not a FeatxError: a bug in featx or a library, or the machine (a file, memory)
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(_unexpected(args.command, e), file=sys.stderr)
        return 1
