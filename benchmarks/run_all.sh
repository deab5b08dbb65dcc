#!/usr/bin/env bash
# The benchmark set behind docs/benchmarks.md, one run each, on a quiet machine:
#   train step vs HF, decode vs HF at batch 1 and 16, VQ-GAN encode vs HF at 512 and 64 px, data headroom.
# Each output (which starts with the CPU, ISA, XLA flags and versions it ran with) goes to OUT/NAME.txt.
#
#   benchmarks/run_all.sh [OUT]        # from the repository root; OUT defaults to $TMPDIR/chameleon_jax_bench/<date>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${TMPDIR:-/tmp}/chameleon_jax_bench/$(date -u +%Y%m%dT%H%M)}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}  # no accelerator probing at start-up
run() {
  local name=$1; shift
  echo "== $name: $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$PY" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s"
  grep -v -E "WARNING|TPU|libtpu|InitGoogle|Source Location|UserWarning|detach|float\(loss\)" "$OUT/$name.txt" | tail -n 25
}
run train_step benchmarks/bench_train_step.py
run decode benchmarks/bench_decode.py
run vqgan benchmarks/bench_vqgan.py
run data benchmarks/bench_data.py
echo "outputs in $OUT"
