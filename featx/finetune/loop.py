"""The training loop of one run (one fold, training size and seed): epochs of AdamW with gradient accumulation,
exponential learning-rate decay, early stopping on the dev primary metric, a checkpoint per epoch that a
resumed run continues from (reaching the same weights as an uninterrupted run on the same device)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from featx import metrics
from featx.device import autocast
from featx.finetune.checkpoints import (BEST, clear_checkpoints, load_checkpoint, load_tensors, load_trainable,
                                        save_checkpoint, save_tensors)
from featx.finetune.data import DecodedItems, TargetCoding, batch_inputs, batches
from featx.runinfo import read_json, write_json
from featx.finetune.model import build_model, predict
from featx.finetune.saved import save_finetuned
from featx.probing.fusion import loss_function


@dataclass
class Run:
    """One training run: fit (training labels), dev (model selection) and test item indices of one fold, at
    one training size and seed."""
    tag: str
    fold: int
    size: object  # featx.settings.TrainSize
    seed: int
    fit: np.ndarray
    dev: np.ndarray
    test: np.ndarray


@dataclass
class TrainingData:
    """What every run of a sweep shares: the decoded items, the task, the classes (classification), the cut
    layer per encoder, a loader of fresh pretrained encoders, where and how to run."""
    items: DecodedItems
    task: str
    classes: object
    layers: list
    load_encoders: Callable
    device: torch.device
    precision: str
    progress: bool = True
    resume: bool = False


def _seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class _Fit:
    """One run's model, optimizer, gradient scaler, loss and targets; trains an epoch, predicts, scores dev."""

    def __init__(self, run: Run, data: TrainingData, settings):
        self.run, self.data, self.s = run, data, settings
        self.encoders = data.load_encoders()
        labels = data.items.labels
        self.coding = TargetCoding.fit(data.task, data.classes, labels[run.fit])
        out_dim = len(data.classes) if data.task == "classification" else 1
        self.model = build_model(self.encoders, data.layers, settings.train_blocks, settings.head_settings,
                                 out_dim).to(data.device)
        head_ids = {id(p) for p in self.model.head.parameters()}
        encoder_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": list(self.model.head.parameters()), "lr": settings.head_lr}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": settings.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(data.device.type, enabled=data.precision == "fp16")
        self.loss_fn = loss_function(data.task, settings.loss)
        self.targets = self.coding.encode(labels)
        self.primary = metrics.PRIMARY[data.task]

    def predict(self, idx) -> np.ndarray:
        d = self.data
        return predict(self.model, batches(self.encoders, d.items, idx, self.s.batch_size), self.coding, d.device,
                       d.precision)

    def dev_score(self) -> float:
        pred = self.predict(self.run.dev)
        return float(metrics.compute(self.data.task, self.data.items.labels[self.run.dev], pred)[self.primary])

    def _step(self, group, bar, totals):
        """One optimizer step over a group of micro-batches (gradient accumulation)."""
        d, n_group = self.data, sum(len(b) for b in group)
        self.optimizer.zero_grad(set_to_none=True)
        for b in group:
            with autocast(d.device, d.precision):
                out = self.model(batch_inputs(self.encoders, d.items, b))
            loss = self.loss_fn(out.float(), self.targets[b].to(d.device))
            self.scaler.scale(loss * (len(b) / n_group)).backward()
            totals[0] += float(loss.detach()) * len(b)
            totals[1] += len(b)
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0] / totals[1]:.4f}")
        if self.s.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.s.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def train_epoch(self, epoch, bar) -> float:
        """One pass over the run's fit items in an order fixed by (seed, epoch); returns the mean loss."""
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.s.lr_decay ** epoch
        fit, bs = self.run.fit, self.s.batch_size
        order = fit[np.random.default_rng([self.run.seed, epoch]).permutation(len(fit))]
        micro = [order[s:s + bs] for s in range(0, len(order), bs)]
        self.model.train()
        totals = [0.0, 0]
        for g0 in range(0, len(micro), self.s.accumulate):
            self._step(micro[g0:g0 + self.s.accumulate], bar, totals)
        return totals[0] / totals[1]


def _is_better(state, value, higher) -> bool:
    if state["best_epoch"] < 0:
        return True
    if not np.isfinite(value):
        return False
    return state["best"] is None or (value > state["best"] if higher else value < state["best"])


def _epochs(fit: _Fit, run_dir, start, state):
    """Train from epoch `start` until the last epoch or early stopping; state is updated in place."""
    from featx.progress import progress_bar

    s, d = fit.s, fit.data
    higher = metrics.higher_is_better(fit.primary)
    n_batches = -(-len(fit.run.fit) // s.batch_size)
    for epoch in range(start, s.epochs):
        if state["stopped"]:
            break
        bar = progress_bar(n_batches, f"{fit.run.tag} epoch {epoch + 1}/{s.epochs}", "batch", enabled=d.progress)
        loss = fit.train_epoch(epoch, bar)
        dev_value = fit.dev_score()
        bar.set_postfix(loss=f"{loss:.4f}", **{f"dev_{fit.primary}": f"{dev_value:.4f}"})
        bar.close()
        state["history"].append({"epoch": epoch, "train_loss": loss, f"dev_{fit.primary}": dev_value,
                                 "lr": fit.optimizer.param_groups[-1]["lr"]})
        if _is_better(state, dev_value, higher):
            state.update(best=dev_value if np.isfinite(dev_value) else None, best_epoch=epoch, bad_epochs=0)
            save_tensors(os.path.join(run_dir, BEST), fit.model.trainable_state())
        else:
            state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= s.patience
        save_checkpoint(run_dir, epoch, fit.model, fit.optimizer, fit.scaler, state, d.device)


def _scored(fit: _Fit, state) -> dict:
    """done.json of the run: its history and the best dev epoch's predictions on dev and test."""
    run, items = fit.run, fit.data.items
    labels = items.labels
    dev_pred, test_pred = fit.predict(run.dev), fit.predict(run.test)
    return {"tag": run.tag, "fold": run.fold, "size": str(run.size), "seed": run.seed,
            "best_epoch": state["best_epoch"], "history": state["history"], "train_items": len(run.fit),
            "dev": {"ids": items.ids[run.dev].tolist(), "true": labels[run.dev].tolist(), "pred": dev_pred.tolist()},
            "test": {"ids": items.ids[run.test].tolist(), "true": labels[run.test].tolist(),
                     "pred": test_pred.tolist()}}


def train_run(run: Run, data: TrainingData, settings, run_dir, save_to=None) -> dict:
    """Train one run (from its latest checkpoint when data.resume), keep the best dev epoch's weights, save the
    model to `save_to` when given; returns the run's done.json dict (read back when the run had finished)."""
    done_path = os.path.join(run_dir, "done.json")
    if data.resume and os.path.exists(done_path):
        return read_json(done_path)
    os.makedirs(run_dir, exist_ok=True)
    _seed_everything(run.seed)
    fit = _Fit(run, data, settings)
    state = {"best": None, "best_epoch": -1, "bad_epochs": 0, "stopped": False, "history": []}
    start = 0
    loaded = load_checkpoint(run_dir, fit.model, fit.optimizer, fit.scaler, data.device) if data.resume else None
    if loaded is not None:
        state = {k: loaded[k] for k in state}
        start = loaded["epoch"] + 1
    _epochs(fit, run_dir, start, state)
    load_trainable(fit.model, load_tensors(os.path.join(run_dir, BEST)))
    done = _scored(fit, state)
    if save_to:
        save_finetuned(save_to, fit.model, fit.coding, settings,
                       {"train_items": len(run.fit), "seed": run.seed, "train_size": str(run.size), "fold": run.fold})
    write_json(done_path, done)
    clear_checkpoints(run_dir)
    return done
