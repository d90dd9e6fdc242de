"""α-β cost of the collectives of expert-parallel MoE training: all-to-all (direct, hierarchical), ring
all-reduce, and a step's time with or without overlap.

All-to-all model (both algorithms are a sequence of phases; a phase ends when its slowest rank is done, the
collective is the sum of its phases):

- A rank's own chunk (``traffic[r, r]``) is a local copy and costs nothing.
- Every rank posts one message to every peer of a phase, empty or not (a dense all-to-all), paying α each;
  latencies of different ranks overlap (each process has its own progress thread).
- Intra-node: each rank has its own full-duplex port, so its time is ``α·(peers) + β·max(sent, received)``.
- Inter-node: the bytes of the ``ranks_per_nic`` ranks that share a NIC (all ranks of a node with the default
  single NIC, as on the emulated testbed) go through that one link: ``α·(remote peers) + β·max(bytes the
  NIC sends, bytes it receives)``. Every rank of a NIC is charged the NIC's time (all its flows finish at
  about the same time under fair sharing) — exact for the collective's maximum.
- Intra- and inter-node traffic of a rank proceed concurrently: direct time of a rank = max(intra, inter).

Arrays may carry leading batch dimensions (``traffic [..., P, P]``): the result then has those dimensions,
so many placements or layers are costed in one vectorised call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .links import (ETH_1G, ETH_10G, ETH_25G, ETH_100G, IB_400G, LINK_PRESETS, NVLINK_H100, LinkClass,
                    Topology)

__all__ = [
    "LinkClass", "Topology", "LINK_PRESETS", "NVLINK_H100", "IB_400G", "ETH_100G", "ETH_25G", "ETH_10G", "ETH_1G",
    "Branch", "AllToAllBreakdown", "all_to_all_phases", "all_to_all_time", "all_to_all_breakdown",
    "uniform_traffic", "uniform_all_to_all_time", "algbw", "busbw_from_algbw", "ring_all_reduce_time",
    "moe_layer_all_to_all_time", "StepTime", "step_time",
]

Algorithm = Literal["direct", "hierarchical", "node_aware"]
ALGORITHMS: tuple[str, ...] = ("direct", "hierarchical", "node_aware")


@dataclass(frozen=True)
class Branch:
    """One concurrent part of a phase on one link class: per rank ``messages`` (α's) and the ``bytes`` that β
    multiplies (the busier direction of the rank's port or its NIC). Time = α·messages + β·bytes."""

    link: Literal["intra", "inter"]
    messages: np.ndarray  # [..., P] (broadcastable)
    bytes: np.ndarray  # [..., P]

    def time_s(self, topo: Topology) -> np.ndarray:
        link = topo.intra if self.link == "intra" else topo.inter
        return link.alpha_s * self.messages + link.beta_s_per_byte * self.bytes


Phase = tuple[Branch, ...]


@dataclass(frozen=True)
class _Traffic:
    """Per-rank byte counts of a traffic matrix, excluding each rank's chunk to itself."""

    sent_intra: np.ndarray
    received_intra: np.ndarray
    sent_inter: np.ndarray
    received_inter: np.ndarray
    node_out: np.ndarray  # [..., nodes] bytes leaving each node
    node_in: np.ndarray  # [..., nodes]


def _check_traffic(traffic: np.ndarray, topo: Topology) -> np.ndarray:
    t = np.asarray(traffic, dtype=np.float64)
    p = topo.world
    if t.ndim < 2 or t.shape[-2:] != (p, p):
        raise ValueError(f"traffic must have shape [..., {p}, {p}] for a topology of {p} ranks, got {t.shape}")
    if t.size and not t.min() >= 0:  # one pass; NaN fails too
        raise ValueError("traffic must hold bytes >= 0 (and no NaN)")
    return t


def _traffic_stats(t: np.ndarray, topo: Topology) -> _Traffic:
    n, r, p = topo.nodes, topo.ranks_per_node, topo.world
    batch = t.shape[:-2]
    self_bytes = np.diagonal(t, axis1=-2, axis2=-1)
    sent = t.sum(-1) - self_bytes
    received = t.sum(-2) - self_bytes
    blocks = t.reshape(*batch, n, r, n, r)
    intra = np.einsum("...mimj->...mij", blocks)  # [..., nodes, r, r]: the diagonal (same-node) blocks
    sent_intra = intra.sum(-1).reshape(*batch, p) - self_bytes
    received_intra = intra.sum(-2).reshape(*batch, p) - self_bytes
    sent_inter = np.maximum(sent - sent_intra, 0.0)
    received_inter = np.maximum(received - received_intra, 0.0)
    return _Traffic(sent_intra, received_intra, sent_inter, received_inter,
                    sent_inter.reshape(*batch, n, r).sum(-1), received_inter.reshape(*batch, n, r).sum(-1))


def _per_nic(per_rank: np.ndarray, topo: Topology) -> np.ndarray:
    """Sum over the ranks sharing each NIC, repeated back to every rank of the NIC."""
    g = topo.ranks_per_nic
    batch = per_rank.shape[:-1]
    shared = per_rank.reshape(*batch, topo.world // g, g).sum(-1, keepdims=True)
    return np.broadcast_to(shared, (*batch, topo.world // g, g)).reshape(*batch, topo.world)


def _per_rank_of_node(per_node: np.ndarray, topo: Topology) -> np.ndarray:
    return np.repeat(per_node, topo.ranks_per_node, axis=-1)


def _transposed(s: _Traffic) -> _Traffic:
    """The stats of ``traffic.T`` (combine after dispatch): directions swap."""
    return _Traffic(s.received_intra, s.sent_intra, s.received_inter, s.sent_inter, s.node_in, s.node_out)


def _node_aware_phases(t: np.ndarray, s: _Traffic, topo: Topology, dedup: float | np.ndarray) -> list[Phase]:
    """Source (n, i) -> destination (m, j) goes over the rail to (m, i), which relays it to (m, j)."""
    n, r, p = topo.nodes, topo.ranks_per_node, topo.world
    batch = t.shape[:-2]
    blocks = t.reshape(*batch, n, r, n, r)
    from_rail = np.swapaxes(blocks.sum(-1).sum(-3), -1, -2)  # [..., m, i]: from (any node, i) to node m
    rail_in = np.maximum(from_rail - np.einsum("...mimj->...mi", blocks), 0.0).reshape(*batch, p)
    relayed = np.swapaxes(blocks.sum(-4), -3, -2)  # [..., m, i, j]: relay (m, i) to (m, j), from every node
    relay_self = np.einsum("...mii->...mi", relayed)
    relay_sent = (relayed.sum(-1) - relay_self).reshape(*batch, p)
    relay_received = (relayed.sum(-2) - relay_self).reshape(*batch, p)
    keep = 1.0 - np.asarray(dedup, dtype=np.float64)[..., None]
    rail = Branch("inter", np.full(p, float(n - 1)),
                  keep * np.maximum(_per_nic(s.sent_inter, topo), _per_nic(rail_in, topo)))
    relay = Branch("intra", np.full(p, float(r - 1)), np.maximum(relay_sent, relay_received))
    return [(rail,), (relay,)]


def all_to_all_phases(traffic: np.ndarray, topo: Topology, algorithm: Algorithm = "direct",
                      dedup: float = 0.0) -> tuple[list[Phase], _Traffic]:
    """The phases of an all-to-all of ``traffic[..., src, dst]`` bytes, as α/β terms per rank (no link
    parameters yet: calibration fits them from these terms).

    ``hierarchical`` (node-aware, Tutel 2D / DeepEP style): (A) each rank hands its remote-bound bytes to the
    local relays over intra links, the node's bytes for each remote node spread evenly over its ranks, while
    same-node traffic is delivered directly; (B) relay ``i`` of node ``m`` sends to relay ``i`` of each other node
    (one message per remote node); (C) the destination relays fan the bytes out over intra links.
    ``dedup`` is the fraction of inter-node bytes saved in (A) and (B) because a token routed to several experts
    of one remote node crosses once (it is duplicated again in (C)).

    ``node_aware`` (moeflux's :class:`moeflux.exchange.transport.hierarchical.HierarchicalTransport`): (B) each rank sends its own
    remote-bound bytes to the rank with its local index on each other node (its rail; one message per remote
    node); then (C) every rank relays what it received, and its own same-node traffic, to the ranks of its node
    that hold the experts. ``dedup`` (a float, or an array of the traffic's batch shape) is the fraction of (B)'s
    bytes saved by sending a token once per node.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if not np.all((np.asarray(dedup) >= 0.0) & (np.asarray(dedup) < 1.0)):
        raise ValueError(f"dedup must be in [0, 1), got {dedup!r}")
    if np.ndim(dedup) and algorithm != "node_aware":
        raise ValueError(f"dedup must be a float for the {algorithm} algorithm (an array only for node_aware)")
    t = _check_traffic(traffic, topo)
    s = _traffic_stats(t, topo)
    if algorithm == "node_aware":
        return _node_aware_phases(t, s, topo, dedup), s
    return _phases(s, topo, algorithm, dedup), s


def _phases(s: _Traffic, topo: Topology, algorithm: Algorithm, dedup: float) -> list[Phase]:
    n, r, p = topo.nodes, topo.ranks_per_node, topo.world
    intra_peers = float(r - 1)
    if algorithm == "direct":
        if dedup:
            raise ValueError("dedup applies to the hierarchical algorithm only")
        intra = Branch("intra", np.full(p, intra_peers), np.maximum(s.sent_intra, s.received_intra))
        inter = Branch("inter", np.full(p, float(p - r)),
                       np.maximum(_per_nic(s.sent_inter, topo), _per_nic(s.received_inter, topo)))
        return [(intra, inter)]

    keep = 1.0 - dedup
    spread = (r - 1) / r  # share of a rank's relayed bytes that move to another local rank
    node_out = _per_rank_of_node(s.node_out, topo)
    node_in = _per_rank_of_node(s.node_in, topo)
    # Each source spreads its remote-bound bytes evenly over the r relays of its node (1/r stays with itself).
    gather = Branch("intra", np.full(p, intra_peers),
                    np.maximum(s.sent_intra + keep * s.sent_inter * spread,
                               s.received_intra + keep * (node_out - s.sent_inter) / r))
    # Each relay carries 1/r of its node's remote bytes; ranks_per_nic relays share a NIC.
    cross = Branch("inter", np.full(p, float(n - 1)),
                   keep * np.maximum(node_out, node_in) / r * topo.ranks_per_nic)
    fan_out = Branch("intra", np.full(p, intra_peers if n > 1 else 0.0),
                     np.maximum((node_in - s.received_inter) / r, s.received_inter * spread))
    return [(gather,), (cross,), (fan_out,)]


@dataclass(frozen=True)
class AllToAllBreakdown:
    """Where an all-to-all's time goes. Per-rank arrays are ``[..., P]``; "rank bytes" is the busier direction
    of a rank, ``max(sent, received)``, excluding its chunk to itself; the mean is that of a balanced rank."""

    time_s: np.ndarray  # [...]: the collective (sum over phases of the slowest rank)
    phase_time_s: tuple[np.ndarray, ...]  # [...] per phase
    rank_time_s: np.ndarray  # [..., P]: sum over phases of the rank's own time
    intra_time_s: np.ndarray  # [..., P]: the rank's intra-node terms (summed over phases)
    inter_time_s: np.ndarray  # [..., P]: its inter-node terms (its NIC's, when shared)
    bytes_sent_intra: np.ndarray
    bytes_sent_inter: np.ndarray
    bytes_received_intra: np.ndarray
    bytes_received_inter: np.ndarray
    slowest_rank: np.ndarray  # [...] int: argmax of rank_time_s; ties (ranks sharing a NIC) go to the most bytes

    @property
    def rank_bytes(self) -> np.ndarray:
        return np.maximum(self.bytes_sent_intra + self.bytes_sent_inter,
                          self.bytes_received_intra + self.bytes_received_inter)

    @property
    def slowest_rank_bytes(self) -> np.ndarray:
        return np.take_along_axis(self.rank_bytes, self.slowest_rank[..., None], -1)[..., 0]

    @property
    def mean_rank_bytes(self) -> np.ndarray:
        """Bytes a rank would move with the traffic spread evenly: off-rank total / P (sent = received)."""
        return (self.bytes_sent_intra + self.bytes_sent_inter).mean(-1)

    @property
    def slowest_over_mean_bytes(self) -> np.ndarray:
        """Bytes of the slowest rank / mean rank bytes (1 for uniform traffic)."""
        return _ratio(self.slowest_rank_bytes, self.mean_rank_bytes)

    @property
    def max_over_mean_bytes(self) -> np.ndarray:
        """Busiest rank's bytes / mean rank bytes."""
        return _ratio(self.rank_bytes.max(-1), self.mean_rank_bytes)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.ones(np.broadcast(a, b).shape), where=np.asarray(b) > 0)


def _scalar(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


def all_to_all_breakdown(traffic: np.ndarray, topo: Topology, algorithm: Algorithm = "direct",
                         dedup: float = 0.0) -> AllToAllBreakdown:
    """Per-rank and per-phase times and bytes of an all-to-all of ``traffic[..., src, dst]`` bytes."""
    phases, s = all_to_all_phases(traffic, topo, algorithm, dedup)
    batch = s.sent_intra.shape[:-1]
    zeros = np.zeros((*batch, topo.world))
    rank_time, intra_time, inter_time, phase_times = zeros, zeros, zeros, []
    for phase in phases:
        times = {b.link: np.broadcast_to(b.time_s(topo), zeros.shape) for b in phase}
        per_rank = np.maximum(times.get("intra", zeros), times.get("inter", zeros))
        phase_times.append(per_rank.max(-1))
        rank_time = rank_time + per_rank
        intra_time = intra_time + times.get("intra", zeros)
        inter_time = inter_time + times.get("inter", zeros)
    rank_bytes = np.maximum(s.sent_intra + s.sent_inter, s.received_intra + s.received_inter)
    slowest = np.argmax(np.where(rank_time >= rank_time.max(-1, keepdims=True), rank_bytes, -1.0), axis=-1)
    return AllToAllBreakdown(
        time_s=np.sum(phase_times, axis=0), phase_time_s=tuple(phase_times), rank_time_s=rank_time,
        intra_time_s=intra_time, inter_time_s=inter_time, bytes_sent_intra=s.sent_intra,
        bytes_sent_inter=s.sent_inter, bytes_received_intra=s.received_intra, bytes_received_inter=s.received_inter,
        slowest_rank=slowest)


def all_to_all_time(traffic: np.ndarray, topo: Topology, algorithm: Algorithm = "direct",
                    dedup: float = 0.0) -> float | np.ndarray:
    """Seconds of an all-to-all of ``traffic[..., src, dst]`` bytes (float, or ``[...]`` for batched input)."""
    phases, _ = all_to_all_phases(traffic, topo, algorithm, dedup)
    return _scalar(_time(phases, topo))


def _time(phases: list[Phase], topo: Topology) -> np.ndarray:
    total = 0.0
    for phase in phases:
        total = total + functools.reduce(np.maximum, [b.time_s(topo) for b in phase]).max(-1)
    return np.asarray(total)


def uniform_traffic(world: int, bytes_per_rank: float) -> np.ndarray:
    """nccl-tests' all-to-all: every rank sends ``bytes_per_rank / world`` to every rank, itself included."""
    return np.full((world, world), bytes_per_rank / world, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def uniform_all_to_all_time(bytes_per_rank: float, topo: Topology, algorithm: Algorithm = "direct") -> float:
    """Model time of a uniform all-to-all of ``bytes_per_rank`` per rank (cached: the count exchange of every
    layer asks the same). On one flat link class this is ``(n-1)/n · bytes_per_rank · β + (n-1)·α``, so bus
    bandwidth -> link bandwidth as α -> 0."""
    return float(all_to_all_time(uniform_traffic(topo.world, bytes_per_rank), topo, algorithm))


def algbw(bytes_per_rank: float, time_s: float) -> float:
    """nccl-tests' algorithm bandwidth: bytes per rank / time (bytes/s)."""
    return bytes_per_rank / time_s


def busbw_from_algbw(algbw_bytes_per_s: float, n: int) -> float:
    """nccl-tests' all-to-all bus bandwidth: ``algbw · (n-1)/n`` (the share of the data that leaves a rank)."""
    return algbw_bytes_per_s * (n - 1) / n


def ring_all_reduce_time(nbytes: float, topo: Topology) -> float:
    """Ring all-reduce of ``nbytes`` per rank: ``2(n-1)/n · nbytes · β_b + 2(n-1) · α_b``.

    Bottleneck: the inter-node link when there is more than one node (one ring per NIC, as NCCL runs one
    channel per NIC, so a node's ``nics_per_node`` links together carry ``1/nics`` each), else the intra link.
    """
    n = topo.world
    if n == 1 or nbytes == 0:
        return 0.0
    betas = []
    if topo.ranks_per_node > 1:
        betas.append(topo.intra.beta_s_per_byte)
    if topo.nodes > 1:
        betas.append(topo.inter.beta_s_per_byte / topo.nics_per_node)
    alpha = topo.inter.alpha_s if topo.nodes > 1 else topo.intra.alpha_s
    return 2 * (n - 1) / n * nbytes * max(betas) + 2 * (n - 1) * alpha


def moe_layer_all_to_all_time(traffic: np.ndarray, topo: Topology, algorithm: Algorithm = "direct",
                              dedup: float = 0.0, count_bytes_per_peer: float = 0.0) -> float | np.ndarray:
    """One MoE layer's all-to-alls in one training step, ``traffic`` being the dispatch bytes [..., src, dst]:
    dispatch and combine forward, their gradients backward (``2·t(T) + 2·t(Tᵀ)``), plus the dropless count
    exchange (a uniform all-to-all of ``count_bytes_per_peer`` to each peer; 0 to leave it out)."""
    phases, stats = all_to_all_phases(traffic, topo, algorithm, dedup)
    forward = _time(phases, topo)
    # The direct model only sees max(sent, received) per port / NIC, so t(Tᵀ) = t(T); node_aware's combine
    # retraces its dispatch's route backwards (relay, then rail), whose phases cost the same. Tutel's 2D
    # all-to-all of the combine gathers on the experts' node: its phases are those of Tᵀ.
    backward = forward if algorithm != "hierarchical" else _time(_phases(_transposed(stats), topo, algorithm, dedup),
                                                                 topo)
    total = 2 * forward + 2 * backward
    if count_bytes_per_peer:
        # node_aware: its header goes straight to every rank of the group (the node's own count exchange is
        # left out: one intra-node message per rank pair)
        count_algorithm = "direct" if algorithm == "node_aware" else algorithm
        total = total + uniform_all_to_all_time(count_bytes_per_peer * topo.world, topo, count_algorithm)
    return _scalar(total)


@dataclass(frozen=True)
class StepTime:
    """A step's time and what of its communication is exposed."""

    compute_s: float
    all_to_all_s: float
    all_reduce_s: float
    exposed_all_to_all_s: float
    exposed_all_reduce_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_all_to_all_s + self.exposed_all_reduce_s

    @property
    def all_to_all_share(self) -> float:
        """Exposed all-to-all time / step time."""
        return self.exposed_all_to_all_s / self.total_s if self.total_s > 0 else 0.0


def step_time(compute_s: float, a2a_s: float, allreduce_s: float, overlap: bool = False,
              a2a_hidden_fraction: float = 0.0) -> StepTime:
    """Step time from its parts.

    Without overlap, the sum. With overlap, compute is a window that hides communication, up to its length:
    first the ``a2a_hidden_fraction`` of the all-to-all that a pipelined implementation can overlap (the rest is
    on the critical path: experts wait for their tokens), then the all-reduce (gradient buckets reduce while
    backward runs). Whatever does not fit is exposed.
    """
    if min(compute_s, a2a_s, allreduce_s) < 0:
        raise ValueError("step_time: times must be >= 0")
    if not 0.0 <= a2a_hidden_fraction <= 1.0:
        raise ValueError(f"step_time: a2a_hidden_fraction must be in [0, 1], got {a2a_hidden_fraction!r}")
    if not overlap:
        return StepTime(compute_s, a2a_s, allreduce_s, a2a_s, allreduce_s)
    hideable_a2a = a2a_s * a2a_hidden_fraction
    exposed_a2a = a2a_s - hideable_a2a + max(0.0, hideable_a2a - compute_s)
    window_left = max(0.0, compute_s - hideable_a2a)
    return StepTime(compute_s, a2a_s, allreduce_s, exposed_a2a, max(0.0, allreduce_s - window_left))


def pipelined_layer_time(a2a_s: float, expert_s: float, stages: int) -> float:
    """One direction (forward or backward) of a MoE layer whose all-to-alls (``a2a_s``: dispatch + combine)
    and expert compute (``expert_s``) are split into ``stages`` equal stages that overlap (moeflux's chunked
    schedule): the first stage's dispatch, the last stage's experts and combine are not hidden; in between,
    the slower of communication and compute sets the pace. ``stages=1`` is the bulk layer: the sum.

        t = (a2a + experts) / S + (S - 1) / S * max(a2a, experts)
    """
    if stages < 1 or min(a2a_s, expert_s) < 0:
        raise ValueError(f"pipelined_layer_time: need stages >= 1 and times >= 0, got {stages}, {a2a_s}, {expert_s}")
    return (a2a_s + expert_s) / stages + (stages - 1) / stages * max(a2a_s, expert_s)
