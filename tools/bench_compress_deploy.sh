#!/usr/bin/env bash
# compress's latency figure against deploy's, for one model, as a user gets them from the CLI: at each thread
# count, `trp-edge compress` (its latency check in report.json) then `trp-edge deploy --local` (its report), both
# at that count, for ROUNDS rounds. Prints one line per run and saves them as JSON lines in OUT/agree.jsonl.
#
#   tools/bench_compress_deploy.sh [OUT] [THREADS...]        (env: MODEL=resnet18 SPEEDUP=3 ROUNDS=2 TRP_EDGE=...)
#
# TRP_EDGE names the command (default .venv/bin/trp-edge); PYTHONPATH may point it at another checkout, so two
# versions of trp-edge can be measured one after the other on the same machine.
set -euo pipefail
OUT=${1:-bench-out/compress-deploy}; shift || true
THREADS=("${@:-1 2}"); [ $# -eq 0 ] && THREADS=(1 2)
MODEL=${MODEL:-resnet18}; SPEEDUP=${SPEEDUP:-3}; ROUNDS=${ROUNDS:-2}; TRP_EDGE=${TRP_EDGE:-.venv/bin/trp-edge}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${THREADS[@]}"; do
    m="$OUT/$MODEL-${t}t"
    "$TRP_EDGE" compress "$MODEL" --steps 0 --target-speedup "$SPEEDUP" --scheme spatial --runtime ort \
      --precision fp32 --threads "$t" --no-calibrate --out "$m" --force -q >/dev/null
    rm -rf "$OUT/reports-$t"
    "$TRP_EDGE" deploy --target host --local --model "$m" --runtime ort --precision fp32 --threads "$t" \
      --no-layers --reports "$OUT/reports-$t" -q >/dev/null
    "$PY" - "$m" "$OUT/reports-$t" "$r" <<'PYEOF' | tee -a "$OUT/agree.jsonl"
import json, sys
from pathlib import Path
model, reports, rnd = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
c = json.loads((model / "report.json").read_text())
(d,) = [json.loads(p.read_text()) for p in reports.glob("*/*.json")]
lat = c["latency"]
row = {"round": rnd, "threads": d["threads"], "mac_speedup": round(c["mac_speedup"], 3),
       "compress": {"dense_ms": round(lat["dense"]["median_ms"], 3), "compressed_ms": round(lat["compressed"]["median_ms"], 3),
                    "speedup": round(lat["latency_speedup"], 3), "efficiency": round(lat["efficiency"], 3)},
       "deploy": {"dense_ms": round(d["dense"]["median_ms"], 3), "compressed_ms": round(d["compressed"]["median_ms"], 3),
                  "speedup": round(d["latency_speedup"], 3), "efficiency": round(d["efficiency"], 3)},
       "deploy_over_compress": round(d["latency_speedup"] / lat["latency_speedup"], 3), "cpu": d["device"]["cpu"]}
print(json.dumps(row))
PYEOF
  done
done
