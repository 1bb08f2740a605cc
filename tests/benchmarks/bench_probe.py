"""Benchmark (not collected by pytest): the batched torch probe vs scikit-learn's per-layer loop.

All layers of an L-layer, D-wide cache of N items, K stratified folds (featx's own make_folds); in each fold the
inner dev split selects the regularisation per layer, as `featx probe` does, and the test fold is scored. Both
sides see the same folds, grid and standardisation. Each side is timed `--repeats` times, interleaved (the
machine may be shared: the best time of each is kept), and the script prints one table: the time of each, the
ratio, and the largest per-layer difference of the pooled out-of-fold primary metric (f1_macro for classes,
MAE for numbers) and of accuracy. A smaller size is measured in the same run (`--small`, 0 to skip).

Run: PYTHONPATH=. python tests/benchmarks/bench_probe.py [--task classification|regression|both] [--n 2000]
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from featx import metrics  # noqa: E402
from featx.probing.estimators import BatchedLinearProbe, LayerProbe  # noqa: E402
from featx.probing.splits import make_folds  # noqa: E402


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


def sweep(make, X, y, units):
    """(seconds, (N_test_pooled, L) out-of-fold predictions, the last fitted estimator) of one probe."""
    start, preds = time.perf_counter(), []
    for train, dev, test in units:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = make().fit(X[train], y[train], X[dev], y[dev])
        preds.append(est.predict_layers(X[test]))
    return time.perf_counter() - start, np.concatenate(preds), est


def run(task, n, layers, dim, folds, device="cpu", repeats=2):
    """One size: returns a dict of the figures printed."""
    X, y = data(n, layers, dim, task)
    units, _ = make_folds(y, None, task, folds, seed=0)
    truth = y[np.concatenate([t for _, _, t in units])]
    makers = {"batched": lambda: BatchedLinearProbe(device=device), "sklearn": lambda: LayerProbe()}
    best, preds, method = {"batched": np.inf, "sklearn": np.inf}, {}, ""
    for _ in range(repeats):
        for name, make in makers.items():
            seconds, preds[name], est = sweep(make, X, y, units)
            best[name] = min(best[name], seconds)
            if name == "batched":
                method = getattr(est, "method_", "logistic" if task == "classification" else "ridge")
    primary = metrics.PRIMARY[task]
    names = [primary] + (["acc"] if task == "classification" else [])
    diff = {}
    for m in names:
        s = {k: np.array([metrics.compute(task, truth, p[:, i])[m] for i in range(layers)]) for k, p in preds.items()}
        diff[m] = float(np.max(np.abs(s["batched"] - s["sklearn"])))
        diff[m + "_best"] = {k: float(v.max() if metrics.higher_is_better(m) else v.min()) for k, v in s.items()}
    return dict(task=task, n=n, layers=layers, dim=dim, folds=folds, sklearn=best["sklearn"],
                batched=best["batched"], ratio=best["sklearn"] / best["batched"], diff=diff, method=method)


def show(r, primary):
    d = r["diff"]
    extra = f"  max|d acc| {d['acc']:.4f}" if "acc" in d else ""
    print(f"| {r['task']} | N={r['n']} L={r['layers']} D={r['dim']} folds={r['folds']} | {r['sklearn']:7.1f} s "
          f"| {r['batched']:7.1f} s | {r['ratio']:5.1f}x | max|d {primary}| {d[primary]:.4f}{extra} "
          f"(best layer {d[primary + '_best']['sklearn']:.4f} vs {d[primary + '_best']['batched']:.4f}) "
          f"| {r['method']} |", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="classification", choices=["regression", "classification", "both"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="times each side runs; the best time is kept")
    ap.add_argument("--small", type=int, default=1, help="also measure N=600 L=13 D=384 (1) or not (0)")
    ap.add_argument("--device", default="cpu", help="for the batched probe: cpu or cuda")
    a = ap.parse_args()
    import torch

    import featx
    print(f"featx {os.path.dirname(featx.__file__)}; torch threads {torch.get_num_threads()}, cpu count "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; best of {a.repeats}")
    print("| task | size | sklearn loop | batched | ratio | score difference (pooled out-of-fold, per layer) "
          "| batched method |")
    print("|---|---|---|---|---|---|---|")
    for task in (["regression", "classification"] if a.task == "both" else [a.task]):
        sizes = [(a.n, a.layers, a.dim)] + ([(600, 13, 384)] if a.small else [])
        for n, layers, dim in sizes:
            show(run(task, n, layers, dim, a.folds, a.device, a.repeats), metrics.PRIMARY[task])
    print(f"load average after {os.getloadavg()[0]:.1f}")
