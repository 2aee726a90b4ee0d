#!/usr/bin/env bash
# The GPU check: throughput, memory and the decoder's share of the GPU's peak for
# Tetrominoes and CLEVR6 at batch 32 (bf16 and float32), then the paper, deepmind and fast
# presets on Tetrominoes and fast on Multi-dSprites trained side by side, with held-out
# FG-ARI and ARI: at most 9 minutes on one GPU.
# Everything is written under $OUT (default runs/gpu-check). Extra arguments go to
# benchmarks/gpu_check.py (e.g. --device cpu --tiny --budget 60 to test the plumbing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-check}"
exec python benchmarks/gpu_check.py --out "$OUT" "$@"
