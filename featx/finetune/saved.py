"""A fine-tuned model saved for `featx predict`, self-contained: it needs nothing of the base models.

model/
  config.json       format, task, classes, target scaling, head settings, one entry per encoder
  head.safetensors  the fusion head's weights
  encoder-<i>/      the encoder truncated at its cut layer (save_pretrained: config.json with the kept number of
                    blocks, model.safetensors) with its tokenizer or processor; loaded back as the tower
                    (modality) it was trained as
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pandas as pd
import torch

from featx.encoders.base import quiet_libraries
from featx.encoders.registry import set_num_blocks
from featx.errors import FeatxError
from featx.finetune.checkpoints import load_tensors, save_tensors
from featx.finetune.data import DecodedItems, TargetCoding, batches, decode_items
from featx.runinfo import read_json, write_json
from featx.finetune.model import HeadSettings, build_model, kept_blocks, predict

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
        """DataFrame(id, prediction) for every item of the manifest; items that cannot be decoded are named on
        stderr and get a missing prediction."""
        from featx.data.manifest import read_manifest, source_column

        df = read_manifest(manifest)
        columns = [source_column(df, e.modality, os.path.basename(os.fspath(manifest))) for e in self.encoders]
        items = decode_items(df, self.encoders, columns, self.config["max_audio_seconds"], labelled=False,
                             what="predict")
        pred = self.predict(items.inputs, batch_size) if len(items.ids) else []
        out = pd.DataFrame({"id": df["id"].astype(str)})
        got = pd.Series(list(pred), index=list(items.ids), dtype=object)
        out["prediction"] = out["id"].map(got)
        if self.task == "regression":
            out["prediction"] = out["prediction"].astype(float)
        return out


def _read_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FeatxError(f"{path} is not a saved featx finetune model (no config.json)")
    config = read_json(cfg_path)
    if config.get("format") not in (FORMAT, FORMAT_V1):
        raise FeatxError(f"{cfg_path}: not a featx finetune model config")
    return config


def _load_v1(path, config, device):
    """The first format: the encoders load from the base models' paths, which must still exist."""
    from safetensors.torch import load_model

    from featx.encoders import load_encoder

    entries = config["encoders"]
    encoders = [load_encoder(e["model"], device=device, max_length=config["max_length"], modality=e.get("modality"))
                for e in entries]
    out_dim = len(config["classes"]) if config["task"] == "classification" else 1
    model = build_model(encoders, [e["layer"] for e in entries], [0] * len(entries), HeadSettings(**config["head"]),
                        out_dim).to(device)
    missing, unexpected = load_model(model, os.path.join(path, "model.safetensors"), strict=False, device=str(device))
    # The first format cut at `layer` blocks; a branch now keeps one frozen block above the cut (kept_blocks), whose
    # output never reaches hidden state `layer`: only its weights may be missing, and they stay the base model's.
    above = tuple(f"branches.{i}.encoder.{b.block_path}.{b.layer}." for i, b in enumerate(model.branches))
    if unexpected or any(not k.startswith(above) for k in missing):
        raise FeatxError(f"{path}: model.safetensors does not match its config.json (a damaged or edited model?)")
    return FinetunedModel(model.eval(), encoders, config, device)


def load_finetuned(path, device="cpu") -> FinetunedModel:
    """Load a model saved by `finetune` (the `model/` folder of its output) for prediction."""
    from featx.encoders import load_encoder

    path = os.fspath(path)
    config = _read_config(path)
    device = torch.device(device)
    if config["format"] == FORMAT_V1:
        return _load_v1(path, config, device)
    entries = config["encoders"]
    encoders = [load_encoder(os.path.join(path, e["folder"]), device=device, max_length=config["max_length"],
                             modality=e["modality"]) for e in entries]
    out_dim = len(config["classes"]) if config["task"] == "classification" else 1
    model = build_model(encoders, [e["layer"] for e in entries], [0] * len(entries), HeadSettings(**config["head"]),
                        out_dim).to(device)
    model.head.load_state_dict(load_tensors(os.path.join(path, HEAD_FILE)), strict=True)
    return FinetunedModel(model.eval(), encoders, config, device)
