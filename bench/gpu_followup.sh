#!/usr/bin/env bash
# The second prepared GPU call, right after bench/gpu_check.py on the same warm machine (the
# device tool gives a machine back after ~30 s idle: send this at once). At most ~5.5 minutes:
#
#   run(command="bash bench/gpu_followup.sh", timeout_s=360)
#
# 1. bench/gpu_stress.py: the BSR decode kernel's cross-program join over random patterns, grid
#    sizes and configs, each launch checked against float64 and run twice (bitwise equal).
# 2. bench/gpu_conv.py: the Triton block-sparse conv against cuDNN (issue 13's GPU point).
# 3. The CUDA kernel tests gpu_check does not run, one line per test as it ends (-v), so a run
#    cut short or hung in teardown still names its failures (grep FAILED / ERROR below).
# Files under $OUT: stress.json, conv.json, tests-followup.txt.
set -u
: "${OUT:?set OUT to the folder for results}"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
python3 -c "import sparse_lth.kernels" 2>/dev/null \
  || python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 \
  || echo "pip install failed"

echo "== stress"
timeout -k 10 100 python3 -W ignore bench/gpu_stress.py --out "$OUT" --budget 80 2>&1 | tail -4
echo "== conv"
timeout -k 10 80 python3 -W ignore bench/gpu_conv.py --out "$OUT" 2>&1 | tail -17
echo "== tests"
timeout -k 15 -s INT 120 python3 -m pytest -v -p no:cacheprovider -n 8 -rfE \
  tests/test_bsr_decode.py tests/test_bsr_tma.py tests/test_csr_padded.py \
  tests/test_triton_conv.py tests/test_cuda_rule.py tests/test_sparse_conv.py \
  > "$OUT/tests-followup.txt" 2>&1
echo "pytest rc=$?"
grep -E "(FAILED|ERROR) tests/" "$OUT/tests-followup.txt" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | sort -u | head -40
grep -cE " PASSED " "$OUT/tests-followup.txt" | sed 's/^/passed: /'
tail -3 "$OUT/tests-followup.txt"
