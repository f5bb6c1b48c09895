#!/usr/bin/env bash
# Runs what scripts/gpu_prepare.sh prepared on the GPU machine (from the repository root):
# `bash scripts/gpu_check.sh PREPARED [RESULTS]`. Each case runs in its own `kiln-gpu-run`
# process (a fault in one cannot poison the others) against ref's outputs (rtol $GPU_RTOL,
# default 1e-3; atol $GPU_ATOL, default 1e-4); the CNNs are also timed ($GPU_REPEAT runs, default
# 20). Writes RESULTS/gpu_check.json (default $OUT, else PREPARED/results): every case's result
# line from `kiln-gpu-run --json` with its name, the node-test pass rate and the CNN results.
# Without a CUDA driver every case fails the same way and the summary says "no CUDA driver".
set -uo pipefail
prep=${1:?usage: scripts/gpu_check.sh PREPARED [RESULTS]}
results=${2:-${OUT:-$prep/results}}
rtol=${GPU_RTOL:-1e-3} atol=${GPU_ATOL:-1e-4} repeat=${GPU_REPEAT:-20}
# Cases not started after this many seconds are skipped (counted), so the summary is written
# within a device call's limit.
budget=${GPU_CHECK_BUDGET_S:-450}
run=$prep/bin/kiln-gpu-run
mkdir -p "$results"
log=$results/gpu_check.log
: >"$log"
lines=$results/cases.jsonl
: >"$lines"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$log" 2>&1 || echo "nvidia-smi: not found" >>"$log"
skipped=0
check() { # kind dir repeat
    local kind=$1 dir=$2 n=$3 name line rc
    name=$(basename "$dir")
    if [ $(($(date +%s) - start)) -ge "$budget" ]; then
        skipped=$((skipped + 1))
        return
    fi
    local args=("$dir" --json --rtol "$rtol" --atol "$atol" --repeat "$n" --input)
    for f in $(ls "$dir"/input_*.npy 2>/dev/null | sort -V); do args+=("$f"); done
    args+=(--expect)
    for f in $(ls "$dir"/expect_*.npy | sort -V); do args+=("$f"); done
    line=$(timeout "${GPU_CASE_TIMEOUT:-60}" "$run" "${args[@]}" 2>>"$log")
    rc=$?
    if [ -z "$line" ]; then
        line="{\"ok\":false,\"rc\":$rc,\"error\":\"no result: crashed, killed or timed out (exit $rc)\"}"
    fi
    echo "{\"kind\":\"$kind\",\"name\":\"$name\",\"result\":$line}" >>"$lines"
}
start=$(date +%s)
# The CNNs first (few, timed), then the node tests; each result line is appended as it comes,
# so a run cut short still leaves RESULTS/cases.jsonl.
for d in "$prep"/cnn/*/; do [ -d "$d" ] && check cnn "${d%/}" "$repeat"; done
for d in "$prep"/node/*/; do check node "${d%/}" 0; done
# Node tests whose plans are host steps only (the runner's interpreter path, no launch).
for d in "$prep"/node-host/*/; do [ -d "$d" ] && check node-host "${d%/}" 0; done
count() { grep "\"kind\":\"$1\"" "$lines" | grep -c "$2"; }
node_total=$(grep -c '"kind":"node"' "$lines")
node_pass=$(count node '"ok":true')
host_total=$(grep -c '"kind":"node-host"' "$lines")
host_pass=$(count node-host '"ok":true')
cnn_total=$(grep -c '"kind":"cnn"' "$lines")
cnn_pass=$(count cnn '"ok":true')
no_driver=$(grep -c 'no CUDA driver' "$lines")
rate=$(awk -v p="$node_pass" -v t="$node_total" 'BEGIN { if (t > 0) printf "%.4f", p / t; else print 0 }')
{
    echo "{"
    echo " \"seconds\": $(($(date +%s) - start)),"
    echo " \"node_tests_run\": $node_total, \"node_tests_passed\": $node_pass, \"node_pass_rate\": $rate,"
    echo " \"host_only_node_tests_run\": $host_total, \"host_only_node_tests_passed\": $host_pass,"
    echo " \"cnns_run\": $cnn_total, \"cnns_passed\": $cnn_pass,"
    echo " \"cases_without_cuda_driver\": $no_driver, \"cases_skipped_over_budget\": $skipped,"
    echo " \"rtol\": $rtol, \"atol\": $atol,"
    echo " \"cases\": ["
    sed '$!s/$/,/' "$lines"
    echo " ]"
    echo "}"
} >"$results/gpu_check.json"
echo "node tests: $node_pass / $node_total passed (rate $rate); host-only node tests: $host_pass / $host_total; CNNs: $cnn_pass / $cnn_total passed"
[ "$skipped" -gt 0 ] && echo "SKIPPED: $skipped cases not started within GPU_CHECK_BUDGET_S=$budget s"
[ "$no_driver" -gt 0 ] && echo "NOT RUN on a GPU: $no_driver cases found no CUDA driver (see $results/gpu_check.json)"
grep '"kind":"cnn"' "$lines"
echo "wrote $results/gpu_check.json"
