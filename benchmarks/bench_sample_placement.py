"""Flat vs hierarchical vs hierarchical + NetMoE sample placement on the emulated cluster: inter-node bytes per
step and step time. Root (network namespaces).

    python benchmarks/bench_sample_placement.py --out benchmarks/results/sample_placement
    python benchmarks/bench_sample_placement.py --report benchmarks/results/sample_placement   # report only

Each cluster run trains the main job's model (examples/moe_lm, 2 MoE layers of 32 experts, top-2) in three
variants, interleaved step by step from a barrier: ``flat`` (the flat exchange), ``hierarchical``
(``ExchangeConfig(transport="hierarchical")``) and ``placement`` (hierarchical + :class:`moeflux.SamplePlacement`
before every MoE layer, the output restored before the head). Routing is replayed per sample
(:class:`moeflux.sim.replay.SampleRoutingReplay`), so a sample routes the same on whichever rank holds it:
``trace``: each sample replays one (source rank, micro-batch) unit of the shared SmartMoE trace
(:func:`moeflux.sim.replay.trace_sample_counts`); ``uniform``: each sample's slots drawn uniformly.
Inter-node bytes: everything moeflux's collectives send to other nodes (moeflux.comm_stats: the exchanges, the
sample moves and restores, the placement's count gathers), mean over ranks, per step (forward and backward);
step: slowest rank, median over the measured steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_balance  # noqa: E402  (machine_state, wait_until_quiet, fresh_results_folder)
import bench_step  # noqa: E402  (model options, start_worker)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("flat", "hierarchical", "placement", "placement_free_moves")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_step.model_args(p)
    p.set_defaults(experts=32, steps=8, warmup=3)
    p.add_argument("--routing", choices=("trace", "uniform"), default="trace", help="worker: routing replayed")
    p.add_argument("--trace-layers", default="6,18", help="trace layers replayed by the model's MoE layers")
    p.add_argument("--trace-start", type=int, default=100, help="first trace sample replayed (one per step)")
    p.add_argument("--move-cost", type=float, default=1.0, help="SamplePlacement's move_cost")
    p.add_argument("--json", type=Path, help="worker: where rank 0 writes the result")
    bench_balance.add_sweep_args(p.add_argument_group("driver"), ROOT / "benchmarks" / "results" / "sample_placement",
                                 rounds=1, timeout=900)
    return p.parse_args(argv)


# ---- worker (on every rank, started by cluster.py)


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import moeflux
    from moeflux.sim import load_trace
    from moeflux.sim.replay import SampleRoutingReplay, trace_sample_counts, uniform_replay_counts

    rank, world, ranks_per_node, groups, config = bench_step.start_worker(args)
    from moe_lm.model import ByteLM  # on the path from start_worker
    nodes = moeflux.init_node_groups(groups.ep_group, ranks_per_node=ranks_per_node)
    layers = [int(v) for v in args.trace_layers.split(",")][:args.layers]
    total_steps, samples = args.warmup + args.steps, world * args.batch
    if args.routing == "trace":
        counts = trace_sample_counts(load_trace(), layers, samples, args.trace_start, total_steps)
    else:
        counts = uniform_replay_counts(total_steps, samples, args.layers, args.experts, args.seq_len * args.top_k,
                                       seed=1)
    identity = moeflux.SampleOrder.identity(world, args.batch)

    models, optimizers, placements, decided = {}, {}, {}, {name: [] for name in VARIANTS}
    for name in VARIANTS:
        torch.manual_seed(0)
        placement = None
        if name.startswith("placement"):
            move_cost = 0.0 if name == "placement_free_moves" else args.move_cost
            placement = moeflux.SamplePlacement(groups, nodes, move_cost=move_cost)
            place = placement.place

            def recorded(*a, _place=place, _placement=placement, _name=name, **kw):
                out = _place(*a, **kw)
                decided[_name].append(_placement.last)
                return out
            placement.place = recorded
        exchange = None if name == "flat" else moeflux.ExchangeConfig(transport="hierarchical", nodes=nodes)
        model = moeflux.DataParallel(ByteLM(config, groups, exchange, placement))
        models[name], optimizers[name], placements[name] = model, torch.optim.AdamW(model.parameters(), lr=1e-3), placement
        for i, layer in enumerate(model.module.moe_layers()):
            layer.stats_name = f"blocks.{i}.mlp"
            held = (lambda p=placement: (p.last_order or identity).samples_of(rank)) if placement else \
                (lambda: identity.samples_of(rank))
            SampleRoutingReplay(counts[:, :, i], held).attach(layer)
    gen = torch.Generator().manual_seed(rank)
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]

    mine = {name: {"step_s": [], "step_max_s": [], "bytes_inter": [], "bytes_intra": [], "a2a_s": []}
            for name in VARIANTS}
    with moeflux.comm_stats(ranks_per_node=ranks_per_node) as stats:
        for step in range(total_steps):
            for name in VARIANTS:
                model, optimizer = models[name], optimizers[name]
                dist.barrier()
                start = time.perf_counter()
                bench_step.train_step(model, optimizer, x, y)
                seconds = time.perf_counter() - start
                worst = torch.tensor([seconds])
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                s = stats.step()
                if step >= args.warmup:
                    r = mine[name]
                    r["step_s"].append(seconds)
                    r["step_max_s"].append(worst.item())
                    r["bytes_inter"].append(s.bytes_inter)
                    r["bytes_intra"].append(s.bytes_intra)
                    r["a2a_s"].append(s.all_to_all_s)
    for name in VARIANTS:  # placement records: one per layer per step, the same on every rank
        mine[name]["records"] = [(r.solve_s, r.moved_samples, r.moved_across_nodes, r.inter_node_before,
                                  r.inter_node_after) for r in decided[name][args.warmup * args.layers:]]
    result = bench_step.gather_to_json(mine, args.json,
                                       lambda gathered: summarise(args, gathered, world, ranks_per_node))
    if result is not None:
        flat = result["variants"]["flat"]
        for name, v in result["variants"].items():
            print(f"{args.routing} {name}: step {1e3 * v['step_s']:.0f} ms ({flat['step_s'] / v['step_s']:.2f}x), "
                  f"inter-node {v['inter_mb']:.2f} MB/step ({v['inter_mb'] / flat['inter_mb']:.2f} of flat), "
                  f"a2a share {100 * v['a2a_share']:.0f}%", flush=True)
    dist.destroy_process_group()


def summarise(args: argparse.Namespace, per_rank: list[dict], world: int, ranks_per_node: int) -> dict:
    out = {"nodes": world // ranks_per_node, "ranks_per_node": ranks_per_node, "routing": args.routing,
           "link": args.link, "config": {k: getattr(args, k) for k in (
               "layers", "d_model", "d_ffn", "experts", "top_k", "batch", "seq_len", "steps", "warmup",
               "trace_layers", "trace_start", "move_cost")}, "variants": {}}
    for name in VARIANTS:
        ranks = [r[name] for r in per_rank]
        steps = len(ranks[0]["step_max_s"])
        step_s = statistics.median(ranks[0]["step_max_s"])
        a2a = statistics.median(max(r["a2a_s"][i] for r in ranks) for i in range(steps))
        out["variants"][name] = {
            "step_s": step_s, "step_max_s": ranks[0]["step_max_s"],
            "inter_mb": float(np.mean([np.mean(r["bytes_inter"]) for r in ranks])) / 1e6,
            "intra_mb": float(np.mean([np.mean(r["bytes_intra"]) for r in ranks])) / 1e6,
            "a2a_share": a2a / step_s}
    for name in VARIANTS:
        records = per_rank[0][name]["records"]
        if not records:
            continue
        solve, moved, across, before, after = (np.array(c, dtype=float) for c in zip(*records))
        out["variants"][name].update({
            "solve_ms_mean": 1e3 * float(solve.mean()), "solve_ms_max": 1e3 * float(solve.max()),
            "moved_samples_per_layer": float(moved.mean()), "moved_across_nodes_per_layer": float(across.mean()),
            "predicted_inter_vectors_before": float(before.mean()),
            "predicted_inter_vectors_after": float(after.mean())})
    return out


# ---- driver


def run_cluster(args: argparse.Namespace, nodes: int, per_node: int, routing: str, path: Path) -> None:
    forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "layers", "d_model", "heads", "d_ffn", "experts", "top_k", "batch", "seq_len", "steps", "warmup",
        "trace_layers", "trace_start", "move_cost")]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cluster.py"), "--nodes", str(nodes), "--ranks-per-node",
           str(per_node), "--link", args.link, "--timeout", str(args.timeout), "--",
           str(ROOT / "benchmarks" / "bench_sample_placement.py"), "--routing", routing, "--link", args.link,
           "--json", str(path), *forwarded]
    print(f"== {nodes}x{per_node} {routing}: {' '.join(cmd[1:])}", flush=True)
    waited = bench_balance.wait_until_quiet(args.wait_quiet)
    before = bench_balance.machine_state()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 120)
    print("\n".join(line for line in done.stdout.splitlines() if f"{routing} " in line), flush=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"bench_sample_placement: the {nodes}x{per_node} {routing} run failed "
                         f"(exit {done.returncode})")
    result = json.loads(path.read_text())
    result["machine"] = {"before": before, "after": bench_balance.machine_state(), "waited_for_quiet_s": waited,
                         "command": " ".join(cmd[1:])}
    path.write_text(json.dumps(result, indent=1))


def main() -> None:
    args = parse_args()
    if args.json is not None:
        run_worker(args)
        return
    if args.report:
        report(args.report)
        return
    bench_balance.fresh_results_folder(args.out, "placement_*.json")
    for r, topology, nodes, per_node, routing in bench_balance.sweep(args):
        run_cluster(args, nodes, per_node, routing, args.out / f"placement_{routing}_{topology}_{args.link}_r{r}.json")
    report(args.out)


def report(folder: Path) -> None:
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for path in sorted(folder.glob("placement_*.json")):
        run = json.loads(path.read_text())
        runs.setdefault((f"{run['nodes']}x{run['ranks_per_node']}", run["link"], run["routing"]), []).append(run)
    lines = ["| topology | link | routing | variant | step ms | vs flat | inter-node MB/step | vs flat | "
             "a2a share | moved samples/layer (across nodes) | solve ms |", "|" + "---|" * 11]
    summary = {}
    for (topology, link, routing), group in sorted(runs.items()):
        def med(name, key):
            return statistics.median(r["variants"][name][key] for r in group)
        for name in VARIANTS:
            v = group[0]["variants"][name]
            ratio_step = statistics.median(r["variants"]["flat"]["step_s"] / r["variants"][name]["step_s"]
                                           for r in group)
            ratio_bytes = med(name, "inter_mb") / med("flat", "inter_mb")
            moved = (f"{v['moved_samples_per_layer']:.1f} ({v['moved_across_nodes_per_layer']:.1f})"
                     if "moved_samples_per_layer" in v else "")
            solve = f"{v['solve_ms_mean']:.2f}" if "solve_ms_mean" in v else ""
            lines.append(f"| {topology} | {link} | {routing} | {name} | {1e3 * med(name, 'step_s'):.0f} | "
                         f"{ratio_step:.2f}x | {med(name, 'inter_mb'):.2f} | {ratio_bytes:.2f} | "
                         f"{100 * med(name, 'a2a_share'):.0f}% | {moved} | {solve} |")
            summary[f"{topology} {link} {routing} {name}"] = {"step_vs_flat": ratio_step,
                                                             "inter_bytes_vs_flat": ratio_bytes}
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(runs, folder / "sample_placement.png")
    print("\n".join(lines))


def plot(runs: dict[tuple[str, str, str], list[dict]], path: Path) -> None:
    """Inter-node MB and step time per variant, relative to flat, for each (topology, link, routing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(VARIANTS)
    for ax, key, label in ((axes[0], "inter_mb", "inter-node bytes / flat"), (axes[1], "step_s", "step time / flat")):
        for i, name in enumerate(VARIANTS):
            values = [statistics.median(r["variants"][name][key] / r["variants"]["flat"][key] for r in runs[k])
                      for k in keys]
            ax.bar(np.arange(len(keys)) + i * width, values, width, label=name)
        ax.set_xticks(np.arange(len(keys)) + width * (len(VARIANTS) - 1) / 2)
        ax.set_xticklabels([f"{t} {r}" for t, _, r in keys])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"emulated cluster, {keys[0][1]} inter-node links: lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
