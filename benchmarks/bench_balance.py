"""Load balancing on the emulated cluster: the main job's model (examples/moe_lm) with its MoE layers replaying
the shared SmartMoE trace (moeflux.sim.replay), trained with no balancing, FasterMoE shadowing, SmartMoE
re-placement, or both, steps interleaved in one run; and on uniform routing, where balancing must cost
nothing. Root (network namespaces).

    # driver: --rounds x (one cluster run per routing: trace, uniform), each after waiting for other pytest runs
    # to end; then the simulator at 16/64/256 GPUs and the report (table.md, summary.json, balance_load.png,
    # with the simulator's estimate for the testbed)
    python benchmarks/bench_balance.py --out benchmarks/results/balance --rounds 2
    python benchmarks/bench_balance.py --report benchmarks/results/balance      # rebuild the report only

    # worker (what the driver starts on each node through benchmarks/cluster.py)
    python benchmarks/cluster.py --nodes 2 --ranks-per-node 2 --link 500mbit -- \\
        benchmarks/bench_balance.py --routing trace --json /tmp/balance_trace.json

Every variant is its own model (same seed, same initial weights), optimizer and replay; each round of the
loop runs one training step of every variant in turn, each step starting at a barrier, so drift of the
machine hits all of them alike. Step time: slowest rank (all-reduce max), median over the measured steps;
it includes ExpertReplacement.step() (the all-reduce of loads, and the moves when it re-places). MoE layer
time: each layer's forward + backward (hooks on its input and output), mean over ranks, summed over layers,
median over steps. Load: the rows each rank's experts compute (their non-shadowed slots from every rank + the
rank's own slots of shadowed experts) and the rows it receives from other ranks, from every rank's routed counts,
the shadowed experts and the placement of each step.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (model options, summarise)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "shadowing", "replacement", "both")
BALANCE_PHASES = ("agreement", "shadow_broadcast", "shadow_reduce", "expert_move")
FITTED = ROOT / "benchmarks" / "results" / "calibration" / "fitted.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_step.model_args(p)
    p.set_defaults(experts=32, steps=12, warmup=4)
    g = p.add_argument_group("routing replay and balancing")
    g.add_argument("--routing", choices=("trace", "uniform"), default="trace")
    g.add_argument("--trace", type=Path, default=None, help="routing trace npz (default: moeflux.sim's)")
    g.add_argument("--trace-layers", default="6,18", help="trace layers replayed by the model's MoE layers")
    g.add_argument("--trace-start", type=int, default=100, help="first trace sample replayed (one per step)")
    g.add_argument("--uniform", choices=("multinomial", "exact"), default="multinomial",
                   help="uniform routing: each rank's slots drawn uniformly (a balanced router's noise), or "
                        "exactly equal counts")
    g.add_argument("--variants", default=",".join(VARIANTS))
    g.add_argument("--every", type=int, default=4, help="ExpertReplacement: re-place every N steps")
    g.add_argument("--window", type=int, default=4, help="ExpertReplacement: steps of load history")
    g.add_argument("--max-shadows", type=int, default=None)
    g.add_argument("--fitted", type=Path, default=FITTED, help="calibrated testbed links (shadowing's link rate)")
    p.add_argument("--json", type=Path, help="worker: where rank 0 writes the result")
    g = p.add_argument_group("driver")
    g.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "balance")
    g.add_argument("--nodes", type=int, default=2)
    g.add_argument("--ranks-per-node", type=int, default=2)
    g.add_argument("--link", default="500mbit")
    g.add_argument("--timeout", type=int, default=900, help="seconds per cluster run")
    g.add_argument("--routings", default="trace,uniform")
    g.add_argument("--rounds", type=int, default=2, help="cluster runs per routing, interleaved (default 2)")
    g.add_argument("--wait-quiet", type=float, default=600,
                   help="before each run, wait up to this many seconds for other pytest runs to end (default 600)")
    g.add_argument("--report", type=Path, help="only rebuild the report from the JSON in this folder")
    g.add_argument("--no-sim", action="store_true", help="driver: skip python -m moeflux.sim.balance")
    return p.parse_args(argv)


# ---- worker


class LayerTimer:
    """Forward and backward wall time of one module: forward from its pre-hook to its hook; backward from the
    moment its output's gradient is complete to the moment its input's is (hooks on both tensors)."""

    def __init__(self, module) -> None:
        self.forward_s = 0.0
        self.backward_s = 0.0
        self._bwd_start = None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def reset(self) -> None:
        self.forward_s = self.backward_s = 0.0

    def _pre(self, module, inputs) -> None:
        self._fwd_start = time.perf_counter()
        x = inputs[0]
        if x.requires_grad:
            x.register_hook(self._input_grad)

    def _post(self, module, inputs, output) -> None:
        self.forward_s += time.perf_counter() - self._fwd_start
        if output.requires_grad:
            output.register_hook(self._output_grad)

    def _output_grad(self, grad):
        self._bwd_start = time.perf_counter()

    def _input_grad(self, grad):
        if self._bwd_start is not None:
            self.backward_s += time.perf_counter() - self._bwd_start
            self._bwd_start = None


def matmul_rate(d_model: int, d_ffn: int) -> float:
    """FLOP/s of one rank's expert matmul ([1024, d_model] x [d_model, 2 d_ffn]) while every rank runs it."""
    import torch

    a, b = torch.randn(1024, d_model), torch.randn(d_model, 2 * d_ffn)
    for _ in range(3):
        a @ b
    reps = 30
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * a.shape[0] * d_model * 2 * d_ffn / (time.perf_counter() - start)


def link_gbit() -> float:
    from cluster import parse_rate

    rate = os.environ.get("MOEFLUX_CLUSTER_LINK", "none")
    bits = parse_rate(rate) if rate not in ("none", "") else None
    return bits / 1e9 if bits else 10.0  # unshaped / loopback runs: a nominal 10 Gbit/s


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
    layers = [int(v) for v in args.trace_layers.split(",")][:args.layers]
    if len(layers) != args.layers:
        raise SystemExit(f"bench_balance: --trace-layers names {len(layers)} layers, the model has {args.layers}")
    total_steps = args.warmup + args.steps

    counts = replay_counts_for(args, world)  # [steps, ranks, layers, experts], the same on every rank

    # Shadowing's policy: the calibrated link at the configured rate, the measured (contended) matmul rate.
    dist.barrier()
    rate = torch.tensor([matmul_rate(args.d_model, args.d_ffn)], dtype=torch.float64)
    dist.all_reduce(rate)
    flops = float(rate.item()) / world  # mean over ranks: every rank must hold the same policy
    gbit = link_gbit()
    policy = moeflux.ShadowCostModel.from_fitted_links(load_fitted(args.fitted), gbit, flops, args.max_shadows)

    models, optimizers, replacements, replays, timers = {}, {}, {}, {}, {}
    for name in variants:
        torch.manual_seed(0)
        exchange = moeflux.ExchangeConfig(shadowing=policy) if name in ("shadowing", "both") else None
        if name == "hierarchical":  # node-aware exchange (bench_hierarchical.py), nodes from LOCAL_WORLD_SIZE
            exchange = moeflux.ExchangeConfig(transport="hierarchical")
        model = moeflux.DataParallel(ByteLM(config, groups, exchange), all_to_all_priority=args.priority == "on")
        models[name] = model
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if name in ("replacement", "both"):
            replacements[name] = moeflux.ExpertReplacement(model, optimizers[name], every=args.every,
                                                           window=args.window)
        moe_layers = model.module.moe_layers()
        for i, layer in enumerate(moe_layers):
            layer.stats_name = f"blocks.{i}.mlp"
        replays[name] = attach_replay(moe_layers, counts[:, rank])
        timers[name] = [LayerTimer(layer) for layer in moe_layers]
    gen = torch.Generator().manual_seed(rank)
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]

    per_variant = {name: {"step_seconds": [], "step_max_s": [], "layer_s": [], "loads": [], "moves": [],
                          "stats": []} for name in variants}
    with moeflux.comm_stats(ranks_per_node=ranks_per_node) as stats:
        for step in range(total_steps):
            for name in variants:
                model, optimizer = models[name], optimizers[name]
                for t in timers[name]:
                    t.reset()
                dist.barrier()
                start = time.perf_counter()
                bench_step.train_step(model, optimizer, x, y)
                held = [layer.placement.experts_of() for layer in model.module.moe_layers()]  # what this step used
                made = replacements[name].step() if name in replacements else []
                seconds = time.perf_counter() - start
                record = per_variant[name]
                record["stats"].append(stats.step())
                worst = torch.tensor([seconds])
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                record["step_seconds"].append(seconds)
                record["step_max_s"].append(worst.item())
                record["layer_s"].append([(t.forward_s, t.backward_s) for t in timers[name]])
                record["moves"].append([(r.layer, r.moved, r.imbalance_before, r.imbalance_after) for r in made])
                # What this rank routed to each expert, what was shadowed, which experts it holds; rank 0
                # derives every rank's rows from these (not from tokens_per_expert, whose meaning for a
                # shadowed layer is the experts' routed load, shadowed tokens included).
                record["loads"].append([{"routed": layer.routed_tokens_per_expert.tolist(),
                                         "shadowed": list(layer.exchange.shadowed_experts),
                                         "experts": list(experts),
                                         "tokens_per_expert": int(layer.tokens_per_expert.sum())}
                                        for layer, experts in zip(model.module.moe_layers(), held)])
    skip = args.warmup
    mine = {}
    for name in variants:
        r = per_variant[name]
        collected = CommStats()
        collected.steps = r.pop("stats")
        mine[name] = {**r, "breakdown": collected.mean(skip=skip).as_dict()}
    # stats.records holds every step of every variant in issue order: variant v of step s is index s*V + v.
    for v, name in enumerate(variants):
        mine[name]["collectives"] = [
            [(c.layer, c.phase, list(c.bytes_to_rank), c.seconds) for c in stats.records[s * len(variants) + v]
             if c.phase in bench_step.PHASES] for s in range(skip, total_steps)]
        mine[name]["step_seconds_measured"] = mine[name]["step_seconds"][skip:]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        result = summarise_run(args, gathered, variants, world, ranks_per_node, counts, flops, gbit, policy, layers)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        base = result["variants"][variants[0]]
        for name in variants:
            v = result["variants"][name]
            print(f"{args.routing} {name}: step {1e3 * v['step_s']:.0f} ms ({base['step_s'] / v['step_s']:.2f}x), "
                  f"MoE layers {1e3 * v['moe_layers_s']:.0f} ms ({base['moe_layers_s'] / v['moe_layers_s']:.2f}x), "
                  f"a2a {1e3 * v['all_to_all_s']:.0f} ms ({100 * v['all_to_all_share']:.0f}%), slowest-rank rows "
                  f"{v['slowest_rank_rows']:.0f}, shadows/step {v['shadows_per_step']:.1f}", flush=True)
    dist.destroy_process_group()


def rank_rows(per_rank: list[dict]) -> tuple[list[int], list[int]]:
    """From every rank's routed counts ``[E]``, the shadowed experts and each rank's experts: the rows each
    rank's experts compute (its experts' non-shadowed slots from every rank + its own slots of shadowed
    experts) and the rows it receives from other ranks."""
    counts = np.array([x["routed"] for x in per_rank], dtype=np.int64)  # [P, E]
    shadowed = set(per_rank[0]["shadowed"])
    computed, received = [], []
    for r, x in enumerate(per_rank):
        held = [e for e in x["experts"] if e not in shadowed]
        computed.append(int(counts[:, held].sum() + counts[r, sorted(shadowed)].sum()))
        received.append(int(counts[:, held].sum() - counts[r, held].sum()))
    return computed, received


def summarise_run(args, per_rank: list[dict], variants: list[str], world: int, ranks_per_node: int,
                  counts: np.ndarray, flops: float, gbit: float, policy, layers: list[int]) -> dict:
    skip = args.warmup
    out = {"routing": args.routing, "trace_layers": layers if args.routing == "trace" else None,
           "trace_start": args.trace_start, "nodes": world // ranks_per_node, "ranks_per_node": ranks_per_node,
           "link": os.environ.get("MOEFLUX_CLUSTER_LINK", "loopback"),
           "shaping": os.environ.get("MOEFLUX_CLUSTER_SHAPING", ""),
           "matmul_flop_per_s": flops, "policy": {"link_bytes_per_s": policy.link_bytes_per_s,
                                                   "flops_per_s": policy.flops_per_s,
                                                   "max_shadows": policy.max_shadows,
                                                   "latency_s": policy.latency_s},
           "link_gbit": gbit, "every": args.every, "window": args.window,
           "variants": {}}  # the replayed counts are not stored (derived from the trace): replayed_counts()
    for name in variants:
        ranks = [r[name] for r in per_rank]
        base = bench_step.summarise(args, [{"step_seconds": r["step_seconds_measured"], "breakdown": r["breakdown"],
                                            "collectives": r["collectives"]} for r in ranks], world, ranks_per_node)
        steps = len(ranks[0]["step_max_s"])
        layer_s = [statistics.fmean(sum(f + b for f, b in r["layer_s"][s]) for r in ranks) for s in range(steps)]
        per_layer_s = [[statistics.fmean(r["layer_s"][s][l][0] + r["layer_s"][s][l][1] for r in ranks)
                        for l in range(args.layers)] for s in range(steps)]
        # loads[step][layer][rank] -> rows each rank's experts compute and rows it receives from other ranks
        loads = [[[r["loads"][s][l] for r in ranks] for l in range(args.layers)] for s in range(steps)]
        rows, remote = [], []
        for s in range(steps):
            rows.append([])
            remote.append([])
            for l in range(args.layers):
                computed, received = rank_rows(loads[s][l])
                rows[s].append(computed)
                remote[s].append(received)
        measured = range(skip, steps)
        slowest = [max(rows[s][l]) for s in measured for l in range(args.layers)]
        slowest_remote = [max(remote[s][l]) for s in measured for l in range(args.layers)]
        shadows = [len(loads[s][l][0]["shadowed"]) for s in measured for l in range(args.layers)]
        moves = [m for s in range(steps) for m in ranks[0]["moves"][s]]
        out["variants"][name] = {
            **{k: base[k] for k in ("step_s", "breakdown_s", "all_to_all_share", "bytes_intra_per_step",
                                    "bytes_inter_per_step", "per_layer")},
            "step_s_all": [ranks[0]["step_max_s"][s] for s in measured],
            "step_s_mean": statistics.fmean(ranks[0]["step_max_s"][s] for s in measured),
            "moe_layers_s": statistics.median(layer_s[s] for s in measured),
            "moe_layer_s": [statistics.median(per_layer_s[s][l] for s in measured) for l in range(args.layers)],
            "all_to_all_s": base["breakdown_s"]["all_to_all"],
            # agreement checks, shadow broadcasts / gradient reduces, expert moves (inside and outside the layers)
            "balance_collectives_s": sum(layer["wait_seconds"].get(phase, 0.0) for layer in base["per_layer"].values()
                                         for phase in BALANCE_PHASES),
            "rank_rows": [[statistics.median(rows[s][l][r] for s in measured) for r in range(world)]
                          for l in range(args.layers)],
            "rank_remote_rows": [[statistics.median(remote[s][l][r] for s in measured) for r in range(world)]
                                 for l in range(args.layers)],
            "slowest_rank_rows": statistics.median(slowest),
            "slowest_rank_remote_rows": statistics.median(slowest_remote),
            "mean_rank_rows": float(np.mean([rows[s][l] for s in measured for l in range(args.layers)])),
            "shadows_per_step": statistics.fmean(shadows) if shadows else 0.0,
            "shadowed": [[loads[s][l][0]["shadowed"] for l in range(args.layers)] for s in measured],
            # Cross-check where the layer's own count means rows received (no shadows): must be 0.
            "tokens_per_expert_mismatches": sum(loads[s][l][r]["tokens_per_expert"] != rows[s][l][r]
                                                for s in range(steps) for l in range(args.layers)
                                                for r in range(world) if not loads[s][l][0]["shadowed"]),
            "placements": [[loads[s][l][r]["experts"] for r in range(world)] for s in (skip, steps - 1)
                           for l in range(args.layers)],
            "moves": moves,
            "moves_measured": [m for s in measured for m in ranks[0]["moves"][s]],
        }
        out.setdefault("config", {**base["config"], **{k: getattr(args, k) for k in (
            "routing", "trace_layers", "trace_start", "every", "window", "max_shadows", "variants", "uniform")},
            "trace": str(args.trace) if args.trace else None})
    return out


# ---- driver


def forwarded(args: argparse.Namespace) -> list[str]:
    names = ("every", "window", "trace_start", "trace_layers", "variants", "uniform")
    extra = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names]
    if args.max_shadows is not None:
        extra.append(f"--max-shadows={args.max_shadows}")
    if args.trace is not None:
        extra.append(f"--trace={args.trace}")
    return bench_step.forwarded_model_args(args) + extra


def machine_state() -> dict:
    """What else runs here (the measurements share 2 cores): load average and pytest processes."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    pytest = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True).stdout.split()
    return {"loadavg": [float(v) for v in load], "pytest_processes": len(pytest), "time": time.time()}


def wait_until_quiet(limit_s: float) -> float:
    """Wait (polling every 30 s, at most ``limit_s``) until no pytest runs on this machine; returns the wait."""
    start = time.time()
    while machine_state()["pytest_processes"] and time.time() - start < limit_s:
        time.sleep(30)
    return time.time() - start


class MachineSampler:
    """Samples :func:`machine_state` every few seconds in a thread while a run goes on."""

    def __init__(self, every_s: float = 5.0) -> None:
        import threading

        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(machine_state())

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        busy = sum(1 for m in self.samples if m["pytest_processes"])
        loads = [m["loadavg"][0] for m in self.samples]
        return {"samples": len(self.samples), "samples_with_pytest": busy,
                "loadavg_1min_max": max(loads) if loads else None}


def add_sweep_args(p: argparse.ArgumentParser, out: Path, rounds: int, timeout: int) -> None:
    """The driver options of a sweep over topologies and routings (bench_hierarchical, bench_sample_placement)."""
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--topologies", default="2x2,4x1", help="NODESxRANKS, comma separated")
    p.add_argument("--link", default="500mbit", help="inter-node link rate (cluster.py --link)")
    p.add_argument("--routings", default="trace,uniform")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--timeout", type=int, default=timeout, help="seconds per cluster run")
    p.add_argument("--wait-quiet", type=float, default=60, help="wait up to this long for other pytest runs")
    p.add_argument("--report", type=Path, help="only rebuild the report from the JSON in this folder")


def sweep(args: argparse.Namespace):
    """(round, "NxL", nodes, ranks per node, routing) of every cluster run of an add_sweep_args driver."""
    for r in range(args.rounds):
        for topology in args.topologies.split(","):
            nodes, per_node = (int(v) for v in topology.split("x"))
            for routing in args.routings.split(","):
                yield r, topology, nodes, per_node, routing


def run_cluster(args: argparse.Namespace, routing: str, path: Path) -> dict:
    return run_on_cluster(args, "bench_balance.py", ["--routing", routing, *forwarded(args)], path, routing)


def run_on_cluster(args: argparse.Namespace, script: str, worker_args: list[str], path: Path, tag: str) -> dict:
    """One cluster run of ``benchmarks/<script>`` (its worker writes ``path``), after waiting for the machine to
    be quiet; the machine's state before, during and after is added to the result. ``tag``: what the worker's
    progress lines start with (after the rank prefix), the lines echoed here."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cluster.py"), "--nodes", str(args.nodes), "--ranks-per-node",
           str(args.ranks_per_node), "--link", args.link, "--timeout", str(args.timeout), "--",
           str(ROOT / "benchmarks" / script), "--json", str(path), *worker_args]
    print(f"== {tag}: {' '.join(cmd[1:])}", flush=True)
    waited = wait_until_quiet(args.wait_quiet)
    before = machine_state()
    sampler = MachineSampler()
    start = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 120)
    finally:
        during = sampler.stop()
    wall = time.time() - start
    after = machine_state()
    lines = [line for line in done.stdout.splitlines() if f"] {tag} " in line or line.startswith(f"{tag} ")]
    print("\n".join(lines) if lines else done.stdout[-3000:] + done.stderr[-3000:], flush=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{Path(script).stem}: the {tag} run failed (exit {done.returncode})")
    result = json.loads(path.read_text())
    result["machine"] = {"before": before, "after": after, "during": during, "waited_for_quiet_s": waited,
                         "wall_s": wall, "command": " ".join(cmd[1:])}
    path.write_text(json.dumps(result, indent=1))
    print(f"   {wall:.0f} s; machine: waited {waited:.0f} s for quiet; load {before['loadavg'][0]:.1f} -> "
          f"{after['loadavg'][0]:.1f}; other pytest running in {during['samples_with_pytest']} of "
          f"{during['samples']} samples", flush=True)
    return result


def fresh_results_folder(out: Path, pattern: str) -> None:
    """Make ``out`` and remove the runs a previous driver left there: a report mixes every run in the folder."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(pattern):
        old.unlink()


def main() -> None:
    args = parse_args()
    if args.report:
        report(args.report, args)
        return
    fresh_results_folder(args.out, "balance_*.json")
    for r in range(args.rounds):
        for routing in args.routings.split(","):
            run_cluster(args, routing,
                        args.out / f"balance_{routing}_{args.nodes}x{args.ranks_per_node}_{args.link}_r{r}.json")
    if not args.no_sim:
        cmd = [sys.executable, "-m", "moeflux.sim.balance", "--json", str(args.out / "sim_16_64_256.json")]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        (args.out / "sim_16_64_256.txt").write_text(done.stdout)
        print(done.stdout[-4000:], done.stderr[-2000:])
    report(args.out, args)


# ---- report


def replay_counts_for(args: argparse.Namespace, world: int) -> np.ndarray:
    """``[warmup + steps, ranks, layers, E]``: what a run replays (the same on every rank)."""
    from moeflux.sim import load_trace
    from moeflux.sim.replay import trace_replay_counts, uniform_replay_counts

    total = args.warmup + args.steps
    if args.routing == "trace":
        trace = load_trace(args.trace) if args.trace else load_trace()
        layers = [int(v) for v in str(args.trace_layers).split(",")][:args.layers]
        return trace_replay_counts(trace, layers, world, args.trace_start, total)
    slots = args.batch * args.seq_len * args.top_k if args.uniform == "multinomial" else 0
    return uniform_replay_counts(total, world, args.layers, args.experts, slots, seed=0)


def replayed_counts(run: dict) -> np.ndarray:
    """The counts a finished run replayed, rebuilt from its configuration (and the trace, which is read from
    its shared location, never copied into the results)."""
    cfg = dict(run["config"])
    cfg.setdefault("uniform", "exact")
    cfg["trace"] = Path(cfg["trace"]) if cfg.get("trace") else None
    return replay_counts_for(argparse.Namespace(**cfg), run["nodes"] * run["ranks_per_node"])


def testbed_estimate(run: dict, args: argparse.Namespace) -> dict:
    """moeflux.sim.balance on what the run replayed, with the testbed's calibrated links and the run's measured
    matmul rate and policy: the simulator's prediction of the per-layer gain on the emulated cluster."""
    from moeflux.balance import ShadowCostModel
    from moeflux.sim import load_fitted
    from moeflux.sim.balance import BalanceConfig, simulate_methods, summarise
    from moeflux.sim.replay import fit_counts
    from moeflux.sim.sweep import ModelShape

    cfg = run["config"]
    counts = replayed_counts(run)  # [steps, ranks, layers, E]
    tokens = cfg["batch"] * cfg["seq_len"]
    fitted_counts = np.stack([[[fit_counts(counts[s, r, l], tokens, cfg["top_k"]) for r in range(counts.shape[1])]
                               for l in range(counts.shape[2])] for s in range(counts.shape[0])])  # [S, L, P, E]
    links = load_fitted(args.fitted)
    topo = links.topology(run["nodes"], run["ranks_per_node"], run["link_gbit"])
    shape = ModelShape(hidden=cfg["d_model"], ffn=cfg["d_ffn"], ffn_matrices=3, top_k=cfg["top_k"],
                       tokens_per_rank=tokens, bytes_per_elem=4,
                       experts_per_rank=cfg["experts"] // (run["nodes"] * run["ranks_per_node"]),
                       expert_flop_per_s=run["matmul_flop_per_s"])
    policy = ShadowCostModel(**run["policy"])
    window = max(1, run["window"])
    config = BalanceConfig(shape, window=window, replace_every=run["every"], optimizer_bytes_per_param=8,
                           samples_per_replacement=run["every"])
    warmup = max(0, cfg["warmup"] - window)
    result = simulate_methods(fitted_counts, topo, config, policy, warmup=warmup)
    return summarise(result)


def report(folder: Path, args: argparse.Namespace) -> None:
    by_routing: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("balance_*.json")):
        run = json.loads(path.read_text())
        by_routing.setdefault(run["routing"], []).append(run)
    if not by_routing:
        raise SystemExit(f"bench_balance: no balance_*.json in {folder}")
    lines = []
    summary = {}
    for routing, runs in by_routing.items():
        run = runs[0]
        cfg = run["config"]
        names = list(run["variants"])
        counts = replayed_counts(run)  # [steps, ranks, layers, E]
        load = counts[cfg["warmup"]:].sum(1).astype(float)  # [steps, layers, E]
        expert_skew = np.median(load.max(-1) / load.mean(-1), axis=0)
        per_rank = load.reshape(*load.shape[:-1], run["nodes"] * run["ranks_per_node"], -1).sum(-1)
        rank_skew = np.median(per_rank.max(-1) / per_rank.mean(-1), axis=0)

        def med(name: str, key: str) -> float:
            return statistics.median(r["variants"][name][key] for r in runs)

        def ratios(name: str, key: str) -> list[float]:
            return [r["variants"]["none"][key] / r["variants"][name][key] for r in runs]

        def shown(values: list[float]) -> str:
            main_value = f"{statistics.median(values):.2f}x"
            return main_value + (" (" + ", ".join(f"{v:.2f}" for v in values) + ")" if len(values) > 1 else "")

        machine = [r.get("machine", {}) for r in runs]
        busy = [m for m in machine if m and (m["before"]["pytest_processes"] or m["after"]["pytest_processes"]
                                             or m.get("during", {}).get("samples_with_pytest"))]
        lines += [f"### {routing} routing: {run['nodes']}x{run['ranks_per_node']} ranks at {run['link']}, "
                  f"{cfg['layers']} MoE layers replaying "
                  + (f"trace layers {run['trace_layers']} (samples {run['trace_start']}.."
                     f"{run['trace_start'] + counts.shape[0] - 1})"
                     if routing == "trace" else f"uniform routing ({cfg.get('uniform', 'exact')})"), "",
                  "Replayed skew (medians over measured steps), per layer: expert max/mean "
                  + ", ".join(f"{v:.2f}" for v in expert_skew) + "; rank max/mean with the contiguous placement "
                  + ", ".join(f"{v:.2f}" for v in rank_skew) + ".", "",
                  f"Model: d_model {cfg['d_model']}, d_ffn {cfg['d_ffn']} (SwiGLU), {cfg['experts']} experts "
                  f"({cfg['experts'] // (run['nodes'] * run['ranks_per_node'])} per rank), top-{cfg['top_k']}, "
                  f"{cfg['batch']}x{cfg['seq_len']} tokens per rank, fp32, AdamW; {cfg['warmup']} warm-up + "
                  f"{cfg['steps']} measured steps per variant, interleaved; {len(runs)} cluster run(s). Shadowing "
                  f"policy: ShadowCostModel.from_fitted_links(fitted, {run['link_gbit']:g} Gbit/s) = "
                  f"{run['policy']['link_bytes_per_s'] / 1e6:.1f} MB/s, matmul rate measured on all ranks at once "
                  + ", ".join(f"{r['matmul_flop_per_s'] / 1e9:.1f}" for r in runs) + " GFLOP/s per rank. "
                  f"Re-placement: every {run['every']} steps, window {run['window']}. "
                  + ("Machine: load average before->after each run "
                     + ", ".join(f"{m['before']['loadavg'][0]:.1f}->{m['after']['loadavg'][0]:.1f}" for m in machine
                                 if m)
                     + (f"; other sessions' pytest running during {len(busy)} of {len(runs)} run(s) ("
                        + ", ".join(f"{m['during']['samples_with_pytest']}/{m['during']['samples']} samples"
                                    for m in machine if "during" in m) + ")"
                        if busy else "; no other pytest running during any run (sampled every 5 s)")
                     if all(machine) else "Machine state not recorded") + ".", "",
                  "Medians over runs of each run's median; ratios: median over runs (each run's in brackets).", "",
                  "| variant | step ms (mean) | vs none | MoE layers ms | vs none | all-to-all ms (share) | expert ms | "
                  "balancing collectives ms | slowest-rank rows (remote) | shadows / layer-step | "
                  "experts moved in measured steps |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        summary[routing] = {"runs": len(runs), "variants": {}}
        for name in names:
            v = run["variants"][name]
            moved = [sum(m[1] for m in r["variants"][name]["moves_measured"]) for r in runs]
            share = statistics.median(r["variants"][name]["all_to_all_share"] for r in runs)
            expert = statistics.median(r["variants"][name]["breakdown_s"]["expert_compute"] for r in runs)
            balance = statistics.median(r["variants"][name].get("balance_collectives_s", 0.0) for r in runs)
            lines.append(
                f"| {name} | {1e3 * med(name, 'step_s'):.0f} ({1e3 * med(name, 'step_s_mean'):.0f}) | "
                f"{shown(ratios(name, 'step_s'))} | {1e3 * med(name, 'moe_layers_s'):.0f} | "
                f"{shown(ratios(name, 'moe_layers_s'))} | {1e3 * med(name, 'all_to_all_s'):.0f} ({100 * share:.0f}%) | "
                f"{1e3 * expert:.0f} | {1e3 * balance:.0f} | {med(name, 'slowest_rank_rows'):.0f} "
                f"({med(name, 'slowest_rank_remote_rows'):.0f}) | {med(name, 'shadows_per_step'):.1f} | "
                f"{', '.join(map(str, moved))} |")
            summary[routing]["variants"][name] = {
                "step_s": med(name, "step_s"), "step_s_mean": med(name, "step_s_mean"),
                "step_speedup": ratios(name, "step_s"), "moe_layers_s": med(name, "moe_layers_s"),
                "moe_layers_speedup": ratios(name, "moe_layers_s"), "all_to_all_s": med(name, "all_to_all_s"),
                "all_to_all_share": share, "balance_collectives_s": balance,
                "slowest_rank_rows": med(name, "slowest_rank_rows"),
                "slowest_rank_remote_rows": med(name, "slowest_rank_remote_rows"),
                "shadows_per_step": med(name, "shadows_per_step"), "rank_rows": v["rank_rows"],
                "rank_remote_rows": v["rank_remote_rows"], "experts_moved_measured": moved}
        try:
            est = testbed_estimate(run, args)
            lines += ["", "Simulator (moeflux.sim.balance) on the same replayed counts, testbed links from "
                      "`results/calibration/fitted.json`, the first run's matmul rate and policy (per layer and step, "
                      "no overlap, gloo's pair serialisation and per-collective costs not modelled; median over "
                      "steps and layers):", "",
                      "| variant | layer ms | a2a ms | expert ms | shadow ms | move ms | speedup | slowest rows |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {m} | {1e3 * e['total_s']:.1f} | {1e3 * e['a2a_s']:.1f} | {1e3 * e['compute_s']:.1f} | "
                      f"{1e3 * e['shadow_s']:.1f} | {1e3 * e['move_s']:.2f} | {e['speedup']:.2f}x | "
                      f"{e['slowest_rank_rows']:.0f} |" for m, e in est.items()]
            summary[routing]["testbed_estimate"] = est
        except Exception as e:  # the report must not die on the estimate
            lines += ["", f"(testbed estimate failed: {e!r})"]
        lines.append("")
    sim_txt = folder / "sim_16_64_256.txt"
    if sim_txt.exists():
        lines += ["### Simulator at 16, 64, 256 GPUs", "", "```", sim_txt.read_text().rstrip(), "```", ""]
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    plot({routing: runs[0] for routing, runs in by_routing.items()}, folder / "balance_load.png")
    print(f"wrote {folder}/table.md, summary.json and balance_load.png")


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every replayed trace layer; one layer of uniform routing (its layers look alike).
    panels = [(routing, l) for routing, run in runs.items()
              for l in range(run["config"]["layers"] if routing == "trace" else 1)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    colors = {"none": "#7f7f7f", "shadowing": "#1f77b4", "replacement": "#ff7f0e", "both": "#2ca02c"}
    for ax, (routing, l) in zip(axes[0], panels):
        run = runs[routing]
        variants = run["variants"]
        world = run["nodes"] * run["ranks_per_node"]
        width = 0.8 / len(variants)
        for i, (name, v) in enumerate(variants.items()):
            xs = np.arange(world) + (i - (len(variants) - 1) / 2) * width
            ax.bar(xs, v["rank_rows"][l], width, color=colors.get(name), label=f"{name}: rows computed")
            ax.scatter(xs, v["rank_remote_rows"][l], marker="_", s=120, color="black",
                       label="rows received from other ranks" if i == 0 else None, zorder=3)
        title = f"trace layer {run['trace_layers'][l]}" if routing == "trace" else f"uniform, layer {l}"
        ax.set_title(f"{title}: {run['nodes']}x{run['ranks_per_node']} at {run['link']}", fontsize=9)
        ax.set_xticks(range(world), [f"rank {r}" for r in range(world)])
        ax.set_ylabel("token rows per step (median)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Per-rank expert load: none vs shadowing vs re-placement vs both (replayed routing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:
        if arguments.json is None:
            raise SystemExit("bench_balance: pass --json PATH for the result (rank 0 writes it)")
        run_worker(arguments)
    else:
        main()
