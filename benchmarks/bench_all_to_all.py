"""Time moeflux's token all-to-all on the emulated cluster, for the simulator's calibration.

    python benchmarks/cluster.py --nodes 2 --ranks-per-node 2 --link 1gbit -- \\
        benchmarks/bench_all_to_all.py --out m.json tokens=1024 tokens=512,routing=zipf,s=1.2

Runs under torchrun (env:// rendezvous, gloo). Each positional SETTING is ``key=value`` pairs joined by commas
(keys: tokens (per rank), hidden, topk, experts (0: 2 per rank), routing (uniform | zipf), s (the zipf
exponent), seed, tag (a free label, e.g. fit / predict)); missing keys take the --defaults.

Per setting, every rank builds the same token→expert counts ``[P, E]`` with ``moeflux.sim.routing.zipf`` (s = 0
for uniform: the draws of ``moeflux.sim.calibrate.RoutingSpec``), experts placed contiguously (E/P per rank),
and sends its row's slots to the experts' ranks as float32 rows ``[rows, hidden]`` with
``moeflux.ops.all_to_all``. The receive splits come from a small all-to-all of the counts (untimed, and checked
against the model's matrix). A few warm-ups, then --min-repeats to --repeats timed repeats (fewer for slow settings), each after a barrier; the time of
a repeat is the max over ranks of its own wall time; the median over repeats is reported. Rank 0 appends one
measurement per setting to --out (JSON list in moeflux.sim.calibrate.load_measurements format, plus descriptive
fields).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import moeflux
from moeflux.sim.routing import traffic_matrix, zipf

BYTES_PER_ELEM = 4  # float32 rows
KEYS = {"tokens": int, "hidden": int, "topk": int, "experts": int, "routing": str, "s": float, "seed": int,
        "tag": str}


def parse_setting(text: str, defaults: dict) -> dict:
    setting = dict(defaults)
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"bench_all_to_all: bad setting item {item!r} (keys: {', '.join(KEYS)})")
        setting[key] = KEYS[key](value)
    if setting["routing"] not in ("uniform", "zipf"):
        raise SystemExit(f"bench_all_to_all: routing must be uniform or zipf, got {setting['routing']!r}")
    return setting


def link_gbit(text: str) -> float | None:
    """MOEFLUX_CLUSTER_LINK ('1gbit', '500mbit', 'none') -> Gbit/s, None when unshaped."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit|tbit)", text.strip().lower())
    if not m:
        return None
    return float(m.group(1)) * {"kbit": 1e-6, "mbit": 1e-3, "gbit": 1.0, "tbit": 1e3}[m.group(2)]


def measure(setting: dict, rank: int, world: int, warmup: int, repeats: int, min_repeats: int,
            max_seconds: float) -> dict:
    experts = setting["experts"] or 2 * world
    skew = setting["s"] if setting["routing"] == "zipf" else 0.0
    counts = zipf(world, experts, setting["tokens"], setting["topk"], skew, setting["seed"])  # [P, E], same on all
    rows = traffic_matrix(counts, 1, 1).astype(np.int64)  # [src, dst] rows
    send = rows[rank].tolist()
    got = torch.empty(world, dtype=torch.int64)
    dist.all_to_all_single(got, torch.tensor(send, dtype=torch.int64))  # the count exchange (untimed)
    recv = got.tolist()
    if recv != rows[:, rank].tolist():
        raise SystemExit(f"rank {rank}: exchanged counts {recv} differ from the model's {rows[:, rank].tolist()}")
    x = torch.randn(sum(send), setting["hidden"], generator=torch.Generator().manual_seed(rank))

    def once() -> tuple[float, float, float]:
        dist.barrier()
        start = time.perf_counter()
        out = moeflux.ops.all_to_all(x, recv, send, agree_first=False)  # splits checked above
        end = time.perf_counter()
        assert out.shape[0] == sum(recv)
        # CLOCK_MONOTONIC is one clock for all the namespaces of this machine: starts and ends are comparable.
        t = torch.tensor([end - start, start, end], dtype=torch.float64)
        lo = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float(t[0]), float(t[2] - t[1]), float(t[1] - lo[1])  # max duration, last-in→last-out, skew

    warm = [once() for _ in range(warmup)]
    n = max(min_repeats, min(repeats, math.floor(max_seconds / max(warm[-1][0], 1e-6)))) if warm else repeats
    runs = [once() for _ in range(n)]
    link_text = os.environ.get("MOEFLUX_CLUSTER_LINK", "none")
    gbit = link_gbit(link_text)
    nodes = int(os.environ.get("MOEFLUX_CLUSTER_NODES", "1"))
    return {
        "nodes": nodes,
        "ranks_per_node": world // nodes,
        "link_gbit_per_s": gbit if gbit is not None else 1000.0,  # unshaped veth: a placeholder, flagged below
        "latency_s": 0.0,
        "measured_s": statistics.median(r[0] for r in runs),
        "traffic_bytes": traffic_matrix(counts, setting["hidden"], BYTES_PER_ELEM).tolist(),
        "link": link_text,
        "unshaped": gbit is None,
        "tokens": setting["tokens"], "hidden": setting["hidden"], "top_k": setting["topk"], "experts": experts,
        "routing": None, "kind": setting["routing"], "skew": skew, "seed": setting["seed"], "tag": setting["tag"],
        "bytes_per_elem": BYTES_PER_ELEM,
        "repeats_s": [r[0] for r in runs],
        "span_s": statistics.median(r[1] for r in runs),  # median of (last end − last start)
        "start_skew_s": statistics.median(r[2] for r in runs),
        "warmup_s": [w[0] for w in warm],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", metavar="SETTING", help="key=value[,key=value...] (see above)")
    parser.add_argument("--defaults", default="tokens=1024,hidden=1024,topk=2,experts=0,routing=uniform,s=0,seed=0,"
                        "tag=", help="values of the keys a setting leaves out")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per setting (at most)")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=5.0,
                        help="fewer repeats (>= --min-repeats) when they would take longer than this")
    parser.add_argument("--out", type=Path, help="JSON list to append the measurements to (rank 0)")
    args = parser.parse_args()
    defaults = parse_setting(args.defaults, dict.fromkeys(KEYS, None) | {"routing": "uniform"})
    settings = [parse_setting(s, defaults) for s in args.settings]

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for setting in settings:
        r = measure(setting, rank, world, args.warmup, args.repeats, args.min_repeats, args.max_seconds)
        results.append(r)
        if rank == 0:
            sent = np.asarray(r["traffic_bytes"]).sum(1).max()
            print(f"a2a P={world} ({r['nodes']}x{r['ranks_per_node']}) link={r['link']} tokens={r['tokens']} "
                  f"hidden={r['hidden']} {r['kind']} s={r['skew']:g}: median {r['measured_s'] * 1e3:.2f} ms "
                  f"(span {r['span_s'] * 1e3:.2f} ms, start skew {r['start_skew_s'] * 1e6:.0f} us, "
                  f"{len(r['repeats_s'])} repeats, max sent/rank {sent / 1e6:.2f} MB)", flush=True)
    if rank == 0 and args.out is not None:
        existing = json.loads(args.out.read_text()) if args.out.exists() and args.out.stat().st_size else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(existing + results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
