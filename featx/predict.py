"""`featx predict`: run a saved classifier (a probe, or a fine-tuned model) on new raw files."""
from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pandas as pd

from featx.errors import FeatxError, OptionAdvice


def predict(manifest, classifier, out=None, cache_dir=None, device="auto", batch_size=16,
            progress=True, precision=None) -> pd.DataFrame:
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
    """
    path = os.fspath(classifier)
    if os.path.isdir(path) and precision is not None:
        raise FeatxError(f"{path}: --precision is for a probe's classifier; a fine-tuned model predicts in fp32 "
                         "with its saved weights")
    if os.path.isdir(path):
        from featx.finetune import load_finetuned

        from featx.device import resolve_device
        result = load_finetuned(path, device=resolve_device(device)).predict_manifest(manifest, batch_size)
    elif os.path.isfile(path):
        result = _predict_probe(manifest, path, cache_dir, device, batch_size, progress, precision)
    else:
        raise FeatxError(f"classifier not found: {path}")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        (result.to_parquet if str(out).endswith(".parquet") else result.to_csv)(out, index=False)
    return result


_EXTRACT_ADVICE = "run with the settings it was made with, or use --overwrite to start again"
_PREDICT_ADVICE = ("predict extracts with the classifier's model, pooling and extraction settings: give it another "
                   "--cache-dir (or none: a temporary folder)")


def _predict_probe(manifest, path, cache_dir, device, batch_size, progress, precision):
    from featx.probing.classifier import Classifier, prediction_table
    from featx.extraction.pipeline import extract, print_summary
    from featx.data.manifest import read_manifest

    clf = Classifier.load(path)
    settings = [extraction_options(block, path, device, precision) for block in clf.blocks]
    ids = read_manifest(manifest)["id"].astype(str)
    with tempfile.TemporaryDirectory(prefix="featx-predict-") as tmp:
        folder = os.fspath(cache_dir) if cache_dir else tmp
        caches = []
        for block, options in zip(clf.blocks, settings):
            _say_relative(block["encoder"])
            try:
                with warnings.catch_warnings():   # extract's options, e.g. --image-decode: predict takes the
                    warnings.simplefilter("ignore", OptionAdvice)   # classifier's, the user has none to change
                    res = extract(manifest, [block["encoder"]], folder, pool=[block["pooling"]], device=device,
                                  batch_size=batch_size, progress=progress, summary=bool(cache_dir), **options)
            except FeatxError as e:   # extract's advice names its --overwrite, which predict does not have
                raise FeatxError(str(e).replace(_EXTRACT_ADVICE, _PREDICT_ADVICE)) from None
            if not cache_dir:  # not the path of a cache that is gone once the predictions are made
                for entry in res.caches:
                    print_summary(entry, where="a temporary folder, removed after the predictions")
            caches.append(_cache_of(res.paths, block))
        got_ids, inputs = clf.cache_inputs(caches)
        pred = clf.predict(inputs) if len(got_ids) else []
        proba = clf.predict_proba(inputs) if clf.task == "classification" and len(got_ids) else None
        reasons = _not_done(caches, clf.blocks)
    return prediction_table(ids, got_ids, pred, clf.classes if clf.task == "classification" else None, proba,
                            reasons)


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
