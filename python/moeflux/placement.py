"""Where each expert of a layer lives: global expert -> (rank of the expert-parallel group, local slot).

One object per MoE layer, shared by everything that needs to know: the
exchange (which rank a token's expert is on), the experts module (which global
experts its stacked weights hold, and the names they are saved under) and the
checkpoint code. Today's layout is the contiguous one (rank ``r`` holds
experts ``[r * E_local, (r + 1) * E_local)``); a placement may also be any
permutation with ``E_local`` experts per rank, which is what expert
re-placement (SmartMoE) changes between steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class ExpertPlacement:
    """Experts of one layer over the ``ep_size`` ranks of its expert-parallel group, ``E / ep_size`` per rank.

    ``expert_at[r * E_local + s]`` is the global expert in slot ``s`` of rank ``r``
    (default: the identity, i.e. contiguous blocks).
    """

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    expert_at: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"ExpertPlacement: num_experts must be a positive int, got {self.num_experts!r}")
        if not isinstance(self.ep_size, int) or self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(f"ExpertPlacement: ep_size must be a positive divisor of num_experts "
                             f"({self.num_experts}), got {self.ep_size!r}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ExpertPlacement: ep_rank must be in [0, ep_size={self.ep_size}), got {self.ep_rank}")
        if not self.expert_at:
            object.__setattr__(self, "expert_at", tuple(range(self.num_experts)))
        if sorted(self.expert_at) != list(range(self.num_experts)):
            raise ValueError(f"ExpertPlacement: expert_at must be a permutation of range({self.num_experts}), "
                             f"got {list(self.expert_at)}")

    @classmethod
    def from_ranks(cls, rank_experts: Sequence[Sequence[int]], ep_rank: int = 0) -> ExpertPlacement:
        """From the global experts of each rank, slot order: ``[[0, 5], [1, 2], ...]``."""
        flat = tuple(int(e) for experts in rank_experts for e in experts)
        return cls(len(flat), len(rank_experts), ep_rank, flat)

    @property
    def local_experts(self) -> int:
        """Experts per rank."""
        return self.num_experts // self.ep_size

    @property
    def is_contiguous(self) -> bool:
        """Rank ``r`` holds experts ``[r * E_local, (r + 1) * E_local)`` in order."""
        return self.expert_at == tuple(range(self.num_experts))

    def rank_of(self, expert: int) -> int:
        return self.expert_at.index(expert) // self.local_experts

    def slot_of(self, expert: int) -> int:
        return self.expert_at.index(expert) % self.local_experts

    def global_expert(self, slot: int, rank: int | None = None) -> int:
        """The global expert in ``slot`` of ``rank`` (default: this rank)."""
        rank = self.ep_rank if rank is None else rank
        return self.expert_at[rank * self.local_experts + slot]

    def experts_of(self, rank: int | None = None) -> tuple[int, ...]:
        """Global experts of ``rank`` (default: this rank), in slot order."""
        rank = self.ep_rank if rank is None else rank
        return self.expert_at[rank * self.local_experts:(rank + 1) * self.local_experts]

    def position_table(self, device: torch.device | str | None = None) -> Tensor:
        """``[E]`` int32: global expert -> ``rank * E_local + slot``, the id the exchange sends by."""
        table = torch.empty(self.num_experts, dtype=torch.int32)
        table[torch.tensor(self.expert_at)] = torch.arange(self.num_experts, dtype=torch.int32)
        return table.to(device)

    def to_positions(self, expert_ids: Tensor) -> Tensor:
        """Global expert ids ``[T, k]`` (``-1``: dropped) -> positions; the identity for the contiguous layout."""
        if self.is_contiguous:
            return expert_ids
        table = self.position_table(expert_ids.device)
        return torch.where(expert_ids >= 0, table[expert_ids.clamp(min=0).long()], expert_ids)
