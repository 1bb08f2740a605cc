"""Benchmark (not collected by pytest): batched torch probe vs scikit-learn's per-layer loop.

All layers of a 25-layer, D=1024 cache, N=2000 items, 5 stratified folds; in each fold an inner 20% dev
split selects the regularisation per layer, and the test fold is scored. Both sides see the same folds, the
same grid and the same standardisation; the script prints the time of each and the largest per-layer score
difference. Run: .venv/bin/python tests/bench_probe.py [--task regression|classification|both] [--n 2000]
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from featx import metrics  # noqa: E402
from featx.probing.splits import make_folds  # noqa: E402
from featx.probing.estimators import BatchedLinearProbe, LayerProbe  # noqa: E402


def data(n, layers, dim, task, seed=0):
    """Correlated features, like transformer layers: a shared random walk across depth plus noise; the label
    is readable best from the middle layers."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    X = np.empty((n, layers, dim), np.float32)
    direction = rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
    for l in range(layers):
        strength = np.exp(-((l - layers * 0.6) / (layers / 4)) ** 2)
        base = 0.9 * base + 0.45 * rng.standard_normal((n, dim)).astype(np.float32)
        X[:, l] = base + strength * 3 * z[:, None] * direction[None] * np.sqrt(dim) / 4
    y = np.clip(z * 1.3, -3, 3) if task == "regression" else np.where(z > 0, "pos", "neg").astype(object)
    return X, y


def run(task, n, layers, dim, folds, device="cpu"):
    X, y = data(n, layers, dim, task)
    units, _ = make_folds(y, None, task, folds, seed=0)
    out = {}
    for name, make in (("batched", lambda: BatchedLinearProbe(device=device)), ("sklearn", lambda: LayerProbe())):
        start, preds = time.perf_counter(), []
        for train, dev, test in units:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = make().fit(X[train], y[train], X[dev], y[dev])
            preds.append((test, est.predict_layers(X[test])))
        seconds = time.perf_counter() - start
        idx = np.concatenate([t for t, _ in preds])
        P = np.concatenate([p for _, p in preds])
        scores = np.array([metrics.compute(task, y[idx], P[:, l])[metrics.PRIMARY[task]] for l in range(layers)])
        out[name] = (seconds, scores)
    (tb, sb), (ts, ss) = out["batched"], out["sklearn"]
    primary = metrics.PRIMARY[task]
    print(f"{task}: N={n} L={layers} D={dim} folds={folds}  (primary metric {primary}, pooled out-of-fold)")
    print(f"  batched ({device}) : {tb:8.1f} s   best layer {int(np.argmax(sb) if metrics.higher_is_better(primary) else np.argmin(sb))}"
          f"  {primary} at best {sb.min() if primary == 'mae' else sb.max():.4f}")
    print(f"  sklearn loop  : {ts:8.1f} s   best layer {int(np.argmax(ss) if metrics.higher_is_better(primary) else np.argmin(ss))}"
          f"  {primary} at best {ss.min() if primary == 'mae' else ss.max():.4f}")
    print(f"  speed-up {ts / tb:.1f}x; max per-layer |score difference| {np.max(np.abs(sb - ss)):.4f}")
    return ts / tb, np.max(np.abs(sb - ss))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="both", choices=["regression", "classification", "both"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="for the batched probe: cpu or cuda")
    a = ap.parse_args()
    import torch
    print(f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    for task in (["regression", "classification"] if a.task == "both" else [a.task]):
        run(task, a.n, a.layers, a.dim, a.folds, a.device)
