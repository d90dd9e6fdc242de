"""Shadowing (FasterMoE, PPoPP'22): a transform of the routing before any transport plans it.

Each forward, :func:`moeflux.ops.routing_counts` gives every rank the ``[P, E]`` routing counts (one small
all-to-all and the layer's one host synchronisation: a flat transport reuses them instead of exchanging counts
again); the policy picks the positions to shadow from them, the same on every rank (a
:class:`moeflux.ShadowCostModel`, or :class:`moeflux.FixedShadows`). The shadows' weights (and biases) are
broadcast from their owners (:func:`moeflux.ops.broadcast_expert_rows`), their slots are removed from the
positions (-1) and the counts, so that they never enter the transport, and :meth:`Shadowing.add` computes them
on the rank they come from with the one expert op. In backward their weight gradients are summed onto the
owners by autograd, so they are complete before the owners' gradient hooks (and :class:`moeflux.DataParallel`'s
buckets) see them. Outputs and gradients equal the unshadowed layer's up to the order of floating-point sums,
for every transport and schedule.

A :class:`moeflux.ShadowCostModel` estimates the all-to-alls with the transport's
:meth:`~moeflux.exchange.Transport.wire_bytes`; with ``calibrate=True`` (``shadowing="auto"``) its rates are
measured from the layer's own broadcasts, shadow compute and transport runs, agreed across the group and
smoothed over steps (:mod:`moeflux.exchange.calibration`: one tiny all-reduce every few forwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..balance import ExpertShape, FixedShadows, Rates, ShadowCostModel, WireCost, flat_wire_bytes
from ..placement import ExpertPlacement
from .base import swallow_errors
from .calibration import FLOP, SHADOW, WIRE, ShadowCalibration, Span

if TYPE_CHECKING:
    from ..experts import ExpertWeights, GroupedExperts

ShadowPolicy = Union[ShadowCostModel, FixedShadows]
FORWARD_SHARE = 1 / 3  # of ExpertShape.flops_per_row: the forward's (the backward's is twice it)


@dataclass(frozen=True)
class ShadowedRouting:
    """One forward's routing after the transform."""

    positions: Tensor  # [T, k] the slots the transport moves (shadowed ones -1)
    routing_counts: Tensor  # [P, E] int64 on the host, shadowed positions zeroed: what the transport moves
    routed_per_local_expert: Tensor  # [E_local] int32: this rank's experts' load, shadowed tokens included
    shadow_ids: Tensor | None  # [T, k] index of each slot's shadow (-1: not shadowed); None: no shadows
    shadow_weights: ExpertWeights | None  # the shadows' parameters, broadcast from their owners
    shape: ExpertShape  # the experts', for the calibration's measurements
    shadow_rows: int = 0  # this rank's rows of the shadows (computed here by add)


class Shadowing:
    """Applies ``policy`` over the expert-parallel ``group`` (see the module's docstring); ``transport``
    answers the cost model's :meth:`~moeflux.exchange.Transport.wire_bytes` (``None``: the flat all-to-all's)."""

    def __init__(self, policy: ShadowPolicy, group: dist.ProcessGroup, transport: WireCost | None = None) -> None:
        if not isinstance(policy, (ShadowCostModel, FixedShadows)):
            raise TypeError(f"shadowing: the policy must be a ShadowCostModel or FixedShadows, got {policy!r}")
        self.policy, self.group, self.transport = policy, group, transport
        self.calibration: ShadowCalibration | None = None
        if isinstance(policy, ShadowCostModel) and policy.calibrate:
            self.calibration = ShadowCalibration(policy, group)
        self.shadowed_experts: tuple[int, ...] = ()  # global experts shadowed by the last forward

    # Host arithmetic on the counts: torch.compile would trace numpy and recompile for each step's counts.
    @torch.compiler.disable
    def _choose(self, counts: Tensor, placement: ExpertPlacement, shape: ExpertShape,
                rates: Rates | None) -> list[int]:
        if isinstance(self.policy, FixedShadows):
            return list(self.policy.choose_experts(placement))
        return list(self.policy.choose(counts.numpy(), shape, self.transport, rates))

    def transform(self, tokens: Tensor, positions: Tensor, placement: ExpertPlacement,
                  experts: GroupedExperts) -> ShadowedRouting:
        num_experts, local = placement.num_experts, placement.local_experts
        # No agreement collective: num_experts was agreed at construction, and the shadows are chosen from
        # counts every rank holds. Hidden size and dtype are still compared, in the counts' exchange.
        counts = ops.routing_counts(tokens, positions, num_experts, self.group, agree_first=False)
        calibration = self.calibration
        rates = None if calibration is None else calibration.step(tokens.device)  # agreed: the same everywhere
        mine = slice(placement.ep_rank * local, (placement.ep_rank + 1) * local)
        routed_per_local_expert = counts[:, mine].sum(0).to(device=tokens.device, dtype=torch.int32)
        shape = ExpertShape.of_ffn(experts.d_model, experts.d_ffn, experts.activation, experts.w_in.element_size())
        shadows = self._choose(counts, placement, shape, rates)
        self.shadowed_experts = tuple(placement.expert_at[p] for p in shadows)
        if not shadows:
            return ShadowedRouting(positions, counts, routed_per_local_expert, None, None, shape)
        # Shadow index of each position (-1: not shadowed); index num_experts is for dropped slots.
        index_of = torch.full((num_experts + 1,), -1, dtype=torch.int32)
        index_of[shadows] = torch.arange(len(shadows), dtype=torch.int32)
        shadow_ids = index_of.to(positions.device)[torch.where(positions >= 0, positions, num_experts).long()]
        shadow_rows = int(counts[placement.ep_rank, shadows].sum())
        counts = counts.clone()
        counts[:, shadows] = 0
        span = None if calibration is None else calibration.start(tokens.device)
        weights = experts.weights().map(
            lambda w: ops.broadcast_expert_rows(w, shadows, self.group, agree_first=False))
        if calibration is not None:
            # The model's latency of these broadcasts (w_in and w_out, one per owner) is not bandwidth.
            owners = len({p // local for p in shadows})
            calibration.record(SHADOW, span, 2 * owners * rates.latency_s, len(shadows) * shape.param_bytes)
        return ShadowedRouting(torch.where(shadow_ids >= 0, -1, positions), counts, routed_per_local_expert,
                               shadow_ids, weights, shape, shadow_rows)

    @torch.compiler.disable
    def start_transport(self, tokens: Tensor) -> Span | None:
        """Before the transport's run of a transformed routing: its span, if calibrating."""
        return None if self.calibration is None else self.calibration.start(tokens.device)

    @torch.compiler.disable
    def transport_done(self, span: Span | None, routing: ShadowedRouting) -> None:
        """After it: the run's time, less the model's forward compute of its busiest rank, is its two
        all-to-alls' time (see :mod:`moeflux.exchange.calibration`)."""
        if span is None:
            return
        counts = routing.routing_counts.numpy()
        world = counts.shape[0]
        wire = self.transport.wire_bytes if self.transport is not None else flat_wire_bytes
        busiest_rows = float(counts.reshape(world, world, -1).sum(2).sum(0).max())
        compute_s = busiest_rows * routing.shape.flops_per_row * FORWARD_SHARE / self.calibration.rates.flops_per_s
        self.calibration.record(WIRE, span, compute_s, 2 * wire(counts, routing.shape.row_bytes))

    def add(self, out: Tensor, routing: ShadowedRouting, tokens: Tensor, weights: Tensor | None,
            experts: GroupedExperts) -> Tensor:
        """``out`` (the transport's output) plus the shadowed slots' expert outputs, computed here."""
        if routing.shadow_ids is None:
            return out
        shadows = routing.shadow_weights.w_in.shape[0]
        rows, counts, row_map = ops.permute(tokens, routing.shadow_ids, shadows)
        span = None if self.calibration is None else self.calibration.start(tokens.device)
        expert_out = experts(rows, counts, weights=routing.shadow_weights)
        if span is not None:
            forward_flops = routing.shadow_rows * routing.shape.flops_per_row * FORWARD_SHARE
            self.calibration.record(FLOP, span, 0.0, forward_flops)
        return out + ops.unpermute(expert_out, row_map, weights)

    def join_failed(self, probe: Tensor, top_k: int, num_experts: int) -> None:
        # The peers are in routing_counts (dropless or not), which compares hidden sizes and dtypes.
        no_ids = torch.empty((0, top_k), dtype=torch.int32, device=probe.device)
        swallow_errors(ops.routing_counts, probe, no_ids, num_experts, self.group, agree_first=False)
