#!/usr/bin/env bash
# The six-task comparison on one GPU with the 2.7B config on random weights in bfloat16 (issue 4's H200
# figure), run twice: "cold" with an empty persistent compilation cache, then "warm" with the cache the cold
# pass wrote. Prints each pass's wall time and its compile totals; results go to $OUT (default /tmp/gpu_compare).
#
#   bash benchmarks/gpu_compare.sh [COLD_LIMIT_S] [WARM_LIMIT_S]
#
# Environment: TASK (default all), EXTRA (more flags), DUALFORM_DATA_DIR / DUALFORM_GPT2_BPE_DIR when
# ../shared is not next to the checkout, WRAP_WARM (a command prefix for the warm pass, e.g. a profiler:
# "py-spy record -r 50 --idle -f raw -o $OUT/warm_pyspy.txt --"). Wheels in .carry/wheels (ml_collections, gguf) are installed first
# when present (machines without those packages and without a network).
set -u
OUT=${OUT:-/tmp/gpu_compare}; mkdir -p "$OUT"
if ls .carry/wheels/*.whl > /dev/null 2>&1; then
  python3 -m pip install --no-deps -q --target /tmp/pylib .carry/wheels/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}
fi
# cuBLAS instead of Triton for GEMMs: half the compile time and 9 % faster batches on the H200
# (benchmarks/compile_bench.py, BUILD_NOTES.md). Set XLA_FLAGS to override.
export XLA_FLAGS=${XLA_FLAGS---xla_gpu_enable_triton_gemm=false}
# A new, empty cache folder unless JAX_COMPILATION_CACHE_DIR is given (then "cold" means what it holds).
export JAX_LOG_COMPILES=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d /tmp/jaxcache.XXXXXX)} \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
ARGS="--task ${TASK:-all} --model random:fairseq-dense-2.7b --dtype bfloat16 --eval_tokens_per_batch 32768
  --eval_minimum_bucket 32 --noeval_bucket_midpoints --eval_fixed_rows --ft_bucket_multiple 192 --kendall_max_examples 100
  --eval_score_budget 536870912 --scan_layers --eval_prefix_multiple 2048 --save_records=false --analysis device
  --compile_workers 4 --prefix_attention cudnn
  ${EXTRA:-}"
echo "python3 -m experiments.compare $ARGS" | tr -s ' \n' ' ' | tee "$OUT/summary.txt"; echo | tee -a "$OUT/summary.txt"
limits=("${1:-600}" "${2:-600}")
for pass in cold warm; do
  limit=${limits[0]}; limits=("${limits[@]:1}")
  rm -rf "/tmp/runs_$pass"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  wrap=""; [ "$pass" = warm ] && wrap=${WRAP_WARM:-}
  timeout "$limit" $wrap python3 -m experiments.compare $ARGS --workdir "/tmp/runs_$pass" > "$OUT/compare_$pass.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  echo "$pass rc=$rc wall_s=$(python3 -c "print(round($end - $start, 1))")" | tee -a "$OUT/summary.txt"
  grep -h "Finished XLA compilation" "$OUT/compare_$pass.log" \
    | sed 's/.*compilation of \(jit([^)]*)\) in \([0-9.]*\) sec/\1 \2/' \
    | awk '{n[$1]++; t[$1]+=$2; T+=$2} END {for (k in n) printf "%s n=%d s=%.1f\n", k, n[k], t[k]; printf "TOTAL compile s=%.1f\n", T}' \
    | sort -t= -k3 -rn | head -6 | tee -a "$OUT/summary.txt"
  grep -E "accuracy|done in|Error" "$OUT/compare_$pass.log" | grep -v "Finished\|Compiling" | sed 's/^I[0-9]* //' \
    | cut -c1-150 >> "$OUT/summary.txt"
  tar czf "$OUT/${pass}_runs.tgz" -C /tmp --exclude '*.png' "runs_$pass" 2>/dev/null
  gzip -f "$OUT/compare_$pass.log"
  [ $rc -eq 0 ] || break
done
