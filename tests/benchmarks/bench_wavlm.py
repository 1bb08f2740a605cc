#!/usr/bin/env python
"""WavLM attention benchmark: transformers' eager attention against featx's SDPA one (featx.encoders.wavlm_sdpa).

(1) Per model size (random init, real dimensions): WavLM-Base (hidden 768, 12 layers, group-norm conv features,
    no attention mask: a batch of 4 equal lengths) and WavLM-Large (1024, 24 layers, layer-norm conv features,
    a padded batch of 4 with an attention mask: lengths s, 0.9s, 0.8s, 0.7s). For each input length s, the forward
    `model(x, attention_mask=..., output_hidden_states=True)` is timed with each attention, runs alternating,
    best of --repeats after one warm-up; audio-s/s counts the real (unpadded) seconds. The same run gives the max
    abs difference of every hidden state between the two attentions (fp32; on CUDA also under bf16 autocast, as
    featx runs there, against the fp32 eager forward).
(2) The attention bias alone (--bias B,T;...: WavLM-Large's 16 heads, padded batches as in (1)): featx's one-pass
    build (featx.encoders.wavlm_sdpa.attention_bias: key padding and gated position bias written once, in the
    compute dtype) against the former one (an fp32 product, an fp32 masked_fill, then a cast), in fp32 and bf16,
    with the bytes each writes and reads of the (B, H, T, T) tensors (the (1, H, T, T) position bias not counted;
    nor, for the former, the padded copy SDPA's memory-efficient CUDA kernel makes of a mask when T % 8 != 0).
(3) The tiny WavLM: featx.extract end to end (decode, preprocess, batches, forward with SDPA, pooling, HDF5)
    against the bare forward with SDPA on the same length-sorted batches, pre-collated (the limit).

Run: python tests/benchmarks/bench_wavlm.py --sizes base,large --seconds 1,5,15 --large-layers 24 --bias 32,750
Standalone script (named bench_*.py so pytest does not collect it).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BATCH = 4
RATE = 16000
SIZES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      feat_extract_norm="group", do_stable_layer_norm=False),
         "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       feat_extract_norm="layer", do_stable_layer_norm=True)}


def build(size, layers=None, seed=0):
    """A random-init WavLMModel of `size` (real conv feature encoder), `layers` transformer blocks if given."""
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(seed)
    cfg = dict(SIZES[size], **({"num_hidden_layers": layers} if layers else {}))
    return WavLMModel(WavLMConfig(**cfg)).eval()


def batch(size, seconds, seed=0):
    """(input values (4, n), attention mask or None, real audio seconds): base equal lengths, large padded."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * RATE)
    x = torch.randn(BATCH, n, generator=g)
    if size == "base":
        return x, None, BATCH * seconds
    lengths = [int(n * (1 - 0.1 * k)) for k in range(BATCH)]
    mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long()
    return x * mask, mask, sum(lengths) / RATE


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward(model, x, mask, autocast=None):
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        return model(x, attention_mask=mask, output_hidden_states=True).hidden_states


def max_diff(a, b):
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(a, b))


def time_pair(eager, sdpa, x, mask, repeats, autocast=None):
    """Best seconds of `repeats` forwards of each model, alternating (fair under a varying machine load)."""
    best = {"eager": float("inf"), "sdpa": float("inf")}
    for _ in range(repeats):
        for name, model in (("eager", eager), ("sdpa", sdpa)):
            _sync(x.device)
            t = time.perf_counter()
            forward(model, x, mask, autocast)
            _sync(x.device)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def measure_size(size, args, device):
    """Rows {size, layers, seconds, precision, eager_s, sdpa_s, audio_s_per_s, speedup, max_abs_diff}."""
    from featx.encoders.wavlm_sdpa import use_sdpa_attention

    layers = args.large_layers if size == "large" else None
    eager = build(size, layers).to(device)
    sdpa = build(size, layers).to(device)
    use_sdpa_attention(sdpa)
    rows = []
    precisions = [("fp32", None)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" else [])
    for seconds in args.seconds:
        x, mask, audio = batch(size, seconds)
        x, mask = x.to(device), None if mask is None else mask.to(device)
        ref = forward(eager, x, mask)
        for precision, cast in precisions:
            got = forward(sdpa, x, mask, cast)   # also the warm-up
            row = {"size": size, "layers": eager.config.num_hidden_layers, "seconds": seconds,
                   "precision": precision, "max_abs_diff_vs_eager_fp32": max_diff(ref, got)}
            if cast is not None:
                row["eager_bf16_max_abs_diff_vs_eager_fp32"] = max_diff(ref, forward(eager, x, mask, cast))
            best = time_pair(eager, sdpa, x, mask, args.repeats, cast)
            row.update(eager_s=best["eager"], sdpa_s=best["sdpa"], eager_audio_s_per_s=audio / best["eager"],
                       sdpa_audio_s_per_s=audio / best["sdpa"], speedup=best["eager"] / best["sdpa"])
            print(_row_text(row), flush=True)
            rows.append(row)
    return rows


def _row_text(r):
    extra = (f"  eager-bf16 vs eager-fp32 {r['eager_bf16_max_abs_diff_vs_eager_fp32']:.2e}"
             if "eager_bf16_max_abs_diff_vs_eager_fp32" in r else "")
    return (f"{r['size']:5s} L={r['layers']:2d} {r['seconds']:4.0f}s x{BATCH} {r['precision']}: "
            f"eager {r['eager_audio_s_per_s']:8.2f} audio-s/s  sdpa {r['sdpa_audio_s_per_s']:8.2f} audio-s/s  "
            f"x{r['speedup']:.2f}  max|sdpa-eager(fp32)| {r['max_abs_diff_vs_eager_fp32']:.2e}{extra}")


def former_bias(module, hidden_states, position_bias, attention_mask, dtype):
    """The bias as featx built it before attention_bias: fp32 gate * position bias, masked_fill, cast."""
    b, t, _ = hidden_states.shape
    heads = hidden_states.view(b, t, module.num_heads, -1).transpose(1, 2)
    proj = module.gru_rel_pos_linear(heads).view(b, module.num_heads, t, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
    bias = (gate_a * (gate_b * module.gru_rel_pos_const - 1.0) + 2.0) * position_bias
    bias = bias.masked_fill(attention_mask[:, None, None, :].ne(1), float("-inf"))
    return bias.to(dtype)


def bias_only(args, device):
    """Rows {batch, frames, precision, former_ms, one_pass_ms, speedup, former_gb, one_pass_gb}."""
    from featx.encoders.wavlm_sdpa import attention_bias

    attention = build("large", layers=1).to(device).encoder.layers[0].attention
    rows = []
    for shape in args.bias:
        b, t = shape
        g = torch.Generator().manual_seed(0)
        h = torch.randn(b, t, attention.embed_dim, generator=g).to(device)
        lengths = torch.tensor([int(t * (1 - 0.1 * (k % BATCH))) for k in range(b)], device=device)
        mask = (torch.arange(t, device=device)[None] < lengths[:, None]).long()
        with torch.inference_mode():
            pos = attention.compute_bias(t, t).unsqueeze(0)
        n = b * attention.num_heads * t * t
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            builds = {"former": former_bias, "one_pass": attention_bias}
            best = dict.fromkeys(builds, float("inf"))
            with torch.inference_mode():
                same = torch.equal(former_bias(attention, h, pos, mask, dtype), attention_bias(attention, h, pos, mask,
                                                                                              dtype))
                for _ in range(args.repeats + 1):   # the first round is the warm-up
                    for name, fn in builds.items():
                        _sync(device)
                        tic = time.perf_counter()
                        fn(attention, h, pos, mask, dtype)
                        _sync(device)
                        best[name] = min(best[name], time.perf_counter() - tic)
            size = dtype.itemsize
            # former: write 4, masked_fill read 4 + write 4, cast (bf16 only) read 4 + write size; one pass: write size
            former_bytes = n * (12 + (4 + size if size != 4 else 0))
            row = {"batch": b, "frames": t, "precision": precision, "former_ms": 1e3 * best["former"],
                   "one_pass_ms": 1e3 * best["one_pass"], "speedup": best["former"] / best["one_pass"],
                   "former_gb": former_bytes / 1e9, "one_pass_gb": n * size / 1e9, "equal": same}
            print(f"bias B={b:3d} T={t:4d} H={attention.num_heads} {precision}: former {row['former_ms']:8.2f} ms "
                  f"({row['former_gb']:.2f} GB)  one pass {row['one_pass_ms']:8.2f} ms ({row['one_pass_gb']:.2f} GB)  "
                  f"x{row['speedup']:.2f}  bitwise equal: {same}", flush=True)
            rows.append(row)
    return rows


def tiny_featx_vs_bare(args, device):
    """audio-s/s of featx.extract on the tiny WavLM (SDPA) against its bare forward on the same batches."""
    import numpy as np
    import pandas as pd
    import soundfile as sf

    from featx import extract
    from featx.demo.tiny import build_tiny_wavlm
    from featx.encoders import load_encoder
    from featx.extraction.pipeline import CPU_BATCH_SECONDS

    root = tempfile.mkdtemp(prefix="bench-wavlm-")
    model_dir = build_tiny_wavlm(os.path.join(root, "tiny"))
    rng = np.random.default_rng(0)
    seconds = rng.uniform(*args.tiny_seconds, args.tiny_n)
    rows = []
    for k, s in enumerate(seconds):
        sf.write(os.path.join(root, f"a{k}.wav"), (0.1 * rng.standard_normal(int(s * RATE))).astype("float32"), RATE)
        rows.append({"id": f"a{k}", "audio": f"a{k}.wav"})
    manifest = os.path.join(root, "m.csv")
    pd.DataFrame(rows).to_csv(manifest, index=False)
    budget = CPU_BATCH_SECONDS if device.type == "cpu" else None
    opts = dict(device=str(device), batch_size=args.tiny_batch, max_batch_seconds=budget, progress=False,
                overwrite=True, audio_attention="sdpa", num_workers=0)
    extract(manifest, [model_dir], os.path.join(root, "warm"), **opts)
    enc = load_encoder(model_dir, device=str(device), audio_attention="sdpa")
    pre = enc.preprocessor()
    feats = sorted((pre(sf.read(os.path.join(root, r["audio"]), dtype="float32")[0]) for r in rows),
                   key=len, reverse=True)
    batches, cur = [], []
    for f in feats:   # featx's batches: longest first, at most batch_size, padded seconds within the budget
        if cur and (len(cur) == args.tiny_batch or (budget and (len(cur) + 1) * len(cur[0]) / RATE > budget)):
            batches.append(cur)
            cur = []
        cur.append(f)
    batches = [enc.collate(b) for b in batches + [cur]]
    best_bare = best_featx = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                enc.forward(b)
        _sync(device)
        best_bare = min(best_bare, time.perf_counter() - t)
        t = time.perf_counter()
        extract(manifest, [model_dir], os.path.join(root, "out"), **opts)
        best_featx = min(best_featx, time.perf_counter() - t)
    shutil.rmtree(root, ignore_errors=True)
    total = float(seconds.sum())
    res = {"items": len(rows), "audio_seconds": total, "bare_audio_s_per_s": total / best_bare,
           "featx_audio_s_per_s": total / best_featx, "featx_over_bare": best_bare / best_featx}
    print(f"tiny WavLM, {len(rows)} files, {total:.0f} audio-s: bare {res['bare_audio_s_per_s']:.0f} audio-s/s, "
          f"featx (with model load) {res['featx_audio_s_per_s']:.0f} audio-s/s, featx/bare "
          f"{res['featx_over_bare']:.2f}x (target >= 0.9)", flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="base,large", help="comma-separated: base,large (empty: none)")
    p.add_argument("--seconds", default="1,5,15", help="input lengths in seconds (the longest item of a batch)")
    p.add_argument("--large-layers", type=int, default=24, help="blocks of the large model (24 is WavLM-Large)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bias", default="", help="B,T shapes of the bias-only timing, ';'-separated (empty: none); "
                                             "e.g. 32,750 (32 items of 15 s)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True, help="featx vs bare, tiny model")
    p.add_argument("--tiny-n", type=int, default=64)
    p.add_argument("--tiny-seconds", default="0.3,1.5", help="min,max seconds of the tiny benchmark's files")
    p.add_argument("--tiny-batch", type=int, default=16)
    args = p.parse_args(argv)
    args.seconds = [float(s) for s in args.seconds.split(",") if s]
    args.bias = [tuple(int(v) for v in shape.split(",")) for shape in args.bias.split(";") if shape]
    args.tiny_seconds = tuple(float(s) for s in args.tiny_seconds.split(","))
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), {device} {gpu}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    for size in [s for s in args.sizes.split(",") if s]:
        measure_size(size, args, device)
    if args.bias:
        bias_only(args, device)
    if args.tiny:
        tiny_featx_vs_bare(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
