#!/usr/bin/env bash
# The second prepared GPU call, right after bench/gpu_check.py on the same warm machine (the
# device tool gives a machine back after ~30 s idle: send this at once). At most ~5.7 minutes:
#
#   run(command="bash bench/gpu_followup.sh", timeout_s=360)
#
# 1. bench/gpu_training.py: the sparse training step against masked dense, eager and captured in
#    a CUDA graph (the sparse training issue's GPU point).
# 2. bench/gpu_conv.py: the Triton block-sparse conv against cuDNN (issue 13's GPU point).
# 3. bench/gpu_stress.py: the BSR decode kernel's cross-program join over random patterns, grid
#    sizes and configs, each launch checked against float64 and run twice (bitwise equal).
# 4. The CUDA kernel tests gpu_check does not run (the trainable layer on CUDA too), one line per test as it ends (-v), so a run
#    cut short or hung in teardown still names its failures (grep FAILED / ERROR below).
# Files under $OUT: training.json, conv.json, stress.json, tests-followup.txt.
set -u
: "${OUT:?set OUT to the folder for results}"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
python3 -c "import sparse_lth.kernels" 2>/dev/null \
  || python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 \
  || echo "pip install failed"

echo "== training"
timeout -k 10 90 python3 -W ignore bench/gpu_training.py --out "$OUT" --budget 70 2>&1 | tail -8
echo "== conv"
timeout -k 10 80 python3 -W ignore bench/gpu_conv.py --out "$OUT" 2>&1 | tail -20
echo "== stress"
timeout -k 10 45 python3 -W ignore bench/gpu_stress.py --out "$OUT" --budget 32 2>&1 | tail -4
echo "== tests"
timeout -k 15 -s INT 110 python3 -m pytest -v -p no:cacheprovider -n 8 -rfE \
  tests/test_bsr_decode.py tests/test_bsr_tma.py tests/test_csr_padded.py \
  tests/test_triton_conv.py tests/test_cuda_rule.py tests/test_sparse_conv.py \
  tests/test_trainable.py::test_cuda_gradients_match_masked_dense tests/test_trainable.py::test_cuda_graph_replays_the_sparse_step \
  > "$OUT/tests-followup.txt" 2>&1
echo "pytest rc=$?"
grep -E "(FAILED|ERROR) tests/" "$OUT/tests-followup.txt" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | sort -u | head -40
grep -cE " PASSED " "$OUT/tests-followup.txt" | sed 's/^/passed: /'
tail -3 "$OUT/tests-followup.txt"
