#!/usr/bin/env bash
# Issue 15's GPU acceptance in one device run (a lent H100 / H200): extraction of real-size random-init
# BERT-large, CLIP ViT-L/14 and WavLM-Large (bf16, every layer stored as float16) against the bare forward,
# the batched-torch image path on the GPU against the CPU processor, WavLM SDPA vs eager, and the probe sweep.
# Each step has its own time limit, so one that fails or runs long leaves the others' figures.
# Run from the repository root; figures and logs go to $OUT (default /tmp/featx-gpu). Wheels in .whl/ (for
# packages the machine lacks: soundfile, this repository's transformers) are installed to /tmp/site first.
# STEPS (default "check text image audio profile wavlm probe"; also "diagnose", after text/image/audio, and "cache") picks the steps; TEXT_N, IMAGE_N, AUDIO_N, *_BATCH, REPEAT
# and BENCH_FLAGS (more bench_extract.py flags, e.g. "--no-profile --skip-naive --no-host") size them.
set -u
OUT=${OUT:-/tmp/featx-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
B=tests/benchmarks
LOG="$OUT/bench_gpu.log"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, transformers, featx; print('torch', torch.__version__, 'transformers', transformers.__version__, 'featx', featx.__version__, torch.cuda.get_device_name(0))"
    nproc; df -h /dev/shm /tmp | tail -2
} 2>&1 | tee -a "$LOG"
common="--device cuda --size large --repeat ${REPEAT:-2} --readback-n 0 --out /tmp/featx-bench ${BENCH_FLAGS:-}"
for step in ${STEPS:-check text image audio profile wavlm probe}; do
    echo "=== $step $(date -u +%T)" | tee -a "$LOG"
    case $step in
    check) timeout 60 python3 $B/check_cuda_paths.py ;;
    text)  timeout 200 python3 $B/bench_extract.py $common --kinds text --n ${TEXT_N:-16000} --text-tokens 128 \
               --batch-size ${TEXT_BATCH:-256} --naive-n 200 --json "$OUT/text.json" ;;
    image) timeout 200 python3 $B/bench_extract.py $common --kinds image --n ${IMAGE_N:-4000} --image-sizes 640x480 \
               --batch-size ${IMAGE_BATCH:-256} --naive-n 100 --json "$OUT/image.json" ;;
    audio) timeout 200 python3 $B/bench_extract.py $common --kinds audio --n ${AUDIO_N:-600} --audio-seconds 1,15 \
               --batch-size ${AUDIO_BATCH:-32} --naive-n 30 --json "$OUT/audio.json" ;;
    profile) timeout 90 python3 $B/profile_cuda_forward.py --models /tmp/featx-bench/models ;;
    cache) timeout 90 python3 $B/bench_cache.py --n 16384 --part 1024 --order longest --dir /tmp/featx-bench/cachebench ;;
    diagnose) timeout 240 python3 $B/diagnose_cuda_extract.py --root /tmp/featx-bench --json "$OUT/diagnose.json" \
                  ${DIAGNOSE_FLAGS:-} ;;
    wavlm) timeout 120 python3 $B/bench_wavlm.py --sizes large --seconds 5,15 --repeats 3 --no-tiny --bias "32,750" ;;
    probe) timeout 150 python3 $B/bench_probe.py --device cuda --repeats 1 --small 0 ;;
    esac 2>&1 | tee -a "$LOG"
done
echo "=== done $(date -u +%T)" | tee -a "$LOG"
