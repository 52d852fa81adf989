#!/usr/bin/env bash
# Train the 4D reconstruction model with temporal attention and the per-frame baseline without it side by
# side (GPU 0 and GPU 1 on a two-GPU machine, both on GPU 0 on a one-GPU machine: the models are small and
# each training stage runs for its share of the time), evaluate both on held-out sequences (one process
# each, at the same time), pack the results.
#
#   MINUTES=12 bash scripts/train4d_h200.sh start    # first call: launch both trainings, poll
#   bash scripts/train4d_h200.sh finish              # later calls: poll; then evaluate (detached), then pack
#
# Everything runs detached (setsid), so it does not matter where one device call ends and the next begins.
# When the evaluation is done, $OUT gets m4d-results.tar (eval4d.md/json/png, both logs and loss curves) and
# the temporal model as m4d-model.tar.part-* (15 MB pieces; `cat m4d-model.tar.part-* | tar -x`), which is
# what assets/motion4d ships. TRAIN_ARGS go to both trainings (e.g. "--set batch=32"), EVAL_ARGS to the
# evaluation; ABLATION=1 trains one model with its baseline on the same shared stages (train4d's
# --set baseline=true) and evaluates that pair (give it to every call); FIRST_GPU and SECOND_GPU pick the two models' GPUs (default 0 and 1, or 0 and 0); DEVICE=cpu with TRAIN_ARGS="--config tiny" is a smoke test without a GPU.
set -euo pipefail
RUN=${RUN:-build/m4d-run}
MINUTES=${MINUTES:-12}
POLL_UNTIL=${POLL_UNTIL:-550} # seconds after this script starts
SEQUENCES=${SEQUENCES:-20}
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
ABLATION=${ABLATION:-} # 1: one training whose per-frame baseline shares every network but the deformation denoiser
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
FIRST_GPU=${FIRST_GPU:-0}                       # the temporal model's GPU
SECOND=${SECOND_GPU:-$((GPUS > 1 ? 1 : 0))} # the baseline's GPU
began=$(date +%s)

launch() { # name gpu command...
    local name=$1 gpu=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu setsid nohup "$@" >"$RUN/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
}
alive() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
last_line() { [[ -f "$RUN/$1.log" ]] && tr '\r' '\n' <"$RUN/$1.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-160; }

case "${1:-}" in
start)
    nvidia-smi -L || true
    mkdir -p "$RUN"
    # shellcheck disable=SC2086
    launch temporal "$FIRST_GPU" python3 -m vgen.models.train4d --out "$RUN/temporal" --device "$DEVICE" --minutes "$MINUTES" ${ABLATION:+--set baseline=true} ${TRAIN_ARGS:-}
    # shellcheck disable=SC2086
    [[ -n $ABLATION ]] || launch frame $SECOND python3 -m vgen.models.train4d --out "$RUN/frame" --device "$DEVICE" --minutes "$MINUTES" --no-temporal ${TRAIN_ARGS:-}
    ;;
finish) ;;
*)
    echo "usage: $0 start|finish" >&2
    exit 2
    ;;
esac

evaluating() { [[ -f "$RUN/eval-temporal.pid" ]]; }
model_of() { if [[ $1 == frame && -n $ABLATION ]]; then echo "$RUN/temporal/baseline/model"; else echo "$RUN/$1/model"; fi; }
while (($(date +%s) - began < POLL_UNTIL)); do
    if ! alive temporal && ! alive frame && ! evaluating; then
        for name in temporal frame; do
            [[ -f "$(model_of $name)/config.json" ]] || { echo "== $name training left no model:"; tail -n 20 "$RUN/temporal.log"; exit 1; }
        done
        echo "== evaluating both on $SEQUENCES held-out sequences"
        for name in temporal frame; do
            gpu=$([[ $name == temporal ]] && echo "$FIRST_GPU" || echo "$SECOND")
            # shellcheck disable=SC2086
            launch "eval-$name" "$gpu" python3 -m vgen.models.eval4d --model "$(model_of $name)" \
                --sequences "$SEQUENCES" --device "$DEVICE" --out "$RUN/eval-$name" ${EVAL_ARGS:-}
        done
    fi
    if evaluating && ! alive eval-temporal && ! alive eval-frame; then break; fi
    sleep 20
    echo "[$(($(date +%s) - began)) s] temporal: $(last_line temporal) | frame: $(last_line frame) |" \
        "eval: $(last_line eval-temporal) / $(last_line eval-frame)"
done

if evaluating && ! alive eval-temporal && ! alive eval-frame && [[ ! -f "$RUN/eval/eval4d.json" ]]; then
    for name in temporal frame; do
        [[ -f "$RUN/eval-$name/eval4d.json" ]] || { echo "== the evaluation of $name failed:"; tail -n 30 "$RUN/eval-$name.log"; exit 1; }
    done
    python3 -m vgen.models.eval4d --merge "$RUN/eval-temporal" "$RUN/eval-frame" --out "$RUN/eval"
fi
if [[ ! -f "$RUN/eval/eval4d.json" ]]; then
    echo "== still running; call '$0 finish' again"
    exit 0
fi
cat "$RUN/eval/eval4d.md"
packed=(eval temporal/log.json temporal/loss.png temporal.log eval-temporal.log eval-frame.log)
if [[ -n $ABLATION ]]; then # the baseline's own parts (10.6 MB); the rest is the temporal model's
    packed+=(temporal/baseline/model/config.json temporal/baseline/model/deform_denoiser.safetensors)
else
    packed+=(frame/log.json frame/loss.png frame.log)
fi
tar -C "$RUN" -cf "$OUT/m4d-results.tar" "${packed[@]}"
tar -C "$RUN/temporal" -cf - model | split -b 15M - "$OUT/m4d-model.tar.part-"
ls -la "$OUT"
