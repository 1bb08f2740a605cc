"""Joint fine-tuning of two or three encoders with a small fusion head (Toledo & Marcacini, LXAI @ ICML 2022).

Each branch is a featx encoder (any family `featx extract` supports) cut at a chosen layer: its block list is
truncated so the model stops at hidden state `layer` (0 = embeddings output, L-1 = last), and that hidden
state is what the head sees, the same tensor `featx extract` caches. Blocks per family: BERT-like
`encoder.layer`, CLIP vision `vision_model.encoder.layers`, WavLM / wav2vec2 `encoder.layers`, DistilBERT
`transformer.layer`. `train_blocks=k` trains the top k kept blocks only (embeddings and lower blocks frozen
and run in eval mode); -1 trains everything, 0 freezes the encoder. The conv feature encoder of speech
models is always frozen.

Heads:
- "concat" (the paper): per modality pooled hidden state -> Linear(D, 32) + ReLU; the M projections as M
  tokens through one transformer encoder layer; flattened -> MLP.
- "gated": featx.probing.fusion's gated model (Ando et al.) over the cut layer's sequences: Linear + LayerNorm +
  ReLU + dropout, masked self-attentive pooling, gated fusion, MLP.

Protocol (shared with `featx probe`, featx.probing.splits.make_folds): with train and test splits in the manifest,
train on train, select on dev (held out of train when there is none); otherwise stratified K-fold CV with a
dev part held out of each training fold, test predictions pooled into split "cv". Early stopping and model
selection use dev only, never the test part. Results go to the same tidy table as `featx probe`
(method "finetune"). Each epoch writes a checkpoint (safetensors + JSON, no pickle) that `resume=True`
continues from, reaching the same weights as an uninterrupted run (same seed, same device).

Decoded inputs are held in memory (low-resource datasets: hundreds to a few thousand items). A video gives
its middle frame to an image encoder; audio longer than `max_audio_seconds` is cut to its first
`max_audio_seconds`.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from featx import metrics
from featx.device import autocast, resolve_device, resolve_precision
from featx.errors import FeatxError, MediaError, first_line
from featx.probing.fusion import gated_model, loss_function
from featx.probing.results import FoldScores, best_layer, load_results, meta_head, write_results
from featx.probing.splits import make_folds, subsample

__all__ = ["finetune", "FinetuneResult", "JointModel", "load_finetuned", "FinetunedModel", "HEADS", "BLOCK_PATHS"]

HEADS = ("concat", "gated")
# Where each family keeps its transformer blocks, tried in this order.
BLOCK_PATHS = ("vision_model.encoder.layers", "encoder.layer", "encoder.layers", "transformer.layer")
# Modules whose output never reaches the hidden states (always frozen: they would get no gradient).
_UNUSED = ("pooler", "post_layernorm")
_ENV_KEYS = ("models", "layers", "train_blocks", "head", "task", "pooling", "proj_size", "hidden_size", "heads",
             "dropout", "lr", "head_lr", "weight_decay", "lr_decay", "epochs", "patience", "batch_size",
             "accumulate", "clip_grad", "loss", "folds", "train_sizes", "seeds", "max_length", "max_audio_seconds")


# ------------------------------------------------------------------------------------------ model
def _blocks(model):
    """(parent module, attribute name) of the model's list of transformer blocks."""
    for path in BLOCK_PATHS:
        obj, parts = model, path.split(".")
        for p in parts[:-1]:
            obj = getattr(obj, p, None)
        if obj is not None and isinstance(getattr(obj, parts[-1], None), nn.ModuleList):
            return obj, parts[-1]
    raise FeatxError(f"cannot fine-tune {type(model).__name__}: featx finds no block list "
                     f"(looked for {', '.join(BLOCK_PATHS)})")


class EncoderBranch(nn.Module):
    """One encoder cut at hidden state `layer`, with all but its top `train_blocks` kept blocks frozen.

    forward(inputs) -> (hidden_states[layer] (B, T, D), mask (B, T) bool). The block list is truncated to
    max(layer, 1) blocks (a model with no blocks returns no hidden states), so nothing above the cut runs.
    """

    def __init__(self, adapter, layer, train_blocks=-1):
        super().__init__()
        L = adapter.num_layers
        layer = int(layer)
        layer = layer + L if layer < 0 else layer
        if not 0 <= layer < L:
            raise FeatxError(f"{adapter.name}: layer {layer} out of range 0..{L - 1}")
        self.adapter, self.layer, self.num_layers = adapter, layer, L
        self.modality, self.hidden_size = adapter.modality, adapter.hidden_size
        self.encoder = adapter.model
        parent, attr = _blocks(self.encoder)
        setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[:max(layer, 1)]))
        used = list(getattr(parent, attr))[:layer]
        k = len(used) if int(train_blocks) < 0 else min(int(train_blocks), len(used))
        self.train_all = int(train_blocks) < 0
        self.encoder.requires_grad_(self.train_all)
        self.trainable_blocks = used[len(used) - k:] if k else []
        for block in self.trainable_blocks:
            block.requires_grad_(True)
        if layer == 0:  # the one block kept for the forward is above the cut
            getattr(parent, attr)[0].requires_grad_(False)
        for name in _UNUSED:
            for holder in (self.encoder, getattr(self.encoder, "vision_model", None)):
                if holder is not None and isinstance(getattr(holder, name, None), nn.Module):
                    getattr(holder, name).requires_grad_(False)
        if hasattr(self.encoder, "freeze_feature_encoder"):  # speech: the conv feature encoder stays as trained
            self.encoder.freeze_feature_encoder()

    def train(self, mode=True):
        super().train(mode)
        if mode and not self.train_all:  # frozen parts behave as the feature extractor did: no dropout
            self.encoder.eval()
            for block in self.trainable_blocks:
                block.train(True)
        return self

    def forward(self, inputs):
        hidden_states, mask = self.adapter.forward(inputs)
        return hidden_states[self.layer], mask


class ConcatHead(nn.Module):
    """Toledo & Marcacini's head: per modality Linear(D_m, proj) + ReLU on the pooled hidden state; the M
    projections as M tokens through one transformer encoder layer; flattened -> Linear + ReLU + dropout ->
    Linear(out_dim). forward(seqs, masks) -> (B, out_dim)."""

    def __init__(self, dims, out_dim, proj_size=32, hidden_size=128, heads=4, dropout=0.1, pooling="mean"):
        super().__init__()
        self.pooling = pooling
        self.proj = nn.ModuleList([nn.Sequential(nn.Linear(d, proj_size), nn.ReLU()) for d in dims])
        nhead = heads if proj_size % heads == 0 else 1
        self.mix = nn.TransformerEncoderLayer(proj_size, nhead, dim_feedforward=4 * proj_size, dropout=dropout,
                                              batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(proj_size * len(dims), hidden_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_size, out_dim))

    def forward(self, seqs, masks):
        from featx.encoders.pooling import pool

        tokens = torch.stack([p(pool([h], m, [self.pooling])[self.pooling][:, 0])
                              for p, h, m in zip(self.proj, seqs, masks)], dim=1)
        return self.mlp(self.mix(tokens).flatten(1))


class GatedHead(nn.Module):
    """Ando et al.'s gated fusion over the cut layer's sequences, reusing featx.probing.fusion's model with a single
    layer per modality (its layer-weighted sum over one layer is the identity). forward(seqs, masks) -> (B, out)."""

    def __init__(self, dims, out_dim, hidden_size=128, heads=4, dropout=0.1):
        super().__init__()

        self.model = gated_model(list(dims), [1] * len(dims), hidden_size, heads, dropout, out_dim)

    def forward(self, seqs, masks):
        args = []
        for h, m in zip(seqs, masks):
            args += [h.float().unsqueeze(2), m]
        return self.model(*args)


class JointModel(nn.Module):
    """Branches (EncoderBranch) + a fusion head. forward(inputs: one prepared dict per branch) -> (B, out_dim)."""

    def __init__(self, branches, head):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.head = head

    def forward(self, inputs):
        seqs, masks = zip(*[b(x) for b, x in zip(self.branches, inputs)])
        return self.head(list(seqs), list(masks)).float()

    def trainable_state(self) -> dict:
        """name -> tensor of every trainable parameter (what a checkpoint holds)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def _make_head(kind, dims, out_dim, cfg):
    if kind == "concat":
        return ConcatHead(dims, out_dim, cfg["proj_size"], cfg["hidden_size"], cfg["heads"], cfg["dropout"],
                          cfg["pooling"])
    if kind == "gated":
        return GatedHead(dims, out_dim, cfg["hidden_size"], cfg["heads"], cfg["dropout"])
    raise FeatxError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")


def _build(encoders, layers, train_blocks, head, out_dim, cfg):
    branches = [EncoderBranch(a, l, k) for a, l, k in zip(encoders, layers, train_blocks)]
    return JointModel(branches, _make_head(head, [b.hidden_size for b in branches], out_dim, cfg))


# ------------------------------------------------------------------------------------------ data
@dataclass
class _Items:
    """The labelled items every encoder could decode, in manifest order."""
    ids: np.ndarray
    y: np.ndarray
    splits: object  # (N,) lower-case str or None
    raws: list  # one list of decoded inputs per encoder, aligned with ids


def _unit(encoder, units, max_audio_seconds):
    """One decoded input per item: the middle frame of a video, the first max_audio_seconds of audio."""
    if encoder.modality == "audio":
        wav = units[0] if len(units) == 1 else np.concatenate(units)
        limit = int(max_audio_seconds * encoder.sample_rate) if max_audio_seconds else 0
        wav = wav[:limit] if limit else wav
        if encoder.num_frames(wav.shape[0]) < 1:
            raise MediaError("audio too short for the model (no frames)")
        return wav
    return units[len(units) // 2]


def _decode(df, encoders, columns, max_audio_seconds, fps=3.0, labelled=True, what="finetune"):
    """Decode every item for every encoder; items that fail or have no label are skipped, each named."""
    from featx.extraction.pipeline import Decoder
    from featx.data.manifest import labels_and_splits

    decoders = [Decoder(e.modality, c, getattr(e, "sample_rate", None), None, fps) for e, c in zip(encoders, columns)]
    labels, splits, _ = labels_and_splits(df)
    if labelled and labels is None:
        raise FeatxError("the manifest has no 'label' column to fine-tune on")
    keep, raws, failed, unlabelled = [], [[] for _ in encoders], [], 0
    for i, row in enumerate(df.to_dict("records")):
        if labelled:
            lab = labels[i]
            if (isinstance(lab, float) and math.isnan(lab)) or (isinstance(lab, str) and not lab):
                unlabelled += 1
                continue
        try:
            got = [_unit(e, d(row), max_audio_seconds) for e, d in zip(encoders, decoders)]
        except MediaError as e:
            failed.append((row["id"], str(e)))
            continue
        except Exception as e:  # an odd file must fail the item, not the run
            failed.append((row["id"], f"{type(e).__name__}: {first_line(e)}"))
            continue
        keep.append(i)
        for r, g in zip(raws, got):
            r.append(g)
    for item, why in failed[:20]:
        print(f"featx {what}: skipping {item}: {why}", file=sys.stderr)
    if len(failed) > 20:
        print(f"featx {what}: ... and {len(failed) - 20} more items skipped", file=sys.stderr)
    if unlabelled:
        print(f"featx {what}: {unlabelled} item(s) have no label and are not used", file=sys.stderr)
    if failed:
        print(f"featx {what}: {len(failed)} item(s) skipped (could not be decoded), {len(keep)} used",
              file=sys.stderr)
    keep = np.asarray(keep, dtype=np.int64)
    y = None if labels is None else labels[keep]
    split = None if splits is None else np.asarray([str(s).strip().lower() for s in splits[keep]], dtype=object)
    return _Items(df["id"].to_numpy(dtype=object)[keep], y, split, raws)


def _batch(encoders, items, idx):
    return [e.prepare([r[i] for i in idx]) for e, r in zip(encoders, items.raws)]


# ------------------------------------------------------------------------------------------ checkpoints
def _rng_state(device):
    tensors = {"rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    py_state = random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *map(lambda v: v if not isinstance(v, np.generic)
                                                                        else v.item(), np_state[2:])],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def _set_rng_state(tensors, state, device):
    torch.set_rng_state(tensors["rng/torch"])
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _save_tensors(path, tensors, metadata=None):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _load_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def _load_trainable(model, tensors):
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != want:
        raise FeatxError("the checkpoint does not match this model (trainable parameters differ); "
                         "was it written with other settings?")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def _save_checkpoint(run_dir, epoch, model, optimizer, scaler, state, device):
    """run_dir/epoch-E/{state.safetensors, state.json}, then run_dir/latest.json names it (atomic)."""
    d = os.path.join(run_dir, f"epoch-{epoch}")
    os.makedirs(d, exist_ok=True)
    tensors = {f"model/{k}": v for k, v in model.trainable_state().items()}
    opt = optimizer.state_dict()
    opt_scalars = {}
    for i, s in opt["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim/{i}/{k}"] = v
            else:
                opt_scalars.setdefault(str(i), {})[k] = v
    rng_tensors, rng_json = _rng_state(device)
    tensors.update(rng_tensors)
    _save_tensors(os.path.join(d, "state.safetensors"), tensors)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    _atomic_json(os.path.join(d, "state.json"), {**state, "epoch": epoch, "param_groups": groups,
                                                 "optim_scalars": opt_scalars, "rng": rng_json,
                                                 "scaler": scaler.state_dict() if scaler.is_enabled() else None})
    _atomic_json(os.path.join(run_dir, "latest.json"), {"epoch": epoch, "dir": f"epoch-{epoch}"})
    for name in os.listdir(run_dir):  # older checkpoints
        if name.startswith("epoch-") and name != f"epoch-{epoch}":
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def _load_checkpoint(run_dir, model, optimizer, scaler, device):
    """The state dict saved with the latest checkpoint (model, optimizer, scaler and RNGs restored), or None."""
    latest = os.path.join(run_dir, "latest.json")
    if not os.path.exists(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        d = os.path.join(run_dir, json.load(f)["dir"])
    tensors = _load_tensors(os.path.join(d, "state.safetensors"))
    with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    _load_trainable(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, i, name = k.split("/", 2)
            opt_state.setdefault(int(i), {})[name] = v
    for i, s in state["optim_scalars"].items():
        opt_state.setdefault(int(i), {}).update(s)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(tensors, state["rng"], device)
    return state


# ------------------------------------------------------------------------------------------ training
def _targets(task, y, classes, stats):
    if task == "classification":
        lookup = {c: i for i, c in enumerate(classes)}
        return torch.tensor([lookup[v] for v in y], dtype=torch.long)
    return torch.tensor((np.asarray(y, np.float64) - stats[0]) / stats[1], dtype=torch.float32)


def _decode_outputs(task, out, classes, stats):
    out = out.float().cpu().numpy()
    if task == "classification":
        return np.asarray(classes, dtype=object)[out.argmax(1)]
    return out[:, 0].astype(np.float64) * stats[1] + stats[0]


@torch.no_grad()
def _predict(model, encoders, items, idx, batch_size, device, precision, task, classes, stats):
    model.eval()
    outs = []
    for s in range(0, len(idx), batch_size):
        with autocast(device, precision):
            outs.append(model(_batch(encoders, items, idx[s:s + batch_size])).float())
    if not outs:
        return np.asarray([], dtype=object if task == "classification" else np.float64)
    return _decode_outputs(task, torch.cat(outs), classes, stats)


def _score(task, y_true, y_pred):
    return metrics.compute(task, y_true, y_pred)


@dataclass
class _Run:
    """One training run: one (unit, train size, seed)."""
    tag: str
    unit: int
    size: float
    seed: int
    fit: np.ndarray
    dev: np.ndarray
    test: np.ndarray


def _train_run(run, items, cfg, encoders_fn, task, classes, run_dir, device, precision, progress, resume,
               save_to=None):
    """Train one run (resuming from its checkpoint when asked); returns its done.json dict."""
    from featx.progress import progress_bar

    done_path = os.path.join(run_dir, "done.json")
    if resume and os.path.exists(done_path):
        with open(done_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(run.seed)
    np.random.seed(run.seed)
    random.seed(run.seed)
    encoders = encoders_fn()
    y = items.y
    stats = (0.0, 1.0)
    if task == "regression":
        yf = np.asarray(y[run.fit], np.float64)
        stats = (float(yf.mean()), float(yf.std()) or 1.0)
    out_dim = len(classes) if task == "classification" else 1
    model = _build(encoders, cfg["layers"], cfg["train_blocks"], cfg["head"], out_dim, cfg).to(device)
    head_ids = {id(p) for p in model.head.parameters()}
    enc_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": list(model.head.parameters()), "lr": cfg["head_lr"]}]
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg["lr"]})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    primary = metrics.PRIMARY[task]
    sign = 1.0 if metrics.higher_is_better(primary) else -1.0
    loss_fn = loss_function(task, cfg["loss"])
    targets = _targets(task, y, classes, stats)
    best_path = os.path.join(run_dir, "best.safetensors")

    state = {"best": None, "best_epoch": -1, "bad_epochs": 0, "stopped": False, "history": []}
    start = 0
    if resume:
        loaded = _load_checkpoint(run_dir, model, optimizer, scaler, device)
        if loaded is not None:
            state = {k: loaded[k] for k in state}
            start = loaded["epoch"] + 1
    bs, accumulate = cfg["batch_size"], cfg["accumulate"]
    for epoch in range(start, cfg["epochs"]):
        if state["stopped"]:
            break
        for g, base in zip(optimizer.param_groups, base_lrs):  # exponential decay per epoch
            g["lr"] = base * cfg["lr_decay"] ** epoch
        order = run.fit[np.random.default_rng([run.seed, epoch]).permutation(len(run.fit))]
        batches = [order[s:s + bs] for s in range(0, len(order), bs)]
        model.train()
        bar = progress_bar(len(batches), f"{run.tag} epoch {epoch + 1}/{cfg['epochs']}", "batch", enabled=progress)
        total, count = 0.0, 0
        for g0 in range(0, len(batches), accumulate):
            group = batches[g0:g0 + accumulate]
            n_group = sum(len(b) for b in group)
            optimizer.zero_grad(set_to_none=True)
            for b in group:
                with autocast(device, precision):
                    out = model(_batch(encoders, items, b))
                t = targets[b].to(device)
                loss = loss_fn(out.float(), t)
                scaler.scale(loss * (len(b) / n_group)).backward()
                total += float(loss.detach()) * len(b)
                count += len(b)
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}")
            if cfg["clip_grad"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
        dev_pred = _predict(model, encoders, items, run.dev, bs, device, precision, task, classes, stats)
        dev_value = float(_score(task, y[run.dev], dev_pred)[primary])
        bar.set_postfix(loss=f"{total / count:.4f}", **{f"dev_{primary}": f"{dev_value:.4f}"})
        bar.close()
        state["history"].append({"epoch": epoch, "train_loss": total / count, f"dev_{primary}": dev_value,
                                 "lr": optimizer.param_groups[-1]["lr"]})
        if state["best"] is None or (np.isfinite(dev_value) and sign * dev_value > sign * state["best"]):
            state.update(best=dev_value, best_epoch=epoch, bad_epochs=0)
            _save_tensors(best_path, model.trainable_state())
        else:
            state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= cfg["patience"]
        _save_checkpoint(run_dir, epoch, model, optimizer, scaler, state, device)

    # The model of the best dev epoch, scored on dev and test.
    _load_trainable(model, _load_tensors(best_path))
    dev_pred = _predict(model, encoders, items, run.dev, bs, device, precision, task, classes, stats)
    test_pred = _predict(model, encoders, items, run.test, bs, device, precision, task, classes, stats)
    done = {"tag": run.tag, "unit": run.unit, "size": run.size, "seed": run.seed, "best_epoch": state["best_epoch"],
            "history": state["history"], "train_items": len(run.fit),
            "dev": {"ids": items.ids[run.dev].tolist(), "true": y[run.dev].tolist(), "pred": dev_pred.tolist()},
            "test": {"ids": items.ids[run.test].tolist(), "true": y[run.test].tolist(), "pred": test_pred.tolist()}}
    if save_to:
        _save_model(save_to, model, cfg, task, classes, stats, [b.adapter for b in model.branches], run)
    _atomic_json(done_path, done)
    for name in os.listdir(run_dir):  # the run is done: its checkpoints are no longer needed
        if name.startswith("epoch-") or name in ("best.safetensors", "latest.json"):
            p = os.path.join(run_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return done


# ------------------------------------------------------------------------------------------ saved model
def _model_ref(name):
    return os.path.abspath(name) if os.path.isdir(str(name)) else str(name)


def _save_model(path, model, cfg, task, classes, stats, encoders, run):
    """`path/model.safetensors` (every weight of the cut encoders and the head) + `path/config.json`."""
    from safetensors.torch import save_model

    os.makedirs(path, exist_ok=True)
    config = {"format": "featx-finetune/1", "task": task,
              "classes": None if classes is None else [str(c) for c in classes],
              "target_mean": stats[0], "target_std": stats[1],
              "encoders": [{"model": _model_ref(e.name), "modality": e.modality, "layer": b.layer,
                            "num_layers": b.num_layers} for e, b in zip(encoders, model.branches)],
              "head": {k: cfg[k] for k in ("head", "pooling", "proj_size", "hidden_size", "heads", "dropout")},
              "max_length": cfg["max_length"], "max_audio_seconds": cfg["max_audio_seconds"],
              "trained_on": {"train_items": len(run.fit), "seed": run.seed, "train_size": run.size, "unit": run.unit}}
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_model(model, tmp)
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    _atomic_json(os.path.join(path, "config.json"), config)


class FinetunedModel:
    """A saved joint fine-tuned model. predict(raws_per_encoder) -> (N,); predict_manifest(path) -> DataFrame."""

    def __init__(self, model, encoders, config, device):
        self.model, self.encoders, self.config, self.device = model, encoders, config, device
        self.task = config["task"]
        self.classes_ = config["classes"]
        self.stats = (config["target_mean"], config["target_std"])

    def predict(self, raws, batch_size=16):
        """raws: one list of decoded inputs per encoder (same length N). Returns (N,) labels or scores."""
        items = _Items(np.arange(len(raws[0])), None, None, raws)
        idx = np.arange(len(raws[0]))
        return _predict(self.model, self.encoders, items, idx, batch_size, self.device, "fp32", self.task,
                        self.classes_, self.stats)

    def predict_manifest(self, manifest, batch_size=16) -> pd.DataFrame:
        """DataFrame(id, prediction) for every item of the manifest; items that cannot be decoded are named on
        stderr and get a missing prediction."""
        from featx.data.manifest import read_manifest, source_column

        df = read_manifest(manifest)
        columns = [source_column(df, e.modality, os.path.basename(os.fspath(manifest))) for e in self.encoders]
        items = _decode(df, self.encoders, columns, self.config["max_audio_seconds"], labelled=False,
                        what="predict")
        pred = self.predict(items.raws, batch_size) if len(items.ids) else []
        out = pd.DataFrame({"id": df["id"].astype(str)})
        got = pd.Series(list(pred), index=list(items.ids), dtype=object)
        out["prediction"] = out["id"].map(got)
        if self.task == "regression":
            out["prediction"] = out["prediction"].astype(float)
        return out


def load_finetuned(path, device="cpu") -> FinetunedModel:
    """Load a model saved by `finetune` (the `model/` folder of its output) for prediction."""
    from safetensors.torch import load_model

    from featx.encoders import load_encoder

    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.exists(cfg_path):
        raise FeatxError(f"{path} is not a saved featx finetune model (no config.json)")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != "featx-finetune/1":
        raise FeatxError(f"{cfg_path}: not a featx finetune model config")
    device = torch.device(device)
    encoders = [load_encoder(e["model"], device=device, max_length=config["max_length"])
                for e in config["encoders"]]
    h = config["head"]
    out_dim = len(config["classes"]) if config["task"] == "classification" else 1
    model = _build(encoders, [e["layer"] for e in config["encoders"]], [0] * len(encoders), h["head"], out_dim,
                   h).to(device)
    load_model(model, os.path.join(os.fspath(path), "model.safetensors"), strict=True, device=str(device))
    return FinetunedModel(model.eval(), encoders, config, device)


# ------------------------------------------------------------------------------------------ the sweep
@dataclass
class FinetuneResult:
    """What `finetune` wrote: the tidy rows, the saved model folder (or None), per-run training histories."""
    rows: pd.DataFrame
    out: str
    model_path: object = None
    runs: list = field(default_factory=list)  # done.json dicts


def _resolve_layers(layers, encoders, probe_results, task):
    """Cut layer per encoder: int (negative counts from the last), "last", or "best" (from probe results)."""
    layers = list(layers) if layers is not None else ["last"] * len(encoders)
    if len(layers) == 1 and len(encoders) > 1:
        layers = layers * len(encoders)
    if len(layers) != len(encoders):
        raise FeatxError(f"give one layer per model ({len(encoders)}), got {len(layers)}")
    out = []
    for e, v in zip(encoders, layers):
        v = str(v).strip().lower()
        if v == "last":
            out.append(e.num_layers - 1)
        elif v == "best":
            out.append(_best_layer(e, probe_results, task))
        else:
            try:
                k = int(v)
            except ValueError:
                raise FeatxError(f"layer must be an integer, 'last' or 'best', not {v!r}")
            k = k + e.num_layers if k < 0 else k
            if not 0 <= k < e.num_layers:
                raise FeatxError(f"{e.name}: layer {v} out of range 0..{e.num_layers - 1}")
            out.append(k)
    return out


def _best_layer(encoder, probe_results, task):
    if not probe_results:
        raise FeatxError("layer 'best' needs --probe-results DIR (the output of `featx probe`)")
    res = load_results(probe_results)
    primary = metrics.PRIMARY[task]
    names = set(res.best_layers["encoder"]) if len(res.best_layers) else set()
    name = str(encoder.name)
    match = [n for n in names if n == name] or [n for n in names if os.path.basename(str(n).rstrip("/")) ==
                                                 os.path.basename(name.rstrip("/"))]
    for n in match:
        k = best_layer(res, n, encoder.modality, primary) or best_layer(res, n, "video", primary)
        if k is not None:
            return int(k)
    raise FeatxError(f"{probe_results} has no best layer for {name} ({encoder.modality}, {primary})")


def _list(v, cast=str):
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [cast(x) for x in v]
    return [cast(x.strip()) for x in str(v).split(",") if x.strip()]


def finetune(manifest, models, out, *, layers=None, train_blocks=-1, head="concat", task="auto", pooling="mean",
             proj_size=32, hidden_size=128, heads=4, dropout=0.1, lr=3e-5, head_lr=None, weight_decay=0.01,
             lr_decay=0.95, epochs=20, patience=3, batch_size=16, accumulate=1, clip_grad=1.0, loss="l1",
             folds=5, train_sizes=(1.0,), seeds=1, precision="auto", device="auto", max_length=None,
             max_audio_seconds=30.0, probe_results=None, save_model=True, resume=False, overwrite=False,
             progress=True) -> FinetuneResult:
    """Fine-tune 2-3 encoders jointly with a fusion head; write the tidy results table to `out`.

    manifest: CSV/JSONL/Parquet with id, text/image/audio/video, label (and split). models: hub ids or local
    folders, one per modality. layers: per model int | "last" | "best" (from `probe_results`), one value for
    all. train_blocks: top blocks to train per model (int or list; -1 all, 0 frozen). head: concat | gated.
    task: auto | regression | classification. lr: encoder learning rate; head_lr: the head's (default lr).
    lr_decay: per-epoch exponential factor. epochs / patience: early stopping on the dev primary metric.
    accumulate: micro-batches per optimizer step. folds: K for CV when the manifest lacks train/test splits.
    train_sizes: fractions of the training part (or counts > 1: k per class). seeds: a count n (seeds
    0..n-1, as `featx probe`) or a list of ints. folds and seeds give the same splits as `featx probe`.
    precision: auto (bf16 on CUDA, fp16 where bf16 is unsupported, fp32 on the CPU) | fp32 | bf16 | fp16.
    Writes out/results.csv, results.parquet, meta.json, history.csv, out/model/ (save_model), out/runs/.
    Returns a FinetuneResult. Raises FeatxError for usage and configuration errors.
    """
    from featx.encoders import load_config, load_encoder, modality_of
    from featx.data.manifest import read_manifest, source_column
    from featx.probing.estimators import infer_task

    models = [models] if isinstance(models, (str, os.PathLike)) else [str(m) for m in models]
    if not 1 <= len(models) <= 3:
        raise FeatxError(f"featx finetune takes one to three models (one per modality), got {len(models)}")
    if head not in HEADS:
        raise FeatxError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    if pooling not in ("mean", "cls"):
        raise FeatxError(f"--pooling must be mean or cls, not {pooling!r}")
    if loss not in ("l1", "mse"):
        raise FeatxError(f"--loss must be l1 or mse, not {loss!r}")
    for name, v in (("epochs", epochs), ("batch-size", batch_size), ("accumulate", accumulate),
                    ("patience", patience)):
        if int(v) < 1:
            raise FeatxError(f"--{name} must be at least 1")
    seeds = list(range(int(seeds))) if np.isscalar(seeds) and not isinstance(seeds, str) else _list(seeds, int)
    if not seeds:
        raise FeatxError("give at least one seed")
    sizes = [float(s) for s in (_list(train_sizes, float) or [1.0])]
    if any(s <= 0 for s in sizes):
        raise FeatxError("training sizes must be > 0 (fractions <= 1 or counts > 1)")
    blocks = _list(train_blocks, int)
    blocks = blocks * len(models) if len(blocks) == 1 else blocks
    if len(blocks) != len(models):
        raise FeatxError(f"give one --train-blocks value, or one per model ({len(models)})")
    device = torch.device(resolve_device(device))
    precision = resolve_precision(precision, device)

    df = read_manifest(manifest)
    mname = os.path.basename(os.fspath(manifest))
    configs = [load_config(m) for m in models]
    modalities = [modality_of(c) for c in configs]
    columns = [source_column(df, m, mname) for m in modalities]

    def encoders_fn():
        return [load_encoder(m, config=c, device=device, max_length=max_length) for m, c in zip(models, configs)]

    encoders = encoders_fn()
    items = _decode(df, encoders, columns, max_audio_seconds)
    if len(items.ids) < 4:
        raise FeatxError(f"only {len(items.ids)} usable labelled items; fine-tuning needs more")
    task = infer_task(items.y) if task == "auto" else task
    if task not in ("regression", "classification"):
        raise FeatxError(f"--task must be auto, regression or classification, not {task!r}")
    y = items.y.astype(np.float64) if task == "regression" else items.y.astype(str).astype(object)
    items.y = y
    classes = sorted(set(y.tolist())) if task == "classification" else None
    cut = _resolve_layers(_list(layers), encoders, probe_results, task)
    del encoders  # each run loads fresh pretrained weights

    cfg = {"models": [_model_ref(m) for m in models], "layers": cut, "train_blocks": blocks, "head": head,
           "task": task, "pooling": pooling, "proj_size": int(proj_size), "hidden_size": int(hidden_size),
           "heads": int(heads), "dropout": float(dropout), "lr": float(lr),
           "head_lr": float(head_lr if head_lr is not None else lr), "weight_decay": float(weight_decay),
           "lr_decay": float(lr_decay), "epochs": int(epochs), "patience": int(patience),
           "batch_size": int(batch_size), "accumulate": int(accumulate), "clip_grad": float(clip_grad or 0),
           "loss": loss, "folds": int(folds), "train_sizes": sizes, "seeds": seeds, "max_length": max_length,
           "max_audio_seconds": max_audio_seconds}
    out = os.fspath(out)
    runs_dir = os.path.join(out, "runs")
    cfg_path = os.path.join(out, "finetune.json")
    if os.path.exists(cfg_path):
        if overwrite:
            shutil.rmtree(runs_dir, ignore_errors=True)
            shutil.rmtree(os.path.join(out, "model"), ignore_errors=True)
        elif not resume:
            raise FeatxError(f"{out} already holds a finetune run: pass --resume to continue it or --overwrite "
                             "to start again")
        else:
            with open(cfg_path, encoding="utf-8") as f:
                old = json.load(f)
            changed = [k for k in _ENV_KEYS if json.dumps(old.get(k)) != json.dumps(cfg.get(k))]
            if changed:
                raise FeatxError(f"cannot resume {out}: settings differ from the run there ({', '.join(changed)})")
    os.makedirs(runs_dir, exist_ok=True)
    _atomic_json(cfg_path, cfg)

    encoder_name = "+".join(models)
    modality = "+".join("video" if c == "video" and m == "image" else m for c, m in zip(columns, modalities))
    probe_name = f"finetune-{head}"
    single = len(models) == 1
    base = dict(encoder=encoder_name, modality=modality, num_layers=_num_layers(configs[0]) if single else -1,
                layer=cut[0] if single else -1, pooling="attentive" if head == "gated" else pooling,
                probe=probe_name, method="finetune")
    rows, done_runs, chance, model_path = [], [], {}, None
    for seed in seeds:
        units, test_name = make_folds(y, items.splits, task, folds, seed)
        for size in sizes:
            pooler = FoldScores(task)
            for u, (train, dev, test) in enumerate(units):
                fit = subsample(train, y, task, size, seed)
                run = _Run(f"n{size:g}-s{seed}-u{u}", u, size, seed, np.asarray(fit), np.asarray(dev),
                           np.asarray(test))
                save_to = os.path.join(out, "model") if (save_model and seed == seeds[0] and size == max(sizes)
                                                         and u == 0) else None
                done = _train_run(run, items, cfg, encoders_fn, task, classes, os.path.join(runs_dir, run.tag),
                                  device, precision, progress, resume, save_to)
                if save_to:
                    model_path = save_to
                done_runs.append(done)
                yt = np.asarray(done["test"]["true"], dtype=y.dtype)
                pooler.add(np.asarray(done["dev"]["true"], dtype=y.dtype), _as(done["dev"]["pred"], task),
                           yt, _as(done["test"]["pred"], task))
                if seed == seeds[0] and size == max(sizes) and u == 0:
                    chance = metrics.chance(task, y[fit], y[test]) if len(test) else {}
            dev_m, test_m = pooler.result()
            b = dict(base, train_size=size, seed=seed)
            rows += [dict(b, split="dev", metric=k, value=float(v)) for k, v in dev_m.items()]
            if sum(len(t) for t in pooler.test_true):
                rows += [dict(b, split=test_name, metric=k, value=float(v)) for k, v in test_m.items()]
    table = write_results(rows, out)
    history = [dict(run=d["tag"], **h) for d in done_runs for h in d["history"]]
    pd.DataFrame(history).to_csv(os.path.join(out, "history.csv"), index=False)
    meta = {**meta_head(task, chance), "caches": [],
            "encoders": [{"encoder": m, "modality": mo, "num_layers": _num_layers(c), "layer": k, "train_blocks": tb}
                         for m, mo, c, k, tb in zip(models, modalities, configs, cut, blocks)],
            "finetune": {k: cfg[k] for k in cfg if k not in ("models",)}, "precision": precision,
            "device": device.type, "items": int(len(items.ids)),
            "notes": ["joint fine-tuning: early stopping and model selection on dev only"]}
    _atomic_json(os.path.join(out, "meta.json"), meta)
    return FinetuneResult(table, out, model_path, done_runs)


def _num_layers(config):
    cfg = getattr(config, "vision_config", config)
    return int(cfg.num_hidden_layers) + 1


def _as(values, task):
    return np.asarray(values, dtype=object if task == "classification" else np.float64)
