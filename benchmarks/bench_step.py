"""What one training step of a stack of MoE transformer blocks costs, and where the time goes, on the
emulated cluster (benchmarks/cluster.py) or any torchrun launch.

Two modes:

    # one configuration: run by torchrun on each node (this is what cluster.py starts)
    python benchmarks/cluster.py --nodes 2 --ranks-per-node 2 --link 1gbit -- \\
        benchmarks/bench_step.py --json /tmp/step.json

    # the sweep: several link rates x topologies, each on a fresh emulated cluster (root);
    # writes JSON per run (with every token collective's traffic matrix and time), table.md and step_breakdown.png
    python benchmarks/bench_step.py --sweep --out benchmarks/results/step

The model is the main job's (examples/moe_lm: attention + moeflux.MoE per block, moeflux.DataParallel,
AdamW), with random bytes as data. The breakdown comes from moeflux.comm_stats: the four token all-to-alls
and the count exchange of every layer, expert compute, the gradient all-reduce backward did not hide, and
the rest of the step ("other compute": attention, router, optimizer...). Step time: the slowest rank,
median over the measured steps; components: mean over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("dispatch", "combine", "combine_backward", "dispatch_backward", "count_exchange")


def model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and batch (per rank)")
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--d-model", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--d-ffn", type=int, default=256)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--batch", type=int, default=8, help="sequences per rank (default 8)")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--steps", type=int, default=6, help="measured steps (default 6)")
    g.add_argument("--warmup", type=int, default=2, help="steps before measuring (default 2)")
    g.add_argument("--schedule", default="bulk", help="MoE schedule: bulk, chunked, pairwise (default bulk)")
    g.add_argument("--chunks", type=int, default=2, help="stages of the chunked schedule (default 2)")
    g.add_argument("--pairwise-group-size", type=int, default=1, help="ranks per group, pairwise (default 1)")
    g.add_argument("--priority", choices=("on", "off"), default="off",
                   help="DataParallel's all-to-all priority over the gradient all-reduce (default off)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    p.add_argument("--json", type=Path, help="worker: where rank 0 writes the result")
    p.add_argument("--sweep", action="store_true", help="driver: run every --links x --topologies on cluster.py")
    p.add_argument("--links", default="none,10gbit,1gbit,200mbit", help="sweep: link rates (default %(default)s)")
    p.add_argument("--topologies", default="2x2,4x1", help="sweep: NODESxRANKS_PER_NODE list (default %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step", help="sweep: output folder")
    return p.parse_args(argv)


# ---- worker: one configuration, every rank


def start_worker(args: argparse.Namespace):
    """What every benchmark worker starts with (this one and bench_balance's): one thread, gloo over the
    launcher's ranks, experts split over all of them, the main job's model config from the model arguments.
    -> (rank, world, ranks_per_node, groups, config)."""
    import torch
    import torch.distributed as dist

    import moeflux

    sys.path.insert(0, str(ROOT / "examples"))
    from moe_lm.model import ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    groups = moeflux.init_expert_parallel(world)
    config = ModelConfig(args.layers, args.d_model, args.heads, args.d_ffn, args.experts, args.top_k, None,
                         args.seq_len)
    return rank, world, ranks_per_node, groups, config


def train_step(model, optimizer, x, y) -> None:
    """One training step of the main job's model (wrapped in DataParallel): next-byte loss plus the MoE layers'
    auxiliary losses."""
    import torch.nn.functional as F

    import moeflux

    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + moeflux.aux_loss(model.module)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def gather_to_json(mine: dict, path: Path, summarise) -> dict | None:
    """Gather every rank's ``mine`` on rank 0, which writes ``summarise(gathered)`` to ``path`` as JSON and
    returns it (None on the other ranks)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    result = summarise(gathered)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import moeflux

    rank, world, ranks_per_node, groups, config = start_worker(args)
    from moe_lm.model import ByteLM  # on the path from start_worker
    torch.manual_seed(0)
    exchange = moeflux.ExchangeConfig(schedule=args.schedule, chunks=args.chunks, group_size=args.pairwise_group_size)
    model = moeflux.DataParallel(ByteLM(config, groups, exchange), all_to_all_priority=args.priority == "on")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]

    step_seconds = []
    with moeflux.comm_stats(model, ranks_per_node=ranks_per_node) as stats:
        for _ in range(args.warmup + args.steps):
            dist.barrier()  # every rank starts the step together
            start = time.perf_counter()
            train_step(model, optimizer, x, y)
            step_seconds.append(time.perf_counter() - start)
            stats.step()
    mean = stats.mean(skip=args.warmup).as_dict()
    collectives = [[(r.layer, r.phase, list(r.bytes_to_rank), r.seconds) for r in step if r.phase in PHASES]
                   for step in stats.records[args.warmup:]]
    mine = {"step_seconds": step_seconds[args.warmup:], "breakdown": mean, "collectives": collectives}
    result = gather_to_json(mine, args.json, lambda gathered: summarise(args, gathered, world, ranks_per_node))
    if result is not None:
        b = result["breakdown_s"]
        print(f"step {1e3 * result['step_s']:.1f} ms: all-to-all {1e3 * b['all_to_all']:.1f} ms "
              f"({100 * result['all_to_all_share']:.0f}%), experts {1e3 * b['expert_compute']:.1f} ms, "
              f"all-reduce wait {1e3 * b['grad_allreduce_wait']:.1f} ms, other {1e3 * b['other_compute']:.1f} ms")
    dist.destroy_process_group()


def summarise(args: argparse.Namespace, per_rank: list[dict], world: int, ranks_per_node: int) -> dict:
    steps = len(per_rank[0]["step_seconds"])
    step_s = statistics.median(max(r["step_seconds"][i] for r in per_rank) for i in range(steps))

    def mean_over_ranks(key: str) -> float:
        return statistics.fmean(r["breakdown"][key] for r in per_rank)

    # The all-to-all part of the step is what the host was blocked by (with bulk: all of it; pipelined: the
    # part the experts did not hide); in flight counts issue to completion.
    a2a, in_flight = mean_over_ranks("all_to_all_wait_s"), mean_over_ranks("all_to_all_s")
    experts, allreduce = mean_over_ranks("expert_compute_s"), mean_over_ranks("grad_allreduce_wait_s")
    breakdown = {"all_to_all": a2a, "expert_compute": experts, "grad_allreduce_wait": allreduce,
                 "other_compute": max(0.0, step_s - a2a - experts - allreduce), "all_to_all_in_flight": in_flight}
    # One entry per collective for calibrating moeflux.sim: the traffic matrix and the slowest rank's time.
    collectives = []
    for i in range(steps):
        for j, (layer, phase, _, _) in enumerate(per_rank[0]["collectives"][i]):
            rows = [r["collectives"][i][j] for r in per_rank]
            collectives.append({"layer": layer, "phase": phase, "traffic_bytes": [row[2] for row in rows],
                                "seconds": max(row[3] for row in rows)})
    return {
        "config": {k: getattr(args, k) for k in ("layers", "d_model", "heads", "d_ffn", "experts", "top_k", "batch",
                                                 "seq_len", "steps", "warmup", "schedule", "chunks",
                                                 "pairwise_group_size", "priority")},
        "nodes": world // ranks_per_node, "ranks_per_node": ranks_per_node,
        "link": os.environ.get("MOEFLUX_CLUSTER_LINK", "loopback"),
        "shaping": os.environ.get("MOEFLUX_CLUSTER_SHAPING", ""),
        "step_s": step_s, "breakdown_s": breakdown, "all_to_all_share": a2a / step_s,
        "bytes_intra_per_step": statistics.fmean(r["breakdown"]["bytes_intra"] for r in per_rank),
        "bytes_inter_per_step": statistics.fmean(r["breakdown"]["bytes_inter"] for r in per_rank),
        "per_layer": per_rank[0]["breakdown"]["layers"],
        "collectives": collectives,
    }


# ---- driver: the sweep over emulated clusters


def forwarded_model_args(args: argparse.Namespace) -> list[str]:
    names = ("layers", "d_model", "heads", "d_ffn", "experts", "top_k", "batch", "seq_len", "steps", "warmup",
             "schedule", "chunks", "pairwise_group_size", "priority")
    return [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names]


def run_sweep(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for topology in args.topologies.split(","):
        nodes, per_node = (int(v) for v in topology.split("x"))
        for link in args.links.split(","):
            path = args.out / f"step_{topology}_{link}.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "cluster.py"), "--nodes", str(nodes),
                   "--ranks-per-node", str(per_node), "--link", link, "--timeout", "600", "--",
                   str(ROOT / "benchmarks" / "bench_step.py"), "--json", str(path), *forwarded_model_args(args)]
            print(f"== {topology} {link}: {' '.join(cmd[1:])}", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            summary = [line for line in done.stdout.splitlines() if "step " in line and "all-to-all" in line]
            print("\n".join(summary) if summary else done.stdout[-2000:] + done.stderr[-2000:], flush=True)
            if done.returncode != 0:
                raise SystemExit(f"bench_step: the {topology} run at {link} failed (exit {done.returncode})")
            results.append(json.loads(path.read_text()))
    write_outputs(results, args.out)


def write_outputs(results: list[dict], out: Path) -> None:
    lines = ["| nodes x ranks | link | step ms | all-to-all ms | share | expert ms | all-reduce wait ms | other ms "
             "| MB intra / inter per rank-step |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        b = r["breakdown_s"]
        lines.append(
            f"| {r['nodes']}x{r['ranks_per_node']} | {r['link']} | {1e3 * r['step_s']:.0f} | "
            f"{1e3 * b['all_to_all']:.0f} | {100 * r['all_to_all_share']:.0f}% | {1e3 * b['expert_compute']:.0f} | "
            f"{1e3 * b['grad_allreduce_wait']:.0f} | {1e3 * b['other_compute']:.0f} | "
            f"{r['bytes_intra_per_step'] / 1e6:.1f} / {r['bytes_inter_per_step'] / 1e6:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "step_breakdown.png")
    print(f"wrote {out}/table.md and step_breakdown.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("all_to_all", "all-to-all, exposed (4 token + count)", "#d62728"), ("expert_compute", "expert compute", "#1f77b4"),
             ("grad_allreduce_wait", "gradient all-reduce (exposed)", "#ff7f0e"),
             ("other_compute", "other compute", "#7f7f7f")]
    labels = [f"{r['nodes']}x{r['ranks_per_node']}\n{r['link']}" for r in results]
    fig, ax = plt.subplots(figsize=(1.2 * len(results) + 2, 4.5))
    bottom = [0.0] * len(results)
    for key, label, color in parts:
        values = [1e3 * r["breakdown_s"][key] for r in results]
        ax.bar(labels, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(results):
        ax.text(i, bottom[i], f"{100 * r['all_to_all_share']:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per training step (mean over ranks)")
    ax.set_title("One training step on the emulated cluster (label: all-to-all share)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.sweep:
        run_sweep(arguments)
    elif "RANK" in os.environ:
        if arguments.json is None:
            raise SystemExit("bench_step: pass --json PATH for the result (rank 0 writes it)")
        run_worker(arguments)
    else:
        raise SystemExit("bench_step: run it under torchrun / benchmarks/cluster.py, or with --sweep")
