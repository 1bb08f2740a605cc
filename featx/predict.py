"""`featx predict`: run a saved classifier (a probe, or a fine-tuned model) on new raw files."""
from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pandas as pd

from featx.checkpoint import MODEL_FINGERPRINT
from featx.errors import FeatxError, OptionAdvice


def predict(manifest, classifier, out=None, cache_dir=None, device="auto", batch_size=16,
            progress=True, precision=None, models=None) -> pd.DataFrame:
    """DataFrame(id, prediction, [p_CLASS per class,] error) for the manifest's items: a classifier's class
    probabilities (columns p_<class>, in its class order), and the reason an item has no prediction (error, empty
    for the others).

    classifier: a `.safetensors` file saved by `featx probe --save-classifier` (its encoders are run by
    `featx extract` into `cache_dir`, a temporary folder when None, with the extraction settings of the caches
    it was trained on, then the probe is applied), or the `model/` folder saved by `featx finetune`. Items that
    fail to decode get an empty prediction and their reason in `error`, and are named on stderr. Writes `out`
    (CSV, or Parquet for .parquet) when given.
    precision: a probe's extraction precision (featx extract's --precision); None: the one its training cache
    was made with (a FeatxError when this device cannot run it: bf16 or fp16 autocast on a CPU), or auto for a
    file that does not record it. Given with a fine-tuned model: a FeatxError (it predicts in fp32).
    models: None, or a probe's encoders where they are now (hub ids or local folders), one per encoder the
    classifier names, in its order (featx predict's --model): in place of the recorded ones, for a model folder
    moved, copied or shared. Each is checked to be the checkpoint the classifier was trained on (the fingerprint
    of its weights, featx.checkpoint): another one is a FeatxError naming what differs; a file saved before featx
    recorded the fingerprint is used with a line on stderr saying that it could not be checked. Given with a
    fine-tuned model: a FeatxError (its model/ folder holds its encoders).
    """
    path = os.fspath(classifier)
    if os.path.isdir(path) and precision is not None:
        raise FeatxError(f"{path}: --precision is for a probe's classifier; a fine-tuned model predicts in fp32 "
                         "with its saved weights")
    if os.path.isdir(path) and models:
        raise FeatxError(f"{path}: --model is for a probe's classifier; a fine-tuned model/ folder holds its "
                         "encoders' weights")
    if os.path.isdir(path):
        from featx.finetune import load_finetuned

        from featx.device import resolve_device
        result = load_finetuned(path, device=resolve_device(device)).predict_manifest(manifest, batch_size)
    elif os.path.isfile(path):
        result = _predict_probe(manifest, path, cache_dir, device, batch_size, progress, precision, models)
    else:
        raise FeatxError(f"classifier not found: {path}")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        (result.to_parquet if str(out).endswith(".parquet") else result.to_csv)(out, index=False)
    return result


_EXTRACT_ADVICE = "run with the settings it was made with, or use --overwrite to start again"
_PREDICT_ADVICE = ("predict extracts with the classifier's model, pooling and extraction settings: give it another "
                   "--cache-dir (or none: a temporary folder)")


def _predict_probe(manifest, path, cache_dir, device, batch_size, progress, precision, models=None):
    from featx.probing.classifier import Classifier, prediction_table, recorded_fingerprint
    from featx.extraction.pipeline import extract, print_summary
    from featx.data.manifest import read_manifest

    clf = Classifier.load(path)
    settings = [extraction_options(block, path, device, precision) for block in clf.blocks]
    chosen = [model_for(block, given, path) for block, given in zip(clf.blocks, given_models(clf.blocks, models))]
    ids = read_manifest(manifest)["id"].astype(str)
    with tempfile.TemporaryDirectory(prefix="featx-predict-") as tmp:
        folder = os.fspath(cache_dir) if cache_dir else tmp
        caches = []
        for block, options, (model, checked) in zip(clf.blocks, settings, chosen):
            _say_relative(model)
            try:
                with warnings.catch_warnings():   # extract's options, e.g. --image-decode: predict takes the
                    warnings.simplefilter("ignore", OptionAdvice)   # classifier's, the user has none to change
                    res = extract(manifest, [model], folder, pool=[block["pooling"]], device=device,
                                  batch_size=batch_size, progress=progress, summary=bool(cache_dir), **options)
            except FeatxError as e:   # extract's advice names its --overwrite, which predict does not have
                raise FeatxError(str(e).replace(_EXTRACT_ADVICE, _PREDICT_ADVICE)) from None
            if not cache_dir:  # not the path of a cache that is gone once the predictions are made
                for entry in res.caches:
                    print_summary(entry, where="a temporary folder, removed after the predictions")
            caches.append(_cache_of(res.paths, block))
            if not checked:   # a hub model not on disk before the extraction: its cache records what ran
                _check_weights(block, model, recorded_fingerprint(caches[-1]), path, model != block["encoder"])
        got_ids, inputs = clf.cache_inputs(caches)
        pred = clf.predict(inputs) if len(got_ids) else []
        proba = clf.predict_proba(inputs) if clf.task == "classification" and len(got_ids) else None
        reasons = _not_done(caches, clf.blocks)
    return prediction_table(ids, got_ids, pred, clf.classes if clf.task == "classification" else None, proba,
                            reasons)


def given_models(blocks, models) -> list:
    """Per block, the model given in place of its recorded encoder (None: the recorded one): `models` names
    the classifier's distinct encoders in the order of its blocks (a model whose two towers are two blocks,
    once); FeatxError when their number differs."""
    if not models:
        return [None] * len(blocks)
    recorded = list(dict.fromkeys(block["encoder"] for block in blocks))
    if len(models) != len(recorded):
        raise FeatxError(f"the classifier was trained on {len(recorded)} encoder(s) ({', '.join(recorded)}): give "
                         f"--model once for each, in that order (got {len(models)})")
    now = dict(zip(recorded, (os.fspath(m) for m in models)))
    return [now[block["encoder"]] for block in blocks]


def model_for(block, given, path):
    """(the model predict runs for a classifier block, whether its weights were checked): `given` (--model), or
    the recorded encoder, which must still exist when it is a local folder. A model whose fingerprint differs
    from the recorded one is a FeatxError; (model, False) when the model's files are not on disk yet (a hub id
    not downloaded), to be checked on the cache the extraction makes."""
    from featx.checkpoint import model_fingerprint
    from featx.naming import is_local, resolve_model

    recorded = block["encoder"]
    if given is None:
        if is_local(recorded) and not os.path.exists(os.path.expanduser(recorded)):
            raise FeatxError(f"{path}: the classifier's model folder {recorded!r} does not exist (moved, or saved "
                             "on another machine?): give the folder where that model is now with --model PATH; "
                             "it is checked to be the checkpoint the classifier was trained on")
        model = recorded
    else:
        model = resolve_model(given)
    now = model_fingerprint(model)
    if now is not None or block.get(MODEL_FINGERPRINT) is None:
        _check_weights(block, model, now, path, given is not None)
        return model, True
    return model, False


def _check_weights(block, model, now, path, substituted):
    """FeatxError when fingerprint `now` of `model` is not the one the classifier recorded; a line on stderr when
    a model given in the encoder's place cannot be checked (no fingerprint on one side)."""
    import sys

    from featx.checkpoint import fingerprint_diff

    recorded = block.get(MODEL_FINGERPRINT)
    if recorded is not None and now is not None and now != recorded:
        trained = "" if model == block["encoder"] else f" ({block['encoder']})"
        raise FeatxError(f"{path}: {model} is not the checkpoint the classifier was trained on{trained}: "
                         f"{fingerprint_diff(recorded, now)}")
    if substituted and (recorded is None or now is None):
        why = ("the classifier records no fingerprint of its model's weights (saved by an earlier featx)"
               if recorded is None else f"the weights of {model} are not on disk to fingerprint")
        print(f"featx predict: {why}: cannot check that {model} is the checkpoint it was trained on "
              f"({block['encoder']}); its predictions are wrong if it is not", file=sys.stderr)


def _not_done(caches, blocks) -> dict:
    """{id: why} of the items not done in some cache (its `error`, or "not extracted"), the modality named when
    the classifier has several blocks."""
    from featx.cache import open_cache

    reasons = {}
    for path, block in zip(caches, blocks):
        with open_cache(path) as cache:
            for i in np.flatnonzero(~cache.done):
                why = str(cache.error[i]) or "not extracted"
                why = f"{block['modality']}: {why}" if len(blocks) > 1 else why
                item = str(cache.ids[i])
                reasons[item] = f"{reasons[item]}; {why}" if item in reasons else why
    return reasons


def _say_relative(encoder):
    """One line on stderr when a classifier names its model by a relative folder (a cache of an earlier featx
    recorded the path as typed): it is read from the current folder, which may not be where it was trained."""
    import sys

    if not os.path.isabs(os.path.expanduser(encoder)) and os.path.isdir(encoder):
        print(f"featx predict: the classifier names its model by the relative path {encoder!r} (recorded by an "
              f"earlier featx); using the folder {os.path.abspath(encoder)}: check that it is the model it was "
              "trained with", file=sys.stderr)


def extraction_options(block, path, device, precision=None) -> dict:
    """featx extract's options for a classifier block: the extraction settings of the cache it was trained on
    (float32 and the defaults for a file that records none), `precision` in place of the recorded one when given.

    A recorded precision this device cannot run (bf16/fp16 autocast on a CPU) is a one-line FeatxError unless
    `precision` is given: other numbers than those it was trained on are the user's choice, not predict's. A given
    precision other than the recorded one is said in one line on stderr, as is a JPEG decoder other than the
    recorded one (nvJPEG recorded, predict on a CPU)."""
    import sys

    from featx.device import resolve_device, resolve_precision
    from featx.encoders.image import JPEG_DECODERS

    options = dict(block.get("extraction") or {"dtype": "float32"})
    decoder = options.pop("image_decode", None)  # recorded as the decoder; extract's option says where it runs
    if decoder is not None and decoder != JPEG_DECODERS["workers"]:
        options["image_decode"] = "device"
        here = JPEG_DECODERS[resolve_device(device).split(":")[0]]
        if here != decoder:
            print(f"featx predict: {block['encoder']}: JPEGs are decoded with {here} here; the classifier was "
                  f"trained on features of JPEGs decoded with {decoder} (pixels may differ by a level)",
                  file=sys.stderr)
    recorded = options.get("precision")
    if precision is not None:
        options["precision"] = precision
        if recorded is not None and resolve_precision(precision, resolve_device(device)) != recorded:
            print(f"featx predict: {block['encoder']}: extracting at --precision {precision}; the classifier was "
                  f"trained on features extracted at {recorded}, which differ from these", file=sys.stderr)
    elif recorded is not None:
        device = resolve_device(device)
        try:
            resolve_precision(recorded, device)
        except FeatxError:
            needs = "a GPU with bf16" if device.startswith("cuda") else "a CUDA device"
            raise FeatxError(f"{path}: the classifier was trained on features extracted at --precision {recorded}, "
                             f"which needs {needs}; run predict on one, or give it --precision (e.g. fp32) to "
                             "extract at another (the features then differ from those it was trained on)") from None
    return options


def _cache_of(paths, block) -> str:
    """The cache, of those extract wrote for a block's model (one per tower whose column the manifest has: CLIP's
    image and text), of the block's modality."""
    from featx.cache import open_cache

    for path in paths:
        with open_cache(path) as cache:
            if cache.modality == block["modality"]:
                return path
    raise FeatxError(f"the manifest gives {block['encoder']} no {block['modality']} input, which the classifier "
                     "was trained on")
