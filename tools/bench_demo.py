#!/usr/bin/env python3
"""`make demo`, timed and checked: the wall time (goal: at most 10 minutes on this machine), and from the reports
it wrote, whether every deployment shows compressed faster than dense and INT8 within 0.5 pt of fp32 top-1.
Prints one line per report and the verdicts; saves bench-out/demo.json. Exit status 1 when a check fails.

    python tools/bench_demo.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    t0 = time.time()
    r = subprocess.run(["make", "demo"], cwd=REPO)
    wall = time.time() - t0
    if r.returncode != 0:
        print(f"make demo failed (exit {r.returncode}) after {wall:.0f} s")
        return 1
    reps = [json.loads(f.read_text()) for f in sorted((REPO / "reports" / "host").glob("resnet20-*.json"))
            if f.stat().st_mtime >= t0]
    lines, faster, int8_ok = [], True, True
    for rep in reps:
        acc = rep.get("accuracy") or {}
        q = acc.get("quantized", {})
        # INT8 dense against the trained (fp32 dense) model, INT8 compressed against the decomposed one
        drop = max((acc["trained" if k == "dense" else "decomposed"] - v for k, v in q.items()), default=None)
        # a precision whose builds keep every pair dense (none faster there) ships the dense net: not "faster"
        same = rep["mac_speedup"] <= 1.0 + 1e-9
        faster &= rep["latency_speedup"] > 1.0 and not same
        int8_ok &= drop is None or drop <= 0.5
        kept = len(rep.get("kept_dense_at_precision") or [])
        lines.append(f"{rep['runtime']} {rep['precision']}: {rep['latency_speedup']:.2f}x for "
                     f"{rep['mac_speedup']:.2f}x fewer MACs (efficiency {rep['efficiency']:.2f}); top-1 trained "
                     f"{acc.get('trained')}, decomposed {acc.get('decomposed')}"
                     + "".join(f", {rep['precision']} {k} {v:.2f}" for k, v in q.items())
                     + (f"; {kept} pair(s) kept dense at {rep['precision']}" if kept else "")
                     + (" (the compressed model is the dense one at this precision)" if same else ""))
    checks = {"reports": len(reps) == 4, "within 10 minutes": wall <= 600,
              "every report compressed faster than dense": faster, "INT8 within 0.5 pt of fp32": int8_ok}
    print("\n".join(lines))
    print(f"make demo: {wall:.0f} s; " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    out = REPO / "bench-out"
    out.mkdir(exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"seconds": round(wall), "checks": checks, "lines": lines,
                                               "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
