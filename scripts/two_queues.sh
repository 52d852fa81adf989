#!/usr/bin/env bash
# Two GPUs, two detached queues: Q0 runs on GPU 0 and Q1 on GPU 1, each a bash command list run in order
# (write results under $QOUT). Every call polls until POLL_UNTIL seconds or both queues' end, then puts a
# tar of $QOUT and both logs into $OUT, so a call cut short still brings back what is finished. Files over
# 16 MiB (model weights, in 15 MB parts) go to $SHIP instead: each is copied to $OUT once, as it is.
#
#   Q0='python3 benchmarks/attention.py --sweep --out $QOUT/attention.md' Q1='...' bash scripts/two_queues.sh start
#   bash scripts/two_queues.sh poll
set -uo pipefail
RUN=${RUN:-build/queues}
POLL_UNTIL=${POLL_UNTIL:-540}
OUT=${OUT:-/tmp/out}
began=$(date +%s)
export QOUT=$RUN/out SHIP=$RUN/ship
# SM clock, power and throttle reasons of every GPU, appended to $QOUT/gpu-clocks.txt: a GPU that runs slow
# (one ran dense attention 1.6x slower than usual beside a busy neighbour) shows here
clocks() {
    { echo "== $1 $(date -u +%H:%M:%S)"; nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active --format=csv; } >>"$QOUT/gpu-clocks.txt" 2>&1 || true
}
case "${1:-}" in
start)
    mkdir -p "$QOUT" "$SHIP"
    nvidia-smi -L
    clocks start
    for gpu in 0 1; do
        var=Q$gpu
        [[ -n "${!var:-}" ]] || continue
        CUDA_VISIBLE_DEVICES=$gpu setsid nohup bash -c "${!var}; echo exit \$? >$RUN/q$gpu.done" \
            >"$RUN/q$gpu.log" 2>&1 </dev/null &
        echo "queue $gpu: ${!var}" >>"$RUN/queues.txt"
    done
    ;;
poll) ;;
*)
    echo "usage: $0 start|poll" >&2
    exit 2
    ;;
esac
running() { for gpu in 0 1; do grep -q "^queue $gpu" "$RUN/queues.txt" && [[ ! -f "$RUN/q$gpu.done" ]] && return 0; done; return 1; }
while (($(date +%s) - began < POLL_UNTIL)) && running; do
    sleep 15
    (( ($(date +%s) - began) % 120 < 15 )) && clocks poll
done
for gpu in 0 1; do
    [[ -f "$RUN/q$gpu.log" ]] && echo "== queue $gpu $(cat "$RUN/q$gpu.done" 2>/dev/null || echo running):" &&
        tr '\r' '\n' <"$RUN/q$gpu.log" | grep -v '^\s*$' | tail -n 4 | cut -c1-300
done
for f in "$SHIP"/*; do
    [[ -f $f && ! -f $f.shipped ]] && [[ $f != *.shipped ]] && cp "$f" "$OUT/" && touch "$f.shipped"
done
tar -C "$RUN" -cf "$OUT/queues.tar" out queues.txt q0.log q1.log 2>/dev/null
ls -la "$OUT"
