"""Each concept a user sets (training sizes, seeds, layers, splits, poolings, device, precision) parsed and
validated in one place. The command line, recipes and the Python API all go through these functions, so a
value means the same thing wherever it is given. Every parser takes the raw value (a string from the command
line, a YAML scalar or list from a recipe, a Python value) and returns the typed value or raises FeatxError
with one line; parsing an already parsed value returns it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from featx.errors import FeatxError

POOLINGS = ("mean", "cls")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TASKS = ("auto", "regression", "classification")
SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "dev": "dev", "valid": "dev", "val": "dev",
                 "validation": "dev", "test": "test", "testing": "test"}


def csv_list(value) -> list:
    """A comma-separated string (command line) or a list (recipe) as a list of non-empty strings."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [t for t in (str(x).strip() for x in items) if t]


def choice(value, allowed, what) -> str:
    """`value` as a string that must be one of `allowed`."""
    v = str(value).strip()
    if v not in allowed:
        raise FeatxError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return v


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
    """An int n >= 1 means seeds 0..n-1; a list (or "3,7") names the seeds."""
    if isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value):
        try:
            seeds = [int(v) for v in csv_list(value)]
        except ValueError:
            raise FeatxError(f"seeds must be whole numbers, not {value!r}")
        if not seeds:
            raise FeatxError("give at least one seed")
        return list(dict.fromkeys(seeds))
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
