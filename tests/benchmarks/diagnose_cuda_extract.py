#!/usr/bin/env python
"""Where featx's GPU extraction loses time against the bare forward (not collected by pytest; needs CUDA).

Uses the real-size random-init models and manifests bench_extract.py leaves under --root (run it first, with
--out ROOT). For each kind:
  precision  the bare forward (output_hidden_states=True) of one batch, timed under bf16 autocast and with the
             weights in bf16 (--precision bf16-weights), and how far each one's per-layer means are from fp32:
             max |diff| / max |x| per layer, largest over layers, and the mean over layers.
  syncs      featx extract of the first --n items under torch.cuda.set_sync_debug_mode("warn"): each place in
             Python that made the host wait for the GPU, with its count (a wait per batch idles the GPU while
             the host prepares the next one).
  timeline   the same extract under torch.profiler (CUDA activity only): the fraction of the span in which a
             kernel ran, and the largest gaps between kernels.
  host       the same extract with its main thread's seconds split: queueing groups on the device
             (Runner.start: collate, launches), fetching their values (Runner.finish, of it waiting for the
             device), handing them to the writer (blocks while its queue is full), and the rest (waiting for
             decoded items, the start).
  fork       in a fresh process: how long the 14 forks of DataLoader workers take after importing torch, after
             asking CUDA about the device (is_bf16_supported), with a CUDA context, with the model on the GPU,
             and with 2 GB of pinned memory cached.

Run: PYTHONPATH=. python tests/benchmarks/diagnose_cuda_extract.py --root /tmp/featx-bench [--kinds text,image,audio]
"""
import argparse
import collections
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BATCH = {"text": 256, "image": 256, "audio": 32}
N = {"text": 4096, "image": 2048, "audio": 256}


def batch_of(kind, enc):
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        vocab = enc.model.config.vocab_size
        ids = torch.randint(min(1000, vocab // 2), vocab, (BATCH[kind], 128), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "image":
        side = enc.model.config.image_size
        return {"pixel_values": torch.randn(BATCH[kind], 3, side, side, generator=g)}
    values = 0.1 * torch.randn(BATCH[kind], 8 * 16000, generator=g)
    mask = torch.ones(values.shape, dtype=torch.long)
    mask[BATCH[kind] // 2:, 5 * 16000:] = 0  # half the batch 5 s of 8: padded, as featx's batches are
    return {"input_values": values, "attention_mask": mask}


def means(enc, x):
    from featx.encoders.pooling import masked_mean

    with torch.no_grad(), enc.autocast():
        hs, mask = enc.forward(x)
        return masked_mean(hs, mask).float().cpu().numpy()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(enc, x, reps=5):
    with torch.no_grad(), enc.autocast():
        x = {k: enc.to_device(v) for k, v in x.items()}
        for _ in range(2):
            enc.model(**x, output_hidden_states=True)
        sync(enc.device.type)
        t = time.perf_counter()
        for _ in range(reps):
            enc.model(**x, output_hidden_states=True)
        sync(enc.device.type)
    return (time.perf_counter() - t) / reps


def precision(kind, model_dir, device):
    from featx.encoders import load_encoder

    out, ref = {}, None
    for prec in ("fp32", "bf16", "bf16-weights") if device == "cuda" else ("fp32", "bf16-weights"):
        enc = load_encoder(model_dir, device=device, precision=prec)
        x = batch_of(kind, enc)
        m = means(enc, x)
        row = {"items_per_s": BATCH[kind] / timed(enc, x)}
        if ref is None:
            ref = m
        else:
            scale = np.abs(ref).max(axis=(0, 2))
            rel = np.abs(m - ref).max(axis=(0, 2)) / scale
            row.update(max_rel_diff=float(rel.max()), mean_rel_diff=float(rel.mean()),
                       output_layer_rel_diff=float(rel[-1]))
        out[prec] = row
        del enc
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def run_extract(kind, root, n, out, model_dir, device, image_decode="workers"):
    import pandas as pd

    from featx.extraction.pipeline import extract

    manifest = os.path.join(root, "data", kind, f"{kind}.csv")
    few = os.path.join(out, f"{kind}-{n}.csv")
    os.makedirs(out, exist_ok=True)
    pd.read_csv(manifest).head(n).to_csv(few, index=False)
    # relative paths in the manifest are relative to its folder
    df = pd.read_csv(few)
    if kind != "text":
        df[kind] = [os.path.join(os.path.dirname(manifest), p) for p in df[kind]]
        df.to_csv(few, index=False)
    return lambda precision: extract(few, [model_dir], out, device=device, image_decode=image_decode,
                                     batch_size=BATCH[kind], precision=precision, progress=False, overwrite=True)


def syncs(run, precision):
    seen = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(precision)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            seen[f"{os.path.relpath(w.filename, os.path.dirname(os.path.dirname(torch.__file__)))}:{w.lineno}"] += 1
    return dict(seen.most_common(12))


def timeline(run, precision):
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(precision)
    wall = time.perf_counter() - t
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return {"wall_s": wall}
    busy, gaps, (s0, e0) = 0.0, [], spans[0]
    for s, e in spans[1:]:
        if s > e0:
            busy += e0 - s0
            gaps.append(s - e0)
            s0, e0 = s, e
        else:
            e0 = max(e0, e)
    busy += e0 - s0
    span = spans[-1][1] - spans[0][0]
    gaps = np.array(gaps) / 1e3  # ms
    return {"wall_s": wall, "kernel_span_s": span / 1e6, "busy_fraction_of_span": busy / span,
            "busy_fraction_of_wall": busy / 1e6 / wall, "gaps_over_1ms": int((gaps > 1).sum()),
            "gap_ms_over_1ms_total": float(gaps[gaps > 1].sum()), "largest_gaps_ms": np.sort(gaps)[-8:][::-1].round(1).tolist()}


def host(run, precision):
    """Seconds of the main thread in each stage of one extract (see the module doc)."""
    from featx.encoders import image
    from featx.extraction import batching, pipeline

    spent = collections.Counter()
    first = []

    def timed(owner, name, key):
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(owner, name, wrapper)
        return inner

    saved = [(batching.Runner, "start", timed(batching.Runner, "start", "start (collate, launch)")),
             (batching.Runner, "finish", timed(batching.Runner, "finish", "finish (fetch values)")),
             (batching.Launched, "wait", timed(batching.Launched, "wait", "of finish: waiting for the device")),
             (batching.Runner, "run_batch", timed(batching.Runner, "run_batch", "of start: run_batch")),
             (pipeline._WriteThread, "put", timed(pipeline._WriteThread, "put", "writer hand-off")),
             (pipeline, "_run", timed(pipeline, "_run", "_run (all)")),
             (image.ImageEncoder, "admit", timed(image.ImageEncoder, "admit", "of start: admit (JPEGs on the device)")),
             (image.ImageEncoder, "_decode_jpegs", timed(image.ImageEncoder, "_decode_jpegs",
                                                         "of admit: decode_jpeg")),
             (image.ImageEncoder, "pixels_of", timed(image.ImageEncoder, "pixels_of", "pixels_of (processor)")),
             (pipeline, "unpack_chunk", timed(pipeline, "unpack_chunk", "unpack_chunk")),
             (pipeline, "_start_group", timed(pipeline, "_start_group", "_start_group"))]
    inner_run, inner_start = saved[5][2], saved[-1][2]

    def run_noting(*a, **k):  # when the first group starts, from the start of _run
        first.append(time.perf_counter())
        return inner_run(*a, **k)

    def start_noting(*a, **k):
        if len(first) == 1:
            first.append(time.perf_counter())
        return inner_start(*a, **k)
    pipeline._run, pipeline._start_group = (lambda *a, **k: _timed_call(spent, "_run (all)", run_noting, a, k),
                                            lambda *a, **k: _timed_call(spent, "_start_group", start_noting, a, k))
    try:
        t = time.perf_counter()
        run(precision)
        total = time.perf_counter() - t
    finally:
        for owner, name, inner in saved:
            setattr(owner, name, inner)
    out = {k: round(v, 3) for k, v in spent.items()}
    out["rest of _run (decoded items, start)"] = round(spent["_run (all)"] - spent["start (collate, launch)"]
                                                       - spent["finish (fetch values)"] - spent["writer hand-off"], 3)
    out["extract (all, closing included)"] = round(total, 3)
    if len(first) == 2:
        out["first group started, after the start of _run"] = round(first[1] - first[0], 3)
    return out


def _timed_call(spent, key, fn, a, k):
    t = time.perf_counter()
    try:
        return fn(*a, **k)
    finally:
        spent[key] += time.perf_counter() - t


FORK_PROBE = r"""
import os, sys, time, json
def forks(k=14):
    t = time.perf_counter()
    pids = []
    for _ in range(k):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    spent = time.perf_counter() - t
    for pid in pids:
        os.waitpid(pid, 0)
    return round(spent * 1e3, 1)
out = {}
import torch
out["after import torch"] = forks()
torch.cuda.is_available(); torch.cuda.is_bf16_supported()
out["after is_bf16_supported"] = forks()
torch.zeros(1, device="cuda")
out["with a CUDA context"] = forks()
from featx.encoders import load_encoder
enc = load_encoder(sys.argv[1], device="cpu", precision=sys.argv[2])
out["model loaded on the CPU"] = forks()
enc.to("cuda")
out["model on the GPU"] = forks()
x = torch.empty(2 << 30, dtype=torch.uint8, pin_memory=True); del x
out["2 GB pinned, cached"] = forks()
print(json.dumps(out))
"""


def fork(model_dir, precision):
    """ms of 14 forks at each stage, in a fresh process."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", FORK_PROBE, model_dir, precision], capture_output=True, text=True,
                       timeout=120)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/featx-bench")
    ap.add_argument("--kinds", default="text,image,audio")
    ap.add_argument("--precision", default="bf16-weights", help="featx's precision in the syncs and timeline steps")
    ap.add_argument("--steps", default="precision,syncs,timeline,host,fork")
    ap.add_argument("--json", default=None)
    ap.add_argument("--size", default="large", help="the models bench_extract.py built (tiny: a CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--image-decode", default="workers", help="featx's --image-decode for images")
    ap.add_argument("--n", default=None, help="items per kind for syncs and timeline (text=N,...; default %s)" % N)
    args = ap.parse_args()
    steps = args.steps.split(",") if args.device == "cuda" else [x for x in args.steps.split(",")
                                                                   if x in ("precision", "host")]
    n = dict(N, **{k: int(v) for k, v in (p.split("=") for p in args.n.split(","))}) if args.n else N
    result = {}
    for kind in args.kinds.split(","):
        model_dir = os.path.join(args.root, "models", f"{args.size}-{kind}")
        if not os.path.isdir(model_dir):
            print(f"[{kind}] no model at {model_dir}: run bench_extract.py --out {args.root} first", file=sys.stderr)
            continue
        r = result[kind] = {}
        if "precision" in steps:
            r["precision"] = precision(kind, model_dir, args.device)
            print(f"[{kind}] precision {json.dumps(r['precision'])}", flush=True)
        run = run_extract(kind, args.root, n[kind], os.path.join(args.root, "diagnose"), model_dir, args.device,
                          args.image_decode)
        run(args.precision)  # warm-up: workers, CUDA context, cudnn autotuning
        for step, measure, what in (("syncs", syncs, "host waits for the GPU, by place"),
                                    ("timeline", timeline, "GPU timeline"), ("host", host, "main thread, seconds")):
            if step in steps:
                r[step] = measure(run, args.precision)
                print(f"[{kind}] {what}: {json.dumps(r[step])}", flush=True)
        if "fork" in steps:
            r["fork_ms"] = fork(model_dir, args.precision)
            print(f"[{kind}] 14 forks, ms: {json.dumps(r['fork_ms'])}", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
