#!/usr/bin/env python
"""Where a bare forward spends its GPU time (not collected by pytest; needs CUDA): one batch of each real-size
random-init model that bench_extract.py builds (BERT-large 128 tokens, CLIP ViT-L/14 224 px, WavLM-Large with
padded 1-15 s audio), `model(**x, output_hidden_states=True)` under bf16 autocast as featx runs it, profiled with
torch.profiler; prints the kernels that take the most GPU time, grouped by kind (matrix products, attention,
convolution, normalisation, element-wise and copies).

Run: PYTHONPATH=. python tests/benchmarks/profile_cuda_forward.py [--models /tmp/featx-bench/models] [--batch 256]
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

KINDS = {"gemm": ("gemm", "sm90_xmma", "cutlass", "matmul", "nvjet"), "attention": ("flash", "fmha", "attention",
         "efficient"), "conv": ("conv", "cudnn", "implicit", "winograd"), "norm": ("norm",),
         "copy/cast": ("copy", "cast", "to_copy", "cat", "memcpy", "fill")}


def kind_of(name):
    low = name.lower()
    for kind, keys in KINDS.items():
        if any(k in low for k in keys):
            return kind
    return "element-wise/other"


def inputs(kind, enc, batch, rng):
    if kind == "text":
        ids = torch.from_numpy(rng.integers(0, enc.model.config.vocab_size, (batch, 128)))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 224, 224)}
    seconds = np.sort(rng.uniform(1, 15, batch))[::-1]
    n = int(seconds[0] * 16000)
    x = torch.zeros(batch, n)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for b, s in enumerate(seconds):
        m = int(s * 16000)
        x[b, :m], mask[b, :m] = torch.randn(m), 1
    return {"input_values": x, "attention_mask": mask}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/featx-bench/models")
    ap.add_argument("--kinds", default="text,image,audio")
    ap.add_argument("--batch", default="text=256,image=256,audio=32")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from featx.encoders import load_encoder
    batches = dict(kv.split("=") for kv in args.batch.split(","))
    rng = np.random.default_rng(0)
    for kind in args.kinds.split(","):
        path = os.path.join(args.models, f"large-{kind}")
        if not os.path.isdir(path):
            print(f"{kind}: no model at {path} (run bench_extract.py --size large --out {os.path.dirname(args.models)})")
            continue
        enc = load_encoder(path, device="cuda", precision="bf16")
        x = {k: v.cuda() for k, v in inputs(kind, enc, int(batches[kind]), rng).items()}
        with torch.inference_mode(), enc.autocast():
            for _ in range(2):
                enc.model(**x, output_hidden_states=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                enc.model(**x, output_hidden_states=True)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith("aten::")]
        total = sum(e.device_time_total for e in events)
        by_kind = {}
        for e in events:
            by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0) + e.device_time_total
        print(f"\n{kind}: one batch of {batches[kind]}, GPU time {total / 1e3:.1f} ms: " + ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
        for e in sorted(events, key=lambda e: -e.device_time_total)[:args.top]:
            print(f"  {100 * e.device_time_total / total:5.1f}%  {e.count:5d} calls  {e.key[:110]}")
        del enc, x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
