#!/usr/bin/env bash
# What a short GPU lease is spent on, as one script (about 8 minutes on an H100/H200):
#  1. trp-edge's torch-level tests on that machine's torch (2.11 on the lent machines; no TVM there);
#  2. tools/bench_step.py on CUDA: SGD vs TRP vs TRP+Nu step time, SVDs on the GPU and on the CPU;
#  3. TRP2+Nu at the paper's settings (e=0.02, lambda=3e-4, m=20) and the SGD baseline (then direct TSVD) on
#     Fashion-MNIST ResNet-20, for as many epochs as fit in TRAIN_SECONDS each, sized from step 2's step time.
#
#     OUT=bench-out/gpu DATA=fashion-mnist:/usr/share/datasets/fashion-mnist bash tools/gpu_trp_session.sh
#
# Runs from the repository root with the project on PYTHONPATH (the machine needs torch, torchvision, numpy,
# click, tqdm, onnx, onnxruntime, pytest). Results: OUT/{env.txt,tests.txt,step/,trp/}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu}
DATA=${DATA:-fashion-mnist}
TRAIN_SECONDS=${TRAIN_SECONDS:-150}
RUNS=${RUNS:-TRP2+Nu,SGD+TSVD}
TESTS=${TESTS:-tests/test_lowrank.py tests/test_trp.py tests/test_sources.py}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"

{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} | tee "$OUT/env.txt"

echo "== tests on this torch"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" $TESTS 2>&1 | tail -15 | tee "$OUT/tests.txt"

echo "== step time"
timeout 200 $PY tools/bench_step.py --device cuda --steps 40 --warmup 10 --rounds 2 --out "$OUT/step" \
  --svd-devices "${SVD_DEVICES:-same,cpu}" \
  | tee "$OUT/step.txt"

# epochs that fit: 60000/128 steps an epoch at the TRP+Nu step time, plus a quarter for evaluation
EPOCHS=$($PY - "$OUT/step/bench_step.json" "$TRAIN_SECONDS" <<'EOF'
import json, sys
rows = {r["variant"]: r["step_ms"] for r in json.load(open(sys.argv[1]))["rows"]}
ms = min(v for k, v in rows.items() if k.startswith("TRP+Nu"))
print(max(2, min(60, int(float(sys.argv[2]) / (469 * ms / 1000 * 1.25)))))
EOF
) || EPOCHS=3
echo "== $RUNS, $EPOCHS epochs each"
timeout $((TRAIN_SECONDS * 2 + 150)) $PY tools/bench_trp.py --data "$DATA" --device cuda --epochs "$EPOCHS" \
  --nuclear 3e-4 --runs "$RUNS" --out "$OUT/trp" 2>&1 | grep -v '^INFO' | tail -12 | tee "$OUT/trp.txt"
