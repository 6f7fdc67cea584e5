#!/usr/bin/env bash
# `make demo`'s two commands (compress, then deploy) in another checkout of trp-edge, with this checkout's
# environments (.venv, .venv-litert), timed: to compare two commits' demos on one machine, one after the other.
#
#   tools/demo_at.sh CHECKOUT > demo.log        # prints WALL <seconds> s last
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$1"
export PYTHONPATH=$PWD TRP_EDGE_LITERT_PYTHON=$HERE/.venv-litert/bin/python
PY=$HERE/.venv/bin/python
start=$(date +%s)
$PY -m trp_edge.cli compress resnet20 --data fashion-mnist --scheme spatial --energy 0.02 \
  --nuclear 3e-4 --epochs 1 --lr 0.05 --force --runtime ort,tflite --precision fp32,int8
$PY -m trp_edge.cli deploy --target host --local --runtime ort,tflite --precision fp32,int8
echo "WALL $(( $(date +%s) - start )) s"
