#!/usr/bin/env bash
# A one-GPU device session as one detached chain, so the GPU never waits for the next call: a training
# job first, then the single-GPU benchmarks (scripts/bench_queue.sh), one after the other, on the same GPU.
# FIRST picks the training job:
#   m4d (default): the 4D training of both models and their evaluation (scripts/train4d_h200.sh);
#                  MINUTES, SEQUENCES, TRAIN_ARGS and EVAL_ARGS go to it;
#   ref:           the reference text-to-video model (scripts/train_reference_h200.sh; TRAIN_ARGS go to it).
#
#   MINUTES=13 BENCHES="quantized_quick vmoba rectified_psa paro" bash scripts/h200_chain.sh start  # first call
#   bash scripts/h200_chain.sh poll                                                                  # later calls
#
# BENCH_FIRST=1 runs the benchmarks before the training.
#
# Every call polls until POLL_UNTIL seconds (keep it under the call's limit) or the chain's end, then
# copies what is finished to $OUT: the training's results once it is done (once: the reference model
# alone is 60 MB of the 64 MiB a call brings back), and a tar of the benchmarks' outputs so far. The
# chain's log goes to $OUT/chain.log on every call, so a call cut short still reports.
set -uo pipefail
RUN=${RUN:-build/chain}
POLL_UNTIL=${POLL_UNTIL:-540}
OUT=${OUT:-/tmp/out}
began=$(date +%s)
FIRST=${FIRST:-m4d}
export RUN OUT FIRST BENCHES="${BENCHES:-quantized_quick vmoba rectified_psa paro}" BENCH_FIRST="${BENCH_FIRST:-}"

case "${1:-}" in
start)
    case "$FIRST" in
    m4d | ref) ;;
    *)
        echo "FIRST must be m4d or ref, got '$FIRST'" >&2
        exit 2
        ;;
    esac
    mkdir -p "$RUN/first-out" "$RUN/bench"
    echo "$FIRST" >"$RUN/first"
    # shellcheck disable=SC2016
    setsid nohup bash -c '
        chain=$RUN  # (a prefix assignment sees the new RUN of the one before it)
        script=$([[ $FIRST == ref ]] && echo train_reference_h200.sh || echo train4d_h200.sh)
        train() {
            RUN=$chain/$FIRST OUT=$chain/first-out POLL_UNTIL=1000000 bash "scripts/$script" start >"$chain/first.log" 2>&1
            echo "$FIRST exit $?" >"$chain/first.done"
        }
        # the model-scoring benchmarks (adherence, encoder_order) score $MODEL if given, else the model the
        # reference training has just made (when they run after it), else the shipped one
        model=${MODEL:-$([[ $FIRST == ref && -z "${BENCH_FIRST:-}" ]] && echo "$chain/ref/model" || echo assets/reference/model)}
        benches() { MODEL=$model SIDE_OUT=$chain/bench bash scripts/bench_queue.sh >"$chain/bench.log" 2>&1; }
        if [[ -n "${BENCH_FIRST:-}" ]]; then benches; train; else train; benches; fi
        echo done >"$chain/chain.done"
    ' >"$RUN/chain.log" 2>&1 </dev/null &
    ;;
poll) ;;
*)
    echo "usage: $0 start|poll" >&2
    exit 2
    ;;
esac

FIRST=$(cat "$RUN/first")
status() {
    local first bench
    first=$( [[ -f "$RUN/first.log" ]] && tr '\r' '\n' <"$RUN/first.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)
    bench=$( [[ -f "$RUN/bench.log" ]] && grep '^== ' "$RUN/bench.log" | tail -n 1)
    echo "[$(($(date +%s) - began)) s] $FIRST: ${first:-} | benchmarks: ${bench:-waiting}"
}
while (($(date +%s) - began < POLL_UNTIL)) && [[ ! -f "$RUN/chain.done" ]]; do
    sleep 20
    status | tee -a "$OUT/chain.log"
done
if [[ -f "$RUN/first.done" ]]; then
    cat "$RUN/first.done"
    tail -n 30 "$RUN/first.log" >"$OUT/first-tail.log"
    if [[ ! -f "$RUN/first.shipped" ]]; then
        cp "$RUN"/first-out/* "$OUT"/ 2>/dev/null
        touch "$RUN/first.shipped"
    fi
elif [[ $FIRST == ref && -f "$RUN/ref/train.log" ]]; then
    tr '\r' '\n' <"$RUN/ref/train.log" | grep -v '^\s*$' | tail -n 200 >"$OUT/train-tail.log"
fi
if [[ -f "$RUN/bench.log" ]]; then
    tar -C "$RUN" -cf "$RUN/bench.tar" bench bench.log
    # a call brings back 64 MiB at most: with the model's pieces in this call, the benchmarks may have to wait
    if (($(du -sb "$OUT" | cut -f1) + $(stat -c %s "$RUN/bench.tar") < 60 * 2 ** 20)); then
        mv "$RUN/bench.tar" "$OUT/bench.tar"
    else
        echo "== bench.tar ($(du -h "$RUN/bench.tar" | cut -f1)) left for the next call: $OUT is full"
    fi
fi
[[ -f "$RUN/chain.done" ]] && echo "== the chain is done" || echo "== still running; call '$0 poll' again"
ls -la "$OUT"
