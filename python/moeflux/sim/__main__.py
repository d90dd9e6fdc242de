"""``python -m moeflux.sim``: MoE all-to-all cost for a sweep of cluster sizes; see ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .cost_model import algbw, busbw_from_algbw, uniform_all_to_all_time
from .links import LINK_PRESETS, LinkClass, Topology
from .routing import DEFAULT_TRACE_PATH, RoutingTrace, load_trace, scale_counts, zipf
from .sweep import LayerSamples, ModelShape, per_layer, simulate, summary

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM datasheet, dense BF16


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moeflux.sim",
        description="α-β model of expert-parallel MoE communication. For each cluster size: one layer's "
                    "all-to-alls per training step (dispatch + combine, forward + backward, + count exchange), "
                    "direct and hierarchical, their share of the step next to the busiest rank's expert compute "
                    "(no overlap, attention/dense parts left out), and the slowest rank's bytes vs the mean. "
                    "node-aware: moeflux's hierarchical exchange (rail, then relay inside the node), with the "
                    "deduplication the routing implies (moeflux.sim.node_dedup). "
                    "Medians / p90 over sampled iterations and layers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--gpus", type=int, nargs="+", default=[16, 64, 256, 1024], help="cluster sizes")
    g.add_argument("--ranks-per-node", type=int, default=8)
    g.add_argument("--nics-per-node", type=int, default=None,
                   help="inter-node links per node, each shared by ranks-per-node/nics ranks (default: one per "
                        "GPU, as in a DGX H100; 1 = one link shared by the node, as on the emulated testbed)")
    g.add_argument("--intra", choices=sorted(LINK_PRESETS), default="nvlink-h100", help="intra-node link preset")
    g.add_argument("--inter", choices=sorted(LINK_PRESETS), default="ib-400g", help="inter-node link preset")
    g.add_argument("--intra-gbps", type=float, help="override the intra link's rate (Gbit/s, payload)")
    g.add_argument("--intra-latency-us", type=float, help="override the intra link's per-message latency")
    g.add_argument("--inter-gbps", type=float, help="override the inter link's rate (Gbit/s, payload)")
    g.add_argument("--inter-latency-us", type=float, help="override the inter link's per-message latency")
    g.add_argument("--dedup", type=float, default=0.0,
                   help="hierarchical (Tutel 2D): fraction of inter-node bytes saved by sending a token once per "
                        "node (node-aware always uses the routing's own, estimated by moeflux.sim.node_dedup)")
    g = p.add_argument_group("routing")
    g.add_argument("--routing", choices=["trace", "uniform", "zipf"], default="trace")
    g.add_argument("--trace", type=Path, default=DEFAULT_TRACE_PATH, help="routing trace npz")
    g.add_argument("--zipf-s", type=float, default=1.2, help="zipf exponent of expert popularity")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--samples", type=int, default=8,
                   help="iterations sampled (evenly over the trace; random draws for uniform/zipf); 0: whole trace")
    g.add_argument("--layers", type=int, default=None, help="layers used (default: all of the trace's; 4 otherwise)")
    g.add_argument("--experts-per-rank", type=int, default=2,
                   help="experts = GPUs x this; the trace's experts are replicated to fill them")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--ffn", type=int, default=14336)
    g.add_argument("--ffn-matrices", type=int, default=3, help="hidden x ffn matrices per expert (SwiGLU: 3)")
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--tokens-per-rank", type=int, default=4096)
    g.add_argument("--bytes-per-elem", type=int, default=2)
    g.add_argument("--tflops", type=float, default=400.0,
                   help=f"achieved expert GEMM rate per GPU, TFLOP/s (400 ≈ 40%% MFU of an H100 SXM's "
                        f"{H100_BF16_DENSE_TFLOPS:.0f} dense BF16)")
    g = p.add_argument_group("output")
    g.add_argument("--per-layer", action="store_true", help="also print per-layer medians")
    g.add_argument("--json", type=Path, help="write the numbers to this JSON file")
    g.add_argument("--check-nccl-formula", action="store_true",
                   help="only print the uniform all-to-all check: busBw = algBw·(n-1)/n vs the link rate")
    return p


def _link(preset: str, gbps: float | None, latency_us: float | None) -> LinkClass:
    base = LINK_PRESETS[preset]
    beta = base.beta_s_per_byte if gbps is None else 8 / (gbps * 1e9)
    alpha = base.alpha_s if latency_us is None else latency_us * 1e-6
    return LinkClass(alpha, beta)


def _topology(gpus: int, args: argparse.Namespace, intra: LinkClass, inter: LinkClass) -> Topology:
    per_node = min(args.ranks_per_node, gpus)
    if gpus % per_node:
        raise SystemExit(f"--gpus {gpus} is not a multiple of --ranks-per-node {per_node}")
    nics = per_node if args.nics_per_node is None else min(args.nics_per_node, per_node)
    return Topology(gpus // per_node, per_node, intra, inter, nics)


def _counts_of(args: argparse.Namespace, shape: ModelShape, gpus: int,
               trace: RoutingTrace | None) -> tuple[Callable[[int, slice], np.ndarray], int, int]:
    """``counts_of(sample, layers)``, the number of samples and of layers."""
    if trace is not None:
        n = trace.num_iterations if args.samples == 0 else min(args.samples, trace.num_iterations)
        picked = np.unique(np.linspace(0, trace.num_iterations - 1, n).round().astype(int))
        steps = [trace.step_counts(int(i)) for i in picked]

        def from_trace(sample: int, layers: slice) -> np.ndarray:
            return scale_counts(steps[sample][layers], gpus, shape.experts_per_rank, shape.slots_per_rank)

        return from_trace, len(picked), min(args.layers or trace.num_layers, trace.num_layers)

    s = args.zipf_s if args.routing == "zipf" else 0.0

    def synthetic(sample: int, layers: slice) -> np.ndarray:
        rng = np.random.default_rng([args.seed, gpus, sample, layers.start])
        return np.stack([zipf(gpus, gpus * shape.experts_per_rank, shape.tokens_per_rank, shape.top_k, s, rng)
                         for _ in range(layers.start, layers.stop)])

    return synthetic, max(args.samples, 1), args.layers or 4


def _check_nccl(args: argparse.Namespace, inter: LinkClass) -> int:
    print(f"Uniform all-to-all on one flat link class ({args.inter}: {inter.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
          f"α = {inter.alpha_s * 1e6:.1f} µs); nccl-tests: algBw = bytes/time, busBw = algBw·(n-1)/n")
    print(f"{'n':>6} {'bytes/rank':>12} {'time ms':>10} {'closed form':>12} {'algBw GB/s':>11} {'busBw GB/s':>11} "
          f"{'busBw/link':>10}")
    worst = 0.0
    for n in args.gpus:
        for nbytes in (1 << 20, 1 << 26, 1 << 30):
            t = uniform_all_to_all_time(nbytes, Topology.flat(n, inter))
            closed = (n - 1) / n * nbytes * inter.beta_s_per_byte + (n - 1) * inter.alpha_s
            bus = busbw_from_algbw(algbw(nbytes, t), n)
            worst = max(worst, abs(t / closed - 1))
            print(f"{n:>6} {nbytes:>12} {t * 1e3:>10.3f} {closed * 1e3:>12.3f} {algbw(nbytes, t) / 1e9:>11.2f} "
                  f"{bus / 1e9:>11.2f} {bus / inter.bandwidth_bytes_per_s:>10.3f}")
    print(f"max |model / closed form - 1| = {worst:.2e}")
    return 0 if worst < 1e-9 else 1


def _print_table(rows: list[tuple[int, Topology, int, dict]]) -> None:
    head = (f"{'GPUs':>5} {'nodes':>5} {'experts':>7} | {'a2a direct ms':>14} | {'a2a hier ms':>14} | "
            f"{'node-aware ms':>14} {'dedup':>5} | {'expert ms':>9} | {'a2a share dir/hier/node':>23} | "
            f"{'slowest/mean B':>14} {'max/mean B':>10} | {'expert max/mean':>15}")
    print(head)
    print("-" * len(head))
    for gpus, topo, experts, s in rows:
        def mp(key: str, scale: float = 1e3) -> str:
            return f"{s[key]['median'] * scale:.2f} / {s[key]['p90'] * scale:.2f}"
        share = " / ".join(f"{s[k]['median'] * 100:.0f}%"
                           for k in ("share_direct", "share_hierarchical", "share_node_aware"))
        print(f"{gpus:>5} {topo.nodes:>5} {experts:>7} | {mp('direct_s'):>14} | {mp('hierarchical_s'):>14} | "
              f"{mp('node_aware_s'):>14} {s['node_dedup']['median'] * 100:>4.0f}% | "
              f"{s['compute_s']['median'] * 1e3:>9.2f} | {share:>23} | "
              f"{s['slowest_over_mean_bytes']['median']:>14.2f} {s['max_over_mean_bytes']['median']:>10.2f} | "
              f"{mp('expert_max_over_mean', 1):>15}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    intra = _link(args.intra, args.intra_gbps, args.intra_latency_us)
    inter = _link(args.inter, args.inter_gbps, args.inter_latency_us)
    if args.check_nccl_formula:
        return _check_nccl(args, inter)
    shape = ModelShape(args.hidden, args.ffn, args.ffn_matrices, args.top_k, args.tokens_per_rank,
                       args.bytes_per_elem, args.experts_per_rank, args.tflops * 1e12)
    trace = None
    if args.routing == "trace":
        if not Path(args.trace).exists():
            raise SystemExit(f"no trace at {args.trace}: pass --trace PATH or --routing uniform|zipf")
        trace = load_trace(args.trace)
    source_name = f"trace {Path(args.trace).name}" if trace is not None else (
        f"zipf s={args.zipf_s}" if args.routing == "zipf" else "uniform")
    started = time.perf_counter()
    rows, results = [], []
    for gpus in args.gpus:
        topo = _topology(gpus, args, intra, inter)
        counts_of, num_samples, num_layers = _counts_of(args, shape, gpus, trace)
        samples: LayerSamples = simulate(topo, shape, counts_of, num_samples, num_layers, args.dedup)
        s = summary(samples)
        experts = gpus * shape.experts_per_rank
        rows.append((gpus, topo, experts, s))
        results.append({"gpus": gpus, "nodes": topo.nodes, "ranks_per_node": topo.ranks_per_node,
                        "nics_per_node": topo.nics_per_node, "experts": experts,
                        "samples": int(samples.direct_s.shape[0]), "layers": int(samples.direct_s.shape[1]),
                        "summary": s, "per_layer_median": per_layer(samples)})
    elapsed = time.perf_counter() - started

    nics = rows[0][1].nics_per_node if rows else 0
    print(f"moeflux.sim — routing: {source_name}; intra {args.intra} ({intra.bandwidth_bytes_per_s / 1e9:.0f} GB/s, "
          f"{intra.alpha_s * 1e6:.0f} µs), inter {args.inter} ({inter.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
          f"{inter.alpha_s * 1e6:.0f} µs) x {nics} per node of {args.ranks_per_node}")
    print(f"layer: hidden {shape.hidden}, ffn {shape.ffn} x{shape.ffn_matrices}, top-{shape.top_k}, "
          f"{shape.tokens_per_rank} tokens/rank, {shape.bytes_per_elem} B/elem, {shape.experts_per_rank} experts/GPU; "
          f"experts at {args.tflops:.0f} TFLOP/s; hierarchical dedup {args.dedup}")
    print(f"samples: {results[0]['samples'] if results else 0} iterations x {results[0]['layers'] if results else 0} "
          f"layers per size (--samples 0: all)")
    print("a2a = one layer's all-to-alls per step (4 token all-to-alls + count exchange), median / p90; "
          "hier = Tutel's 2D (gather, cross, fan out), node-aware = moeflux's (rail, relay; dedup: inter-node "
          "bytes saved); "
          "expert ms = busiest rank, fwd+bwd; share = a2a / (a2a + expert), no overlap; "
          "B = max(sent, received) per rank, dispatch")
    _print_table(rows)
    if args.per_layer:
        for gpus, result in zip(args.gpus, results):
            pl = result["per_layer_median"]
            print(f"\n{gpus} GPUs, per layer (median over samples): layer, a2a direct ms, hier ms, share direct, "
                  f"expert max/mean")
            for layer, values in enumerate(zip(pl["direct_s"], pl["hierarchical_s"], pl["share_direct"],
                                               pl["expert_max_over_mean"])):
                d, h, sh, sk = values
                print(f"  {layer:>3} {d * 1e3:>8.2f} {h * 1e3:>8.2f} {sh * 100:>5.0f}% {sk:>6.2f}")
    print(f"({elapsed:.1f} s)")
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
