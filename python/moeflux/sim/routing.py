"""Where tokens go: token-slot counts ``counts[..., src_rank, expert]`` from synthetic sources or a recorded
trace, and the all-to-all bytes ``[..., src_rank, dst_rank]`` they imply for an expert placement.

The trace format (``save_trace`` / ``load_trace``) has its one home here: the npz of the SmartMoE trace,
``counts [iteration, source rank, layer, micro-batch, expert]`` (unsigned integers) and ``iterations``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_TRACE_PATH", "RoutingTrace", "LoadStats", "load_trace", "save_trace", "expert_ranks",
    "traffic_matrix", "node_dedup", "uniform", "zipf", "scale_counts", "load_stats",
]

# ``../shared/traces/`` next to the repository (never copied into it).
DEFAULT_TRACE_PATH = (Path(__file__).parents[3] / ".." / "shared" / "traces" / "smartmoe_gpt_16x32.npz").resolve()

RngLike = np.random.Generator | int | None


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# ---------------------------------------------------------------------------------------------- trace file


@dataclass(frozen=True)
class RoutingTrace:
    """Recorded routing: ``counts[iteration, source rank, layer, micro-batch, expert]`` token slots (int64) and
    the training ``iterations`` they were sampled at."""

    counts: np.ndarray
    iterations: np.ndarray

    def __post_init__(self) -> None:
        _validate_trace(self.counts, self.iterations, "RoutingTrace")

    @property
    def num_iterations(self) -> int:
        return self.counts.shape[0]

    @property
    def num_ranks(self) -> int:
        return self.counts.shape[1]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[2]

    @property
    def num_micro_batches(self) -> int:
        return self.counts.shape[3]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[4]

    def layer_counts(self, iteration_index: int, layer: int) -> np.ndarray:
        """``[ranks, experts]`` token slots of one layer at one sample, summed over micro-batches."""
        return self.counts[iteration_index, :, layer].sum(axis=1)

    def step_counts(self, iteration_index: int) -> np.ndarray:
        """``[layers, ranks, experts]`` of one sample, summed over micro-batches."""
        return self.counts[iteration_index].sum(axis=2).transpose(1, 0, 2)


def _validate_trace(counts: np.ndarray, iterations: np.ndarray, where: str) -> None:
    if not isinstance(counts, np.ndarray) or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"{where}: counts must be an integer ndarray, got "
                         f"{getattr(counts, 'dtype', type(counts).__name__)}")
    if counts.ndim != 5:
        raise ValueError(f"{where}: counts must have 5 dimensions [iteration, source rank, layer, micro-batch, "
                         f"expert], got shape {counts.shape} (add a micro-batch axis: counts[:, :, :, None, :])")
    if min(counts.shape) < 1:
        raise ValueError(f"{where}: counts must have no empty dimension, got shape {counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"{where}: counts must be >= 0, got a minimum of {counts.min()}")
    if not isinstance(iterations, np.ndarray) or not np.issubdtype(iterations.dtype, np.integer):
        raise ValueError(f"{where}: iterations must be an integer ndarray, got "
                         f"{getattr(iterations, 'dtype', type(iterations).__name__)}")
    if iterations.shape != (counts.shape[0],):
        raise ValueError(f"{where}: iterations must have shape ({counts.shape[0]},) (one per counts[i]), "
                         f"got {iterations.shape}")


def load_trace(path: str | Path = DEFAULT_TRACE_PATH) -> RoutingTrace:
    """Read a routing trace npz (any integer dtype); counts become int64."""
    with np.load(Path(path)) as data:
        missing = {"counts", "iterations"} - set(data.files)
        if missing:
            raise ValueError(f"load_trace: {path} lacks the array(s) {sorted(missing)} (has {data.files})")
        counts, iterations = data["counts"], data["iterations"]
    _validate_trace(counts, iterations, f"load_trace({path})")
    return RoutingTrace(counts.astype(np.int64), iterations.astype(np.int64))


def save_trace(path: str | Path, counts: np.ndarray, iterations: np.ndarray) -> Path:
    """Write ``counts [iteration, source rank, layer, micro-batch, expert]`` and ``iterations`` as a compressed
    npz in the layout of the SmartMoE trace: counts as uint16 when they fit (else uint32, else int64),
    iterations as int32 when they fit. Returns the path written (np.savez adds ``.npz`` when missing)."""
    counts, iterations = np.asarray(counts), np.asarray(iterations)
    _validate_trace(counts, iterations, "save_trace")
    top = int(counts.max())
    dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32 if top <= np.iinfo(np.uint32).max \
        else np.int64
    it_dtype = np.int32 if iterations.size == 0 or (
        np.iinfo(np.int32).min <= iterations.min() and iterations.max() <= np.iinfo(np.int32).max) else np.int64
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    np.savez_compressed(path, counts=counts.astype(dtype), iterations=iterations.astype(it_dtype))
    return path


# ---------------------------------------------------------------------------------------------- placement, bytes


def expert_ranks(num_experts: int, num_ranks: int, placement: np.ndarray | None = None) -> np.ndarray:
    """Rank of each expert: ``placement`` (``[E]`` ints in [0, P)) or, by default, contiguous blocks
    (expert ``e`` on rank ``e // (E / P)``)."""
    if placement is None:
        if num_experts % num_ranks:
            raise ValueError(f"expert_ranks: the default placement needs num_experts ({num_experts}) to be a "
                             f"multiple of num_ranks ({num_ranks}); pass a placement")
        return np.arange(num_experts) // (num_experts // num_ranks)
    placement = np.asarray(placement)
    if placement.shape != (num_experts,) or not np.issubdtype(placement.dtype, np.integer):
        raise ValueError(f"expert_ranks: placement must be an integer array of shape ({num_experts},), "
                         f"got {placement.dtype} {placement.shape}")
    if placement.size and (placement.min() < 0 or placement.max() >= num_ranks):
        raise ValueError(f"expert_ranks: placement ranks must be in [0, {num_ranks})")
    return placement


def traffic_matrix(counts: np.ndarray, hidden: int, bytes_per_elem: int,
                   placement: np.ndarray | None = None) -> np.ndarray:
    """Dispatch bytes ``[..., src, dst]`` from token slots ``counts[..., src, expert]``: each slot carries one
    ``hidden``-vector of ``bytes_per_elem`` to the rank of its expert (``placement``, default contiguous)."""
    counts = np.asarray(counts)
    if counts.ndim < 2:
        raise ValueError(f"traffic_matrix: counts must be [..., ranks, experts], got shape {counts.shape}")
    p, e = counts.shape[-2:]
    owner = expert_ranks(e, p, placement)
    per_slot = float(hidden * bytes_per_elem)
    if placement is None:  # contiguous blocks: add the slot columns (faster than a sum over a short axis)
        slots = counts.reshape(*counts.shape[:-1], p, e // p)
        out = slots[..., 0].astype(np.float64)
        for j in range(1, e // p):
            out += slots[..., j]
        return out * per_slot
    order = np.argsort(owner, kind="stable")
    cum = np.concatenate([np.zeros((*counts.shape[:-1], 1)), np.cumsum(counts[..., order], -1, dtype=np.float64)],
                         -1)
    bounds = np.searchsorted(owner[order], np.arange(p + 1))
    return (cum[..., bounds[1:]] - cum[..., bounds[:-1]]) * per_slot


def node_dedup(counts: np.ndarray, ranks_per_node: int, top_k: int) -> np.ndarray:
    """``[...]``: the expected fraction of inter-node token bytes a node-aware exchange saves by sending a token
    once per remote node that holds any of its ``top_k`` experts, for slots ``counts[..., P, E]`` (contiguous
    placement, ``ranks_per_node`` ranks per node), or for slots per destination rank ``[..., P, P]`` (any
    columns in node-major blocks give the same: only each node's share is used).

    Counts do not say which experts a token chose together; each token of rank ``s`` is taken to draw its ``k``
    experts independently from ``s``'s slot distribution ``q`` (with replacement: an estimate). Then a remote
    node ``m`` receives ``k · q_m`` slots per token but ``1 - (1 - q_m)^k`` copies; the fraction saved is
    ``1 - copies / slots`` over every rank's remote traffic.
    """
    counts = np.asarray(counts, dtype=np.float64)
    p, e = counts.shape[-2:]
    if p % ranks_per_node or e % p:
        raise ValueError(f"node_dedup: ranks_per_node ({ranks_per_node}) must divide the {p} ranks, and the "
                         f"ranks the {e} columns")
    nodes = p // ranks_per_node
    slots = counts.sum(-1, keepdims=True)
    per_node = counts.reshape(*counts.shape[:-1], nodes, e // nodes).sum(-1)  # [..., P, nodes]
    share = np.divide(per_node, slots, out=np.zeros_like(per_node), where=slots > 0)
    remote = 1.0 - np.eye(nodes).repeat(ranks_per_node, axis=0)  # [P, nodes]: node m is remote for rank s
    tokens = slots[..., 0] / top_k
    remote_slots = (tokens[..., None] * top_k * share * remote).sum((-1, -2))
    remote_copies = (tokens[..., None] * (1.0 - (1.0 - share) ** top_k) * remote).sum((-1, -2))
    return 1.0 - np.divide(remote_copies, remote_slots, out=np.ones_like(remote_slots), where=remote_slots > 0)


# ---------------------------------------------------------------------------------------------- sources


def uniform(num_ranks: int, num_experts: int, tokens_per_rank: int, top_k: int, rng: RngLike = None) -> np.ndarray:
    """``[P, E]`` slots: every rank's ``tokens_per_rank · top_k`` slots drawn uniformly over experts
    (multinomial over slots; a token's k experts being distinct changes nothing at this granularity)."""
    return zipf(num_ranks, num_experts, tokens_per_rank, top_k, 0.0, rng)


def zipf(num_ranks: int, num_experts: int, tokens_per_rank: int, top_k: int, s: float,
         rng: RngLike = None) -> np.ndarray:
    """``[P, E]`` slots with skewed expert popularity ``p(i-th most popular) ∝ i^-s`` (s = 0: uniform), the
    same for all ranks, which expert is how popular a random permutation (so the hot experts do not all sit
    on rank 0); each rank's slots a multinomial draw."""
    if min(num_ranks, num_experts, top_k) < 1 or tokens_per_rank < 0 or top_k > num_experts:
        raise ValueError("zipf/uniform: need num_ranks, num_experts, top_k >= 1, tokens_per_rank >= 0, "
                         f"top_k <= num_experts; got {num_ranks}, {num_experts}, {top_k}, {tokens_per_rank}")
    gen = _rng(rng)
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(s)
    popularity = gen.permutation(weights / weights.sum())
    return gen.multinomial(tokens_per_rank * top_k, popularity, size=num_ranks).astype(np.int64)


def scale_counts(base: np.ndarray, num_ranks: int, experts_per_rank: int, slots_per_rank: int) -> np.ndarray:
    """A traced layer ``base[..., R0, E0]`` scaled to ``num_ranks`` ranks and ``num_ranks · experts_per_rank``
    experts, deterministically:

    - experts: ``E = num_ranks · experts_per_rank`` must be a multiple of E0; trace expert ``e`` gets
      ``E / E0`` equal replicas-of-popularity ``e, e + E0, e + 2·E0, ...`` (so with the contiguous placement
      every group of ``E0 / experts_per_rank`` ranks holds the traced mix of experts);
    - ranks: rank ``r`` takes the distribution of trace rank ``r mod R0``, scaled to ``slots_per_rank`` slots
      (largest-remainder rounding: rows sum exactly; a rank with no traced slots becomes uniform).

    The expert popularity max/mean of each layer is kept (up to rounding).
    """
    base = np.asarray(base)
    r0, e0 = base.shape[-2:]
    num_experts = num_ranks * experts_per_rank
    if num_experts % e0:
        raise ValueError(f"scale_counts: num_ranks · experts_per_rank ({num_experts}) must be a multiple of the "
                         f"trace's {e0} experts")
    replicas = num_experts // e0
    row = base.astype(np.float64)
    totals = row.sum(-1, keepdims=True)
    share = np.divide(row, totals, out=np.full(row.shape, 1.0 / e0), where=totals > 0)
    exact = np.tile(share / replicas, replicas) * slots_per_rank  # [..., R0, E]: column j·E0 + e
    whole = np.floor(exact)
    short = (slots_per_rank - whole.sum(-1)).round().astype(np.int64)  # [..., R0]
    order = np.argsort(-(exact - whole), axis=-1, kind="stable")  # biggest remainders first
    rank_in_order = np.empty_like(order)
    np.put_along_axis(rank_in_order, order, np.arange(num_experts), axis=-1)
    scaled = whole.astype(np.int64) + (rank_in_order < short[..., None])
    return np.take(scaled, np.arange(num_ranks) % r0, axis=-2)


# ---------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LoadStats:
    """Skew of one or many layers (``[...]``): max/mean over experts of the global load, and max/mean over
    ranks of the slots each rank's experts receive."""

    expert_max_over_mean: np.ndarray
    rank_max_over_mean: np.ndarray


def load_stats(counts: np.ndarray, placement: np.ndarray | None = None) -> LoadStats:
    """Skew of ``counts[..., ranks, experts]``."""
    counts = np.asarray(counts, dtype=np.float64)
    p, e = counts.shape[-2:]
    expert_load = counts.sum(-2)
    rank_load = traffic_matrix(counts, 1, 1, placement).sum(-2)

    def ratio(x: np.ndarray) -> np.ndarray:
        mean = x.mean(-1)
        return np.divide(x.max(-1), mean, out=np.ones(mean.shape), where=mean > 0)

    return LoadStats(ratio(expert_load), ratio(rank_load))
