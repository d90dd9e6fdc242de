"""What load balancing buys, estimated: one MoE layer's time per training step with no balancing, FasterMoE's
dynamic shadowing, SmartMoE's expert re-placement, or both, on recorded routing at any cluster size.

The choices are the library's own, so the simulator and the layer choose alike: which experts to shadow is
:meth:`moeflux.ShadowCostModel.choose` on the step's ``[P, E]`` counts by position (what
:class:`moeflux.exchange.shadowing.Shadowing` passes it), where experts live is
:func:`moeflux.balance.greedy_placement` on the load of the previous ``window`` samples (what
:class:`moeflux.ExpertReplacement` does, never the step's own load). "both" re-places first and shadows on the
re-placed layout, as a layer with both does.

Cost of one layer in one step (no overlap; the same terms as ``python -m moeflux.sim``):

- all-to-all: :func:`moeflux.sim.moe_layer_all_to_all_time` of the dispatch traffic of the non-shadowed slots
  (4 token all-to-alls + the count exchange, direct algorithm);
- experts: the busiest rank's rows (its experts' non-shadowed slots from every rank, plus its own slots of
  shadowed experts) times forward + backward FLOPs per row at ``expert_flop_per_s``;
- shadows: per shadowed expert a broadcast of its parameters and a reduce of their gradients, each a
  pipelined tree: ``bytes · β + ceil(log2 P) · α`` of the inter-node link (intra-node on one node);
- moves: experts that change rank carry their parameters and AdamW's two fp32 moments
  (:class:`moeflux.ExpertReplacement` moves exactly these); the busiest rank's moved bytes · β of the
  inter-node link, amortised over ``replace_every`` iterations (10: the trace's sampling interval).

``python -m moeflux.sim.balance`` runs it at 16, 64 and 256 GPUs on the shared trace.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..balance import ExpertShape, ShadowCostModel, greedy_placement, moved_experts
from ..placement import ExpertPlacement
from .cost_model import moe_layer_all_to_all_time
from .links import LINK_PRESETS, Topology
from .routing import DEFAULT_TRACE_PATH, load_stats, load_trace, scale_counts, traffic_matrix
from .sweep import ModelShape

__all__ = ["METHODS", "BalanceConfig", "LayerCost", "expert_shape", "shadow_policy", "layer_cost",
           "simulate_methods", "summarise", "main"]

METHODS: tuple[str, ...] = ("none", "shadowing", "replacement", "both")


@dataclass(frozen=True)
class BalanceConfig:
    """The layer (:class:`moeflux.sim.sweep.ModelShape`) and the balancing knobs."""

    shape: ModelShape = field(default_factory=ModelShape)
    window: int = 1  # samples of load history a re-placement sees
    replace_every: int = 10  # iterations between re-placements (move cost amortised over them)
    optimizer_bytes_per_param: int = 8  # AdamW: exp_avg + exp_avg_sq in fp32, moved with the parameter
    samples_per_replacement: int = 1  # re-place before every N-th costed sample (a sample = replace_every / N its)


def expert_shape(shape: ModelShape) -> ExpertShape:
    """The policy's view of one expert of ``shape``."""
    params = shape.ffn_matrices * shape.hidden * shape.ffn
    return ExpertShape(shape.hidden * shape.bytes_per_elem, params * shape.bytes_per_elem, shape.flop_per_slot)


def shadow_policy(topo: Topology, shape: ModelShape, max_shadows: int | None = None) -> ShadowCostModel:
    """The policy a layer would be given for this cluster: the inter-node link's payload rate per NIC and
    latency per collective (as :meth:`ShadowCostModel.from_fitted_links`), and the experts' FLOP rate."""
    return ShadowCostModel(topo.inter.bandwidth_bytes_per_s, shape.expert_flop_per_s, max_shadows,
                           topo.inter.alpha_s)


@dataclass(frozen=True)
class LayerCost:
    """One layer, one step, one method."""

    a2a_s: float
    compute_s: float
    shadow_s: float
    move_s: float  # amortised per iteration
    shadows: int
    moved: int  # experts moved by the re-placement made before this step (0 if none)
    rank_rows: np.ndarray  # [P] rows each rank's experts compute (received + own shadowed slots)
    rank_remote_rows: np.ndarray  # [P] rows each rank receives from other ranks (dispatch)

    @property
    def total_s(self) -> float:
        return self.a2a_s + self.compute_s + self.shadow_s + self.move_s


def _tree_time(nbytes: float, topo: Topology) -> float:
    link = topo.inter if topo.nodes > 1 else topo.intra
    return nbytes * link.beta_s_per_byte + math.ceil(math.log2(max(topo.world, 2))) * link.alpha_s


def layer_cost(counts: np.ndarray, placement: ExpertPlacement, shadows: Sequence[int], topo: Topology,
               shape: ModelShape, moved_bytes: float = 0.0, replace_every: int = 1, moved: int = 0) -> LayerCost:
    """Cost of ``counts [P, E]`` (slots each rank routes to each *global* expert) with ``placement`` and the
    ``shadows`` (positions) computed where their tokens are. ``moved_bytes``: the busiest rank's bytes moved by
    the re-placement made for this step (amortised over ``replace_every``)."""
    counts = np.asarray(counts, dtype=np.float64)
    world = topo.world
    if counts.shape != (world, placement.num_experts) or placement.ep_size != world:
        raise ValueError(f"layer_cost: counts must be [{world}, {placement.num_experts}] for a placement over "
                         f"{world} ranks, got {counts.shape} and ep_size {placement.ep_size}")
    by_position = counts[:, list(placement.expert_at)]
    shadowed = np.zeros(placement.num_experts, dtype=bool)
    shadowed[list(shadows)] = True
    routed = np.where(shadowed, 0.0, by_position)
    traffic = traffic_matrix(routed, shape.hidden, shape.bytes_per_elem)  # positions are contiguous by rank
    a2a = float(moe_layer_all_to_all_time(traffic, topo, "direct", 0.0, shape.count_bytes * placement.local_experts))
    rows_to_rank = traffic / (shape.hidden * shape.bytes_per_elem)
    rank_rows = rows_to_rank.sum(0) + np.where(shadowed, by_position, 0.0).sum(1)
    remote = (rows_to_rank * (1 - np.eye(world))).sum(0)
    compute = float(rank_rows.max() * shape.flop_per_slot / shape.expert_flop_per_s)
    param_bytes = expert_shape(shape).param_bytes
    shadow = 2 * len(shadows) * _tree_time(param_bytes, topo)
    move = moved_bytes * (topo.inter if topo.nodes > 1 else topo.intra).beta_s_per_byte / replace_every
    return LayerCost(a2a, compute, shadow, move, len(shadows), moved, rank_rows, remote)


def _moved_bytes(old: ExpertPlacement, new: ExpertPlacement, shape: ModelShape, optimizer_bytes: int) -> float:
    per_expert = shape.ffn_matrices * shape.hidden * shape.ffn * (shape.bytes_per_elem + optimizer_bytes)
    leaving = np.zeros(old.ep_size)
    arriving = np.zeros(old.ep_size)
    for e in range(old.num_experts):
        a, b = old.rank_of(e), new.rank_of(e)
        if a != b:
            leaving[a] += 1
            arriving[b] += 1
    return float(np.maximum(leaving, arriving).max() * per_expert)


_GREEDY_MEMO: dict[tuple[bytes, tuple[int, ...]], ExpertPlacement | None] = {}


def _greedy(load: np.ndarray, placement: ExpertPlacement) -> ExpertPlacement | None:
    """:func:`greedy_placement`, remembered (the methods that re-place see the same load and placement)."""
    key = (load.tobytes(), placement.expert_at)
    if key not in _GREEDY_MEMO:
        if len(_GREEDY_MEMO) > 4096:
            _GREEDY_MEMO.clear()
        _GREEDY_MEMO[key] = greedy_placement(load, placement)
    return _GREEDY_MEMO[key]


def simulate_methods(counts: np.ndarray, topo: Topology, config: BalanceConfig,
                     policy: ShadowCostModel | None = None,
                     methods: Sequence[str] = METHODS, warmup: int = 0) -> dict[str, list[list[LayerCost]]]:
    """``counts [S, L, P, E]``: ``S`` consecutive samples of ``L`` layers. The first ``window + warmup`` samples
    are history only (placements follow them, nothing is costed); returns, per method,
    ``[S - window - warmup][L]`` :class:`LayerCost`. Each layer's placement starts contiguous and, for
    "replacement" and "both", is re-placed before sample ``s`` when ``s >= window`` and ``(s - window)`` is a
    multiple of ``samples_per_replacement`` (as :class:`moeflux.ExpertReplacement` with ``every`` = ``window``
    = that), from the previous ``window`` samples' global expert load (kept while the greedy finds nothing
    better). A re-placement's move cost is spread over the ``replace_every`` iterations it serves: every
    sample until the next re-placement is charged ``cost / replace_every``."""
    counts = np.asarray(counts)
    if counts.ndim != 4 or counts.shape[2] != topo.world:
        raise ValueError(f"simulate_methods: counts must be [samples, layers, {topo.world} ranks, experts], got "
                         f"{counts.shape}")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"simulate_methods: unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    samples, layers, world, num_experts = counts.shape
    if warmup < 0 or samples <= config.window + warmup:
        raise ValueError(f"simulate_methods: need more than window + warmup = {config.window} + {warmup} samples, "
                         f"got {samples}")
    shape = config.shape
    policy = policy or shadow_policy(topo, shape)
    eshape = expert_shape(shape)
    out: dict[str, list[list[LayerCost]]] = {m: [] for m in methods}
    placements = [ExpertPlacement(num_experts, world, 0) for _ in range(layers)]
    moves = [(0, 0.0)] * layers  # (experts moved, busiest rank's bytes) by each layer's last re-placement
    replacing = any(m in methods for m in ("replacement", "both"))
    if config.samples_per_replacement < 1:
        raise ValueError(f"simulate_methods: samples_per_replacement must be >= 1, got {config.samples_per_replacement}")
    for s in range(config.window, samples):
        if replacing and (s - config.window) % config.samples_per_replacement == 0:
            for l in range(layers):
                load = counts[s - config.window:s, l].sum(axis=(0, 1)).astype(np.float64)
                new, old = _greedy(load, placements[l]), placements[l]
                if new is not None and new.expert_at != old.expert_at:
                    moves[l] = (moved_experts(old, new), _moved_bytes(old, new, shape, config.optimizer_bytes_per_param))
                    placements[l] = new
                else:
                    moves[l] = (0, 0.0)
        if s < config.window + warmup:
            continue
        for method in methods:
            row = []
            for l in range(layers):
                c = counts[s, l]
                placement = placements[l] if method in ("replacement", "both") else ExpertPlacement(num_experts, world)
                shadows: tuple[int, ...] = ()
                if method in ("shadowing", "both"):
                    shadows = policy.choose(c[:, list(placement.expert_at)], eshape)
                moved, moved_bytes = moves[l] if method in ("replacement", "both") else (0, 0.0)
                row.append(layer_cost(c, placement, shadows, topo, shape, moved_bytes, config.replace_every, moved))
            out[method].append(row)
    return out


def summarise(result: dict[str, list[list[LayerCost]]], layers: Sequence[int] | None = None) -> dict[str, dict]:
    """Medians over samples and the chosen ``layers`` (indices into the simulated layers; default all) per
    method: times, the slowest rank's rows vs the mean, shadows and moves, and the speedup over "none" (median
    of the per-(sample, layer) ratios)."""
    base = result.get("none")
    out = {}
    for method, rows in result.items():
        picked = [(i, l, cost) for i, row in enumerate(rows) for l, cost in enumerate(row)
                  if layers is None or l in layers]
        if not picked:
            raise ValueError("summarise: no layers picked")

        def med(values: list[float]) -> float:
            return float(np.median(values))

        entry = {
            "total_s": med([c.total_s for *_, c in picked]),
            "a2a_s": med([c.a2a_s for *_, c in picked]),
            "compute_s": med([c.compute_s for *_, c in picked]),
            "shadow_s": med([c.shadow_s for *_, c in picked]),
            "move_s": med([c.move_s for *_, c in picked]),
            "shadows": med([c.shadows for *_, c in picked]),
            "moved_per_replacement": med([c.moved for *_, c in picked]),
            "slowest_rank_rows": med([c.rank_rows.max() for *_, c in picked]),
            "slowest_over_mean_rows": med([c.rank_rows.max() / c.rank_rows.mean() for *_, c in picked]),
            "slowest_rank_remote_rows": med([c.rank_remote_rows.max() for *_, c in picked]),
        }
        if base is not None:
            entry["speedup"] = med([base[i][l].total_s / c.total_s for i, l, c in picked])
            entry["speedup_of_medians"] = out["none"]["total_s"] / entry["total_s"] if "none" in out else 1.0
        out[method] = entry
    return out


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moeflux.sim.balance",
        description="One MoE layer's time per training step with none / shadowing / re-placement / both on the "
                    "shared routing trace, at several cluster sizes (H100 NVLink within a node, one 400 Gbit/s "
                    "InfiniBand NIC per GPU across; see the module docstring for the model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE_PATH)
    p.add_argument("--samples", type=int, default=8, help="trace samples costed (evenly spaced, each after one "
                                                          "sample of history)")
    p.add_argument("--skewed-layers", type=int, nargs="*", default=[6, 18],
                   help="trace layers reported apart (the ones replayed on the emulated cluster)")
    p.add_argument("--experts-per-rank", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--tokens-per-rank", type=int, default=4096)
    p.add_argument("--tflops", type=float, default=400.0)
    p.add_argument("--replace-every", type=int, default=10)
    p.add_argument("--json", type=Path)
    return p


def _print(rows: list[tuple[int, str, dict]]) -> None:
    head = (f"{'GPUs':>5} {'layers':>8} {'method':>12} | {'layer ms':>8} {'a2a ms':>7} {'expert ms':>9} "
            f"{'shadow ms':>9} {'move ms':>7} | {'speedup':>7} | {'slowest rows':>12} {'/mean':>5} | "
            f"{'shadows':>7} {'moved':>5}")
    print(head)
    print("-" * len(head))
    for gpus, which, s in rows:
        for method, e in s.items():
            print(f"{gpus:>5} {which:>8} {method:>12} | {1e3 * e['total_s']:>8.1f} {1e3 * e['a2a_s']:>7.1f} "
                  f"{1e3 * e['compute_s']:>9.1f} {1e3 * e['shadow_s']:>9.1f} {1e3 * e['move_s']:>7.2f} | "
                  f"{e['speedup']:>6.2f}x | {e['slowest_rank_rows']:>12.0f} {e['slowest_over_mean_rows']:>5.2f} | "
                  f"{e['shadows']:>7.0f} {e['moved_per_replacement']:>5.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.trace).exists():
        raise SystemExit(f"no trace at {args.trace}")
    trace = load_trace(args.trace)
    shape = ModelShape(hidden=args.hidden, ffn=args.ffn, tokens_per_rank=args.tokens_per_rank,
                       experts_per_rank=args.experts_per_rank, expert_flop_per_s=args.tflops * 1e12)
    config = BalanceConfig(shape, window=1, replace_every=args.replace_every)
    # Evenly spaced samples i, each costed with the placement re-placed from sample i - 1's load (10 iterations
    # earlier), starting from the one re-placed from sample i - 2's: moves are those of a steady re-placement.
    picked = np.unique(np.linspace(2, trace.num_iterations - 1, args.samples).round().astype(int))
    started = time.perf_counter()
    rows, results = [], []
    for gpus in args.gpus:
        per_node = min(args.ranks_per_node, gpus)
        topo = Topology(gpus // per_node, per_node, LINK_PRESETS["nvlink-h100"], LINK_PRESETS["ib-400g"], per_node)
        policy = shadow_policy(topo, shape)
        merged: dict[str, list] = {m: [] for m in METHODS}
        for i in picked:
            steps = np.stack([scale_counts(trace.step_counts(int(j)), gpus, shape.experts_per_rank,
                                           shape.slots_per_rank) for j in (i - 2, i - 1, i)])
            for m, r in simulate_methods(steps, topo, config, policy, warmup=1).items():
                merged[m].extend(r)
        stats = load_stats(np.stack([scale_counts(trace.step_counts(int(i)), gpus, shape.experts_per_rank,
                                                  shape.slots_per_rank) for i in picked]))
        entry = {"gpus": gpus, "nodes": topo.nodes, "experts": gpus * shape.experts_per_rank,
                 "samples": [int(i) for i in picked],
                 "expert_max_over_mean_median": float(np.median(stats.expert_max_over_mean)),
                 "rank_max_over_mean_median": float(np.median(stats.rank_max_over_mean)),
                 "all_layers": summarise(merged), "skewed_layers": summarise(merged, args.skewed_layers)}
        results.append(entry)
        rows += [(gpus, "all", entry["all_layers"]), (gpus, "skewed", entry["skewed_layers"])]
    elapsed = time.perf_counter() - started
    print(f"moeflux.sim.balance — trace {Path(args.trace).name}, samples {list(map(int, picked))} (each re-placed "
          f"from the previous sample's load), skewed layers {args.skewed_layers}")
    print(f"layer: hidden {shape.hidden}, ffn {shape.ffn} x{shape.ffn_matrices} (SwiGLU), top-{shape.top_k}, "
          f"{shape.tokens_per_rank} tokens/GPU, bf16, {shape.experts_per_rank} experts/GPU, experts at "
          f"{args.tflops:.0f} TFLOP/s; NVLink 370 GB/s in a node of {args.ranks_per_node}, one 400G IB NIC per "
          f"GPU (46 GB/s); re-placement every {args.replace_every} iterations (moves amortised), AdamW state moved")
    print("layer ms = all-to-alls (4 + count exchange) + busiest rank's experts (fwd+bwd) + shadow broadcast/reduce "
          "+ amortised moves, no overlap; medians over samples x layers; speedup = median of none/method; "
          "slowest rows = busiest rank's expert rows")
    _print(rows)
    print(f"({elapsed:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config_out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config_out, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
