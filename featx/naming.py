"""Names shown to users and used in file names: an encoder's short display name and the one slug rule.

A hub id is shown as given ("org/bert-base"); a local folder by its last component ("text"), or its last two
when the last one names no model ("minilm/model", "bert/checkpoint-500"), with parent folders added when two
encoders would otherwise share a name. The full path stays in meta.json and caches.
"""
from __future__ import annotations

import os
import re


def slug(text, sep="-", empty="x") -> str:
    """`text` made safe for a file name: runs of characters other than letters, digits, '.', '_', '-' become
    `sep`; leading and trailing separators go; `empty` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", sep, str(text)).strip("-") or empty


def model_slug(model) -> str:
    """The model part of a cache file name: a local folder's own name ("/m/bert/" -> "bert"), a hub id with
    "/" as "--" ("openai/clip" -> "openai--clip"); "model" when nothing is left."""
    name = str(model).rstrip("/\\")
    if os.path.isdir(name):
        name = os.path.basename(os.path.abspath(name))
    return slug(name, sep="--", empty="model")


def last_name(model) -> str:
    """The last component of a hub id or folder ("org/bert" -> "bert", "/m/bert/" -> "bert")."""
    return os.path.basename(str(model).rstrip("/\\"))


def is_local(model) -> bool:
    """Whether `model` names a local folder (absolute, relative with ./ ../ ~, or existing) rather than a hub id."""
    text = str(model)
    return (os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text
            or os.path.exists(text))


def resolve_model(model) -> str:
    """The identity a cache and a classifier record for a model: a local folder (one that exists, or a path that
    is_local calls one: absolute, or starting with ./ ../ ~) as its absolute, normalised path, so that the same
    folder typed two ways is one model and a relative path means the same folder from any working folder; a hub
    id as given."""
    text = str(model)
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded) or is_local(text):
        return os.path.abspath(expanded)
    return text


def same_model(recorded, now) -> bool:
    """Whether the model `recorded` in a cache is the model `now` (resolve_model's): equal, or the same folder
    once resolved. A relative folder recorded by a featx that stored what was typed is resolved against the
    current folder (where it was typed is not known)."""
    return str(recorded) == str(now) or resolve_model(recorded) == resolve_model(now)


def _parts(model):
    text = os.path.normpath(os.path.expanduser(str(model).rstrip("/\\")))
    return [p for p in re.split(r"[/\\]+", text) if p not in ("", ".")]


# Last components of a local model folder that say what it is, not which model: shown with their parent folder.
GENERIC_FOLDERS = re.compile(r"(model|models|checkpoint|checkpoints|ckpt|final|best|latest|last|output|outputs|"
                             r"weights|pretrained|hf|huggingface|export|saved_model|snapshot|main|"
                             r"(checkpoint|ckpt|epoch|step)[-_]?\d+|[0-9a-f]{40})", re.IGNORECASE)


def display_name(model, depth=1) -> str:
    """A short name for an encoder: the hub id as given, or the last `depth` components of a local folder (at
    least two when the last one is a GENERIC_FOLDERS name: ".../minilm_l6/model" -> "minilm_l6/model")."""
    text = str(model)
    if not is_local(text):
        return text
    parts = _parts(text)
    if len(parts) > 1 and GENERIC_FOLDERS.fullmatch(parts[-1]):
        depth = max(depth, 2)
    return "/".join(parts[-depth:]) if parts else text


def display_names(models, modalities=None) -> list:
    """Short names for `models` (same order), unique among them: colliding local folders get parent folders
    added until they differ; identical entries keep one name. modalities: each entry's modality (a cache's
    `modality` attribute), or None; a model given with several (CLIP's image and text towers) is named
    "clip (image)", "clip (text)"."""
    models = [str(m) for m in models]
    names = _unique_names(models)
    if modalities is None:
        return names
    towers = {}
    for m, modality in zip(models, modalities):
        towers.setdefault(m, set()).add(modality)
    return [with_modality(n, modality) if len(towers[m]) > 1 else n
            for n, m, modality in zip(names, models, modalities)]


def cache_names(models, modalities, paths) -> list:
    """Names for caches (same order): their encoders' display_names, and where two different cache files hold the
    same encoder (one model extracted twice: at two precisions, say), each followed by its file in brackets,
    shortened as folders are ("text [fp32/m__text.h5]"), so that their scores are never merged under one name."""
    names = display_names(models, modalities)
    out = list(names)
    for name in dict.fromkeys(names):
        same = [k for k, n in enumerate(names) if n == name]
        files = [os.path.abspath(os.fspath(paths[k])) for k in same]
        if len(set(files)) > 1:
            for k, short in zip(same, _unique_names(files)):
                out[k] = f"{name} [{short}]"
    return out


def _unique_names(models) -> list:
    distinct = list(dict.fromkeys(models))
    depth = {m: 1 for m in distinct}
    for _ in range(64):
        names = {m: display_name(m, depth[m]) for m in distinct}
        clash = [m for m in distinct if list(names.values()).count(names[m]) > 1]
        grow = [m for m in clash if is_local(m) and depth[m] < len(_parts(m))]
        if not grow:
            break
        for m in grow:
            depth[m] += 1
    names = {m: display_name(m, depth[m]) for m in distinct}
    seen = {}
    for m in distinct:  # still equal (e.g. a hub id equal to a folder's name): number them
        n = names[m]
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[m] = f"{n} ({seen[n]})"
    return [names[m] for m in models]


def with_modality(name, modality) -> str:
    """'clip (text)': `name` followed by its modality in brackets, unless it already ends so (a display name of
    one tower of a checkpoint with several, see display_names) or there is no modality."""
    if not modality or str(name).endswith(f" ({modality})"):
        return str(name)
    return f"{name} ({modality})"


def short_name(name) -> str:
    """A '+'-joined name of several encoders with each part shortened ('a/bert+/m/clip' -> 'a/bert+clip')."""
    return "+".join(display_name(part) for part in str(name).split("+"))
