#!/usr/bin/env bash
# A one-GPU device session as one detached chain, so the GPU never waits for the next call: the 4D
# training of both models and their evaluation (scripts/train4d_h200.sh), then the single-GPU
# benchmarks (scripts/bench_queue.sh), one after the other, on the same GPU.
#
#   MINUTES=13 BENCHES="quantized_quick vmoba rectified_psa paro" bash scripts/h200_chain.sh start  # first call
#   bash scripts/h200_chain.sh poll                                                                  # later calls
#
# Every call polls until POLL_UNTIL seconds (keep it under the call's limit) or the chain's end, then
# copies what is finished to $OUT: the 4D results and model parts once the evaluation is done, and a
# tar of the benchmarks' outputs so far. The chain's log goes to $OUT/chain.log on every call, so a
# call cut short still reports. MINUTES, SEQUENCES, TRAIN_ARGS and EVAL_ARGS go to train4d_h200.sh.
set -uo pipefail
RUN=${RUN:-build/chain}
POLL_UNTIL=${POLL_UNTIL:-540}
OUT=${OUT:-/tmp/out}
began=$(date +%s)
export RUN OUT BENCHES="${BENCHES:-quantized_quick vmoba rectified_psa paro}"

case "${1:-}" in
start)
    mkdir -p "$RUN/m4d-out" "$RUN/bench"
    # shellcheck disable=SC2016
    setsid nohup bash -c '
        chain=$RUN  # (a prefix assignment sees the new RUN of the one before it)
        RUN=$chain/m4d OUT=$chain/m4d-out POLL_UNTIL=1000000 bash scripts/train4d_h200.sh start >"$chain/m4d.log" 2>&1
        echo "train4d exit $?" >"$chain/m4d.done"
        SIDE_OUT=$chain/bench bash scripts/bench_queue.sh >"$chain/bench.log" 2>&1
        echo done >"$chain/chain.done"
    ' >"$RUN/chain.log" 2>&1 </dev/null &
    ;;
poll) ;;
*)
    echo "usage: $0 start|poll" >&2
    exit 2
    ;;
esac

status() {
    local m4d bench
    m4d=$( [[ -f "$RUN/m4d.log" ]] && tr '\r' '\n' <"$RUN/m4d.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)
    bench=$( [[ -f "$RUN/bench.log" ]] && grep '^== ' "$RUN/bench.log" | tail -n 1)
    echo "[$(($(date +%s) - began)) s] 4D: ${m4d:-} | benchmarks: ${bench:-waiting}"
}
while (($(date +%s) - began < POLL_UNTIL)) && [[ ! -f "$RUN/chain.done" ]]; do
    sleep 20
    status | tee -a "$OUT/chain.log"
done
if [[ -f "$RUN/m4d.done" ]]; then
    cat "$RUN/m4d.done"
    cp "$RUN"/m4d-out/* "$OUT"/ 2>/dev/null
    tail -n 30 "$RUN/m4d.log" >"$OUT/m4d-tail.log"
fi
if [[ -f "$RUN/bench.log" ]]; then
    tar -C "$RUN" -cf "$OUT/bench.tar" bench bench.log
fi
[[ -f "$RUN/chain.done" ]] && echo "== the chain is done" || echo "== still running; call '$0 poll' again"
ls -la "$OUT"
