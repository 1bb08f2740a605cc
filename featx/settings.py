"""Each concept a user sets (training sizes, seeds, layers, splits, poolings, device, precision) parsed and
validated in one place. The command line, recipes and the Python API all go through these functions, so a
value means the same thing wherever it is given. Every parser takes the raw value (a string from the command
line, a YAML scalar or list from a recipe, a Python value) and returns the typed value or raises FeatxError
with one line; parsing an already parsed value returns it unchanged.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

from featx.errors import FeatxError, first_line
from featx.naming import resolve_model

POOLINGS = ("mean", "cls", "last")  # last: the last real token (decoder LMs)
MAX_IMAGE_PIXELS = 100_000_000   # 10,000 x 10,000: about 300 MB once decoded to RGB
# How images become pixel values: batched-torch (workers decode to uint8; the checkpoint's torchvision processor
# runs on whole batches on the model's device) or processor (the checkpoint's processor per image, in the workers)
IMAGE_PREPROCESS = ("batched-torch", "processor")
IMAGE_DECODES = ("workers", "device")  # where JPEGs are decoded (featx.encoders.image)
AUDIO_ATTENTIONS = ("sdpa", "eager")  # WavLM's attention: torch's fused SDPA (the default) or transformers' own
DEVICES = ("auto", "cpu", "cuda")
# bf16 / fp16: autocast over fp32 weights; bf16-weights: the whole model in bf16 (weights and activations, as
# transformers' dtype=torch.bfloat16), the fastest and furthest from fp32; extraction only
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-weights")
TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TASKS = ("auto", "regression", "classification")
HEADS = ("concat", "gated")   # fine-tuning's fusion heads
LOSSES = ("l1", "mse")        # fine-tuning's regression losses
SPLIT_ALIASES = {"train": "train", "training": "train", "dev": "dev", "valid": "dev", "val": "dev",
                 "validation": "dev", "test": "test", "testing": "test"}


def csv_list(value) -> list:
    """A comma-separated string (command line) or a list (recipe) as a list of non-empty strings."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [t for t in (str(x).strip() for x in items) if t]


@dataclass(frozen=True, order=True)
class TrainSize:
    """How many training labels a fit uses: a fraction of the training part (kind "fraction", 0 < value <= 1)
    or a number of labels (kind "count", an integer > 1). Written as given: "0.25", "1.0", "200"."""
    kind: str
    value: float

    @property
    def is_full(self) -> bool:
        """The whole training part."""
        return self.kind == "fraction" and self.value >= 1.0

    def labels(self, n_train: int) -> int:
        """The number of labels this size takes from a training part of n_train items. A count larger than the
        part is an error (it would silently be the full part)."""
        if self.kind == "fraction":
            return n_train if self.is_full else min(n_train, max(2, int(round(self.value * n_train))))
        if int(self.value) > n_train:
            raise FeatxError(f"training size {self} is larger than the training part ({n_train} labelled items); "
                             "use a smaller count or a fraction such as 0.5")
        return int(self.value)

    def __float__(self):
        """The value as given: a fraction (<= 1) or a count (> 1), as the training-size columns hold it."""
        return float(self.value)

    def __str__(self):
        return f"{self.value:g}" if self.kind == "count" else (f"{self.value:.10g}" if self.value < 1 else "1.0")


def parse_train_size(value) -> TrainSize:
    """0 < x <= 1 is a fraction of the training part ("1" and "1.0" are the whole part); a whole number > 1
    is a number of labels ("200")."""
    if isinstance(value, TrainSize):
        return value
    text = str(value).strip()
    try:
        x = float(text)
    except ValueError:
        raise FeatxError(f"a training size must be a fraction in (0, 1] or a number of labels > 1, not {value!r}")
    if not x > 0 or x != x or x == float("inf"):
        raise FeatxError(f"a training size must be a fraction in (0, 1] or a number of labels > 1, not {value!r}")
    if x <= 1:
        return TrainSize("fraction", x)
    if x != int(x):
        raise FeatxError(f"a training size above 1 is a number of labels and must be whole, not {value!r}")
    return TrainSize("count", float(int(x)))


def parse_train_sizes(value) -> list:
    """A list of TrainSize in the order given, without repeats; at least one."""
    sizes = list(dict.fromkeys(parse_train_size(v) for v in csv_list(value) if v != ""))
    if not sizes:
        raise FeatxError("give at least one training size (e.g. 1.0, or 50,200,1.0)")
    return sizes


def parse_seeds(value) -> list:
    """An int n >= 1 means seeds 0..n-1; a list (or "3,7") names the seeds, each once (a repeat is refused: it
    would not run twice)."""
    if isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value):
        seeds = _whole_numbers(value, f"seeds must be whole numbers, not {value!r}", "give at least one seed")
        again = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
        if again is not None:
            raise FeatxError(f"--seeds names seed {again} twice ({','.join(map(str, seeds))}); name each seed once")
        return seeds
    try:
        n = int(str(value).strip())
    except ValueError:
        raise FeatxError(f"--seeds must be a count (e.g. 3) or a list of seeds, not {value!r}")
    if n < 1:
        raise FeatxError(f"--seeds must be at least 1 (the number of seeds to run), not {n}")
    return list(range(n))


def parse_layers(value):
    """"all" (or None), or a list of layer indices (negative ones count from the output layer)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return "all"
    try:
        return [int(v) for v in csv_list(value)]
    except ValueError:
        raise FeatxError(f"layers must be 'all' or integers like 3,7,-1, not {value!r}")


def resolve_layers(layers, num_layers: int, where="") -> list:
    """Layer indices 0..num_layers-1 for parse_layers' value; out of range is an error naming `where`."""
    layers = parse_layers(layers)
    if layers == "all":
        return list(range(num_layers))
    chosen = [v + num_layers if v < 0 else v for v in layers]
    bad = [v for v, c in zip(layers, chosen) if not 0 <= c < num_layers]
    if bad:
        raise FeatxError(f"{where + ': ' if where else ''}layers {bad} out of range 0..{num_layers - 1} "
                         f"(or -{num_layers}..-1)")
    return chosen


def parse_poolings(value) -> list:
    """A list of poolings out of POOLINGS."""
    pools = csv_list(value)
    bad = [p for p in pools if p not in POOLINGS]
    if bad or not pools:
        raise FeatxError(f"unknown pooling {bad[0] if bad else '(none)'!r}; choose from {', '.join(POOLINGS)}")
    return list(dict.fromkeys(pools))


def canonical_split(name) -> str:
    """A manifest's split name as train, dev or test (case and the usual aliases ignored; "" for none).
    Any other name is an error, so that items are never silently left out of training or scoring."""
    text = "" if name is None else str(name).strip()
    if text == "" or text.lower() in ("nan", "none"):
        return ""
    if text.lower() not in SPLIT_ALIASES:
        raise FeatxError(f"unknown split {text!r}: use train, dev (or valid/val/validation) or test")
    return SPLIT_ALIASES[text.lower()]


# ---------------------------------------------------------------- value parsers for typed options
def _plain(value, what="a value"):
    if isinstance(value, (dict, list, tuple, set)):
        raise FeatxError(f"must be {what}, not a {type(value).__name__}")
    return value


def integer(minimum=None):
    """A parser for a whole number (at least `minimum`); "8" and 8 are 8, "eight", 8.5 and true are errors."""
    def parse(value) -> int:
        _plain(value, "a whole number")
        if isinstance(value, bool) or (isinstance(value, float) and not (math.isfinite(value) and value == int(value))):
            raise FeatxError(f"must be a whole number, not {value!r}")
        try:
            n = int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        except ValueError:
            raise FeatxError(f"must be a whole number, not {value!r}")
        if minimum is not None and n < minimum:
            raise FeatxError(f"must be 0 or more, not {n}" if minimum == 0 else f"must be at least {minimum}, not {n}")
        return n
    return parse


def number(minimum=None, positive=False):
    """A parser for a finite real number (> 0 with positive, >= minimum with minimum)."""
    def parse(value) -> float:
        _plain(value, "a number")
        if isinstance(value, bool):
            raise FeatxError(f"must be a number, not {value!r}")
        try:
            x = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise FeatxError(f"must be a number, not {value!r}")
        if x != x or x in (float("inf"), float("-inf")):
            raise FeatxError(f"must be a finite number, not {value!r}")
        if positive and not x > 0:
            raise FeatxError(f"must be positive, not {value!r}")
        if minimum is not None and x < minimum:
            raise FeatxError(f"must be at least {minimum:g}, not {value!r}")
        return x
    return parse


def optional(parse):
    """`parse`, or None for a missing value (None, "", "none")."""
    def parse_optional(value):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return parse(value)
    return parse_optional


def one_of(what, *allowed):
    """A parser for one `what` (a name such as "head") out of `allowed`."""
    def parse(value) -> str:
        v = str(_plain(value, "one name")).strip()
        if v not in allowed:
            raise FeatxError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        return v
    return parse


def one_pooling(command):
    """A parser for the one pooling `command` reads per run; a list of them (what extract's --pool takes) is
    refused saying so."""
    def parse(value) -> str:
        v = str(_plain(value, "one pooling")).strip()
        if "," in v:
            raise FeatxError(f"{command} takes one pooling per run, not {value!r}: run it once per pooling (featx "
                             "extract's --pool takes a list: a cache stores several)")
        return one_of("pooling", *POOLINGS)(v)
    return parse


def boolean(value) -> bool:
    """true/false (YAML booleans, or the words true, false, yes, no, on, off, 1, 0)."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    key = str(_plain(value, "true or false")).strip().lower()
    if key not in words:
        raise FeatxError(f"must be true or false, not {value!r}")
    return words[key]


def text(value) -> str:
    """A non-empty string."""
    v = str(_plain(value, "a single value")).strip()
    if not v:
        raise FeatxError("must not be empty")
    return v


def texts(value) -> list:
    """A list of non-empty strings: a recipe list, a repeated option, or one value (paths are never split at commas)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [text(v) for v in items]


def distinct_paths(value) -> list:
    """texts(value) where no file or folder is named twice (also under two spellings of its path)."""
    paths, seen = texts(value), {}
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            raise FeatxError(f"{p} is given twice (as {seen[key]}); give each once")
        seen[key] = p
    return paths


def distinct_models(value) -> list:
    """texts(value) where no model is named twice (a folder also under two spellings of its path,
    featx.naming.resolve_model)."""
    models, seen = texts(value), {}
    for m in models:
        key = resolve_model(m)
        if key in seen:
            raise FeatxError(f"{m} is given twice (as {seen[key]}); give each model once")
        seen[key] = m
    return models


FUSIONS = ("early", "late", "gated")


def parse_fusions(value) -> list:
    """Fusion methods out of FUSIONS, in the order given; "" or none for no fusion."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return []
    methods = csv_list(value)
    bad = [m for m in methods if m not in FUSIONS]
    if bad:
        raise FeatxError(f"unknown fusion method {bad[0]!r}; choose from {', '.join(FUSIONS)}")
    return list(dict.fromkeys(methods))


def parse_fusion_layer(value):
    """The fusion input per modality: "best" (best dev layer), "weighted" (learned layer-weighted sum) or an index."""
    v = str(_plain(value, "best, weighted or a layer index")).strip()
    if v in ("best", "weighted"):
        return v
    try:
        return int(v)
    except ValueError:
        raise FeatxError(f"must be best, weighted or a layer index, not {value!r}")


def parse_cut_layers(value) -> list:
    """Fine-tuning cut layer per model (one value for all): an index, "last", or "best" (from --probe-results)."""
    items = csv_list(value)
    if not items:
        raise FeatxError("give a layer: an index, last or best")
    out = []
    for v in items:
        if v in ("last", "best"):
            out.append(v)
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise FeatxError(f"must be layer indices, last or best (one, or one per model), not {value!r}")
    return out


TOWERS = ("auto", "text", "image", "audio", "video")  # fine-tuning: which tower of a checkpoint a model runs


def parse_towers(value) -> list:
    """Per model (one value for all): auto, or the modality of the tower it runs (CLIP: image or text)."""
    items = csv_list(value)
    bad = [v for v in items if v not in TOWERS]
    if bad or not items:
        raise FeatxError(f"unknown modality {bad[0] if bad else '(none)'!r}; choose from {', '.join(TOWERS)} (one, "
                         "or one per model)")
    return items


def int_list(value) -> list:
    """Whole numbers, comma-separated or a list: "-1" or "2,4"."""
    return _whole_numbers(value, f"must be whole numbers (one, or one per model), not {value!r}",
                          "give at least one whole number")


def _whole_numbers(value, bad, empty) -> list:
    """csv_list(value) as ints; FeatxError `bad` for a non-integer, `empty` for none."""
    try:
        out = [int(v) for v in csv_list(value)]
    except ValueError:
        raise FeatxError(bad)
    if not out:
        raise FeatxError(empty)
    return out


def parse_device(value) -> str:
    """auto, cpu, cuda or cuda:N."""
    v = str(_plain(value, "a device")).strip()
    if v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise FeatxError(f"must be auto, cpu, cuda or cuda:N, not {value!r}")


def parse_precision(value, choices=PRECISIONS) -> str:
    """auto (bf16 autocast on CUDA, fp32 on the CPU), fp32, bf16, fp16 or bf16-weights."""
    v = str(_plain(value, "a precision")).strip()
    if v not in choices:
        extra = " (bf16-weights is for extraction only)" if v in PRECISIONS else ""
        raise FeatxError(f"must be one of {', '.join(choices)}, not {value!r}{extra}")
    return v


def parse_training_precision(value) -> str:
    """A precision fine-tuning can train in: auto, fp32, bf16 or fp16 (autocast)."""
    return parse_precision(value, TRAINING_PRECISIONS)


def parse_probe(value) -> str:
    """A probe name; checked against the probe registry by the command line (featx.cli), which may import it."""
    return text(value)


# ---------------------------------------------------------------- typed settings: declaration
def option(default=None, help="", parse=None, *, positional=False, many=False, flag=False, path=False,
           model=False, required=False, cli_only=False, default_text=None, metavar=None):
    """A dataclass field declared once for the command line, recipes and the Python API.

    parse: raw value (command-line string, YAML scalar or list, Python value) -> typed value, or FeatxError.
    positional: a positional argument; many: a list (nargs="*" or a repeatable option); flag: on when given;
    path / model: relative paths in a recipe resolve against its folder (a model only when that folder exists);
    cli_only: refused in a recipe; default_text: the default as --help shows it, when not the value itself.
    """
    meta = dict(help=help, parse=parse or (boolean if flag else text), positional=positional, many=many, flag=flag,
                path=path, model=model, required=required, cli_only=cli_only, default_text=default_text,
                metavar=metavar)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def dashed(name) -> str:
    return name.replace("_", "-")


class Settings:
    """Base of the per-command settings: every field is parsed (and so validated) on construction."""
    RENAMED: ClassVar[dict] = {}   # {old option name: its name now}

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, parse_field(f, getattr(self, f.name), f"--{dashed(f.name)}", sep=" "))


def parse_field(f, value, where, sep=": "):
    """`value` parsed by field f's parser; a FeatxError says `where` it came from, in one line."""
    if value is None and f.default is None:
        return None
    try:
        return f.metadata["parse"](value)
    except FeatxError as e:
        msg = first_line(e)
        flag = f"--{dashed(f.name)} "
        raise FeatxError(f"{where}{sep}{msg[len(flag):] if msg.startswith(flag) else msg}") from None


# ---------------------------------------------------------------- recipes, and the merge with the command line
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_ALIASES = 100


def _recipe_loader():
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        """yaml's SafeLoader that counts aliases: a few are fine, an alias bomb fails at once."""
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_RECIPE_ALIASES:
                    raise FeatxError(f"uses more than {MAX_RECIPE_ALIASES} YAML aliases")
            return super().compose_node(parent, index)

    return RecipeLoader


def read_recipe(path) -> dict:
    """A recipe file as {key: value}: a YAML mapping of scalars and flat lists, under MAX_RECIPE_BYTES, UTF-8.
    Keys keep their spelling (dashes or underscores); FeatxError with one line for anything else."""
    import yaml

    where = f"recipe {path}"
    try:
        if not os.path.isfile(path):
            raise FeatxError(f"{where}: no such file" if not os.path.exists(path) else f"{where}: not a regular file")
        if os.path.getsize(path) > MAX_RECIPE_BYTES:
            raise FeatxError(f"{where} is larger than {MAX_RECIPE_BYTES // (1 << 20)} MB; a recipe is a short list "
                             "of settings")
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise FeatxError(f"cannot read {where}: {e.strerror}")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FeatxError(f"{where} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})")
    try:
        data = yaml.load(content, Loader=_recipe_loader())
    except FeatxError as e:
        raise FeatxError(f"{where} {e}")
    except yaml.YAMLError as e:
        raise FeatxError(f"{where} is not valid YAML: {' '.join(first_line(e).split())}")
    except RecursionError:
        raise FeatxError(f"{where} is nested too deeply")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FeatxError(f"{where} must be a YAML mapping of option: value")
    for key, value in data.items():
        if not isinstance(key, str):
            raise FeatxError(f"{where}: key {key!r} is not a name")
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or any(isinstance(v, (list, dict)) for v in items):
            raise FeatxError(f"{where}: {key} must be a value or a list of values")
    return data


def recipe_values(cls, path) -> dict:
    """{field name: value} of recipe `path` for settings class `cls`: keys checked (cls.RENAMED names old keys
    for a helpful error), relative paths resolved against the recipe's folder."""
    known = {f.name: f for f in fields(cls)}
    renamed = cls.RENAMED
    base = os.path.dirname(os.path.abspath(path))
    out = {}
    for key, value in read_recipe(path).items():
        name = key.strip().replace("-", "_")
        name = "quiet" if name == "no_progress" and "quiet" in known else name   # the flag's older spelling
        if name in out:
            raise FeatxError(f"recipe {path}: {dashed(name)} is given twice")
        if name not in known:
            hint = f" (it is now {dashed(renamed[name])!r})" if renamed and name in renamed else ""
            raise FeatxError(f"recipe {path}: unknown key {key!r}{hint}")
        meta = known[name].metadata
        if meta["cli_only"]:
            raise FeatxError(f"recipe {path}: {dashed(name)} can only be given on the command line "
                             f"(--{dashed(name)})")
        out[name] = _resolve_paths(value, base, meta)
    return out


def _resolve_paths(value, base, meta):
    if value is None or not (meta["path"] or meta["model"]):
        return value

    def resolve(v):
        v = str(v)
        if os.path.isabs(v) or os.path.expanduser(v) != v:
            return os.path.expanduser(v)
        here = os.path.join(base, v)
        return here if meta["path"] or os.path.exists(here) else v   # a hub id stays as written

    return [resolve(v) for v in value] if isinstance(value, list) else resolve(value)


def merge(defaults: dict, recipe: dict, given: dict) -> dict:
    """The raw value of every setting: written on the command line (`given`, only what was written, even when it
    equals the default) wins over the recipe, the recipe over the defaults."""
    return {**defaults, **recipe, **given}


def defaults_of(cls) -> dict:
    """{field name: default} of a settings dataclass."""
    from dataclasses import MISSING

    return {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default) for f in fields(cls)}


def build_settings(cls, given=None, recipe=None, parsers=None, command=None):
    """A `cls` from the options written on the command line (`given`: {field name: raw value}) and a recipe
    file; each value parsed once, a bad one a one-line FeatxError naming the option or recipe key.
    parsers: {field name: parser} run after the field's own (e.g. a registry check)."""
    given = dict(given or {})
    from_recipe = recipe_values(cls, recipe) if recipe else {}
    raw = merge(defaults_of(cls), from_recipe, given)
    known = {f.name: f for f in fields(cls)}
    values = {}
    for name, value in raw.items():
        where = (f"--{dashed(name)}" if name in given else f"recipe {recipe}: {dashed(name)}" if name in from_recipe
                 else dashed(name))
        values[name] = parse_field(known[name], value, where)
        if parsers and name in parsers and values[name] is not None:
            try:
                values[name] = parsers[name](values[name])
            except FeatxError as e:
                raise FeatxError(f"{where}: {first_line(e)}") from None
    missing = [n for n, f in known.items() if f.metadata["required"] and values[n] in (None, [], "")]
    if missing:
        names = ", ".join(n.upper() if known[n].metadata["positional"] else f"--{dashed(n)}" for n in missing)
        raise FeatxError(f"{'featx ' + command + ' ' if command else ''}needs {names} (or a --recipe that gives "
                         f"{'them' if len(missing) > 1 else 'it'})")
    return cls(**values)


# ---------------------------------------------------------------- outputs refused before any work
def check_out_dir(path, what="--out"):
    """An output folder: refused when it exists and is not a folder."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise FeatxError(f"{what} {path} is a file; give a folder (it is created when missing)")
    return path


def check_out_file(path, inputs=(), what="--out"):
    """An output file: refused when it is an existing folder, or would overwrite one of `inputs`."""
    if path is None:
        return path
    if os.path.isdir(path):
        raise FeatxError(f"{what} {path} is a folder; give a file name (e.g. {os.path.join(path, 'out.csv')})")
    for src in inputs:
        if src is not None and os.path.exists(src) and os.path.exists(path) and os.path.samefile(src, path) \
                or src is not None and os.path.abspath(src) == os.path.abspath(path):
            raise FeatxError(f"{what} {path} is the input {src}; writing it would overwrite the input")
    return path


# ---------------------------------------------------------------- typed settings per command
_QUIET = dict(flag=True, help="no progress, only errors and the final summary")


@dataclass
class ExtractSettings(Settings):
    """`featx extract`: cache the hidden states of every layer of every item to HDF5, one file per model."""
    manifest: str = option(None, "CSV, JSONL or Parquet manifest (id, text/image/audio/video, label, split)",
                           positional=True, path=True, required=True)
    model: list = option(None, "hub id or local folder; repeat for several", distinct_models, many=True, model=True,
                         required=True)
    out: str = option(None, "output folder (one .h5 per manifest x model)", path=True, required=True)
    pool: list = option("mean", "poolings, comma-separated: mean,cls,last (each model stores those its family supports)", parse_poolings)
    seq: bool = option(False, "also store the full per-position sequences", flag=True)
    seq_stride: int = option(1, "keep every k-th position of stored sequences (audio)", integer(1))
    batch_size: int = option(16, "most inputs per forward", integer(1))
    max_batch_tokens: int = option(None, "text: most padded tokens per forward (batch x longest)",
                                   optional(integer(1)), default_text="no limit")
    max_batch_seconds: float = option(None, "audio: most padded seconds per forward (batch x longest)",
                                      optional(number(positive=True)),
                                      default_text="8 on the CPU, no limit on CUDA")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", parse_device)
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on the CPU), fp32, bf16 or fp16 (autocast "
                            "over fp32 weights), or bf16-weights (the whole model in bf16: fastest on a GPU, "
                            "furthest from fp32); stored with the cache", parse_precision)
    dtype: str = option("float16", "storage dtype: float16 or float32", one_of("dtype", "float16", "float32"))
    max_length: int = option(None, "text: max tokens", optional(integer(1)), default_text="the tokenizer's")
    max_audio_seconds: float = option(30.0, "longer audio is processed in windows of this length",
                                      number(positive=True))
    audio_attention: str = option(AUDIO_ATTENTIONS[0], "WavLM's attention: sdpa (torch's fused "
                                  "scaled_dot_product_attention) or eager (transformers' own); stored with the "
                                  "cache", one_of("audio attention", *AUDIO_ATTENTIONS))
    fps: float = option(3.0, "video: frames sampled per second for image encoders", number(positive=True))
    num_workers: int = option(None, "decoding worker processes", optional(integer(0)),
                              default_text="0 on the CPU; on CUDA the CPUs less 2, at most 16")
    trust_remote_code: bool = option(False, "run Python code shipped with a hub checkpoint (command line only; "
                                     "never from a recipe)", flag=True, cli_only=True)
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, "images (and video frames) with more pixels fail as items "
                                   "before they are decoded; 0: no limit", optional(integer(0)))
    image_preprocess: str = option("batched-torch", "images: batched-torch (workers only decode; the checkpoint's "
                                   "torchvision processor resizes and normalises whole batches on the device) or "
                                   "processor (the checkpoint's processor per image, in the workers); stored with the "
                                   "cache", one_of("image preprocessing", *IMAGE_PREPROCESS))
    image_decode: str = option("workers", "images: where JPEGs are decoded: workers (Pillow, in the decoding "
                               "workers) or device (the model's device decodes whole batches: nvJPEG on CUDA; other "
                               "files still in the workers); batched-torch only; stored with the cache",
                               one_of("image decoding", *IMAGE_DECODES))
    overwrite: bool = option(False, "start again over an existing cache", flag=True)
    quiet: bool = option(False, **_QUIET)

    def kwargs(self) -> dict:
        """Keyword arguments of featx.extraction.extract(manifest, model, out, **kwargs)."""
        names = ("seq", "seq_stride", "batch_size", "device", "dtype", "precision", "max_length", "max_batch_tokens",
                 "max_batch_seconds", "max_audio_seconds", "fps", "num_workers", "trust_remote_code", "overwrite",
                 "audio_attention")
        return dict({n: getattr(self, n) for n in names}, pool=self.pool, progress=not self.quiet,
                    max_image_pixels=self.max_image_pixels, image_preprocess=self.image_preprocess,
                    image_decode=self.image_decode)


@dataclass
class ProbeSettings(Settings):
    """`featx probe`: a probe per layer of each cache (dev selects, test reports), optionally fused."""
    RENAMED: ClassVar[dict] = {"method": "fusion", "layer": "fusion_layer"}
    caches: list = option([], "HDF5 caches written by featx extract, one per modality", distinct_paths,
                          positional=True, many=True, path=True, required=True, metavar="CACHE")
    out: str = option(None, "output folder: results.csv/.parquet, best_layers.csv, meta.json", path=True,
                      required=True)
    probe: str = option("linear", "linear (ridge or logistic by task), ridge, logistic, mlp, batched (all layers "
                        "at once in torch), or a registered probe", parse_probe)
    layers: object = option("all", "all, or layer indices: 3,7,-1", parse_layers)
    pool: str = option("mean", "pooling stored in the cache, one per run: mean, cls or last",
                       one_pooling("featx probe"))
    seeds: list = option(1, "a count n (seeds 0..n-1) or a list of seeds: 3,7", parse_seeds)
    train_sizes: list = option("1.0", "fractions of the training part (<= 1) or numbers of labels (> 1): "
                               "50,200,1.0", parse_train_sizes)
    folds: int = option(5, "CV folds when the cache has no split column", integer(2))
    task: str = option("auto", "auto (from the labels), regression or classification", one_of("task", *TASKS))
    device: str = option("auto", "auto, cpu, cuda or cuda:N", parse_device)
    weighted: bool = option(False, "also learn a softmax-weighted sum over layers (per modality)", flag=True)
    fusion: list = option("", "fuse the caches (one per modality): early,late,gated", parse_fusions,
                          default_text="no fusion")
    fusion_layer: object = option("best", "fusion input per modality: best (dev), weighted or a layer index",
                                  parse_fusion_layer)
    missing: str = option("intersect", "items missing from a modality: intersect (fuse the shared items, "
                          "reported) or error", one_of("rule for missing items", "intersect", "error"))
    late_rule: str = option("mean", "late fusion: mean of the modalities' predictions, or stack",
                            one_of("late-fusion rule", "mean", "stack"))
    save_classifier: bool = option(False, "save the best dev layer's probe per cache (safetensors)", flag=True)
    json: bool = option(False, "print the summary as JSON on stdout", flag=True)
    quiet: bool = option(False, **_QUIET)

    def kwargs(self) -> dict:
        """Keyword arguments of featx.probing.sweep.run_probe(caches, out, **kwargs)."""
        names = ("probe", "layers", "pool", "seeds", "train_sizes", "folds", "task", "device", "weighted", "fusion",
                 "fusion_layer", "missing", "late_rule", "save_classifier")
        return dict({n: getattr(self, n) for n in names}, progress=not self.quiet)


@dataclass
class FuseSettings(ProbeSettings):
    """`featx fuse`: `featx probe` whose fusion methods default to early, late and gated."""
    fusion: list = option("early,late,gated", "fusion methods: early,late,gated", parse_fusions)


@dataclass
class FinetuneSettings(Settings):
    """`featx finetune`: fine-tune one to three encoders jointly with a fusion head."""
    RENAMED: ClassVar[dict] = {"layer": "layers", "pooling": "pool"}
    manifest: str = option(None, "CSV, JSONL or Parquet manifest (id, text/image/audio/video, label, split)",
                           positional=True, path=True, required=True)
    model: list = option(None, "hub id or local folder; one per modality, repeat", texts, many=True, model=True,
                         required=True)
    out: str = option(None, "output folder: results.csv/.parquet, meta.json, history.csv, model/, runs/", path=True,
                      required=True)
    layers: list = option("last", "cut layer per model (one for all, or a comma list): an index, last, or best "
                          "(from --probe-results)", parse_cut_layers)
    probe_results: str = option(None, "a `featx probe` output folder, for --layers best", optional(text), path=True,
                                default_text="none")
    train_blocks: list = option("-1", "top blocks trained per model (-1 all, 0 frozen encoder)", int_list)
    modality: list = option("auto", "per model, the tower it fine-tunes (one for all, or a comma list): auto (its "
                            "first tower whose column the manifest has and no earlier model reads), text, image, "
                            "audio or video", parse_towers)
    head: str = option("concat", "fusion head: concat or gated", one_of("head", *HEADS))
    task: str = option("auto", "auto (from the labels), regression or classification", one_of("task", *TASKS))
    pool: str = option("mean", "concat head: pooling of each branch, mean, cls or last",
                       one_pooling("featx finetune"))
    proj_size: int = option(32, "concat head: per-modality projection size", integer(1))
    hidden_size: int = option(128, "head MLP / gated fusion size", integer(1))
    heads: int = option(4, "attention heads of the head", integer(1))
    dropout: float = option(0.1, "dropout of the head", number(minimum=0))
    lr: float = option(3e-5, "AdamW learning rate of the encoders", number(positive=True))
    head_lr: float = option(None, "learning rate of the head", optional(number(positive=True)),
                            default_text="--lr")
    weight_decay: float = option(0.01, "AdamW weight decay", number(minimum=0))
    lr_decay: float = option(0.95, "exponential decay of the learning rate per epoch", number(positive=True))
    epochs: int = option(20, "most epochs", integer(1))
    patience: int = option(3, "early stopping: epochs without a better dev score", integer(1))
    batch_size: int = option(16, "items per micro-batch", integer(1))
    accumulate: int = option(1, "gradient accumulation: micro-batches per optimizer step", integer(1))
    clip_grad: float = option(1.0, "max gradient norm (0: no clipping)", number(minimum=0))
    loss: str = option("l1", "regression loss: l1 or mse", one_of("loss", *LOSSES))
    folds: int = option(5, "CV folds when the manifest has no train/test split", integer(2))
    train_sizes: list = option("1.0", "fractions of the training part (<= 1) or numbers of labels (> 1): 0.1,1.0",
                               parse_train_sizes)
    seeds: list = option(1, "a count n (seeds 0..n-1) or a list of seeds: 3,7", parse_seeds)
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on the CPU), fp32, bf16 or fp16",
                            parse_training_precision)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", parse_device)
    max_length: int = option(None, "text: max tokens", optional(integer(1)), default_text="the tokenizer's")
    max_audio_seconds: float = option(30.0, "longer audio is cut to its start", number(positive=True))
    no_save_model: bool = option(False, "do not save model/ for featx predict", flag=True)
    resume: bool = option(False, "continue a run from its checkpoints", flag=True)
    overwrite: bool = option(False, "start again over an existing run", flag=True)
    json: bool = option(False, "print the summary as JSON on stdout", flag=True)
    quiet: bool = option(False, **_QUIET)

    def kwargs(self) -> dict:
        """Keyword arguments of featx.finetune.finetune(manifest, model, out, **kwargs)."""
        names = ("layers", "probe_results", "train_blocks", "head", "task", "proj_size", "hidden_size", "heads",
                 "dropout", "lr", "head_lr", "weight_decay", "lr_decay", "epochs", "patience", "batch_size",
                 "accumulate", "clip_grad", "loss", "folds", "train_sizes", "seeds", "precision", "device",
                 "max_length", "max_audio_seconds", "resume", "overwrite", "modality")
        return dict({n: getattr(self, n) for n in names}, pooling=self.pool, save_model=not self.no_save_model,
                    progress=not self.quiet)


def parse_cka_pairs(value):
    """"all", or "a:b,c:d" (or a list of "a:b") as [(a, b), ...]."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None if value is None else "all"
    if isinstance(value, (list, tuple)) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return [tuple(map(str, v)) for v in value]
    pairs = []
    for item in csv_list(value):
        a, sep, b = item.rpartition(":") if item.count(":") > 1 else item.partition(":")
        if not sep or not a.strip() or not b.strip():
            raise FeatxError(f"--cka-pairs takes all or pairs A:B separated by commas, not {item!r}")
        pairs.append((a.strip(), b.strip()))
    return pairs


@dataclass
class ReportSettings(Settings):
    """`featx report`: layer-wise plots, CKA heatmaps and a summary table as HTML + Markdown."""
    results: list = option([], "results folders written by featx probe, fuse or finetune; several share one page",
                           distinct_paths, positional=True, many=True, path=True, required=True, metavar="RESULTS")
    out: str = option(None, "output folder: report.html, summary.md, figures/*.png", path=True, required=True)
    relative_depth: bool = option(False, "plot layers as relative depth (layer / output layer)", flag=True)
    no_cka: bool = option(False, "skip the CKA heatmaps", flag=True)
    biased_cka: bool = option(False, "plain CKA estimator instead of the debiased one", flag=True)
    cache: list = option([], "HDF5 cache for CKA; repeat", texts, many=True, path=True,
                         default_text="the caches listed in meta.json")
    note: list = option([], "text shown at the top of the report; repeat", texts, many=True, default_text="none")
    cka_pairs: object = option(None, "cross-encoder layer-by-layer CKA figures: all, or pairs A:B,C:D named by "
                               "cache path, file stem or encoder name", parse_cka_pairs,
                               default_text="every pair up to 4 caches, else none (the summary matrix is always "
                                            "drawn for 3 or more)")

    def kwargs(self) -> dict:
        """Keyword arguments of featx.report.build_report(results, out, **kwargs)."""
        return dict(caches=self.cache or None, relative_depth=self.relative_depth, notes=self.note,
                    cka=not self.no_cka, debiased=not self.biased_cka, cka_pairs=self.cka_pairs)


@dataclass
class PredictSettings(Settings):
    """`featx predict`: a saved classifier (probe or fine-tuned model) on new raw files."""
    manifest: str = option(None, "manifest of the new items (same columns as for extract)", positional=True,
                           path=True, required=True)
    classifier: str = option(None, "a .safetensors probe (featx probe --save-classifier) or a featx finetune "
                             "model/ folder", path=True, required=True)
    out: str = option(None, "predictions file, CSV or .parquet", optional(text), path=True,
                      default_text="print CSV on stdout")
    cache_dir: str = option(None, "keep the extracted caches here", optional(text), path=True,
                            default_text="a temporary folder")
    model: list = option(None, "a probe's model where it is now (hub id or local folder), in place of the one the "
                         "classifier records (a folder moved, copied or shared); repeat once per encoder of the "
                         "classifier, in its order; refused unless it is the same checkpoint (its weights' "
                         "fingerprint)", texts, many=True, model=True, default_text="the recorded one")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", parse_device)
    batch_size: int = option(16, "most inputs per forward", integer(1))
    precision: str = option(None, "a probe's extraction precision, as featx extract's: auto, fp32, bf16, fp16 or "
                            "bf16-weights", optional(parse_precision),
                            default_text="its training cache's; auto for a file that records none")
    quiet: bool = option(False, **_QUIET)


@dataclass
class DemoSettings(Settings):
    """`featx demo`: an offline end-to-end run on real review snippets with human sentiment ratings."""
    out: str = option("featx-demo", "folder for data, models, caches, results and report", path=True)
    items: int = option(None, "items: a subset spread over the ratings (default: all 3,708 snippets; 120 with "
                              "--synthetic)", optional(integer(10)), default_text="all")
    seed: int = option(0, "seed of the subset and of the synthetic images and sounds", integer(0))
    synthetic: bool = option(False, "a small synthetic data set instead of the real reviews", flag=True)
    quiet: bool = option(False, **_QUIET)


@dataclass
class MmsaSettings(Settings):
    """`featx manifest mmsa`: a featx manifest from MMSA's label.csv and Raw/ videos."""
    label_csv: str = option(None, "MMSA's label.csv", positional=True, path=True, required=True,
                            metavar="LABEL_CSV")
    out: str = option(None, "manifest to write: .csv, .jsonl or .parquet", path=True, required=True)
    raw: str = option(None, "folder holding <video_id>/<clip_id>.EXT", optional(text), path=True,
                      default_text="Raw beside LABEL_CSV")
    ext: str = option("mp4", "video file extension")
    label_column: str = option("label", "column giving `label`: label, or label_T / label_A / label_V")
    allow_missing: bool = option(False, "exit 0 when some videos are missing (they are still left out and listed)",
                                 flag=True)


@dataclass
class ModelsSettings(Settings):
    """`featx models`: the supported encoder families, or what featx would run for one model (its config only)."""
    model: str = option(None, "hub id or local folder: read its config only (no weights) and say what featx runs",
                        optional(text), positional=True, model=True, default_text="list the supported families")
    json: bool = option(False, "print JSON on stdout", flag=True)
    markdown: bool = option(False, "print the families as a Markdown table (README's \"Supported models\")",
                            flag=True)
    trust_remote_code: bool = option(False, "let transformers run Python code shipped with a hub checkpoint to read "
                                     "its config (command line only)", flag=True, cli_only=True)
