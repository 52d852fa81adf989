#!/usr/bin/env bash
# Benchmark commands one after another in one device call, all inside the call's limit, with one tar back.
#
#   bash scripts/device_steps.sh 560 'python3 benchmarks/ab_forward.py INDEX_EARLY --out $R/ab.md' '...'
#
# The first argument is the deadline in seconds from the start: each command runs under `timeout` with the time
# left, and one that is cut short or fails does not stop the next. Commands write under $R ($OUT/r). The GPU's
# clocks go to $R/clocks.txt before and after; each command's output goes to $R/steps.log. At the end $R is
# packed into $OUT/results.tar (a call brings back 8 files at most, each at most 16 MiB: a larger tar is
# split into 15 MB pieces, results.tar.part-*) and removed.
set -uo pipefail
deadline=${1:?usage: device_steps.sh DEADLINE_S COMMAND...}
shift
[[ $deadline =~ ^[0-9]+$ ]] || { echo "DEADLINE_S must be whole seconds, got '$deadline'" >&2; exit 2; }
OUT=${OUT:-/tmp/out}
export R=$OUT/r
mkdir -p "$R"
began=$(date +%s)
clocks() {
    echo "== $1 $(date +%T)" >>"$R/clocks.txt"
    nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv >>"$R/clocks.txt" 2>&1
}
clocks start
for cmd in "$@"; do
    left=$((deadline - ($(date +%s) - began)))
    if ((left < 10)); then
        echo "== skipped (deadline): $cmd" | tee -a "$R/steps.log"
        continue
    fi
    echo "== $(date +%T) ($left s left): $cmd" | tee -a "$R/steps.log"
    timeout "$left" bash -c "$cmd" >>"$R/steps.log" 2>&1
    echo "== exit $? after $(($(date +%s) - began)) s" | tee -a "$R/steps.log"
done
clocks end
tail -n 40 "$R/steps.log"
tar -C "$OUT" -cf "$OUT/results.tar" r && rm -rf "$R"
# a call brings back files of at most 16 MiB: a larger tar goes in 15 MB pieces (cat results.tar.part-* | tar -x)
if (($(stat -c %s "$OUT/results.tar") > 15000000)); then
    split -b 15000000 "$OUT/results.tar" "$OUT/results.tar.part-" && rm "$OUT/results.tar"
    ls -l "$OUT"
fi
