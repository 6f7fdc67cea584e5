#!/usr/bin/env bash
# ExecuTorch against ORT and TFLite, issue 29's benchmark: ResNet-18 at 3x fewer MACs by the default latency-aware
# path for ExecuTorch (`compress --runtime executorch`, ranks from the executorch tables in calibration/host/,
# measured first when missing), then one deploy that times ExecuTorch, ORT and TFLite dense and compressed on this
# machine, each runtime in its own alternating run. Reports and logs go to OUT.
#
#   tools/bench_executorch.sh OUT [THREADS [PRECISIONS]]     # e.g. OUT 1 fp32,int8 ; OUT 2 fp32
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/bench_executorch.sh OUT [THREADS [PRECISIONS]]}
T=${2:-1}
PREC=${3:-fp32}
TRP=${TRP_EDGE:-.venv/bin/trp-edge}
mkdir -p "$OUT"
MODEL="$OUT/resnet18-et-${T}t"
{
  echo "# $(date -u +%FT%TZ) $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), commit $(git rev-parse --short HEAD)"
  echo "# threads $T, precisions $PREC"
  "$TRP" compress resnet18 --steps 0 --target-speedup 3 --scheme spatial --runtime executorch --precision "$PREC" \
    --threads "$T" --out "$MODEL" --force
  "$TRP" deploy --target host --local --model "$MODEL" --runtime executorch,ort,tflite --precision "$PREC" \
    --threads "$T" --no-layers --reports "$OUT/reports"
} 2>&1 | grep -v -e "Warning" -e "warnings.warn" -e "cpuinfo" | tee "$OUT/bench-${T}t.log"
