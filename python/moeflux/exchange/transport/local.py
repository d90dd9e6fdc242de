"""Every expert on this process: a scatter into rows grouped by expert and a weighted gather back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ... import ops
from ..base import ExpertBatch, Transport

if TYPE_CHECKING:
    from ...experts import GroupedExperts
    from ..schedule import Schedule


@dataclass(frozen=True)
class LocalPlan:
    row_map: Tensor  # [T, k] int32: row of each (token, slot) in the batch, -1 if dropped


class LocalTransport(Transport):
    """No collectives: nothing to overlap, so every schedule is the bulk one."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, tokens: Tensor, positions: Tensor, capacity: int | None,
                 routing_counts: Tensor | None = None) -> tuple[ExpertBatch, LocalPlan]:
        rows, tokens_per_expert, row_map = ops.permute(tokens, positions, self.num_experts, capacity)
        return ExpertBatch(rows, tokens_per_expert, capacity), LocalPlan(row_map)

    def combine(self, expert_out: Tensor, plan: LocalPlan, weights: Tensor | None) -> Tensor:
        return ops.unpermute(expert_out, plan.row_map, weights)

    def run(self, tokens: Tensor, positions: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts, schedule: Schedule,
            routing_counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch, plan = self.dispatch(tokens, positions, capacity)
        out = self.combine(experts(batch.rows, batch.tokens_per_expert, batch.capacity), plan, weights)
        return out, batch.tokens_per_expert

    def wire_bytes(self, counts: np.ndarray, row_bytes: int) -> float:
        return 0.0  # nothing crosses
