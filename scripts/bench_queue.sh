#!/usr/bin/env bash
# The single-GPU benchmarks, one after another, each writing its Markdown + JSON under $SIDE_OUT
# (default $OUT). Meant as train_reference_h200.sh's SIDE_JOB on a two-GPU machine:
#
#   SIDE_JOB='bash scripts/bench_queue.sh' ... bash scripts/train_reference_h200.sh start
#
# BENCHES picks and orders them (default: all; profile_calls, the per-kernel profile, is extra); "vmoba:1,2"
# passes --parts 1,2. A failing benchmark does not stop the others.
# "train4d" in BENCHES trains the 4D model for $M4D_MINUTES (default 12) into $dest/m4d (37 MB of weights).
# QQ_ARGS: quantized_quick's arguments (default --sweep).
# "adherence:N" scores $MODEL (default assets/reference/model) on N (default 20) held-out captions at the demo size
# (17 x 128 x 128, 16 steps, guidance 5, fp32); "encoder_order" runs scripts/text_encoder_order.py on $MODEL.
set -uo pipefail
dest=${SIDE_OUT:-${OUT:-/tmp/out}}
mkdir -p "$dest"
for entry in ${BENCHES:-quantized_quick attention vmoba paro rectified_psa}; do
    bench=${entry%%:*}  # "name:1,2" runs only parts 1 and 2 (benchmarks with --parts)
    parts=()
    [[ $entry == *:* && $bench != adherence ]] && parts=(--parts "${entry#*:}")
    echo "== $entry $(date +%T)"
    case "$bench" in
    quantized_quick) python3 benchmarks/quantized_quick.py ${QQ_ARGS-"--sweep"} >"$dest/quantized_quick.txt" 2>&1 ;;
    adherence)
        n=$([[ $entry == *:* ]] && echo "${entry#*:}" || echo 20)
        python3 -m vgen.cli bench adherence --model "${MODEL:-assets/reference/model}" --prompts "$n" --frames 17 \
            --height 128 --width 128 --steps 16 --guidance 5 --device cuda --out "$dest/adherence-$n" ;;
    encoder_order) python3 scripts/text_encoder_order.py --model "${MODEL:-assets/reference/model}" \
        >"$dest/encoder_order.txt" 2>&1 ;;
    train4d) python3 -m vgen.models.train4d --out "$dest/m4d" --device cuda --minutes "${M4D_MINUTES:-12}" ;;
    attention) python3 benchmarks/attention.py --sweep --forward-only --out "$dest/attention.md" ;;
    *) python3 "benchmarks/$bench.py" --out "$dest/$bench.md" "${parts[@]}" ;;
    esac
    echo "== $entry exit $? $(date +%T)"
done
