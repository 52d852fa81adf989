#!/usr/bin/env bash
# Train the reference model on one H200 across two device calls of under 10 minutes each.
#
#   bash scripts/train_reference_h200.sh start    # smoke test, then launch training in its own session
#   bash scripts/train_reference_h200.sh finish   # (next call, machine still warm) wait, then pack results
#
# Training runs detached (setsid), so it does not care where one call ends and the next begins.
# `finish` packs OUT/{model,log.json,loss.png,samples-*.png,train.log} into $OUT/train.tar.part-*
# (15 MB pieces: `cat train.tar.part-* | tar -x` to unpack).
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
    echo "== smoke test: the tiny config end to end on CUDA"
    [[ -n "${SKIP_SMOKE:-}" ]] || python3 -m vgen.models.train --out /tmp/smoke --config tiny --device cuda 2>&1 | tail -n 4
    mkdir -p "$RUN"
    echo "== training: python3 -m vgen.models.train --out $RUN $ARGS"
    # shellcheck disable=SC2086
    setsid nohup python3 -m vgen.models.train --out "$RUN" $ARGS >"$RUN/train.log" 2>&1 </dev/null &
    echo $! >"$RUN/pid"
    ;;
finish) ;;
*)
    echo "usage: $0 start|finish" >&2
    exit 2
    ;;
esac

pid=$(cat "$RUN/pid")
while kill -0 "$pid" 2>/dev/null && (($(date +%s) - began < POLL_UNTIL)); do
    sleep 30
    echo "[$(($(date +%s) - began)) s] $(progress)"
done
if kill -0 "$pid" 2>/dev/null; then
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
