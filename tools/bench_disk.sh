#!/usr/bin/env bash
# The peak disk a command's temp folders take: samples `du` of $TMPDIR/trp-edge-* (calibrate's and build's
# scratch folders) every second while CMD runs, then prints the command's exit code, its time and the peak.
#   tools/bench_disk.sh .venv/bin/trp-edge calibrate --local --model resnet18 --runtime ort --threads 1 --out /tmp/cal -q
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: tools/bench_disk.sh CMD [ARGS...]" >&2; exit 2; }
tmp=${TMPDIR:-/tmp}
samples=$(mktemp)
( while true; do du -sm "$tmp"/trp-edge-* 2>/dev/null | awk '{s += $1} END {print s + 0}' >> "$samples"; sleep 1; done ) &
watcher=$!
start=$(date +%s)
"$@"
rc=$?
kill "$watcher"
echo "bench_disk: rc=$rc, $(( $(date +%s) - start )) s, peak $(sort -n "$samples" | tail -1) MB in $tmp/trp-edge-*"
rm -f "$samples"
exit $rc
