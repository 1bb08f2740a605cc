"""The demo's real data: 3,708 Amazon product-review snippets with mean human sentiment ratings in [-4, 4]
(Hutto & Gilbert, ICWSM 2014, MIT licence; see featx/demo/data/README.md), with fixed splits stratified on
the rating, and a synthetic image and sound per snippet derived from its rating.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import pandas as pd

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "amazonReviewSnippets_GroundTruth.txt.gz")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)   # train, dev, test
RATING_RANGE = (-4.0, 4.0)


def load_snippets() -> pd.DataFrame:
    """(3708 rows) id, text, label: the snippets in file order with their mean human rating."""
    with gzip.open(DATA, "rt", encoding="utf-8", newline="") as f:
        rows = [line.rstrip("\r\n").split("\t", 2) for line in f if line.strip()]
    df = pd.DataFrame(rows, columns=["id", "label", "text"])
    df["label"] = df["label"].astype(float)
    return df[["id", "text", "label"]]


def stratified_splits(labels, seed=0, fractions=SPLIT_FRACTIONS, bins=10) -> np.ndarray:
    """(N,) "train" / "dev" / "test", stratified on the rating's deciles: within each decile bin, the items in
    a random order (fixed by `seed`) are cut in the given fractions."""
    labels = np.asarray(labels, np.float64)
    edges = np.unique(np.quantile(labels, np.linspace(0, 1, bins + 1)[1:-1]))
    strata = np.digitize(labels, edges)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for s in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == s))
        cut = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        for name, part in zip(("train", "dev", "test"), np.split(members, cut)):
            out[part] = name
    return out


def stratified_subset(labels, n, seed=0) -> np.ndarray:
    """Sorted indices of n items drawn evenly over the rating's range (every item when n >= N)."""
    labels = np.asarray(labels, np.float64)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    picks = order[np.round(np.linspace(0, len(order) - 1, n)).astype(int)]
    return np.sort(np.unique(picks if len(np.unique(picks)) == n else rng.choice(len(labels), n, replace=False)))


def write_media(folder, key, y, rng, low=RATING_RANGE[0], high=RATING_RANGE[1]):
    """A 32x32 PNG whose red rises and blue falls with the rating y, and a short WAV tone whose pitch rises
    with it, each with noise of its own. Returns (image file name, audio file name)."""
    import soundfile as sf
    from PIL import Image

    level = (y - low) / (high - low)
    img = rng.normal(0, 20, (32, 32, 3)) + np.array([60 + 140 * level, 120, 200 - 140 * level])
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{key}.png"))
    rate = 16000
    t = np.arange(int(rate * rng.uniform(0.4, 0.8))) / rate
    wav = 0.4 * np.sin(2 * np.pi * (220 + 400 * level) * t) + 0.05 * rng.standard_normal(t.shape)
    sf.write(os.path.join(folder, f"{key}.wav"), wav.astype(np.float32), rate)
    return f"{key}.png", f"{key}.wav"


def make_review_dataset(folder, n=None, seed=0) -> str:
    """Write the manifest (id, text, image, audio, label, split) of n snippets (all by default) into `folder`
    with their synthetic images and sounds; returns the manifest's path. Splits are fixed per snippet
    (stratified on the rating over all 3,708 snippets), so a smaller n keeps each snippet's split."""
    os.makedirs(folder, exist_ok=True)
    df = load_snippets()
    df["split"] = stratified_splits(df["label"], seed=0)
    df = df.iloc[stratified_subset(df["label"], len(df) if n is None else int(n), seed)].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    media = [write_media(folder, f"r{k:04d}", y, rng) for k, y in enumerate(df["label"])]
    df["image"], df["audio"] = [m[0] for m in media], [m[1] for m in media]
    path = os.path.join(folder, "manifest.csv")
    df[["id", "text", "image", "audio", "label", "split"]].to_csv(path, index=False)
    return path
