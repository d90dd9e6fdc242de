"""Load-balancing policies: which experts to shadow this step (FasterMoE) and where experts should live
(SmartMoE). Pure host arithmetic on routing counts, identical on every rank given identical counts (and, for a
calibrated :class:`ShadowCostModel`, identical agreed :class:`Rates`); the mechanics that act on their choices
are :class:`moeflux.exchange.shadowing.Shadowing` (which also calibrates the rates:
:mod:`moeflux.exchange.calibration`) and :class:`moeflux.ExpertReplacement`.

Counts are indexed by *position* (``rank * E_local + slot``, see :class:`moeflux.ExpertPlacement`), so the
owner of position ``p`` is rank ``p // E_local``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .placement import ExpertPlacement


@dataclass(frozen=True)
class ExpertShape:
    """What one expert costs: bytes of a token row, bytes of the expert's parameters, FLOPs per row
    (forward + backward)."""

    row_bytes: int
    param_bytes: int
    flops_per_row: float

    @classmethod
    def of_ffn(cls, d_model: int, d_ffn: int, activation: str, element_size: int) -> ExpertShape:
        in_features = d_ffn if activation == "gelu" else 2 * d_ffn
        params = d_model * in_features + d_ffn * d_model
        return cls(d_model * element_size, params * element_size, 3 * 2.0 * params)  # fwd 2·params, bwd twice that


class WireCost(Protocol):
    """What a transport answers for the cost model (:meth:`moeflux.exchange.Transport.wire_bytes`)."""

    def wire_bytes(self, counts: np.ndarray, row_bytes: int) -> float:
        """Bytes through the busiest port of one of its all-to-alls of ``counts [P, E]`` rows."""


def flat_wire_bytes(counts: np.ndarray, row_bytes: int) -> float:
    """The flat all-to-all of ``counts [P, E]`` (rows each rank routes to each position): bytes through the
    busiest rank's port, ``max(bytes sent, bytes received)`` to other ranks (rows to its own experts stay)."""
    counts = np.asarray(counts, dtype=np.float64)
    world, num_experts = counts.shape
    to_rank = counts.reshape(world, world, num_experts // world).sum(2)  # [src, dst] rows
    remote = to_rank * (1 - np.eye(world))
    return float(max(remote.sum(1).max(), remote.sum(0).max()) * row_bytes)


@dataclass(frozen=True)
class Rates:
    """The rates one estimate uses: a :class:`ShadowCostModel`'s fixed ones (:attr:`ShadowCostModel.rates`), or
    those its layer measured and agreed (:class:`moeflux.exchange.calibration.ShadowCalibration`)."""

    link_bytes_per_s: float  # all-to-all: bytes through the busiest port (the transport's wire_bytes) per second
    shadow_bytes_per_s: float  # a shadow's broadcast (and its gradient's reduce): parameter bytes per second
    flops_per_s: float  # the busiest rank's expert compute
    latency_s: float  # per shadow collective


@dataclass(frozen=True)
class ShadowCostModel:
    """FasterMoE's choice of shadowed experts (PPoPP'22, §4): shadowing expert ``e`` costs a broadcast of its
    parameters and a reduce of its gradients; it saves that its tokens stop crossing the network and that
    their compute spreads over the ranks they come from, instead of piling up on the owner.

    A step's layer time is estimated as ``comm + compute + shadow``:

    - ``comm``: the four all-to-alls (dispatch, combine, both again in backward), each moving the transport's
      :meth:`~moeflux.exchange.Transport.wire_bytes` (without a transport, the flat all-to-all's: the busiest
      rank's ``max(bytes sent, bytes received)`` to other ranks, :func:`flat_wire_bytes`) at
      ``link_bytes_per_s``;
    - ``compute``: the busiest rank's expert rows (its own experts' tokens from every rank, plus its own tokens
      of shadowed experts) at ``flops_per_s``;
    - ``shadow``: a broadcast and a reduce of every shadowed expert's parameters at ``link_bytes_per_s``
      (calibrated: the measured broadcast rate, :attr:`Rates.shadow_bytes_per_s`), plus ``latency_s`` for each
      of those collectives (two weights, one broadcast and one reduce per owner).

    The candidates are the experts busier than the mean expert, from the most loaded (a colder one moves
    no more than its share); the shadows are the prefix of that order with the lowest estimate (shadowing
    several hot experts can pay when none pays alone, e.g. two equally hot experts on one rank), at most
    ``max_shadows`` (``None``: no limit). A step costs one ``O(P·E)`` estimate per candidate. Set the rates
    from the simulator's calibration of the cluster (:meth:`from_fitted_links`) or from the hardware.

    ``calibrate``: the layer measures the rates instead (its broadcasts, its all-to-alls, its shadows'
    compute: :mod:`moeflux.exchange.calibration`), agreed across its ranks and smoothed over steps, starting
    from these; what ``shadowing="auto"`` and an int build (:meth:`default_for`). Off, the rates are fixed.
    """

    link_bytes_per_s: float
    flops_per_s: float
    max_shadows: int | None = None
    latency_s: float = 0.0
    calibrate: bool = False

    def __post_init__(self) -> None:
        if not self.link_bytes_per_s > 0 or not self.flops_per_s > 0:
            raise ValueError(f"ShadowCostModel: link_bytes_per_s and flops_per_s must be > 0, got "
                             f"{self.link_bytes_per_s!r}, {self.flops_per_s!r}")
        if self.max_shadows is not None and (not isinstance(self.max_shadows, int) or self.max_shadows < 0):
            raise ValueError(f"ShadowCostModel: max_shadows must be an int >= 0 or None, got {self.max_shadows!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"ShadowCostModel: latency_s must be >= 0, got {self.latency_s!r}")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"ShadowCostModel: calibrate must be a bool, got {self.calibrate!r}")

    @classmethod
    def default_for(cls, device_type: str, max_shadows: int | None = None) -> ShadowCostModel:
        """Rough rates when nothing better is known: CPU ranks over 10 Gbit/s Ethernet (~50 GFLOP/s of
        fp32 per rank), GPUs over 400 Gbit/s InfiniBand (~400 TFLOP/s of bf16); calibrated by the layer from
        its first steps on (``calibrate=True``)."""
        if device_type == "cuda":
            return cls(400e9 / 8, 400e12, max_shadows, calibrate=True)
        return cls(10e9 / 8, 50e9, max_shadows, calibrate=True)

    @classmethod
    def from_fitted_links(cls, fitted: object, link_gbit_per_s: float, flops_per_s: float,
                          max_shadows: int | None = None) -> ShadowCostModel:
        """From :class:`moeflux.sim.calibrate.FittedLinks` (the calibrated testbed) at a link rate."""
        inter = fitted.inter(link_gbit_per_s)
        return cls(1.0 / inter.beta_s_per_byte, flops_per_s, max_shadows, inter.alpha_s + fitted.overhead_s)

    @property
    def rates(self) -> Rates:
        """Its fixed rates (a calibrated layer's prior)."""
        return Rates(self.link_bytes_per_s, self.link_bytes_per_s, self.flops_per_s, self.latency_s)

    def estimate_s(self, counts: np.ndarray, shadows: tuple[int, ...] | list[int], shape: ExpertShape,
                   transport: WireCost | None = None, rates: Rates | None = None) -> float:
        """Estimated layer time (s) for ``counts [P, E]`` (rows each rank routes to each position) with
        ``shadows`` (positions) computed where their tokens are, over ``transport`` (``None``: flat) at
        ``rates`` (``None``: :attr:`rates`)."""
        rates = self.rates if rates is None else rates
        wire_bytes = flat_wire_bytes if transport is None else transport.wire_bytes
        counts = np.asarray(counts, dtype=np.float64)
        world, num_experts = counts.shape
        local = num_experts // world
        shadowed = np.zeros(num_experts, dtype=bool)
        shadowed[list(shadows)] = True
        routed = np.where(shadowed, 0.0, counts)
        comm = 4 * wire_bytes(routed, shape.row_bytes) / rates.link_bytes_per_s
        rows_on_rank = routed.reshape(world, world, local).sum(2).sum(0) + np.where(shadowed, counts, 0.0).sum(1)
        compute = rows_on_rank.max() * shape.flops_per_row / rates.flops_per_s
        owners = len({p // local for p in shadows})
        shadow = 2 * len(shadows) * shape.param_bytes / rates.shadow_bytes_per_s + 4 * owners * rates.latency_s
        return float(comm + compute + shadow)

    def choose(self, counts: np.ndarray, shape: ExpertShape, transport: WireCost | None = None,
               rates: Rates | None = None) -> tuple[int, ...]:
        """The positions to shadow for ``counts [P, E]``, ascending (``transport``, ``rates``: as
        :meth:`estimate_s`)."""
        counts = np.asarray(counts, dtype=np.float64)
        load = counts.sum(0)
        limit = counts.shape[1] if self.max_shadows is None else self.max_shadows
        # Stable order: ties broken by position, so every rank makes the same choice.
        order = sorted(range(counts.shape[1]), key=lambda p: (-load[p], p))
        candidates = [p for p in order if load[p] > load.mean()][:limit]
        best, best_length = self.estimate_s(counts, [], shape, transport, rates), 0
        for length in range(1, len(candidates) + 1):
            estimate = self.estimate_s(counts, candidates[:length], shape, transport, rates)
            if estimate < best:
                best, best_length = estimate, length
        return tuple(sorted(candidates[:best_length]))


@dataclass(frozen=True)
class FixedShadows:
    """Always shadow the same global experts (tests, and experiments with a hand-picked set)."""

    experts: tuple[int, ...]

    def __post_init__(self) -> None:
        experts = tuple(self.experts)
        if any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in experts) or \
                len(set(experts)) != len(experts):
            raise ValueError(f"FixedShadows: experts must be distinct ints >= 0, got {self.experts!r}")
        object.__setattr__(self, "experts", experts)

    def choose_experts(self, placement: ExpertPlacement) -> tuple[int, ...]:
        """Their positions under ``placement``, ascending."""
        if any(e >= placement.num_experts for e in self.experts):
            raise ValueError(f"FixedShadows: experts must be < num_experts={placement.num_experts}, "
                             f"got {self.experts}")
        return tuple(sorted(placement.expert_at.index(e) for e in self.experts))


def rank_loads(load: np.ndarray, placement: ExpertPlacement) -> np.ndarray:
    """``[P]``: the summed load of each rank's experts, for ``load [E]`` per global expert."""
    load = np.asarray(load, dtype=np.float64)
    return np.array([load[list(placement.experts_of(r))].sum() for r in range(placement.ep_size)])


def greedy_placement(load: np.ndarray, placement: ExpertPlacement,
                     min_improvement: float = 0.05) -> ExpertPlacement | None:
    """SmartMoE's greedy re-placement (ATC'23, §4.2) from ``load [E]`` per global expert: experts from the
    most to the least loaded, each onto the least loaded rank that still has a free slot (ties: lowest rank,
    lowest expert). Accepted only if the busiest rank's load drops by at least ``min_improvement`` (a
    fraction: moving experts costs an all-to-all of their weights and optimizer state, which a 1% better
    balance does not repay); ``None`` otherwise.

    To move as few experts as possible, the new groups of experts are then matched to ranks so that the
    most experts stay where they are (an assignment problem, solved by
    ``scipy.optimize.linear_sum_assignment``), and an expert that stays on its rank keeps its slot.
    """
    load = np.asarray(load, dtype=np.float64)
    world, local = placement.ep_size, placement.local_experts
    if load.shape != (placement.num_experts,):
        raise ValueError(f"greedy_placement: load must have shape ({placement.num_experts},), got {load.shape}")
    if not 0 <= min_improvement < 1:
        raise ValueError(f"greedy_placement: min_improvement must be in [0, 1), got {min_improvement!r}")
    if world == 1:
        return None
    bins: list[list[int]] = [[] for _ in range(world)]
    bin_load = [0.0] * world
    open_bins = [(0.0, b) for b in range(world)]  # (load, rank) of the ranks with a free slot: a heap
    for expert in sorted(range(placement.num_experts), key=lambda e: (-load[e], e)):
        target_load, target = heapq.heappop(open_bins)
        bins[target].append(expert)
        bin_load[target] = target_load + load[expert]
        if len(bins[target]) < local:
            heapq.heappush(open_bins, (bin_load[target], target))
    if not max(bin_load) < rank_loads(load, placement).max() * (1 - min_improvement) - 1e-12:
        return None

    # Match groups to ranks by the overlap with what each rank holds now: a maximum-weight assignment.
    from scipy.optimize import linear_sum_assignment  # deterministic: same input, same answer on every rank

    old_rank = np.empty(placement.num_experts, dtype=np.int64)
    old_rank[list(placement.expert_at)] = np.arange(placement.num_experts) // local
    new_group = np.empty(placement.num_experts, dtype=np.int64)
    for b, experts in enumerate(bins):
        new_group[experts] = b
    overlap = np.bincount(old_rank * world + new_group, minlength=world * world).reshape(world, world)
    ranks, groups = linear_sum_assignment(overlap, maximize=True)
    group_of_rank = dict(zip(ranks.tolist(), groups.tolist()))
    expert_at: list[int] = []
    for r in range(world):
        group = set(bins[group_of_rank[r]])
        slots: list[int | None] = [e if e in group else None for e in placement.experts_of(r)]
        arriving = iter(sorted(group - set(slots)))
        expert_at.extend(e if e is not None else next(arriving) for e in slots)
    return ExpertPlacement(placement.num_experts, world, placement.ep_rank, tuple(expert_at))


def moved_experts(old: ExpertPlacement, new: ExpertPlacement) -> int:
    """Experts whose rank changes from ``old`` to ``new``."""
    return sum(old.rank_of(e) != new.rank_of(e) for e in range(old.num_experts))


def imbalance(load: np.ndarray, placement: ExpertPlacement) -> float:
    """Busiest rank's load / mean rank load (1.0: balanced)."""
    per_rank = rank_loads(load, placement)
    mean = per_rank.mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


__all__ = ["ExpertShape", "Rates", "WireCost", "flat_wire_bytes", "ShadowCostModel", "FixedShadows", "greedy_placement",
           "rank_loads", "moved_experts", "imbalance"]
