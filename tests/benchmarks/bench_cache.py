"""Time featx's cache writer: per-part writes (CacheWriter.write) and the consolidation (CacheWriter.close).

Standalone (not collected by pytest):
    python tests/benchmarks/bench_cache.py --n 8192 16384 [--part 2048] [--layers 25] [--dim 1024]
        [--dtype float16] [--order sequential|scattered|longest] [--seq] [--profile] [--dir DIR]

Each part is random float32 (B, L, D) values, cast by the writer to the storage dtype. The first write is
timed apart (it imports torch for the cast). --order scattered writes the parts' items interleaved
(part k holds items k, k + P, ...); --order longest writes a random permutation of the items in parts, each
part's items unsorted, as featx's longest-first batching does. Prints one line per n, close() split into the
copy, the fsync and rename of the new file, and removing the parts.

Measured on a shared 2-core CPU (ext4 mounted with discard), L=25, D=1024, float16, one pooling; before ->
after the consolidation and write changes of session 6 (close: copy + fsync/rename + removing the parts):
  n=8192,  parts of 2048 in order:         writes 0.34 -> 0.24 s/part, close 2.35 -> 1.61 s (copy 1.44 -> 0.89)
  n=16384, parts of 2048 in order:         writes 0.34 -> 0.23 s/part, close 4.42 -> 4.19 s (copy 2.86 -> 1.72)
  n=8192,  parts of 2048, longest-first:   writes 0.48 -> 0.24 s/part, close 3.33 -> 1.93 s (copy 2.16 -> 1.01)
  n=16384, parts of 2048, longest-first:   writes 0.43 -> 0.25 s/part, close 7.15 -> 3.47 s (copy 5.66 -> 1.99)
  n=16384, parts of 128, longest-first:    close 13.8 -> 4.6 s (copy 11.9 -> 2.8)
  n=4096, parts of 1024, longest-first, --seq (1-7 positions):  writes 0.76 -> 0.68 s/part, close 49 -> 4.8 s
Removing the parts (0.55-2.1 s for 840 MB, varying) is I/O wait of the file system's online discard.
Session 9, the new file written to the disk while it is built (writer._EarlySync), n=8192, parts of 1024,
longest-first, medians of 6 paired runs on the loaded 2-core VM: close 2.21 -> 1.77 s, fsync+rename 0.18 ->
0.01 s (the sync of the last block now ends inside the copy). About 40% of the copy is HDF5's Fletcher-32 (on
reading the parts and on writing the file, ~0.2 s per 420 MB each, measured with perf).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time

import numpy as np


SPENT = {}  # seconds in the wrapped functions of close(): name -> seconds


def timed(module, name):
    """Wrap module.name so that the seconds spent in it add up in SPENT[name]."""
    inner = getattr(module, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.perf_counter() - t

    setattr(module, name, wrapper)


def run(n, args, root):
    from featx.cache import CacheWriter

    path = os.path.join(root, f"bench-{n}.h5")
    rng = np.random.default_rng(0)
    ids = [f"s{k:07d}" for k in range(n)]
    block = rng.standard_normal((args.part, args.layers, args.dim)).astype(np.float32)
    P = -(-n // args.part)
    if args.order == "scattered":
        batches = [np.arange(k, n, P) for k in range(P)]
    elif args.order == "longest":
        perm = rng.permutation(n)
        batches = [perm[s:s + args.part] for s in range(0, n, args.part)]
    else:
        batches = [np.arange(s, min(s + args.part, n)) for s in range(0, n, args.part)]
    seq_lengths = rng.integers(1, 8, n) if args.seq else None
    writer = CacheWriter(path, ids=ids, attrs={"model": "synthetic", "modality": "text"}, poolings=["mean"],
                         num_layers=args.layers, hidden_size=args.dim, dtype=args.dtype, seq=args.seq,
                         overwrite=True)
    prof = cProfile.Profile() if args.profile else None
    times = []
    for idx in batches:
        seq = [block[j % args.part, None].repeat(seq_lengths[j], 0) for j in idx] if args.seq else None
        t = time.perf_counter()
        if prof is not None and times:
            prof.enable()
        writer.write(idx, {"mean": block[:len(idx)]}, seq)
        if prof is not None:
            prof.disable()
        times.append(time.perf_counter() - t)
    if prof is not None:
        print(f"--- writes, n={n}", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        prof = cProfile.Profile()
        prof.enable()
    SPENT.clear()
    t = time.perf_counter()
    writer.close()
    close = time.perf_counter() - t
    publish, remove = SPENT.get("_publish", 0.0), SPENT.get("remove_parts", 0.0)
    if prof is not None:
        prof.disable()
        print(f"--- close, n={n}", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    size = os.path.getsize(path)
    later = times[1:] or times
    print(f"n={n} L={args.layers} D={args.dim} {args.dtype} parts of {args.part} ({args.order}"
          f"{', seq' if args.seq else ''}): first write {times[0]:.2f}s, later writes {np.mean(later):.3f}s/part "
          f"(min {min(later):.3f}), close {close:.2f}s for {size / 1e6:.0f} MB ({size / 1e6 / close:.0f} MB/s): "
          f"copy {close - publish - remove:.2f}s, fsync+rename {publish:.2f}s, removing the parts {remove:.2f}s")
    os.remove(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--part", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--order", default="sequential", choices=["sequential", "scattered", "longest"])
    ap.add_argument("--seq", action="store_true", help="also store sequences (1-7 rows per item)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the later writes and of close, on stderr")
    ap.add_argument("--dir", default=None, help="where the cache is written (default: a temporary folder)")
    args = ap.parse_args()
    from featx.cache import parts, writer as cache_writer

    timed(cache_writer, "_publish")  # fsync of the new final file, rename, fsync of its folder
    timed(parts, "remove_parts")
    root = args.dir or tempfile.mkdtemp(prefix="bench_cache-")
    try:
        for n in args.n:
            run(n, args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
