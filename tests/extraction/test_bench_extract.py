"""Smoke test of the extraction benchmark script (tests/benchmarks/bench_extract.py) on tiny models and a few items."""
import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_extract.py")


def test_bench_extract_runs_on_tiny_models_and_reports_its_figures(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, BENCH, "--size", "tiny", "--kinds", "text,image,audio", "--n", "4",
                        "--naive-n", "2", "--batch-size", "2", "--device", "cpu", "--readback-n", "64",
                        "--readback-layers", "3", "--readback-dim", "16", "--out", str(tmp_path / "work"),
                        "--json", str(out_json)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "b/a" in r.stdout and "c/b" in r.stdout and "read one layer back, synthetic" in r.stdout
    figures = json.loads(out_json.read_text())
    assert [x["kind"] for x in figures["results"]] == ["text", "image", "audio"]
    for x in figures["results"]:
        assert x["n"] == 4 and x["num_layers"] == 3 and x["hidden_size"] == 32
        for key in ("rate_bare", "rate_featx", "rate_naive"):
            assert x[key]["items_per_s"] > 0 and x[key]["units_per_s"] > 0 and x[key]["gflop_per_s"] > 0
        assert x["featx"]["load_seconds"] > 0 and x["featx"]["seconds_with_load"] > x["featx"]["seconds"]
        assert 0 < x["featx"]["close_seconds"] < x["featx"]["seconds"]
        assert x["featx_over_bare"] > 0 and x["naive_over_featx"] > 0
        assert x["gflops_per_item"] > 0
        line = next(line for line in r.stdout.splitlines() if line.startswith(x["kind"]))
        assert "tiny" in line and x["unit"] in line
        # issue 15's CPU ratios against the plain tools, and where featx's main process spends its time
        h = x["host"]
        assert h["baseline_seconds"] > 0 and h["featx_seconds"] > 0 and h["ratio"] > 0
        assert h["ratio"] == (h["ratio_host"] if x["kind"] in ("image", "text") else h["ratio_whole"])
        assert h["met"] == (h["ratio"] <= 1.0 if x["kind"] == "image" else h["ratio"] >= float(h["target"][2:]))
        p = x["profile"]
        assert p["n"] == 4 and p["seconds_per_item"] > 0 and p["functions"]
        assert p["stages"]["forward"] > 0 and p["stages"]["collate (+ device preprocess)"] > 0
        assert f"  {x['kind']}: main-process profile, ms per item" in r.stdout
    assert "host cost against the plain tools" in r.stdout
    # without workers images decode in the main process's decoding thread, beside the forward
    assert figures["results"][1]["profile"]["decode_thread"]["stages"]["decode"] > 0
    assert "decode" not in figures["results"][1]["profile"]["stages"]
    assert os.path.exists(tmp_path / "work" / "data" / "image" / "image000000.jpg")  # JPEG files by default
    # the per-item naive loop saved one .npy of (L, D) per item it ran
    assert len(os.listdir(tmp_path / "work" / "naive" / "audio")) == 2
    rb = figures["readback_synthetic"]
    assert rb["featx"]["shape"] == [64, 16] and rb["featx"]["gb_per_s"] > 0 and rb["h5py"]["gb_per_s"] > 0
