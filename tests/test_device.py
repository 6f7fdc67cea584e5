"""The device side (trp_edge.device and the backends' load/profile) runs with numpy and the runtimes only:
here with torch blocked from import, as on a board that has no torch."""

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import torch

BLOCKED = textwrap.dedent('''
    import builtins, json, sys
    from pathlib import Path

    real = builtins.__import__

    def guard(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return real(name, *args, **kwargs)

    builtins.__import__ = guard
    import tvm  # the runtime serve needs
    from trp_edge.backends import ort, tflite, tvm as tvm_backend  # noqa: F401
    from trp_edge.device import bench, runner, serve  # noqa: F401

    out = bench.bench(json.loads(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps({"out": out, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
''')


def test_the_device_side_runs_without_torch(tmp_path, tiny):
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny.eval(), (x,), str(tmp_path / "dense.onnx"), input_names=["input"], dynamo=False)
    with torch.no_grad():
        np.savez(tmp_path / "reference.npz", input=x.numpy(), dense=tiny(x).numpy())
    job = {"runtime": "ort", "threads": 1, "reference": "reference.npz", "layers": True,
           "protocol": {"warmup": 1, "block": 2, "min_runs": 4, "min_seconds": 0.0},
           "artifacts": [{"variant": "dense", "file": "dense.onnx"}]}
    r = subprocess.run([sys.executable, "-c", BLOCKED, json.dumps(job), str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["torch"] == []
    art = got["out"]["artifacts"]["dense"]
    assert "error" not in art and art["max_abs_diff"] < 1e-4
    assert got["out"]["timing"]["dense"]["runs"] >= 4
    assert {o["op"] for o in art["ops"]} & {"Conv", "FusedConv"}  # ORT's op profile, through the backend
