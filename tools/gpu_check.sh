#!/usr/bin/env bash
# GPU check: the GPU parity tests, then the benchmark's GPU engines against Paddle on CPU, on one GPU.
# Needs Paddle's GPU build (and onnxruntime-gpu for the ONNX engine): see docs/gpu.md. About 5-8 minutes on
# one H100. Writes gpu_check/ (bench.json, bench.png, pytest.log, generate-21b-bf16.json and its -memory.csv)
# for docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
python -c "import paddle; paddle.utils.run_check()" 2>&1 | tail -2 | tee -a "$OUT/gpu.txt"
# 1. parity of the fused GPU path (bf16/fp16 and the fused kernels) against the portable path
python -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
# 2. the benchmark: Paddle GPU (bf16, fused kernels) and ONNX Runtime CUDA fp16, Paddle CPU as the reference
python -m ernie_paddle.tools.bench --preset mid --work "$OUT/work" \
    --engines paddle-gpu,ort-cuda-fp16,ort-int4 --decode-tokens 64 \
    --json "$OUT/bench.json" --plot "$OUT/bench.png" | tee "$OUT/bench.txt"
# 3. the real 21B-A3B shape in bf16 on one GPU through the fused path: a random checkpoint in the real -Paddle
#    format (41 GB of bf16 shards; point --model at the downloaded weights for the real model), loaded and run
python -m ernie_paddle.cli.paddle_cli make-checkpoint --preset 21b-a3b --layout paddle --out "$OUT/ckpt-21b" 2>&1 | tail -1
python -m ernie_paddle.cli.paddle_cli generate --model "$OUT/ckpt-21b" --device gpu --dtype bfloat16 \
    --input-ids 1,2,3,4,5,6,7,8 --max-new-tokens 64 --json | tee "$OUT/generate-21b-bf16.json"
# the GPU memory the 21B run leaves in use: CSV, in its own file (the .json above stays valid JSON)
nvidia-smi --query-gpu=memory.used --format=csv | tee "$OUT/generate-21b-bf16-memory.csv"
rm -rf "$OUT/ckpt-21b"
