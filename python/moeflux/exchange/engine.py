"""The exchange engine: routing -> shadowing (optional) -> a transport, in a schedule -> the layer's output.

The parts are independent: a :class:`~moeflux.exchange.base.Transport` (local, flat, hierarchical) moves rows
and owns the one count/header exchange; a :class:`~moeflux.exchange.schedule.Schedule` (bulk, chunked,
pairwise) says what each stage moves (the staged C++ engine runs it, calling the one expert op per stage);
:class:`~moeflux.exchange.shadowing.Shadowing` transforms the routing before the transport sees it. The
:class:`moeflux.ExpertPlacement` (global expert -> rank, slot) is shared with the experts and re-placement:
this engine maps expert ids to positions once, at the top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor

from ..placement import ExpertPlacement
from .base import Transport
from .schedule import Schedule
from .shadowing import ShadowPolicy, Shadowing

if TYPE_CHECKING:
    from ..experts import GroupedExperts


class ExchangeEngine:
    """One layer's exchange: ``run`` moves the tokens to their experts, computes them and brings them back."""

    def __init__(self, placement: ExpertPlacement, transport: Transport, schedule: Schedule,
                 shadowing: Shadowing | None = None) -> None:
        if transport.num_experts != placement.num_experts:
            raise ValueError(f"ExchangeEngine: the transport moves {transport.num_experts} experts, the placement "
                             f"holds {placement.num_experts}")
        self.placement, self.transport, self.schedule, self.shadowing = placement, transport, schedule, shadowing

    @property
    def groups(self) -> tuple[dist.ProcessGroup, ...]:
        """The process groups its collectives use (what :func:`moeflux.comm_stats` maps to nodes)."""
        return self.transport.groups

    @property
    def policy(self) -> ShadowPolicy | None:
        return None if self.shadowing is None else self.shadowing.policy

    @property
    def shadowed_experts(self) -> tuple[int, ...]:
        """The global experts the last forward shadowed."""
        return () if self.shadowing is None else self.shadowing.shadowed_experts

    def run(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts) -> tuple[Tensor, Tensor]:
        """``tokens [T, H]``, ``expert_ids [T, k]`` (global, -1 dropped), ``weights [T, k]`` (None: unweighted
        sum) -> ``(output [T, H], tokens_per_local_expert [E_local] int32)`` (shadowed tokens included)."""
        positions = self.placement.to_positions(expert_ids)
        if self.shadowing is None:
            return self.transport.run(tokens, positions, weights, capacity, experts, self.schedule)
        routing = self.shadowing.transform(tokens, positions, self.placement, experts)
        # The counts are those of the transformed routing: a flat transport skips its count exchange (and, given
        # counts, travels packed with a capacity too: the positions already mark the slots the capacity dropped).
        span = self.shadowing.start_transport(tokens)  # timed for a calibrated cost model
        out, _ = self.transport.run(tokens, routing.positions, weights, capacity, experts, self.schedule,
                                    routing.routing_counts)
        self.shadowing.transport_done(span, routing)
        return self.shadowing.add(out, routing, tokens, weights, experts), routing.routed_per_local_expert

    def join_failed_dispatch(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        """This rank's input failed a check: join the first collective its peers wait in (shadowing's count
        exchange, else the transport's) with ``probe`` (:func:`~moeflux.exchange.base.failed_probe`), so that
        they raise too instead of waiting."""
        if self.shadowing is not None:
            self.shadowing.join_failed(probe, top_k, self.placement.num_experts)
        else:
            self.transport.join_failed(probe, top_k, capacity)
