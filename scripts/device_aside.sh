#!/usr/bin/env bash
# Keep large committed assets out of the working tree that travels to the device machine (64 MiB in all,
# carried wheels included): a tracked file that is absent on disk does not travel.
#
#   bash scripts/device_aside.sh out    # before device runs: move them to $ASIDE (git status: deleted)
#   bash scripts/device_aside.sh back   # after: restore them (git status: clean)
#
# The reference model (assets/reference) stays: the device runs need it.
set -euo pipefail
cd "$(dirname "$0")/.."
ASIDE=${ASIDE:-/tmp/vgen-aside}
PATHS=(assets/motion4d/model benchmarks/results assets/demo-reference.png assets/reference/samples-demo.png
       assets/motion4d/sample-recon.png)  # none is read on the device; the tree there holds 64 MiB
case "${1:-}" in
out)
    for p in "${PATHS[@]}"; do
        if [[ -e "$p" ]]; then
            mkdir -p "$ASIDE/$(dirname "$p")"
            rm -rf "${ASIDE:?}/$p"
            mv "$p" "$ASIDE/$p"
            echo "aside: $p -> $ASIDE/$p"
        fi
    done
    ;;
back)
    for p in "${PATHS[@]}"; do
        if [[ -e "$ASIDE/$p" ]]; then
            rm -rf "$p"
            mkdir -p "$(dirname "$p")"
            mv "$ASIDE/$p" "$p"
            echo "back: $p"
        elif [[ ! -e "$p" ]]; then
            git checkout -- "$p" 2>/dev/null && echo "restored from git: $p" || true
        fi
    done
    ;;
*)
    echo "usage: $0 out|back" >&2
    exit 2
    ;;
esac
