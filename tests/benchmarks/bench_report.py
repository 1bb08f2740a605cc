"""Benchmark (not collected by pytest): `build_report` over N tiny encoders (default 30), with their caches.

Each encoder is a 4-layer, D=16 cache of 200 items; the results directory holds layer rows, a weighted sum
and learning curves for every encoder. Prints the wall time, the number of PNGs and the HTML size.
Run: PYTHONPATH=. python tests/benchmarks/bench_report.py [--encoders 30] [--out /tmp/bench_report]
"""
import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _report_fixtures import make_results_dir, write_cache  # noqa: E402
from featx.report import build_report  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", type=int, default=30)
    ap.add_argument("--out", default="/tmp/featx_bench_report")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    rng = np.random.default_rng(0)
    ids = [f"i{k:04d}" for k in range(200)]
    encoders, caches = [], []
    for e in range(args.encoders):
        name = f"org/tiny-encoder-{e:02d}"
        encoders.append((name, "text", 3, 1 + e % 3, 0.3 + 0.01 * e))
        caches.append(write_cache(os.path.join(args.out, f"c{e:02d}.h5"), ids,
                                  rng.standard_normal((200, 4, 16)), model=name))
    res = make_results_dir(os.path.join(args.out, "res"), encoders=encoders, seeds=(0, 1), train_sizes=(0.25, 1.0),
                           fusion=False, caches=caches)
    t0 = time.perf_counter()
    paths = build_report(res, os.path.join(args.out, "report"))
    took = time.perf_counter() - t0
    size = os.path.getsize(paths["html"]) / 2**20
    print(f"{args.encoders} encoders: {took:.1f} s, {len(paths['pngs'])} PNGs, report.html {size:.1f} MB")


if __name__ == "__main__":
    main()
