"""The composed exchange on the emulated cluster: every combination of transport (flat, hierarchical), schedule
(bulk, chunked, pairwise), shadowing and re-placement that issue 27 names, against flat bulk, on the main job's
model (examples/moe_lm) with its MoE layers replaying the shared SmartMoE trace (moeflux.sim.replay), steps
interleaved in one run. Root (network namespaces).

    # driver: --rounds cluster runs (each after waiting for other pytest runs to end), then the report
    # (table.md, summary.json, composed.png)
    python benchmarks/bench_composed.py --out benchmarks/results/composed --rounds 2
    python benchmarks/bench_composed.py --report benchmarks/results/composed      # rebuild the report only

    # worker (what the driver starts on each node through benchmarks/cluster.py)
    python benchmarks/cluster.py --nodes 2 --ranks-per-node 2 --link 500mbit -- \\
        benchmarks/bench_composed.py --json /tmp/composed.json

Every variant is its own model (same seed, same initial weights), optimizer and replay; each round of the loop
runs one training step of every variant in turn (the order rotated by one each step), each step starting at a
barrier, so drift of the machine hits all of them alike. Step time: slowest rank (all-reduce max), median over
the measured steps; it includes ExpertReplacement.step() where the variant re-places. MoE layer time: each
layer's forward + backward (bench_balance.LayerTimer: hooks on its input and output), mean over ranks, summed
over layers, median over steps. Exposed all-to-all: moeflux.comm_stats's all_to_all_wait, mean over ranks.
Shadowing's policy is bench_balance's: ShadowCostModel.from_fitted_links(calibrated testbed, the link rate, the
matmul rate measured on all ranks at once). Re-placement: moeflux.ExpertReplacement(every, window).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_balance  # noqa: E402  (LayerTimer, matmul_rate, link_gbit, replay counts, machine state)
import bench_step  # noqa: E402  (model options, start_worker, train_step, summarise)

ROOT = Path(__file__).resolve().parents[1]

# name -> (transport, schedule, shadowing, re-placement); shadowing True: the calibrated testbed's fixed rates,
# "auto": moeflux's default, which calibrates its rates from its own broadcasts and all-to-alls

VARIANTS = {
    "flat-bulk": ("flat", "bulk", False, False),
    "flat-chunked": ("flat", "chunked", False, False),
    "flat-pairwise": ("flat", "pairwise", False, False),
    "hier-bulk": ("hierarchical", "bulk", False, False),
    "hier-chunked": ("hierarchical", "chunked", False, False),
    "flat-bulk+shadow": ("flat", "bulk", True, False),
    "flat-chunked+shadow": ("flat", "chunked", True, False),
    "hier-chunked+shadow": ("hierarchical", "chunked", True, False),
    "flat-bulk+replace": ("flat", "bulk", False, True),
    "hier-chunked+shadow+replace": ("hierarchical", "chunked", True, True),
    # not in issue 27's list: where the re-placement gain goes when it is composed
    "flat-chunked+replace": ("flat", "chunked", False, True),
    "hier-chunked+replace": ("hierarchical", "chunked", False, True),
    "flat-bulk+shadow+replace": ("flat", "bulk", True, True),
    "flat-chunked+shadow+replace": ("flat", "chunked", True, True),
    "flat-bulk+auto": ("flat", "bulk", "auto", False),
    "flat-chunked+auto": ("flat", "chunked", "auto", False),
}
ISSUE_VARIANTS = tuple(list(VARIANTS)[:10])  # the default: issue 27's ten, flat bulk first (the baseline)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_step.model_args(p)  # its --schedule / --chunks / --pairwise-group-size are unused here
    p.set_defaults(experts=32, steps=8, warmup=4)
    g = p.add_argument_group("routing replay and the variants")
    g.add_argument("--trace", type=Path, default=None, help="routing trace npz (default: moeflux.sim's)")
    g.add_argument("--trace-layers", default="6,18", help="trace layers replayed by the model's MoE layers")
    g.add_argument("--trace-start", type=int, default=100, help="first trace sample replayed (one per step)")
    g.add_argument("--variants", default=",".join(ISSUE_VARIANTS),
                   help=f"comma separated, the first is the baseline (default issue 27's ten; known: {', '.join(VARIANTS)})")
    g.add_argument("--stage-chunks", type=int, default=2, help="chunks of the chunked schedule (default 2)")
    g.add_argument("--group-size", type=int, default=1, help="ranks per group of the pairwise schedule (default 1)")
    g.add_argument("--every", type=int, default=4, help="ExpertReplacement: re-place every N steps")
    g.add_argument("--window", type=int, default=4, help="ExpertReplacement: steps of load history")
    g.add_argument("--max-shadows", type=int, default=None)
    g.add_argument("--fitted", type=Path, default=bench_balance.FITTED,
                   help="calibrated testbed links (shadowing's link rate)")
    p.add_argument("--json", type=Path, help="worker: where rank 0 writes the result")
    g = p.add_argument_group("driver")
    g.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "composed")
    g.add_argument("--nodes", type=int, default=2)
    g.add_argument("--ranks-per-node", type=int, default=2)
    g.add_argument("--link", default="500mbit")
    g.add_argument("--timeout", type=int, default=420, help="seconds per cluster run (cluster.py --timeout)")
    g.add_argument("--rounds", type=int, default=2, help="cluster runs (default 2)")
    g.add_argument("--wait-quiet", type=float, default=600,
                   help="before each run, wait up to this many seconds for other pytest runs to end")
    g.add_argument("--report", type=Path, help="only rebuild the report from the JSON in this folder")
    return p.parse_args(argv)


# ---- worker


def exchange_config(args: argparse.Namespace, name: str, policy):
    import moeflux

    transport, schedule, shadow, _ = VARIANTS[name]
    return moeflux.ExchangeConfig(transport=transport, schedule=schedule, chunks=args.stage_chunks,
                                  group_size=args.group_size,
                                  shadowing="auto" if shadow == "auto" else policy if shadow else "off")


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import moeflux
    from moeflux.instrumentation import CommStats
    from moeflux.sim import load_fitted
    from moeflux.sim.replay import attach_replay

    rank, world, ranks_per_node, groups, config = bench_step.start_worker(args)
    from moe_lm.model import ByteLM  # on the path from start_worker
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench_composed: unknown variants {unknown}; known: {list(VARIANTS)}")
    layers = [int(v) for v in args.trace_layers.split(",")][:args.layers]
    if len(layers) != args.layers:
        raise SystemExit(f"bench_composed: --trace-layers names {len(layers)} layers, the model has {args.layers}")
    total_steps = args.warmup + args.steps
    args.routing, args.uniform = "trace", "exact"  # what bench_balance.replay_counts_for reads
    counts = bench_balance.replay_counts_for(args, world)  # [steps, ranks, layers, experts], the same everywhere

    dist.barrier()
    rate = torch.tensor([bench_balance.matmul_rate(args.d_model, args.d_ffn)], dtype=torch.float64)
    dist.all_reduce(rate)
    flops = float(rate.item()) / world  # mean over ranks: every rank must hold the same policy
    gbit = bench_balance.link_gbit()
    policy = moeflux.ShadowCostModel.from_fitted_links(load_fitted(args.fitted), gbit, flops, args.max_shadows)

    models, optimizers, replacements, timers = {}, {}, {}, {}
    for name in variants:
        torch.manual_seed(0)
        model = moeflux.DataParallel(ByteLM(config, groups, exchange_config(args, name, policy)),
                                     all_to_all_priority=args.priority == "on")
        models[name] = model
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if VARIANTS[name][3]:
            replacements[name] = moeflux.ExpertReplacement(model, optimizers[name], every=args.every,
                                                           window=args.window)
        moe_layers = model.module.moe_layers()
        for i, layer in enumerate(moe_layers):
            layer.stats_name = f"blocks.{i}.mlp"
        attach_replay(moe_layers, counts[:, rank])
        timers[name] = [bench_balance.LayerTimer(layer) for layer in moe_layers]
    gen = torch.Generator().manual_seed(rank)
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]

    record = {name: {"step_seconds": [], "step_max_s": [], "layer_s": [], "shadows": [], "moves": [], "stats": []}
              for name in variants}
    with moeflux.comm_stats(ranks_per_node=ranks_per_node) as stats:
        for step in range(total_steps):
            shift = step % len(variants)
            for name in variants[shift:] + variants[:shift]:
                model, optimizer = models[name], optimizers[name]
                for t in timers[name]:
                    t.reset()
                dist.barrier()
                start = time.perf_counter()
                bench_step.train_step(model, optimizer, x, y)
                shadowed = [len(layer.exchange.shadowed_experts) for layer in model.module.moe_layers()]
                made = replacements[name].step() if name in replacements else []
                seconds = time.perf_counter() - start
                r = record[name]
                r["stats"].append(stats.step())
                worst = torch.tensor([seconds])
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                r["step_seconds"].append(seconds)
                r["step_max_s"].append(worst.item())
                r["layer_s"].append([(t.forward_s, t.backward_s) for t in timers[name]])
                r["shadows"].append(shadowed)
                r["moves"].append([(m.layer, m.moved, m.imbalance_before, m.imbalance_after) for m in made])
    skip = args.warmup
    mine = {}
    for name in variants:
        r = record[name]
        collected = CommStats()
        collected.steps = r.pop("stats")
        mine[name] = {**r, "breakdown": collected.mean(skip=skip).as_dict()}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        result = summarise_run(args, gathered, variants, world, ranks_per_node, flops, gbit, policy, layers)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        base = result["variants"][variants[0]]
        for name in variants:
            v = result["variants"][name]
            print(f"composed {name}: step {1e3 * v['step_s']:.0f} ms ({base['step_s'] / v['step_s']:.2f}x), "
                  f"MoE layers {1e3 * v['moe_layers_s']:.0f} ms ({base['moe_layers_s'] / v['moe_layers_s']:.2f}x), "
                  f"exposed a2a {1e3 * v['all_to_all_s']:.0f} ms, inter-node MB/step "
                  f"{v['bytes_inter_per_step'] / 1e6:.1f}, shadows/layer-step {v['shadows_per_step']:.1f}, "
                  f"experts moved {v['experts_moved']}", flush=True)
    dist.destroy_process_group()


def summarise_run(args, per_rank: list[dict], variants: list[str], world: int, ranks_per_node: int, flops: float,
                  gbit: float, policy, layers: list[int]) -> dict:
    skip = args.warmup
    out = {"trace_layers": layers, "trace_start": args.trace_start, "nodes": world // ranks_per_node,
           "ranks_per_node": ranks_per_node, "link": os.environ.get("MOEFLUX_CLUSTER_LINK", "loopback"),
           "shaping": os.environ.get("MOEFLUX_CLUSTER_SHAPING", ""), "matmul_flop_per_s": flops,
           "policy": {"link_bytes_per_s": policy.link_bytes_per_s, "flops_per_s": policy.flops_per_s,
                      "max_shadows": policy.max_shadows, "latency_s": policy.latency_s},
           "link_gbit": gbit, "variants": {},
           "config": {**{k: getattr(args, k) for k in ("layers", "d_model", "heads", "d_ffn", "experts", "top_k",
                                                      "batch", "seq_len", "steps", "warmup", "priority",
                                                      "trace_layers", "trace_start", "stage_chunks", "group_size",
                                                      "every", "window", "max_shadows", "variants")},
                      "trace": str(args.trace) if args.trace else None}}
    for name in variants:
        ranks = [r[name] for r in per_rank]
        steps = len(ranks[0]["step_max_s"])
        measured = range(skip, steps)
        base = bench_step.summarise(args, [{"step_seconds": r["step_seconds"][skip:], "breakdown": r["breakdown"],
                                            "collectives": [[] for _ in measured]} for r in ranks],
                                    world, ranks_per_node)
        layer_s = [statistics.fmean(sum(f + b for f, b in r["layer_s"][s]) for r in ranks) for s in range(steps)]
        transport, schedule, shadow, replace = VARIANTS[name]
        out["variants"][name] = {
            "transport": transport, "schedule": schedule, "shadowing": shadow, "replacement": replace,
            "step_s": statistics.median(ranks[0]["step_max_s"][s] for s in measured),
            "step_s_all": [ranks[0]["step_max_s"][s] for s in measured],
            "step_s_mean": statistics.fmean(ranks[0]["step_max_s"][s] for s in measured),
            "moe_layers_s": statistics.median(layer_s[s] for s in measured),
            "moe_layers_s_all": [layer_s[s] for s in measured],
            "all_to_all_s": base["breakdown_s"]["all_to_all"],
            "breakdown_s": base["breakdown_s"],
            "bytes_inter_per_step": base["bytes_inter_per_step"],
            "bytes_intra_per_step": base["bytes_intra_per_step"],
            "shadows_per_step": statistics.fmean(n for s in measured for n in ranks[0]["shadows"][s]),
            "moves": [m for s in range(steps) for m in ranks[0]["moves"][s]],
            "experts_moved": sum(m[1] for s in range(steps) for m in ranks[0]["moves"][s]),
            "experts_moved_measured": sum(m[1] for s in measured for m in ranks[0]["moves"][s]),
        }
    return out


# ---- driver


def forwarded(args: argparse.Namespace) -> list[str]:
    names = ("layers", "d_model", "heads", "d_ffn", "experts", "top_k", "batch", "seq_len", "steps", "warmup",
             "priority", "trace_start", "trace_layers", "variants", "stage_chunks", "group_size", "every", "window")
    extra = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names]
    if args.max_shadows is not None:
        extra.append(f"--max-shadows={args.max_shadows}")
    if args.trace is not None:
        extra.append(f"--trace={args.trace}")
    return extra


def run_cluster(args: argparse.Namespace, path: Path) -> dict:
    return bench_balance.run_on_cluster(args, "bench_composed.py", forwarded(args), path, "composed")


def main() -> None:
    args = parse_args()
    if args.report:
        report(args.report)
        return
    bench_balance.fresh_results_folder(args.out, "composed_*.json")
    for r in range(args.rounds):
        run_cluster(args, args.out / f"composed_{args.nodes}x{args.ranks_per_node}_{args.link}_r{r}.json")
    report(args.out)


# ---- report


def report(folder: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("composed_*.json"))]
    if not runs:
        raise SystemExit(f"bench_composed: no composed_*.json in {folder}")
    run, cfg = runs[0], runs[0]["config"]
    names = list(run["variants"])
    base = names[0]

    def med(name: str, key: str) -> float:
        return statistics.median(r["variants"][name][key] for r in runs)

    def ratios(name: str, key: str) -> list[float]:  # > 1: faster than the baseline
        return [r["variants"][base][key] / r["variants"][name][key] for r in runs]

    def shown(values: list[float]) -> str:
        main_value = f"{statistics.median(values):.2f}x"
        return main_value + (" (" + ", ".join(f"{v:.2f}" for v in values) + ")" if len(values) > 1 else "")

    machine = [r.get("machine", {}) for r in runs]
    lines = [f"### {run['nodes']}x{run['ranks_per_node']} ranks at {run['link']}, {cfg['layers']} MoE layers "
             f"replaying trace layers {run['trace_layers']} (samples {cfg['trace_start']}.."
             f"{cfg['trace_start'] + cfg['warmup'] + cfg['steps'] - 1})", "",
             f"Model: d_model {cfg['d_model']}, d_ffn {cfg['d_ffn']} (SwiGLU), {cfg['experts']} experts "
             f"({cfg['experts'] // (run['nodes'] * run['ranks_per_node'])} per rank), top-{cfg['top_k']}, "
             f"{cfg['batch']}x{cfg['seq_len']} tokens per rank, fp32, AdamW; {cfg['warmup']} warm-up + "
             f"{cfg['steps']} measured steps per variant, interleaved (order rotated each step); {len(runs)} "
             f"cluster run(s). Chunked: {cfg['stage_chunks']} chunks; pairwise: groups of {cfg['group_size']}. "
             f"Shadowing: ShadowCostModel.from_fitted_links(fitted, {run['link_gbit']:g} Gbit/s) = "
             f"{run['policy']['link_bytes_per_s'] / 1e6:.1f} MB/s, latency {1e6 * run['policy']['latency_s']:.2f} us, "
             f"matmul rate measured on all ranks at once "
             + ", ".join(f"{r['matmul_flop_per_s'] / 1e9:.1f}" for r in runs) + " GFLOP/s per rank. "
             f"Re-placement: every {cfg['every']} steps, window {cfg['window']}. "
             + ("Runs: " + ", ".join(f"{m['wall_s']:.0f} s (load {m['before']['loadavg'][0]:.1f}->"
                                     f"{m['after']['loadavg'][0]:.1f}, other pytest in "
                                     f"{m['during']['samples_with_pytest']}/{m['during']['samples']} samples)"
                                     for m in machine if m) if all(machine) else "Machine state not recorded")
             + ".", "",
             f"Medians over runs of each run's median; ratios = {base} time / variant time (> 1: faster), median over "
             "runs (each run's in brackets).", "",
             f"| variant | step ms (mean) | step vs {base} | MoE layers ms | MoE layers vs {base} | exposed all-to-all "
             "ms | inter-node MB / rank-step | shadows / layer-step | experts moved (in measured steps) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary = {"runs": len(runs), "baseline": base, "variants": {}}
    for name in names:
        moved = [r["variants"][name]["experts_moved"] for r in runs]
        moved_measured = [r["variants"][name]["experts_moved_measured"] for r in runs]
        lines.append(
            f"| {name} | {1e3 * med(name, 'step_s'):.0f} ({1e3 * med(name, 'step_s_mean'):.0f}) | "
            f"{shown(ratios(name, 'step_s'))} | {1e3 * med(name, 'moe_layers_s'):.0f} | "
            f"{shown(ratios(name, 'moe_layers_s'))} | {1e3 * med(name, 'all_to_all_s'):.0f} | "
            f"{med(name, 'bytes_inter_per_step') / 1e6:.1f} | {med(name, 'shadows_per_step'):.1f} | "
            f"{', '.join(map(str, moved))} ({', '.join(map(str, moved_measured))}) |")
        summary["variants"][name] = {
            "step_s": med(name, "step_s"), "step_s_mean": med(name, "step_s_mean"),
            "step_speedup": ratios(name, "step_s"), "moe_layers_s": med(name, "moe_layers_s"),
            "moe_layers_speedup": ratios(name, "moe_layers_s"), "all_to_all_s": med(name, "all_to_all_s"),
            "bytes_inter_per_step": med(name, "bytes_inter_per_step"),
            "shadows_per_step": med(name, "shadows_per_step"), "experts_moved": moved}
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    plot(summary, run, folder / "composed.png")
    print(f"wrote {folder}/table.md, summary.json and composed.png")


def plot(summary: dict, run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 3, 4.8))
    xs = np.arange(len(names))
    width = 0.38
    for offset, key, label, color in ((-width / 2, "step_speedup", "training step", "#1f77b4"),
                                      (width / 2, "moe_layers_speedup", "MoE layers (fwd + bwd)", "#ff7f0e")):
        values = [summary["variants"][n][key] for n in names]
        ax.bar(xs + offset, [statistics.median(v) for v in values], width, color=color, label=label)
        for x, v in zip(xs, values):
            ax.scatter([x + offset] * len(v), v, marker="_", s=60, color="black", zorder=3,
                       label="single run" if x == 0 and key == "step_speedup" else None)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"speedup vs {summary['baseline']} (median over runs)")
    ax.set_title(f"Composed exchange, emulated {run['nodes']}x{run['ranks_per_node']} at {run['link']}, "
                 f"trace layers {run['trace_layers']} replayed ({summary['runs']} runs)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:
        if arguments.json is None:
            raise SystemExit("bench_composed: pass --json PATH for the result (rank 0 writes it)")
        run_worker(arguments)
    else:
        main()
