"""A fine-tuned model saved for `featx predict`, self-contained: it needs nothing of the base models.

model/
  config.json       format, task, classes, target scaling, head settings, one entry per encoder
  head.safetensors  the fusion head's weights
  encoder-<i>/      the encoder truncated at its cut layer (save_pretrained: config.json with the kept number of
                    blocks, model.safetensors) with its tokenizer or processor; loaded back as the tower
                    (modality) it was trained as

Loading checks every part before use: a missing, unreadable or mis-shaped file is one FeatxError line naming it.
Nothing loaded runs code (JSON and safetensors only).
"""
from __future__ import annotations

import copy
import os
from dataclasses import fields

import numpy as np
import pandas as pd
import torch

from featx.encoders.base import quiet_libraries
from featx.encoders.registry import set_num_blocks
from featx.errors import FeatxError, first_line
from featx.finetune.checkpoints import load_tensors, save_tensors
from featx.finetune.data import DecodedItems, TargetCoding, batches, decode_items
from featx.runinfo import read_json, write_json
from featx.finetune.model import HeadSettings, build_model, kept_blocks, predict, predict_outputs
from featx.settings import FinetuneSettings, integer, number, one_of, optional

FORMAT = "featx-finetune/2"
FORMAT_V1 = "featx-finetune/1"  # encoders named by their base model's path, all weights in model.safetensors
HEAD_FILE = "head.safetensors"


def _save_encoder(folder, branch):
    """The branch's encoder, truncated at its cut, with its tokenizer / processor, as a transformers folder."""
    adapter = branch.adapter
    with quiet_libraries():  # no 'Writing model shards' bar
        adapter.model.save_pretrained(folder, safe_serialization=True)
    config = copy.deepcopy(adapter.model.config)
    # the block list was truncated to this many (written where the family's config keeps its number of blocks)
    set_num_blocks(config, branch.family, kept_blocks(branch.layer, branch.num_layers))
    config.save_pretrained(folder)
    for attr in ("tokenizer", "processor"):
        if getattr(adapter, attr, None) is not None:
            getattr(adapter, attr).save_pretrained(folder)


def save_finetuned(path, model, coding: TargetCoding, settings, trained_on: dict):
    """Write the joint `model` to the folder `path` (layout in the module docstring). settings: its
    head_settings, max_length and max_audio_seconds are recorded; trained_on: what the saved run was."""
    os.makedirs(path, exist_ok=True)
    entries = []
    for i, branch in enumerate(model.branches):
        folder = f"encoder-{i}"
        _save_encoder(os.path.join(path, folder), branch)
        entries.append({"folder": folder, "base_model": branch.adapter.name, "modality": branch.modality,
                        "layer": branch.layer, "num_layers": branch.num_layers})
    save_tensors(os.path.join(path, HEAD_FILE), model.head.state_dict())
    config = {"format": FORMAT, "task": coding.task,
              "classes": None if coding.classes is None else [str(c) for c in coding.classes],
              "target_mean": coding.mean, "target_std": coding.std, "encoders": entries,
              "head": vars(settings.head_settings), "max_length": settings.max_length,
              "max_audio_seconds": settings.max_audio_seconds, "trained_on": trained_on}
    write_json(os.path.join(path, "config.json"), config)


class FinetunedModel:
    """A saved joint fine-tuned model. predict(inputs_per_encoder) -> (N,); predict_manifest(path) -> DataFrame."""

    def __init__(self, model, encoders, config, device):
        self.model, self.encoders, self.config, self.device = model, encoders, config, device
        self.task = config["task"]
        self.classes_ = config["classes"]
        self.coding = TargetCoding(self.task, None if self.classes_ is None else tuple(self.classes_),
                                   config["target_mean"], config["target_std"])

    def predict(self, inputs, batch_size=16) -> np.ndarray:
        """inputs: one list of decoded inputs per encoder (each of length N). Returns (N,) labels or values."""
        items = DecodedItems(np.arange(len(inputs[0])), None, None, inputs)
        idx = np.arange(len(inputs[0]))
        return predict(self.model, batches(self.encoders, items, idx, batch_size), self.coding, self.device, "fp32")

    def predict_manifest(self, manifest, batch_size=16) -> pd.DataFrame:
        """DataFrame(id, prediction, [p_<class> per class,] error) for every item of the manifest (featx.predict's
        columns): items that cannot be decoded are named on stderr and get a missing prediction and their reason
        in `error`; a classifier's class probabilities are the softmax of its outputs."""
        from featx.data.manifest import read_manifest, source_column
        from featx.probing.classifier import prediction_table

        df = read_manifest(manifest)
        columns = [source_column(df, e.modality, os.path.basename(os.fspath(manifest))) for e in self.encoders]
        items = decode_items(df, self.encoders, columns, self.config["max_audio_seconds"], labelled=False,
                             what="predict")
        out = self.outputs(items.inputs, batch_size) if len(items.ids) else None
        pred = self.coding.decode(out) if out is not None else []
        classes = self.classes_ if self.task == "classification" else None
        proba = self.coding.probabilities(out) if classes is not None and out is not None else None
        table = prediction_table(df["id"].astype(str), [str(i) for i in items.ids], pred, classes, proba,
                                 items.failed)
        if self.task == "regression":
            table["prediction"] = table["prediction"].astype(float)
        return table

    def outputs(self, inputs, batch_size=16):
        """(N, C) float32 outputs (logits for classes, standardised values for regression) of decoded inputs."""
        items = DecodedItems(np.arange(len(inputs[0])), None, None, inputs)
        idx = np.arange(len(inputs[0]))
        return predict_outputs(self.model, batches(self.encoders, items, idx, batch_size), self.device, "fp32")


def _read_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FeatxError(f"{path} is not a saved featx finetune model (no config.json)")
    try:
        config = read_json(cfg_path)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise FeatxError(f"{cfg_path}: not a readable JSON file ({first_line(e)})")
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, FORMAT_V1):
        raise FeatxError(f"{cfg_path}: not a featx finetune model config")
    _check_config(config, cfg_path)
    return config


# What config.json holds, each value checked by featx.settings' parsers (the head's by featx finetune's options).
_FINETUNE_OPTIONS = {f.name: f.metadata["parse"] for f in fields(FinetuneSettings)}
_CONFIG_VALUES = {"task": one_of("task", "regression", "classification"), "target_mean": number(),
                  "target_std": number(positive=True), "max_length": _FINETUNE_OPTIONS["max_length"],
                  "max_audio_seconds": optional(_FINETUNE_OPTIONS["max_audio_seconds"])}
_ENTRY_VALUES = {"layer": integer(0), "num_layers": integer(1)}
_HEAD_OPTIONS = {"pooling": "pool"}  # HeadSettings field -> featx finetune option, where the names differ


def _check_config(config, where):
    """Every value load_finetuned uses, parsed in place (FeatxError naming `where` and the key otherwise)."""
    def bad(msg):
        raise FeatxError(f"{where}: damaged model config: {msg}")

    def parse(holder, key, parser, label):
        try:
            holder[key] = parser(holder.get(key))
        except FeatxError as e:
            bad(f"{label} is missing" if key not in holder else f"{label}: {e}")

    for key, parser in _CONFIG_VALUES.items():
        parse(config, key, parser, key)
    classes = config.setdefault("classes", None)
    if config["task"] == "classification" and not (isinstance(classes, list) and len(classes) >= 2
                                                   and all(isinstance(c, str) for c in classes)):
        bad("classes must be a list of two or more names")
    if config["task"] == "regression" and classes is not None:
        bad("a regression model has no classes")
    entries = config.get("encoders")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        bad("encoders must be a list of one or more entries")
    source = "folder" if config["format"] == FORMAT else "model"
    for i, entry in enumerate(entries):
        for key, parser in _ENTRY_VALUES.items():
            parse(entry, key, parser, f"encoders[{i}].{key}")
        if entry["layer"] >= entry["num_layers"]:
            bad(f"encoders[{i}].layer {entry['layer']} is not below its num_layers {entry['num_layers']}")
        name = entry.get(source)
        # a v2 encoder is a folder inside the model folder: a plain name, never a path out of it
        if not isinstance(name, str) or not name or (
                source == "folder" and (name in (".", "..") or os.path.basename(name) != name)):
            bad(f"encoders[{i}].{source} {name!r} is not " +
                ("a folder name inside the model folder" if source == "folder" else "a model path"))
        if not isinstance(entry.get("modality"), (str, type(None))):
            bad(f"encoders[{i}].modality {entry.get('modality')!r}")
    head = config.get("head")
    names = [f.name for f in fields(HeadSettings)]
    if not isinstance(head, dict) or set(head) - set(names):
        bad(f"head must hold only {', '.join(names)}")
    for key in names:
        if key in head:
            option = _HEAD_OPTIONS.get(key, key)
            parse(head, key, _FINETUNE_OPTIONS[option], f"head.{key}")


def _check_layers(encoders, entries, where):
    """Each entry's cut layer is one of its saved encoder's hidden states (EncoderBranch's range)."""
    for i, (encoder, entry) in enumerate(zip(encoders, entries)):
        if entry["layer"] >= encoder.num_layers:
            raise FeatxError(f"{where}: damaged model config: encoders[{i}].layer {entry['layer']} is beyond its "
                             f"saved encoder's hidden states 0..{encoder.num_layers - 1}")


def _load_encoders(path, entries, config, device):
    """The saved encoder folders (format 2), each checked to be there before transformers reads it."""
    from featx.encoders import load_encoder

    encoders = []
    for entry in entries:
        folder = os.path.join(path, entry["folder"])
        if not os.path.isdir(folder):
            raise FeatxError(f"{folder}: the saved encoder folder is missing (a damaged model folder?)")
        encoders.append(load_encoder(folder, device=device, max_length=config["max_length"],
                                     modality=entry.get("modality")))
    return encoders


def _read_weights(path, what):
    """name -> tensor of the safetensors file `path`; one line when it is missing or unreadable."""
    from safetensors import SafetensorError

    if not os.path.isfile(path):
        raise FeatxError(f"{path}: {what} file is missing (a damaged model folder?)")
    try:
        return load_tensors(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FeatxError(f"{path}: not a readable safetensors file ({first_line(e)})")


def _names(keys):
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _load_head(head, path):
    """Copy head.safetensors into `head`: exactly its tensors, each of its shape and finite."""
    file = os.path.join(path, HEAD_FILE)
    tensors = _read_weights(file, "the fusion head's weights")
    want = head.state_dict()
    missing, extra = set(want) - set(tensors), set(tensors) - set(want)
    if missing or extra:
        parts = ([f"missing tensors {_names(missing)}"] if missing else []) + \
                ([f"extra tensors {_names(extra)}"] if extra else [])
        raise FeatxError(f"{file}: does not match the head config.json describes ({'; '.join(parts)})")
    for name, t in want.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(t.shape):
            raise FeatxError(f"{file}: tensor {name} has shape {tuple(got.shape)} where the head config.json "
                             f"describes has {tuple(t.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise FeatxError(f"{file}: tensor {name} holds non-finite values")
    head.load_state_dict(tensors, strict=True)


def _load_v1(path, config, device):
    """The first format: the encoders load from the base models' paths, which must still exist."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from featx.encoders import load_encoder

    entries = config["encoders"]
    encoders = [load_encoder(e["model"], device=device, max_length=config["max_length"], modality=e.get("modality"))
                for e in entries]
    _check_layers(encoders, entries, os.path.join(path, "config.json"))
    out_dim = len(config["classes"]) if config["task"] == "classification" else 1
    model = build_model(encoders, [e["layer"] for e in entries], [0] * len(entries), HeadSettings(**config["head"]),
                        out_dim).to(device)
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise FeatxError(f"{file}: the model's weights file is missing (a damaged model folder?)")
    try:
        missing, unexpected = load_model(model, file, strict=False, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise FeatxError(f"{file}: not a readable safetensors file ({first_line(e)})")
    except RuntimeError as e:  # a tensor of another shape
        raise FeatxError(f"{file}: does not match its config.json ({first_line(e)})")
    # The first format cut at `layer` blocks; a branch now keeps one frozen block above the cut (kept_blocks), whose
    # output never reaches hidden state `layer`: only its weights may be missing, and they stay the base model's.
    above = tuple(f"branches.{i}.encoder.{b.block_path}.{b.layer}." for i, b in enumerate(model.branches))
    if unexpected or any(not k.startswith(above) for k in missing):
        raise FeatxError(f"{path}: model.safetensors does not match its config.json (a damaged or edited model?)")
    return FinetunedModel(model.eval(), encoders, config, device)


def load_finetuned(path, device="cpu") -> FinetunedModel:
    """Load a model saved by `finetune` (the `model/` folder of its output) for prediction. A damaged folder
    (missing, unreadable or mis-shaped file) is a one-line FeatxError naming the file."""
    path = os.fspath(path)
    config = _read_config(path)
    device = torch.device(device)
    if config["format"] == FORMAT_V1:
        return _load_v1(path, config, device)
    entries = config["encoders"]
    encoders = _load_encoders(path, entries, config, device)
    _check_layers(encoders, entries, os.path.join(path, "config.json"))
    out_dim = len(config["classes"]) if config["task"] == "classification" else 1
    model = build_model(encoders, [e["layer"] for e in entries], [0] * len(entries), HeadSettings(**config["head"]),
                        out_dim).to(device)
    _load_head(model.head, path)
    return FinetunedModel(model.eval(), encoders, config, device)
