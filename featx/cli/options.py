"""argparse built from the typed settings of featx.settings: each option declared once there, here only spelled
as command-line flags. Options keep argparse's SUPPRESS default, so the namespace holds exactly what was written
on the command line; featx.settings.build_settings merges it over the recipe and the defaults."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from featx.errors import FeatxError
from featx.settings import build_settings, dashed

# What is true after Ctrl-C (exit 130), per command: said in --help's exit status and in the one line printed.
INTERRUPTED = {
    "extract": "run the same command again to resume: the items done are kept",
    "finetune": "run the same command with --resume (not --overwrite): it continues from the last finished epoch",
    "probe": "probe keeps no partial results and does not resume: run the same command again to start over",
    "fuse": "fuse keeps no partial results and does not resume: run the same command again to start over",
    "predict": "run the same command again: with --cache-dir its extraction resumes, without one it starts over",
    "demo": "run the same command again: its extraction resumes, the probes and the report start over",
}
RUN_AGAIN = "run the same command again (it starts over)"


def interrupted(command) -> str:
    """What to do after `command` was interrupted (Ctrl-C), as one phrase."""
    return INTERRUPTED.get(command, RUN_AGAIN)


def exit_status(command=None) -> str:
    """--help's exit-status section of `command` (None: featx's own --help, every command)."""
    again = interrupted(command) if command else "run the same command again (extract resumes, finetune " \
        "with --resume, probe and fuse start over)"
    return f"""exit status:
  0    done
  1    a usage or configuration error: one line on stderr, nothing done; or an unexpected error
       (a bug): one line too, FEATX_TRACEBACK=1 shows its traceback
  2    done, but some items failed: each is listed with its reason
  130  interrupted: {again}"""


# probe and fuse have no per-item failures of their own: items that failed at extraction were reported (exit 2)
# by featx extract; here they, like items without a label or a split, are left out, counted on stderr and in
# meta.json, and the run is done (0). A bad label value is a data error of the whole run (1).
def probe_exit_status(command) -> str:
    return f"""exit status:
  0    done; items left out (failed at extraction, pending, without a label, with no split) are
       counted on stderr (a line per cache and reason) and in meta.json
  1    a usage, configuration or data error (e.g. a non-finite label): one line on stderr; or an
       unexpected error (a bug): one line too, FEATX_TRACEBACK=1 shows its traceback
  130  interrupted: {interrupted(command)}"""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 1 (2 means "some items failed" in featx)."""

    _given = ()  # the arguments of the parse under way

    def error(self, message):
        unknown = self._unknown(self._given)
        if unknown and message.startswith("the following arguments are required"):
            message = self._unknown_message(unknown)  # `featx info --nope`: the option first, then what is missing
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(1)

    def _unknown(self, args) -> list:
        """The options in `args` that this parser does not know (negative numbers are values)."""
        return [a for a in args if a.startswith("-") and len(a) > 1 and a.split("=")[0] not in
                self._option_string_actions and not self._negative_number_matcher.match(a)]

    @staticmethod
    def _unknown_message(options) -> str:
        return f"unknown option{'s' if len(options) > 1 else ''} {' '.join(options)}"

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, but arguments this parser does not know are an error of its own (`featx probe: error:
        unknown option --nope`): a subcommand's parser hands them up, and the top parser named no subcommand."""
        self._given = list(sys.argv[1:] if args is None else args)
        parsed, extra = super().parse_known_args(args, namespace)
        options = [a for a in extra if a.startswith("-")]
        if options:
            self.error(self._unknown_message(options))
        if extra:
            self.error(f"unexpected argument{'s' if len(extra) > 1 else ''} {' '.join(extra)}")
        return parsed, extra


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


class _Renamed(argparse.Action):
    """An option's former name: a one-line error that gives the name it has now."""

    def __init__(self, option_strings, dest, now="", **kw):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.now = now

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.now}")


def _default_text(f):
    meta = f.metadata
    if meta["default_text"]:
        return meta["default_text"]
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if meta["flag"]:
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


def add_settings(parser, cls, recipe=True):
    """Add one option per field of settings class `cls` (and --recipe) to `parser`."""
    for f in fields(cls):
        meta = f.metadata
        required = meta["required"]
        help_text = meta["help"] + (" (required)" if required and not meta["positional"] else
                                    "" if required else f" (default: {_default_text(f)})")
        kw = dict(default=argparse.SUPPRESS, help=help_text)
        if meta["positional"]:
            parser.add_argument(f.name, nargs="*" if meta["many"] else "?", metavar=meta["metavar"] or f.name.upper(),
                                **kw)
            continue
        flags = ["-q", "--quiet"] if f.name == "quiet" else [f"--{dashed(f.name)}"]
        if meta["flag"]:
            parser.add_argument(*flags, dest=f.name, action="store_true", **kw)
            # every flag can be turned off (a recipe's `quiet: yes` too: the command line wins): --no-FLAG, and
            # for a flag that is itself a no- (--no-cka) the name without it (--cka); not listed, the README says it
            off = dashed(f.name[3:]) if f.name.startswith("no_") else f"no-{dashed(f.name)}"
            parser.add_argument(f"--{off}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        elif meta["many"]:
            parser.add_argument(*flags, dest=f.name, action="append", metavar=meta["metavar"] or f.name.upper(), **kw)
        else:
            parser.add_argument(*flags, dest=f.name, metavar=meta["metavar"] or f.name.upper(), **kw)
        if f.name == "quiet":  # the flag's older spelling, kept working
            parser.add_argument("--no-progress", dest="quiet", action="store_true", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
    for old, now in cls.RENAMED.items():
        parser.add_argument(f"--{dashed(old)}", action=_Renamed, now=f"--{dashed(now)}")
    if recipe:
        parser.add_argument("--recipe", default=None, metavar="FILE.yaml",
                            help="YAML file of option: value with the same names (dashes or underscores) and types; "
                                 "options written on the command line win (default: none)")


def settings_from(args, cls, parsers=None):
    """The typed settings of a parsed command line: what it wrote, over its --recipe, over the defaults."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return build_settings(cls, given, getattr(args, "recipe", None), parsers=parsers, command=args.command)


def registered_probe(name) -> str:
    """A probe name out of featx.probing.registry (FeatxError listing the names otherwise)."""
    from featx.probing.registry import probe_names

    names = probe_names()
    if name not in names:
        raise FeatxError(f"unknown probe {name!r}; choose from {', '.join(names)}")
    return name


def print_table(table, as_json, status):
    """A summary table on stdout (JSON with null for missing values when as_json); `status` says where the
    results are (stdout, or stderr under --json so stdout stays pure JSON)."""
    if as_json:
        if "train_size" in table:   # a number in JSON, as written in the results table: 1.0, 0.25, 200
            table = table.assign(train_size=[_as_number(v) for v in table["train_size"]])
        print(json.dumps(json.loads(table.to_json(orient="records", double_precision=6)), indent=1, allow_nan=False))
        print(status, file=sys.stderr)
        return
    if len(table):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–"))
    print(status)


def _as_number(text):
    """A training size as the results table writes it ("1.0", "200") as the JSON number it reads as."""
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def aligned(rows) -> str:
    """Rows of text cells (the first one the header) as columns padded to their widest cell, one line each."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)
