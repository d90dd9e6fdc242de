"""One cluster size of the CLI's sweep: per-layer all-to-all time (direct, hierarchical, node-aware), expert
compute, the all-to-all share of the step and the skew, over the sampled iterations and layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cost_model import all_to_all_breakdown, moe_layer_all_to_all_time, step_time
from .links import Topology
from .routing import node_dedup, traffic_matrix


@dataclass(frozen=True)
class ModelShape:
    """The MoE layer and the rate its experts compute at."""

    hidden: int = 4096
    ffn: int = 14336
    ffn_matrices: int = 3  # SwiGLU: gate, up, down
    top_k: int = 2
    tokens_per_rank: int = 4096
    bytes_per_elem: int = 2
    experts_per_rank: int = 2
    expert_flop_per_s: float = 400e12
    count_bytes: int = 8  # one int64 count per local expert and peer in the dropless count exchange

    @property
    def slots_per_rank(self) -> int:
        return self.tokens_per_rank * self.top_k

    @property
    def flop_per_slot(self) -> float:
        """Forward + backward (3x forward) FLOPs of one token slot through one expert."""
        return 3 * 2 * self.ffn_matrices * self.hidden * self.ffn


@dataclass(frozen=True)
class LayerSamples:
    """Arrays ``[samples, layers]`` for one cluster size."""

    direct_s: np.ndarray  # the layer's all-to-alls in one step (4 token all-to-alls + count exchange)
    hierarchical_s: np.ndarray
    node_aware_s: np.ndarray  # moeflux's hierarchical exchange, with the routing's expected deduplication
    node_dedup: np.ndarray  # that deduplication: fraction of inter-node bytes saved
    compute_s: np.ndarray  # expert compute of the busiest rank
    share_direct: np.ndarray  # all-to-all / (all-to-all + compute), no overlap
    share_hierarchical: np.ndarray
    share_node_aware: np.ndarray
    slowest_over_mean_bytes: np.ndarray  # dispatch, direct algorithm
    max_over_mean_bytes: np.ndarray
    expert_max_over_mean: np.ndarray  # global expert load


def simulate(topo: Topology, shape: ModelShape, counts_of: Callable[[int, slice], np.ndarray], num_samples: int,
             num_layers: int, dedup: float = 0.0, chunk_bytes: int = 16 << 20) -> LayerSamples:
    """Cost ``counts_of(sample, layers) -> counts[layers, ranks, experts]`` for every sample and layer.

    Layers go in chunks of about ``chunk_bytes`` of counts: small arrays are recycled by the allocator, while
    fresh big ones (hundreds of MB at 1024 ranks) cost more in page faults than the model itself.
    """
    experts = topo.world * shape.experts_per_rank
    step = max(1, chunk_bytes // (topo.world * experts * 8))
    chunks = [_costs(topo, shape, counts_of(i, slice(l0, min(l0 + step, num_layers))), dedup)
              for i in range(num_samples) for l0 in range(0, num_layers, step)]
    per_sample = len(chunks) // num_samples
    return LayerSamples(**{name: np.stack([np.concatenate([getattr(c, name) for c in chunks[i:i + per_sample]])
                                           for i in range(0, len(chunks), per_sample)])
                           for name in LayerSamples.__dataclass_fields__})


def _costs(topo: Topology, shape: ModelShape, counts: np.ndarray, dedup: float) -> LayerSamples:
    """``[layers]`` of each quantity for ``counts[layers, ranks, experts]``."""
    count_bytes_per_peer = shape.count_bytes * shape.experts_per_rank
    traffic = traffic_matrix(counts, shape.hidden, shape.bytes_per_elem)
    direct = np.asarray(moe_layer_all_to_all_time(traffic, topo, "direct", 0.0, count_bytes_per_peer))
    hier = np.asarray(moe_layer_all_to_all_time(traffic, topo, "hierarchical", dedup, count_bytes_per_peer))
    slot_bytes = shape.hidden * shape.bytes_per_elem
    saved = node_dedup(traffic / slot_bytes, topo.ranks_per_node, shape.top_k)  # slots per destination rank
    node_aware = np.asarray(moe_layer_all_to_all_time(traffic, topo, "node_aware", saved, count_bytes_per_peer))
    received_slots = traffic.sum(-2) / slot_bytes
    compute = received_slots.max(-1) * shape.flop_per_slot / shape.expert_flop_per_s
    breakdown = all_to_all_breakdown(traffic, topo)
    expert_load = counts.sum(-2).astype(np.float64)

    def share(a2a: np.ndarray) -> np.ndarray:
        return np.array([step_time(float(c), float(a), 0.0).all_to_all_share for c, a in zip(compute, a2a)])

    return LayerSamples(direct, hier, node_aware, saved, compute, share(direct), share(hier), share(node_aware),
                        breakdown.slowest_over_mean_bytes,
                        breakdown.max_over_mean_bytes, expert_load.max(-1) / expert_load.mean(-1))


def summary(samples: LayerSamples) -> dict[str, dict[str, float]]:
    """Median and 90th percentile of every quantity over samples and layers."""
    return {name: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90))}
            for name, v in vars(samples).items()}


def per_layer(samples: LayerSamples) -> dict[str, list[float]]:
    """Median over samples of every quantity, per layer."""
    return {name: np.median(v, axis=0).tolist() for name, v in vars(samples).items()}
