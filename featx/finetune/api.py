"""`finetune`: fine-tune one to three encoders jointly with a fusion head over a sweep of folds, training sizes
and seeds, and write the tidy results table (Toledo & Marcacini, LXAI @ ICML 2022).

Protocol (shared with `featx probe`, featx.probing.splits.make_folds): with train and test splits in the
manifest, train on train, select on dev (held out of train when there is none); otherwise stratified K-fold CV
with a dev part held out of each training fold, test predictions pooled into split "cv". Early stopping and
model selection use dev only, never the test part. Results go to the same tidy table as `featx probe` (method
"finetune"). Each epoch writes a checkpoint that `resume=True` continues from.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch

from featx import metrics
from featx.device import resolve_device, resolve_precision
from featx.errors import FeatxError
from featx.finetune.data import decode_items
from featx.finetune.loop import Run, TrainingData, train_run
from featx.finetune.model import HeadSettings, layerdrop_of
from featx.naming import display_names, last_name
from featx.probing.results import (FULL_PART_ADDED, FoldScores, best_layer, clear_earlier_outputs, earlier_outputs,
                                   labels_count, load_results, meta_head, said_removed, write_results)
from featx.probing.splits import make_folds, subsample
from featx.runinfo import provenance, read_json, strict_json, write_json, write_meta
from featx.settings import FinetuneSettings as FinetuneOptions
from featx.settings import TRAINING_PRECISIONS, TrainSize, resolve_layers

# Settings that change the numbers: a resumed run must have the same ones.
RESUME_KEYS = ("models", "modalities", "layers", "train_blocks", "head", "task", "pooling", "proj_size",
               "hidden_size", "heads", "dropout", "lr", "head_lr", "weight_decay", "lr_decay", "epochs", "patience",
               "batch_size", "accumulate", "clip_grad", "loss", "folds", "train_sizes", "seeds", "max_length",
               "max_audio_seconds")
# Resume keys a run written by an earlier featx may lack (its runs used each model's primary tower).
ADDED_RESUME_KEYS = ("modalities",)
# The whole training part: the headline size, added to the training sizes when not asked for (as `featx probe`).
FULL = TrainSize("fraction", 1.0)
# Options of the command line that are not settings of a run (inputs, output and what is printed).
NOT_RUN_SETTINGS = ("manifest", "model", "out", "pool", "no_save_model", "json", "quiet")


class FinetuneSettings(FinetuneOptions):
    """`featx finetune`'s options (featx.settings.FinetuneSettings declares each default and parser once) with
    what follows from them: head_lr resolved to lr when not given, the per-model lists (per_model), and the
    Python API's names pooling, save_model and progress.

    layers: per model an index (negative counts from the last), "last" or "best" (from probe_results); one
    value for all models. train_blocks: top blocks trained per model (-1 all, 0 frozen), one or per model.
    """

    def __post_init__(self):
        super().__post_init__()
        if self.head_lr is None:
            self.head_lr = self.lr

    @classmethod
    def of(cls, manifest, models, out, pooling=None, save_model=True, progress=True, **options):
        """The settings of finetune(manifest, models, out, **options): options under the command line's names,
        but pooling (--pool), save_model (not --no-save-model) and progress (not --quiet)."""
        if pooling is not None:
            options["pool"] = pooling
        return cls(manifest=os.fspath(manifest), model=models, out=os.fspath(out), no_save_model=not save_model,
                   quiet=not progress, **options)

    @property
    def pooling(self) -> str:
        return self.pool

    @property
    def save_model(self) -> bool:
        return not self.no_save_model

    @property
    def progress(self) -> bool:
        return not self.quiet

    @property
    def sizes_run(self) -> list:
        """The training sizes trained: those given, plus the full training part (the headline) if absent."""
        return self.train_sizes if any(t.is_full for t in self.train_sizes) else self.train_sizes + [FULL]

    @property
    def notes(self) -> list:
        """What the run does that was not asked for, for meta.json's notes and stderr."""
        return [] if any(t.is_full for t in self.train_sizes) else [FULL_PART_ADDED]

    @property
    def head_settings(self) -> HeadSettings:
        return HeadSettings(self.head, self.pool, self.proj_size, self.hidden_size, self.heads, self.dropout)

    def per_model(self, n_models):
        """Check the per-model lists against the number of models, one value given standing for all."""
        if len(self.train_blocks) == 1:
            self.train_blocks = self.train_blocks * n_models
        if len(self.train_blocks) != n_models:
            raise FeatxError(f"give one --train-blocks value, or one per model ({n_models})")
        if len(self.layers) == 1:
            self.layers = self.layers * n_models
        if len(self.layers) != n_models:
            raise FeatxError(f"give one layer per model ({n_models}), got {len(self.layers)}")
        if len(self.modality) == 1:
            self.modality = self.modality * n_models
        if len(self.modality) != n_models:
            raise FeatxError(f"give one --modality, or one per model ({n_models}), got {len(self.modality)}")

    def as_dict(self) -> dict:
        """The run's settings as JSON values (training sizes as written: "0.5", "200", "1.0"; train_sizes_run
        those trained, with the full training part added when it was not given)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_RUN_SETTINGS}
        return dict(out, pooling=self.pooling, train_sizes=[str(s) for s in self.train_sizes],
                    train_sizes_run=[str(s) for s in self.sizes_run],
                    save_model=self.save_model, progress=self.progress)


@dataclass
class FinetuneResult:
    """What `finetune` wrote: the tidy rows, the output folder, the saved model folder (or None), per-run
    training histories (done.json dicts) and the notes on what differs from what was asked (as meta.json's,
    less the protocol's standing note)."""
    rows: pd.DataFrame
    out: str
    model_path: object = None
    runs: list = field(default_factory=list)
    notes: list = field(default_factory=list)


@dataclass
class _Inputs:
    """The models and the decoded data of a finetune call, with what was resolved from them."""
    models: list
    configs: list
    modalities: list   # per model: the tower it runs, text | image | audio | video
    columns: list      # per model: the manifest column it reads
    num_layers: list   # per model: hidden states of the tower (blocks + 1)
    items: object      # featx.finetune.data.DecodedItems, labels as float64 (regression) or str
    task: str
    classes: object    # sorted classes (classification) or None
    layers: list       # cut layer per model
    layerdrop: list    # per model: {field: probability} of the LayerDrop fine-tuning turns off (empty: none)


def _best_layer(encoder, probe_results, task):
    """The best dev layer `featx probe` recorded for the encoder (matched by name, else by folder name)."""
    if not probe_results:
        raise FeatxError("layer 'best' needs --probe-results DIR (the output of `featx probe`)")
    res = load_results(probe_results)
    primary = metrics.PRIMARY[task]
    names = set(res.best_layers["encoder"]) if len(res.best_layers) else set()
    name = str(encoder.name)
    match = [n for n in names if n == name] or [n for n in names if last_name(n) == last_name(name)]
    for n in match:
        for modality in (encoder.modality, "video"):
            k = best_layer(res, n, modality, primary)
            if k is not None:  # layer 0 is a layer
                return int(k)
    raise FeatxError(f"{probe_results} has no best layer for {name} ({encoder.modality}, {primary})")


def _cut_layers(specs, encoders, probe_results, task):
    """Cut layer per encoder from its spec: an index (negative counts from the last), "last" or "best"."""
    out = []
    for e, v in zip(encoders, specs):
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
            out.append(resolve_layers([k], e.num_layers, e.name)[0])
    return out


def _towers(df, configs, specs, name) -> list:
    """The family (tower) each model fine-tunes: the one of its --modality, or (auto) its first tower, primary
    first, whose column the manifest has and that no earlier model runs (CLIP beside BERT: its image tower; CLIP
    alone on a text column: its text tower). FeatxError (one line) when the manifest has no column for it."""
    from featx.data.manifest import source_column
    from featx.encoders import families_of, family_of

    taken, out = set(), []
    for config, spec in zip(configs, specs):
        if spec != "auto":
            family = family_of(config, spec)
            source_column(df, spec, name)
        else:
            towers = families_of(config)
            usable = [f for f in towers if _has_column(df, f.modality)]
            if not usable:
                source_column(df, towers[0].modality, name)  # raises: names the column it needs
            family = next((f for f in usable if f.modality not in taken), usable[0])
        taken.add(family.modality)
        out.append(family)
    return out


def _has_column(df, modality) -> bool:
    from featx.data.manifest import source_column

    try:
        source_column(df, modality)
        return True
    except FeatxError:
        return False


def _check_trainable(families, configs, settings):
    """One line, before any weights load, for a tower featx cannot cut (no block list) or a pooling it lacks."""
    from featx.encoders import block_path

    for family, config in zip(families, configs):
        block_path(config, None, family.modality)  # FeatxError: "... cannot be fine-tuned by featx: why"
        if settings.head == "concat" and settings.pooling not in family.poolings:
            raise FeatxError(f"{family.name} models support the poolings {', '.join(family.poolings)}, not "
                             f"--pool {settings.pooling}{': ' + family.note if family.note else ''}")


def _prepare(manifest, models, settings, device) -> _Inputs:
    """Load the models' configs and encoders, decode the labelled items, settle the task and cut layers."""
    from featx.data.manifest import read_manifest, source_column
    from featx.encoders import load_config, load_encoder
    from featx.probing.estimators import infer_task, inferred_task_note

    df = read_manifest(manifest)
    name = os.path.basename(os.fspath(manifest))
    configs = [load_config(m) for m in models]
    families = _towers(df, configs, settings.modality, name)
    _check_trainable(families, configs, settings)
    modalities = [f.modality for f in families]
    columns = [source_column(df, m, name) for m in modalities]
    encoders = [load_encoder(m, config=c, device=device, max_length=settings.max_length, modality=mo)
                for m, c, mo in zip(models, configs, modalities)]
    items = decode_items(df, encoders, columns, settings.max_audio_seconds)
    if len(items.ids) < 4:
        raise FeatxError(f"only {len(items.ids)} usable labelled items; fine-tuning needs more")
    task = infer_task(items.labels) if settings.task == "auto" else settings.task
    note = inferred_task_note(items.labels) if settings.task == "auto" else None
    if note and settings.progress:
        warnings.warn(note)   # one line: the command line prints it as "featx finetune: task: ..."
    labels = items.labels
    items.labels = labels.astype(np.float64) if task == "regression" else labels.astype(str).astype(object)
    classes = sorted(set(items.labels.tolist())) if task == "classification" else None
    layers = _cut_layers(settings.layers, encoders, settings.probe_results, task)
    return _Inputs(models, configs, modalities, columns, [e.num_layers for e in encoders], items, task, classes,
                   layers, [layerdrop_of(e.model) for e in encoders])


def _run_config(inputs: _Inputs, settings) -> dict:
    """finetune.json: the resolved settings a resumed run must share."""
    s = settings.as_dict()
    resolved = {"models": [os.path.abspath(m) if os.path.isdir(m) else m for m in inputs.models],
                "modalities": inputs.modalities, "layers": inputs.layers, "task": inputs.task}
    return {k: resolved[k] if k in resolved else s[k] for k in RESUME_KEYS}


def _check_output(out, settings) -> list:
    """The earlier outputs in `out` (featx.probing.results.earlier_outputs); a FeatxError, before any model
    loads, when they are another run's without overwrite, or a finetune run's without resume or overwrite, or when
    resume and overwrite are both given (overwrite would delete the checkpoints that resume asks to continue)."""
    if settings.resume and settings.overwrite:
        raise FeatxError("--resume continues a run and --overwrite starts it again: give one of them (a recipe's "
                         "overwrite: true counts as --overwrite)")
    earlier = earlier_outputs(out)
    if not earlier or settings.overwrite:
        return earlier
    if not os.path.exists(os.path.join(out, "finetune.json")):
        raise FeatxError(f"{out} holds the outputs of an earlier featx run ({said_removed(earlier)})"
                         f"{', not a finetune run to resume' if settings.resume else ''}: pass --overwrite to "
                         "replace them, or give another --out")
    if not settings.resume:
        raise FeatxError(f"{out} already holds a finetune run: pass --resume to continue it or --overwrite "
                         "to start again")
    return earlier


def _open_output(out, config, settings):
    """Create `out` for a new run, or check that a resumed one has the same settings. An earlier run's outputs
    (featx.probing.results.earlier_outputs; a finetune run's runs/ and model/ too) are refused, or removed with
    overwrite, so that the folder holds only this run's."""
    runs_dir, cfg_path = os.path.join(out, "runs"), os.path.join(out, "finetune.json")
    earlier = _check_output(out, settings)
    if settings.overwrite and earlier:
        if os.path.exists(cfg_path):
            shutil.rmtree(runs_dir, ignore_errors=True)
            shutil.rmtree(os.path.join(out, "model"), ignore_errors=True)
            earlier += ["runs/", "model/"]
        clear_earlier_outputs(out)
        warnings.warn(f"--overwrite: removed the earlier run's outputs in {out}: {said_removed(earlier)}")
    elif os.path.exists(cfg_path):   # resume (_check_output refused the rest)
        old = read_json(cfg_path)
        changed = [k for k in RESUME_KEYS if (k in old or k not in ADDED_RESUME_KEYS)
                   and json.dumps(strict_json(old.get(k))) != json.dumps(strict_json(config.get(k)))]
        if changed:
            raise FeatxError(f"cannot resume {out}: settings differ from the run there ({', '.join(changed)})")
    os.makedirs(runs_dir, exist_ok=True)
    write_json(cfg_path, config)


def _plan(inputs: _Inputs, settings) -> list:
    """[(seed, size, test split name, [Run per fold])] in sweep order, over the sizes run (the full training
    part added when not given); sizes are checked against every training part before anything trains."""
    labels, plan = inputs.items.labels, []
    for seed in settings.seeds:
        folds, test_name = make_folds(labels, inputs.items.splits, inputs.task, settings.folds, seed)
        for size in settings.sizes_run:
            runs = []
            for k, (train, dev, test) in enumerate(folds):
                fit = np.asarray(subsample(train, labels, inputs.task, size, seed))
                runs.append(Run(f"n{size}-s{seed}-f{k}", k, size, seed, fit, np.asarray(dev), np.asarray(test)))
            plan.append((seed, size, test_name, runs))
    return plan


def _saved_run(plan):
    """The run whose model is saved: the first seed's first fold at the training size with the most labels."""
    first_seed = [entry for entry in plan if entry[0] == plan[0][0]]
    return max((entry[3][0] for entry in first_seed), key=lambda run: len(run.fit))


def _rows(base, seed, size, test_name, pooled: FoldScores, runs) -> list:
    """The tidy rows of one (seed, size): dev metrics averaged over folds, test metrics of the pooled folds."""
    dev_m, test_m = pooled.result()
    b = dict(base, train_size=str(size), train_labels=labels_count([len(r.fit) for r in runs]), seed=seed)
    rows = [dict(b, split="dev", metric=k, value=float(v)) for k, v in dev_m.items()]
    if sum(len(t) for t in pooled.test_true):
        rows += [dict(b, split=test_name, metric=k, value=float(v)) for k, v in test_m.items()]
    return rows


def _as(values, task):
    return np.asarray(values, dtype=object if task == "classification" else np.float64)


def _sweep(plan, inputs: _Inputs, settings, data: TrainingData, out):
    """Train every planned run; returns (rows, done dicts, chance scores, saved model folder or None)."""
    saved = _saved_run(plan) if settings.save_model else None
    labels, task = inputs.items.labels, inputs.task
    base, rows, done_runs, model_path = _row_base(inputs, settings), [], [], None
    for seed, size, test_name, runs in plan:
        pooled = FoldScores(task)
        for run in runs:
            save_to = os.path.join(out, "model") if run is saved else None
            done = train_run(run, data, settings, os.path.join(out, "runs", run.tag), save_to)
            model_path = save_to or model_path
            done_runs.append(done)
            pooled.add(np.asarray(done["dev"]["true"], dtype=labels.dtype), _as(done["dev"]["pred"], task),
                       np.asarray(done["test"]["true"], dtype=labels.dtype), _as(done["test"]["pred"], task))
        rows += _rows(base, seed, size, test_name, pooled, runs)
    chance_run = _saved_run(plan)
    chance = metrics.chance(task, labels[chance_run.fit], labels[chance_run.test]) if len(chance_run.test) else {}
    return rows, done_runs, chance, model_path


def _row_base(inputs: _Inputs, settings) -> dict:
    single = len(inputs.models) == 1
    modality = "+".join("video" if c == "video" and m == "image" else m
                        for c, m in zip(inputs.columns, inputs.modalities))
    return dict(encoder="+".join(display_names(inputs.models)), modality=modality,
                num_layers=inputs.num_layers[0] if single else -1,
                layer=inputs.layers[0] if single else -1,
                pooling="attentive" if settings.head == "gated" else settings.pooling,
                probe=f"finetune-{settings.head}", method="finetune")


def _write_meta(out, inputs: _Inputs, settings, data: TrainingData, chance):
    """out/meta.json: task and chance, encoders and cut layers, every resolved setting, command line, versions."""
    config = _run_config(inputs, settings)
    names = display_names(inputs.models)
    encoders = [{"encoder": n, "path": m, "modality": mo, "num_layers": nl, "layer": k, "train_blocks": tb,
                 "layerdrop_off": ld}
                for n, m, mo, nl, k, tb, ld in zip(names, inputs.models, inputs.modalities, inputs.num_layers,
                                                   inputs.layers, settings.train_blocks, inputs.layerdrop)]
    layerdrop = [f"{n}: LayerDrop off ({', '.join(f'{k} {v:g}' for k, v in ld.items())} in its config): a skipped "
                 "block would shift the hidden states, and the head would see another layer than the cut one"
                 for n, ld in zip(names, inputs.layerdrop) if ld]
    resolved = dict(settings.as_dict(), task=inputs.task, cut_layers=inputs.layers, device=str(data.device),
                    precision=data.precision)
    meta = {**meta_head(inputs.task, chance), "caches": [], "encoders": encoders,
            "finetune": {k: v for k, v in config.items() if k != "models"}, "precision": data.precision,
            "device": data.device.type, "items": int(len(inputs.items.ids)), **provenance(resolved),
            "notes": ["joint fine-tuning: early stopping and model selection on dev only"] + layerdrop
            + settings.notes}
    write_meta(meta, os.path.join(out, "meta.json"))


def finetune(manifest, models, out, **settings) -> FinetuneResult:
    """Fine-tune one to three encoders (one per modality) jointly with a fusion head; write the results to `out`.

    manifest: CSV/JSONL/Parquet with id, text/image/audio/video, label (and split). models: hub ids or local
    folders. settings: the options of featx.settings.FinetuneSettings (layers, train_blocks, head, lr, epochs,
    train_sizes, seeds, ...; pooling, save_model and progress for --pool, --no-save-model and --quiet).
    Writes out/results.csv, results.parquet (one row per seed, training size, split, metric), meta.json,
    history.csv (per run and epoch), finetune.json, out/model/ (save_model) and out/runs/.
    Returns a FinetuneResult. Raises FeatxError for usage and configuration errors.
    """
    models = [os.fspath(models)] if isinstance(models, (str, os.PathLike)) else [os.fspath(m) for m in models]
    if not 1 <= len(models) <= 3:
        raise FeatxError(f"featx finetune takes one to three models (one per modality), got {len(models)}")
    s = FinetuneSettings.of(manifest, models, out, **settings)
    s.per_model(len(models))
    device = torch.device(resolve_device(s.device))
    precision = resolve_precision(s.precision, device, TRAINING_PRECISIONS)
    _check_output(os.fspath(out), s)
    inputs = _prepare(manifest, models, s, device)
    plan = _plan(inputs, s)
    out = os.fspath(out)
    _open_output(out, _run_config(inputs, s), s)

    def load_encoders():  # each run starts from fresh pretrained weights
        from featx.encoders import load_encoder

        return [load_encoder(m, config=c, device=device, max_length=s.max_length, modality=mo)
                for m, c, mo in zip(models, inputs.configs, inputs.modalities)]

    data = TrainingData(inputs.items, inputs.task, inputs.classes, inputs.layers, load_encoders, device, precision,
                        s.progress, s.resume)
    rows, done_runs, chance, model_path = _sweep(plan, inputs, s, data, out)
    table = write_results(rows, out)
    history = [dict(run=d["tag"], **h) for d in done_runs for h in d["history"]]
    pd.DataFrame(history).to_csv(os.path.join(out, "history.csv"), index=False)
    _write_meta(out, inputs, s, data, chance)
    return FinetuneResult(table, out, model_path, done_runs, s.notes)
