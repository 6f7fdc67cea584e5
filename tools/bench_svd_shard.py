"""TRP's projection SVDs spread over ranks: the time of one projection's SVDs (ResNet-50's conv weights at 224, in
both matrix forms, one batched SVD per shape, as TRPTrainer batches them with scheme 'auto') at 1, 2 and 4 gloo
processes on this CPU, each process one thread, results broadcast to every rank (trp_shard.group_svds).

    python tools/bench_svd_shard.py [--ranks 1,2,4] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as td
import torch.multiprocessing as mp


def groups_of_resnet50():
    from torchvision.models import resnet50

    from trp_edge.config import DecomposeConfig
    from trp_edge.lowrank import conv_layers, get_scheme
    from trp_edge.trp import _Group

    model = resnet50()
    layers = [la for la in conv_layers(model, torch.zeros(1, 3, 224, 224), DecomposeConfig()) if la.reason is None]
    by: dict[tuple, list] = {}
    for name in ("channel", "spatial"):
        for la in layers:
            if get_scheme(name).ineligible(la.module) is None:
                by.setdefault((name, tuple(la.weight.shape)), []).append(la)
    return [_Group(v, shape, get_scheme(n)) for (n, shape), v in by.items()]


def worker(rank: int, world: int, port: int, repeat: int, out: str) -> None:
    from trp_edge.trp_distributed import Dist
    from trp_edge.trp_shard import group_svds

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    dist = Dist(rank, world, rank, "gloo")
    torch.manual_seed(0)
    groups = groups_of_resnet50()
    times = []
    for _ in range(repeat + 1):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        svds = group_svds(dist, groups, torch.device("cpu"))
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": times[1:], "groups": len(groups), "layers": sum(len(g.layers) for g in groups),
                       "s_sum": float(sum(s.sum() for _, s, _ in svds))}, f)
    td.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="bench_svd_shard.json")
    args = ap.parse_args()
    rows = []
    for world in map(int, args.ranks.split(",")):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            mp.spawn(worker, args=(world, free_port(), args.repeat, tmp.name), nprocs=world)
            res = json.load(open(tmp.name))
        med = statistics.median(res["seconds"])
        rows.append({"ranks": world, "median_s": med, "seconds": res["seconds"], "groups": res["groups"],
                     "layers": res["layers"], "singular_value_sum": res["s_sum"]})
        print(f"{world} rank(s): projection SVDs {med:.3f} s (median of {args.repeat}; "
              f"{res['groups']} shape batches, {res['layers']} layer-forms)", flush=True)
    base = rows[0]["median_s"]
    for r in rows:
        r["speedup"] = base / r["median_s"]
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads_per_rank": 1, "rows": rows}
    with open(args.json, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({r["ranks"]: round(r["speedup"], 2) for r in rows}))


if __name__ == "__main__":
    main()
