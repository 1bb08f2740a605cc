"""Per-epoch checkpoints of a training run: safetensors for tensors, JSON for the rest (nothing is unpickled).

A run folder holds epoch-E/{state.safetensors, state.json} (trainable weights, optimizer, gradient scaler and
RNG states, early-stopping state) and latest.json naming the newest complete one; each file is written to a
temporary name and renamed, so a killed run leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from featx.errors import FeatxError
from featx.runinfo import read_json, write_json

LATEST = "latest.json"
BEST = "best.safetensors"


def save_tensors(path, tensors, metadata=None):
    """name -> tensor as a safetensors file, written atomically."""
    from safetensors.torch import save_file

    tmp = os.fspath(path) + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:  # on disk before the rename, as write_json's files are
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(os.fspath(path))


def load_trainable(model, tensors):
    """Copy `tensors` into the model's trainable parameters; they must be exactly those parameters."""
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != want:
        raise FeatxError("the checkpoint does not match this model (trainable parameters differ); "
                         "was it written with other settings?")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def _rng_state(device):
    tensors = {"rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    py_state = random.getstate()
    numpy = [np_state[0], np_state[1].tolist(), *(v.item() if isinstance(v, np.generic) else v for v in np_state[2:])]
    return tensors, {"numpy": numpy, "python": [py_state[0], list(py_state[1]), py_state[2]]}


def _set_rng_state(tensors, state, device):
    torch.set_rng_state(tensors["rng/torch"])
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _optimizer_tensors(optimizer):
    """(tensors "optim/<param>/<name>", non-tensor state per param, param groups as JSON)."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, s in opt["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim/{i}/{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    return tensors, scalars, groups


def _restore_optimizer(optimizer, tensors, state):
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, i, name = k.split("/", 2)
            opt_state.setdefault(int(i), {})[name] = v
    for i, s in state["optim_scalars"].items():
        opt_state.setdefault(int(i), {}).update(s)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


def save_checkpoint(run_dir, epoch, model, optimizer, scaler, state, device):
    """run_dir/epoch-E/{state.safetensors, state.json}, then run_dir/latest.json names it; older epochs go."""
    d = os.path.join(run_dir, f"epoch-{epoch}")
    os.makedirs(d, exist_ok=True)
    opt_tensors, opt_scalars, groups = _optimizer_tensors(optimizer)
    rng_tensors, rng_json = _rng_state(device)
    tensors = {**{f"model/{k}": v for k, v in model.trainable_state().items()}, **opt_tensors, **rng_tensors}
    save_tensors(os.path.join(d, "state.safetensors"), tensors)
    write_json(os.path.join(d, "state.json"), {**state, "epoch": epoch, "param_groups": groups,
                                               "optim_scalars": opt_scalars, "rng": rng_json,
                                               "scaler": scaler.state_dict() if scaler.is_enabled() else None})
    write_json(os.path.join(run_dir, LATEST), {"epoch": epoch, "dir": f"epoch-{epoch}"})
    for name in os.listdir(run_dir):
        if name.startswith("epoch-") and name != f"epoch-{epoch}":
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def load_checkpoint(run_dir, model, optimizer, scaler, device):
    """The state dict saved with the latest checkpoint (model, optimizer, scaler and RNGs restored), or None."""
    latest = os.path.join(run_dir, LATEST)
    if not os.path.exists(latest):
        return None
    d = os.path.join(run_dir, read_json(latest)["dir"])
    tensors = load_tensors(os.path.join(d, "state.safetensors"))
    state = read_json(os.path.join(d, "state.json"))
    load_trainable(model, {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    _restore_optimizer(optimizer, tensors, state)
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(tensors, state["rng"], device)
    return state


def clear_checkpoints(run_dir):
    """Remove a finished run's checkpoints (its done.json stays)."""
    for name in os.listdir(run_dir):
        if name.startswith("epoch-") or name in (BEST, LATEST):
            p = os.path.join(run_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
