#!/usr/bin/env bash
# What one short GPU lease (one H100/H200, torch 2.11 preinstalled, no network) is spent on, as one script of
# about 8 minutes (DEADLINE seconds; each step time-boxed, a failed step recorded and the next one run):
#  a. torch / CUDA / GPU, onnxruntime providers, TVM;
#  b. synthetic JPEGs in ImageFolder layout (tools/make_jpegs.py);
#  c. ResNet-50 at 224 through `trp-edge compress --data imagefolder:...` for STEPS steps each: SGD (--period 0),
#     TRP, TRP+Nu (--nuclear 3e-4), each in fp32 and bf16 (--amp off|bf16), step_ms and images/s read from each
#     report.json; then tools/bench_data.py at 224 on the GPU (loader images/s per worker count against the step);
#  d. the GPU half of deploy: `trp-edge deploy --target cuda --local --runtime tvm` on a small compressed model
#     (where TVM imports; tvm.runtime.enabled("cuda") is printed first), and dense against compressed in
#     onnxruntime's CUDAExecutionProvider where that provider is there.
#
#     bash tools/gpu_session.sh                      # on the lent machine: everything lands in $OUT
#     bash tools/gpu_session.sh --dry-run            # here, on the CPU: tiny sizes, the same path end to end
#
# From the device tool (the working tree is copied there; the project runs from it with PYTHONPATH, no install):
#     run(command="bash tools/gpu_session.sh", timeout_s=570)
# $OUT gets at most 8 files back, 2 folders down: so the step outputs are written under WORK (/tmp) and packed
# into OUT/results.tar.gz; OUT/summary.md holds the table and the goals, OUT/log.txt everything printed.
#
# What the lent machines lack (KINDS.md, 2026-11): TVM is not installed there, so (d)'s TVM half records
# "no TVM" unless a TVM build with CUDA enabled is carried (a wheel in .whl/, installed with pip --no-index
# --target before this script, PYTHONPATH set); their onnxruntime is the CPU package (no CUDAExecutionProvider)
# unless onnxruntime-gpu is carried the same way. deploy's own ORT runtime always uses the CPU provider
# (trp_edge/backends/ort.session): a CUDA ORT deployment would need a provider field in the cuda target and
# that one session function to read it; here the provider is timed directly on the compressed model's ONNX files.
# Environment (defaults in brackets): OUT [bench-out/gpu], WORK [/tmp/trp-gpu-session], DEVICE [cuda],
# MODEL [resnet50], SIZE [224], BATCH [128], STEPS [150], WORKERS [12], IMAGES [2048], VAL [128],
# DEADLINE [480], PYTHON [python3], EXTRA (more compress options, e.g. --channels-last), SMALL_MODEL [resnet18]
# (the model of (d)), SCALE [1] (multiplies each step's time limit). --dry-run: DEVICE=cpu, resnet20 at 32 px,
# 2 steps of batch 8, 40 JPEGs, SCALE=4, DEADLINE=1800.
set -u -o pipefail
{  # read whole before it runs: an edit to this file cannot change a run under way
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then  # CPU, tiny: checks the script's path, not the numbers
  : "${DEVICE:=cpu}" "${MODEL:=resnet20}" "${SIZE:=32}" "${BATCH:=8}" "${STEPS:=2}" "${WORKERS:=2}"
  : "${IMAGES:=40}" "${VAL:=10}" "${SMALL_MODEL:=resnet20}" "${DEADLINE:=1800}" "${SCALE:=4}"
  : "${OUT:=bench-out/gpu-dry-run}"
fi
OUT=${OUT:-bench-out/gpu}
WORK=${WORK:-/tmp/trp-gpu-session}
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-resnet50} SIZE=${SIZE:-224} BATCH=${BATCH:-128} STEPS=${STEPS:-150}
WORKERS=${WORKERS:-12} IMAGES=${IMAGES:-2048} VAL=${VAL:-128} DEADLINE=${DEADLINE:-480} EXTRA=${EXTRA:-}
SMALL_MODEL=${SMALL_MODEL:-resnet18} SCALE=${SCALE:-1}
PY=${PYTHON:-python3} SMALL=$WORK/compress/small
export PY SMALL PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
START=$SECONDS
STATUS=$WORK/status.tsv
trp() { "$PY" -m trp_edge.cli "$@"; }

# step NAME SECONDS CMD...: run CMD for at most SECONDS (less when the DEADLINE is near), record name, exit
# status and seconds in STATUS; never stops the script.
step() {
  local name=$1 limit=$(($2 * SCALE)) left rc t0=$SECONDS
  shift 2
  left=$((DEADLINE - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped (deadline)"; printf '%s\tskipped\t0\n' "$name" >>"$STATUS"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s)"
  timeout -k 5 "$limit" "$@"
  rc=$?
  [ $rc -eq 124 ] && echo "== $name: timed out after ${limit}s"
  [ $rc -ne 0 ] && echo "== $name: failed (exit $rc)"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STATUS"
  return 0
}

# ---- a. the machine
env_info() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: none"
  grep -m1 "model name" /proc/cpuinfo; nproc
  "$PY" - <<'EOF'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}.{p.minor}",
          "bf16", torch.cuda.is_bf16_supported(), "cudnn", torch.backends.cudnn.version())
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError:
    print("onnxruntime: not installed")
EOF
}
export -f env_info
step env 90 bash -c env_info

# ---- b. the images
JPEGS=$WORK/jpegs
step jpegs 90 "$PY" tools/make_jpegs.py "$JPEGS" --train "$IMAGES" --val "$VAL" --size "$SIZE"

# ---- c. step time: SGD, TRP, TRP+Nu x fp32, bf16
AMP=yes
trp compress --help | grep -q -- "--amp" || { AMP=no; echo "== compress has no --amp here: fp32 runs only"; }
for prec in fp32 bf16; do
  for v in SGD TRP TRP+Nu; do
    name="$v-$prec"
    case $v in SGD) args=(--period 0) ;; TRP) args=(--nuclear 0) ;; TRP+Nu) args=(--nuclear 3e-4) ;; esac
    if [ $AMP = yes ]; then
      [ $prec = bf16 ] && args+=(--amp bf16) || args+=(--amp off)
    elif [ $prec = bf16 ]; then
      printf '%s\tno --amp\t0\n' "$name" >>"$STATUS"; continue
    fi
    # shellcheck disable=SC2086  # EXTRA: options split on spaces
    step "$name" 100 "$PY" -m trp_edge.cli compress "$MODEL" --data "imagefolder:$JPEGS" --input-size "$SIZE" \
      --steps "$STEPS" --batch "$BATCH" --workers "$WORKERS" --device "$DEVICE" --no-calibrate --no-latency \
      --force -q --out "$WORK/compress/$name" "${args[@]}" $EXTRA
  done
done
LOADER_WORKERS=${LOADER_WORKERS:-1,4,8,$WORKERS}
[ "$DEVICE" = cpu ] && LOADER_WORKERS=0,$WORKERS
BD_AMP=$([ "$DEVICE" != cpu ] && echo bf16 || echo off)  # the goal's precision; bench_data autocasts itself
step bench_data 120 "$PY" tools/bench_data.py --model "$MODEL" --size "$SIZE" --batch "$BATCH" --device "$DEVICE" \
  --dir "$JPEGS" --workers "$LOADER_WORKERS" --steps $((STEPS < 20 ? STEPS : 20)) --warmup 2 --amp "$BD_AMP" \
  --fmnist '' --out "$WORK/bench_data.json"

# ---- d. deploy on the GPU: TVM's CUDA modules, ORT's CUDA provider
echo "== tvm"
"$PY" -c "import tvm; print('tvm', tvm.__version__, 'cuda enabled:', tvm.runtime.enabled('cuda'))" \
  && TVM=yes || { TVM=no; echo "no TVM here: (d) needs a TVM build with CUDA carried to this machine"; }
ORT_CUDA=$("$PY" -c "import onnxruntime as o; print('yes' if 'CUDAExecutionProvider' in o.get_available_providers() else 'no')" 2>/dev/null || echo no)
if [ $TVM = yes ] || [ "$ORT_CUDA" = yes ]; then
  step small-model 120 "$PY" -m trp_edge.cli compress "$SMALL_MODEL" --data synthetic --steps 0 --target-speedup 2 \
    --device "$DEVICE" --no-calibrate --no-latency --force -q --out "$SMALL"
fi
if [ $TVM = yes ]; then
  step deploy-tvm-cuda 180 "$PY" -m trp_edge.cli deploy --target cuda --local --runtime tvm --model "$SMALL" \
    --reports "$WORK/reports"
fi
ort_cuda() {  # dense against compressed, batch 1, in onnxruntime's CUDA provider (deploy's ORT runs on the CPU)
  "$PY" - "$SMALL" <<'EOF'
import json, sys, time
import numpy as np, onnxruntime as ort
d = sys.argv[1]
res = {}
for name in ("dense", "model"):
    s = ort.InferenceSession(f"{d}/{name}.onnx", providers=["CUDAExecutionProvider"])
    i = s.get_inputs()[0]
    x = np.random.rand(1, *i.shape[1:]).astype(np.float32)
    for _ in range(20):
        s.run(None, {i.name: x})
    t = time.perf_counter()
    for _ in range(200):
        s.run(None, {i.name: x})
    res[name] = 1000 * (time.perf_counter() - t) / 200
    print(name, s.get_providers()[0], f"{res[name]:.3f} ms")
print(f"compressed vs dense: {res['dense'] / res['model']:.2f}x")
json.dump(res, open(f"{d}/../ort_cuda.json", "w"))
EOF
}
export -f ort_cuda
if [ "$ORT_CUDA" = yes ]; then step ort-cuda 60 bash -c ort_cuda; else echo "== onnxruntime has no CUDAExecutionProvider here"; fi

# ---- the summary and the files back
"$PY" - "$WORK" "$BATCH" "$DEVICE" "$MODEL" "$SIZE" "$STEPS" >"$OUT/summary.md" <<'EOF'
import json, sys
from pathlib import Path
work, batch = Path(sys.argv[1]), int(sys.argv[2])
print(f"# GPU session: {sys.argv[4]} at {sys.argv[5]}px, batch {batch}, {sys.argv[6]} steps, device {sys.argv[3]}\n")
print("| run | step ms | images/s | status |\n|---|---:|---:|---|")
status = {}
for line in (work / "status.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    status[name] = "ok" if rc == "0" else f"exit {rc}" if rc.isdigit() else rc
ips = {}
for name in [f"{v}-{p}" for p in ("fp32", "bf16") for v in ("SGD", "TRP", "TRP+Nu")]:
    rep = work / "compress" / name / "report.json"
    tr = (json.loads(rep.read_text()).get("training") or {}) if rep.exists() else {}
    ms = tr.get("step_ms")
    ips[name] = tr.get("images_per_s") or (batch * 1000 / ms if ms else None)
    print(f"| {name} | {ms:.1f} | {ips[name]:.0f} | {status.get(name, '-')} |" if ms else
          f"| {name} | - | - | {status.get(name, 'not run')} |")
def ratio(a, b):
    return f"{ips[a] / ips[b]:.2f}" if ips.get(a) and ips.get(b) else "n/a"
print(f"\nTRP+Nu bf16 / SGD bf16 images/s: {ratio('TRP+Nu-bf16', 'SGD-bf16')} (goal >= 0.9)")
for v in ("SGD", "TRP", "TRP+Nu"):
    print(f"{v} bf16 / fp32 images/s: {ratio(v + '-bf16', v + '-fp32')} (goal >= 1.5)")
bd = work / "bench_data.json"
if bd.exists():
    print("\n| loader workers | loader images/s | step images/s | together images/s | bound |\n|---:|---:|---:|---:|---|")
    for r in json.loads(bd.read_text())["rows"]:
        print(f"| {r['workers']} | {r['loader_images_per_s']:.0f} | {r['step_images_per_s']:.0f} | "
              f"{r['together_images_per_s']:.0f} | {r['bound']} |")
print("\n| step | status | seconds |\n|---|---|---:|")
for line in (work / "status.tsv").read_text().splitlines():
    print("| " + " | ".join(line.split("\t")) + " |")
EOF
cat "$OUT/summary.md"
(cd "$WORK" && find . \( -name report.json -o -name '*.md' -o -name '*.json' -o -name status.tsv \) -print0 \
  | tar -czf "$OUT/results.tar.gz" --null -T -)
echo "== done in $((SECONDS - START))s: $OUT/summary.md, $OUT/log.txt, $OUT/results.tar.gz"
exit 0
}
