#!/usr/bin/env bash
# One command for a GPU session: every check that only a GPU can make, its CSVs in OUTDIR, a one-screen summary.
#
#   bench/gpu_check.sh OUTDIR            on an H100/H200 (aim: <= 7 minutes in all)
#   bench/gpu_check.sh --smoke OUTDIR    the same steps on the CPU at tiny shapes (tests/test_gpu_check.py runs it,
#                                        so the script cannot rot)
#
# Steps (each logged to OUTDIR/<step>.log, timed in OUTDIR/summary.txt; a failing step does not stop the others,
# the script exits non-zero if any failed):
#   env       versions (torch, triton, transformers, vspec git SHA) and the device name -> env.txt
#   tests     GPU: tests/kernels compiled for the device against the reference, and the CUDA-only tests (two
#             streams, events); smoke: the lead0 cases of tests/kernels/test_kv.py under the interpreter (plumbing)
#   scoring / verify / kv / gated_delta   the kernel benchmarks, CSVs into OUTDIR (those that report GB/s set it
#             against the device's copy bandwidth measured in the same run; on the CPU: their smoke parts, no CSV)
#   e2e       bench_e2e.py (GPU: a 7B-shaped Qwen2.5-VL target in bf16 with its draft; smoke: tiny models)
#   parallel  bench_parallel.py (serial vs post / pre / pearl; GPU: two CUDA streams)
#   synthetic bench_e2e_synthetic.py (GPU: 7B / 0.5B shapes in bf16, synthetic acceptance, eager vs compiled with
#             CUDA graphs, serial vs parallel, and target.generate with static cache + compile; smoke: tiny models)
#   demo      python -m vspec demo on the shipped pair
# Run with PYTHONPATH=. where vspec is not installed (the device machine): the script sets it.
set -uo pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
    shift
fi
OUT=${1:?usage: bench/gpu_check.sh [--smoke] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.txt"
FAILED=0

step() {  # step NAME COMMAND...
    local name=$1 start rc
    shift
    start=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%-12s rc=%-3s %4ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || FAILED=1
}

step env "$PY" - "$OUT/env.txt" <<'PYEOF'
import subprocess
import sys

import torch
import transformers

try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "absent"
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
lines = [f"device: {dev}", f"torch: {torch.__version__}", f"triton: {tv}",
         f"transformers: {transformers.__version__}", f"vspec git: {sha or 'unknown'}"]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF

if [ "$SMOKE" -eq 1 ]; then
    step tests "$PY" -m pytest tests/kernels/test_kv.py -q -p no:cacheprovider -k lead0
    step scoring "$PY" bench/bench_scoring.py --out "$OUT/scoring.csv"
    step verify "$PY" bench/bench_verify.py --quick --out "$OUT/verify.csv"
    step kv "$PY" bench/bench_kv.py --no-sweep --out "$OUT/kv.csv"
    step gated_delta "$PY" bench/bench_gated_delta.py --out "$OUT/gated_delta.csv"
    step e2e "$PY" bench/bench_e2e.py --cpu --families qwen2_5_vl --batches 1 --max-new-tokens 8 --repeats 1 \
        --out "$OUT/e2e.csv"
    step parallel "$PY" bench/bench_parallel.py --cpu --max-new-tokens 8 --repeats 1 --out "$OUT/parallel.csv"
    step synthetic "$PY" bench/bench_e2e_synthetic.py --tiny --no-parallel --gammas 2 --ps 0.9 --out "$OUT"
    step demo "$PY" -m vspec demo --clips 2 --max-new-tokens 16
else
    step tests "$PY" -m pytest tests/kernels tests/runtime/test_parallel.py -q -p no:cacheprovider -x
    step scoring "$PY" bench/bench_scoring.py --out "$OUT/scoring.csv"
    step verify "$PY" bench/bench_verify.py --out "$OUT/verify.csv"
    step kv "$PY" bench/bench_kv.py --out "$OUT/kv.csv"
    step gated_delta "$PY" bench/bench_gated_delta.py --out "$OUT/gated_delta.csv"
    step e2e "$PY" bench/bench_e2e.py --out "$OUT/e2e.csv"
    step parallel "$PY" bench/bench_parallel.py --quick --out "$OUT/parallel.csv"
    step synthetic "$PY" bench/bench_e2e_synthetic.py --quick --compile --out "$OUT"
    step demo "$PY" -m vspec demo
fi

echo
echo "== summary ($(head -n 1 "$OUT/env.txt" 2>/dev/null))"
cat "$OUT/summary.txt"
for f in "$OUT"/*.csv; do
    [ -e "$f" ] || continue
    echo "-- $(basename "$f"): $(($(wc -l < "$f") - 1)) rows"
done
tail -n 3 "$OUT/tests.log" 2>/dev/null | sed 's/^/tests: /'
exit "$FAILED"
