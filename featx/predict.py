"""`featx predict`: run a saved classifier (a probe, or a fine-tuned model) on new raw files."""
from __future__ import annotations

import os
import tempfile

import pandas as pd

from featx.errors import FeatxError


def predict(manifest, classifier, out=None, cache_dir=None, device="auto", batch_size=16,
            progress=True) -> pd.DataFrame:
    """DataFrame(id, prediction) for the manifest's items.

    classifier: a `.safetensors` file saved by `featx probe --save-classifier` (its encoders are run by
    `featx extract` into `cache_dir`, a temporary folder when None, then the probe is applied), or the
    `model/` folder saved by `featx finetune`. Items that fail to decode get an empty prediction and are
    named on stderr. Writes `out` (CSV, or Parquet for .parquet) when given.
    """
    path = os.fspath(classifier)
    if os.path.isdir(path):
        from featx.finetune import load_finetuned

        from featx.device import resolve_device
        result = load_finetuned(path, device=resolve_device(device)).predict_manifest(manifest, batch_size)
    elif os.path.isfile(path):
        result = _predict_probe(manifest, path, cache_dir, device, batch_size, progress)
    else:
        raise FeatxError(f"classifier not found: {path}")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        (result.to_parquet if str(out).endswith(".parquet") else result.to_csv)(out, index=False)
    return result


_EXTRACT_ADVICE = "run with the settings it was made with, or use --overwrite to start again"
_PREDICT_ADVICE = ("predict extracts float32 with the classifier's model and pooling: give it another --cache-dir "
                   "(or none: a temporary folder)")


def _predict_probe(manifest, path, cache_dir, device, batch_size, progress):
    from featx.probing.classifier import Classifier
    from featx.extraction.pipeline import extract, print_summary
    from featx.data.manifest import read_manifest

    clf = Classifier.load(path)
    ids = read_manifest(manifest)["id"].astype(str)
    with tempfile.TemporaryDirectory(prefix="featx-predict-") as tmp:
        folder = os.fspath(cache_dir) if cache_dir else tmp
        caches = []
        for block in clf.blocks:
            try:
                res = extract(manifest, [block["encoder"]], folder, pool=[block["pooling"]], dtype="float32",
                              device=device, batch_size=batch_size, progress=progress, summary=bool(cache_dir))
            except FeatxError as e:   # extract's advice names its --overwrite, which predict does not have
                raise FeatxError(str(e).replace(_EXTRACT_ADVICE, _PREDICT_ADVICE)) from None
            if not cache_dir:  # not the path of a cache that is gone once the predictions are made
                for entry in res.caches:
                    print_summary(entry, where="a temporary folder, removed after the predictions")
            caches.append(_cache_of(res.paths, block))
        got_ids, pred = clf.predict_cache(caches)
    got = pd.Series(list(pred), index=list(got_ids), dtype=object)
    return pd.DataFrame({"id": ids, "prediction": ids.map(got)})


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
