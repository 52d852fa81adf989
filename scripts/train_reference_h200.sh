#!/usr/bin/env bash
# Train the reference model on one H200 across two device calls of under 10 minutes each.
#
#   bash scripts/train_reference_h200.sh start    # smoke test, then launch training in its own session
#   bash scripts/train_reference_h200.sh finish   # (next call, machine still warm) wait, then pack results
#
# Training runs detached (setsid), so it does not care where one call ends and the next begins.
# `finish` packs OUT/{model,log.json,loss.png,samples-*.png,train.log} into $OUT/train.tar.part-*
# (15 MB pieces: `cat train.tar.part-* | tar -x` to unpack).
#
# On a machine with two GPUs, SIDE_JOB (a bash command) runs detached on GPU SIDE_GPU (default 1)
# while training uses GPU TRAIN_GPU (default 0); it writes its results under $SIDE_OUT, which every
# call packs into $OUT/side.tar.part-* (so a call that ends early still brings back what is done).
# At most 8 files come back from $OUT: the reference model takes 4 pieces, which leaves 4 for the side job.
set -euo pipefail
RUN=${RUN:-build/train}
ARGS=${TRAIN_ARGS:---device cuda --minutes 17 --vae-minutes 3}
POLL_UNTIL=${POLL_UNTIL:-570}  # seconds after this script starts
OUT=${OUT:-/tmp/out}
began=$(date +%s)

progress() {  # the last progress line of the training log
    tr '\r' '\n' <"$RUN/train.log" | grep -v '^\s*$' | tail -n 1 || true
}

case "${1:-}" in
start)
    nvidia-smi -L || true
    python3 -c "import torch, diffusers, triton; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'triton', triton.__version__)"
    echo "== smoke test: the tiny config end to end on CUDA (compiled too when TRAIN_ARGS has --compile)"
    smoke=(--out /tmp/smoke --config tiny --device cuda)
    [[ " $ARGS " == *" --compile "* ]] && smoke+=(--compile)
    [[ -n "${SKIP_SMOKE:-}" ]] || python3 -m vgen.models.train "${smoke[@]}" 2>&1 | tail -n 4
    mkdir -p "$RUN/side"
    echo "== training: python3 -m vgen.models.train --out $RUN $ARGS"
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=${TRAIN_GPU:-0} setsid nohup python3 -m vgen.models.train --out "$RUN" $ARGS \
        >"$RUN/train.log" 2>&1 </dev/null &
    echo $! >"$RUN/pid"
    if [[ -n "${SIDE_JOB:-}" ]]; then
        echo "== side job on GPU ${SIDE_GPU:-1}: $SIDE_JOB"
        SIDE_OUT=$(realpath "$RUN/side") CUDA_VISIBLE_DEVICES=${SIDE_GPU:-1} \
            setsid nohup bash -c "$SIDE_JOB" >"$RUN/side/side.log" 2>&1 </dev/null &
        echo $! >"$RUN/side.pid"
    fi
    ;;
finish) ;;
*)
    echo "usage: $0 start|finish" >&2
    exit 2
    ;;
esac

pid=$(cat "$RUN/pid")
side_pid=$(cat "$RUN/side.pid" 2>/dev/null || echo 0)
alive() { [[ "$1" != 0 ]] && kill -0 "$1" 2>/dev/null; }
pack_side() {  # whatever the side job has written so far, in 15 MB pieces (cat side.tar.part-* | tar -x)
    if [[ -f "$RUN/side.pid" ]]; then
        rm -f "$OUT"/side.tar.part-*
        tar -C "$RUN" -cf - side | split -b 15M - "$OUT/side.tar.part-"
    fi
}
while { alive "$pid" || alive "$side_pid"; } && (($(date +%s) - began < POLL_UNTIL)); do
    sleep 30
    echo "[$(($(date +%s) - began)) s] $(progress)"
    if alive "$side_pid"; then echo "    side: $(tail -n 1 "$RUN/side/side.log" | cut -c1-200)"; fi
done
pack_side
if alive "$side_pid"; then echo "== side job still running (pid $side_pid)"; fi
if alive "$pid"; then
    echo "== still training (pid $pid); run '$0 finish' in the next call"
    cp "$RUN/log.json" "$OUT/" 2>/dev/null || true
    tr '\r' '\n' <"$RUN/train.log" | grep -v '^\s*$' | tail -n 200 >"$OUT/train-tail.log"
    exit 0
fi
echo "== training ended"
tr '\r' '\n' <"$RUN/train.log" | grep -v '^\s*$' | tail -n 40
files=()
for f in model log.json train.log loss.png "$RUN"/samples-*.png; do
    f=$(basename "$f")
    if [[ -e "$RUN/$f" ]]; then files+=("$f"); fi
done
tar -C "$RUN" -cf - "${files[@]}" | split -b 15M - "$OUT/train.tar.part-"
ls -la "$OUT"
