#!/usr/bin/env bash
# One-GPU check of distributed K-FAC (NCCL, 1 rank) + CUDA step timing vs single-process K-FAC + eigh timings.
# Usage (repository root or anywhere): bash benchmarks/distributed/gpu_check.sh
# Writes $OUT/gpu_check.json and $OUT/gpu_check.log (OUT defaults to benchmarks/distributed). Needs only torch
# (kronfac is taken from src/). Takes about 1-2 minutes on an H100; killed after 170 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/distributed}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu_check.log" || true
timeout 170 "$PYTHON" benchmarks/distributed/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
