"""What NetMoE's sample placement saves in inter-node vectors, from per-sample routing, without a cluster.

    python -m moeflux.sim.sample_placement            # the shared trace (16 ranks) and synthetic affinity

For each layer and iteration: every sample's token ids (:func:`moeflux.sim.replay.replay_expert_ids` of its
counts), their traffic (:func:`moeflux.sample_placement.sample_traffic`), the assignment
(:func:`moeflux.sample_placement.solve_sample_placement`), and the vectors that cross nodes in the layer's
forward exchange (dispatch + combine, the hierarchical exchange's node copies) before and after, the move
included. Samples: the trace's (source rank, micro-batch) units of 2048 tokens, four per rank as recorded; or
synthetic samples whose slots go, with probability ``affinity``, to the experts of one "home" node drawn per
sample and otherwise uniformly (0: uniform routing).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..placement import ExpertPlacement
from ..sample_placement import inter_node_vectors, sample_traffic, solve_sample_placement
from .replay import fit_counts, replay_expert_ids
from .routing import load_trace


def placement_gain(sample_counts: np.ndarray, ranks: int, ranks_per_node: int, top_k: int, tokens: int,
                   move_cost: float = 1.0, seed: int = 0) -> dict:
    """``sample_counts [G, E]`` (slots per expert of each of ``G = ranks * B`` samples, global slot order):
    vectors crossing nodes per forward (dispatch + combine, node copies) before and after placement (the move
    included), samples moved, and the solver's time."""
    g, experts = sample_counts.shape
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([replay_expert_ids(fit_counts(c, tokens, top_k), top_k, generator=gen) for c in sample_counts])
    traffic = sample_traffic(ids, g, ExpertPlacement(experts, ranks), ranks_per_node).numpy()
    start = time.perf_counter()
    dest = solve_sample_placement(traffic, g // ranks, ranks_per_node, tokens, "hierarchical", move_cost)
    solve_s = time.perf_counter() - start
    before, after = inter_node_vectors(traffic, dest, g // ranks, ranks_per_node, tokens)
    crossed = np.arange(g) // (g // ranks) // ranks_per_node != dest // ranks_per_node
    return {"before": before, "after": after, "moved_across_nodes": int(crossed.sum()), "solve_s": solve_s}


def affinity_counts(samples: int, experts: int, nodes: int, slots: int, affinity: float, rng: np.random.Generator
                    ) -> np.ndarray:
    """``[samples, E]``: each sample's ``slots`` drawn from a mix of its home node's experts (weight
    ``affinity``) and all experts."""
    per_node = experts // nodes
    probs = np.full((samples, experts), (1 - affinity) / experts)
    home = rng.integers(0, nodes, samples)
    for s, n in enumerate(home):
        probs[s, n * per_node:(n + 1) * per_node] += affinity / per_node
    return np.stack([rng.multinomial(slots, p) for p in probs])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10, help="trace iterations from --start (default 10)")
    p.add_argument("--start", type=int, default=100)
    p.add_argument("--layers", default="6,18")
    p.add_argument("--move-cost", type=float, default=1.0)
    args = p.parse_args()
    import scipy.optimize  # noqa: F401  (imported once here, not inside the first timed solve)

    trace = load_trace()
    rows = ["| routing | nodes x ranks | samples/rank | tokens/sample | inter-node vectors after / before | "
            "samples moved across nodes / layer | solve ms |", "|" + "---|" * 7]

    def add(name, layout, b, tokens, results):
        ratio = sum(r["after"] for r in results) / max(1, sum(r["before"] for r in results))
        moved = np.mean([r["moved_across_nodes"] for r in results])
        solve = 1e3 * np.mean([r["solve_s"] for r in results])
        rows.append(f"| {name} | {layout} | {b} | {tokens} | {ratio:.3f} | {moved:.1f} | {solve:.2f} |")

    ranks, units = trace.num_ranks, trace.num_ranks * trace.num_micro_batches
    for nodes in (2, 4):
        results = []
        for it in range(args.start, args.start + args.iterations):
            for layer in (int(v) for v in args.layers.split(",")):
                counts = trace.counts[it, :, layer].reshape(units, -1)
                results.append(placement_gain(counts, ranks, ranks // nodes, 2, 2048, args.move_cost))
        add("trace (SmartMoE, units of 2048 tokens)", f"{nodes} x {ranks // nodes}", units // ranks, 2048, results)
    rng = np.random.default_rng(0)
    for ranks, nodes in ((16, 2), (64, 8)):
        for affinity in (0.0, 0.5, 0.8):
            results = [placement_gain(affinity_counts(ranks * 4, 2 * ranks, nodes, 512 * 2, affinity, rng), ranks,
                                      ranks // nodes, 2, 512, args.move_cost, seed=i) for i in range(3)]
            add(f"synthetic, affinity {affinity}", f"{nodes} x {ranks // nodes}", 4, 512, results)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
