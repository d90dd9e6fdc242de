"""The flat transport: every (token, expert) slot goes straight to its expert's rank and back, by all-to-all
over one process group."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ... import ops
from ...balance import flat_wire_bytes
from ..base import ExpertBatch, Transport, join_count_exchange

if TYPE_CHECKING:
    from ...experts import GroupedExperts
    from ..schedule import Schedule

# Test-only: with a capacity, the flat transport takes the GPUs' fixed-split path (``capacity`` rows per expert
# on the wire, ``capacity * group size`` rows per local expert) on the CPU too, so that CPU tests (the GPU
# suite's dry run, tests/test_expert_parallel.py) check it. Read in one place, :meth:`FlatTransport.wire_capacity`;
# not for use: on the CPU the packed path gives the same results faster.
FIXED_SPLITS_ON_CPU = False


class FlatTransport(Transport):
    """``num_experts`` positions over the ranks of ``group`` (rank ``r`` holds ``[r * E_local, (r + 1) *
    E_local)``).

    Dropless: one count/header exchange and one host synchronisation per layer (none when the caller passes
    the routing counts). With a capacity on a GPU, every rank sends ``capacity`` rows per expert: fixed splits,
    no count exchange, no host synchronisation, each local expert owning ``capacity * P`` rows of the batch.
    On the CPU there is no synchronisation to spare, so the tokens the capacity kept travel packed, as
    dropless ones do (the same outputs and gradients).

    Bulk: :func:`moeflux.ops.dispatch`, the experts, :func:`moeflux.ops.combine` (three differentiable ops,
    which torch.compile traces whole). Chunked and pairwise: the staged engine,
    :func:`moeflux.ops.pipelined_moe`, one C++ autograd function that overlaps every stage's all-to-alls with
    another stage's experts, forward and backward (torch.compile runs it eagerly: a graph break).
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.num_experts, self.group = num_experts, group
        self.size = dist.get_world_size(group)
        if num_experts % self.size:
            raise ValueError(f"FlatTransport: num_experts ({num_experts}) must be a multiple of the group's size "
                             f"({self.size})")

    @property
    def groups(self) -> tuple[dist.ProcessGroup, ...]:
        return (self.group,)

    def wire_bytes(self, counts: np.ndarray, row_bytes: int) -> float:
        """The busiest rank's ``max(sent, received)`` to other ranks (:func:`moeflux.balance.flat_wire_bytes`),
        for rows that travel packed (as the shadowed exchange's always do: it passes its counts)."""
        return flat_wire_bytes(counts, row_bytes)

    @staticmethod
    def wire_capacity(tokens: Tensor, capacity: int | None) -> int | None:
        """The capacity the exchange pads to: none on the CPU, where the positions already mark the dropped
        slots (-1) and the kept tokens travel packed; the layer's on a GPU (fixed splits, no host sync), and on
        the CPU too under the test-only :data:`FIXED_SPLITS_ON_CPU`."""
        return None if tokens.device.type == "cpu" and not FIXED_SPLITS_ON_CPU else capacity

    def dispatch(self, tokens: Tensor, positions: Tensor, capacity: int | None,
                 routing_counts: Tensor | None = None) -> tuple[ExpertBatch, ops.DispatchPlan]:
        capacity = None if routing_counts is not None else self.wire_capacity(tokens, capacity)
        rows, plan = ops.dispatch(tokens, positions, self.num_experts, capacity, self.group,
                                  routing_counts=routing_counts, agree_first=False)
        expert_capacity = None if capacity is None else capacity * self.size
        return ExpertBatch(rows, plan.tokens_per_local_expert, expert_capacity), plan

    def combine(self, expert_out: Tensor, plan: ops.DispatchPlan, weights: Tensor | None) -> Tensor:
        return ops.combine(expert_out, plan, weights)

    def run(self, tokens: Tensor, positions: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts, schedule: Schedule,
            routing_counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if schedule.staged:
            return self._run_staged(tokens, positions, weights, capacity, experts, schedule, routing_counts)
        batch, plan = self.dispatch(tokens, positions, capacity, routing_counts)
        out = self.combine(experts(batch.rows, batch.tokens_per_expert, batch.capacity), plan, weights)
        return out, batch.tokens_per_expert

    # torch.compile runs it eagerly (a graph break): its C++ autograd node keeps the stages' state in an opaque
    # object that a traced graph cannot hold.
    @torch.compiler.disable
    def _run_staged(self, tokens: Tensor, positions: Tensor, weights: Tensor | None, capacity: int | None,
                    experts: GroupedExperts, schedule: Schedule,
                    routing_counts: Tensor | None) -> tuple[Tensor, Tensor]:
        capacity = None if routing_counts is not None else self.wire_capacity(tokens, capacity)
        return ops.pipelined_moe(tokens, positions, weights, experts.w_in, experts.w_out, experts.activation,
                                 self.num_experts, capacity, self.group, schedule.name, schedule.chunks,
                                 schedule.group_size, experts.b_in, experts.b_out, routing_counts)

    def join_failed(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        # Dropless, the peers start with the count exchange, which compares every rank's hidden size and dtype:
        # joining it with no tokens makes it report the mismatch on every rank. (Capacity mode on a GPU has no
        # such exchange; on the CPU it travels dropless.)
        if self.wire_capacity(probe, capacity) is None:
            join_count_exchange(probe, self.group, self.num_experts // self.size, self.num_experts)
