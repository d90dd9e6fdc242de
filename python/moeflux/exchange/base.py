"""What every part of the exchange shares: the experts' batch, the transport interface, the failed rank's probe."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops

if TYPE_CHECKING:
    from ..experts import GroupedExperts
    from .schedule import Schedule


@dataclass(frozen=True)
class ExpertBatch:
    """The rows this rank's experts must process, grouped by local expert (slot order)."""

    rows: Tensor  # [M, H]
    tokens_per_expert: Tensor  # [E_local] int32: rows of each local expert
    capacity: int | None  # rows each local expert owns (zero padded past its count); None: packed, dropless


class Transport(ABC):
    """How routed rows reach the experts that hold their *positions* (``rank * E_local + slot``: the placement
    has already mapped global expert ids) and come back.

    :meth:`dispatch` / :meth:`combine` are the bulk exchange split around the experts (differentiable ops, for
    callers that compute the experts themselves); :meth:`run` is the whole exchange around the experts in the
    stages of a :class:`~moeflux.exchange.schedule.Schedule`. ``routing_counts`` (``[P, E]`` on the host, what
    :func:`moeflux.ops.routing_counts` returned for these positions) lets a transport skip its own count
    exchange; ``capacity`` is the per-expert capacity of this rank's tokens, ``None`` for dropless routing
    (the positions already mark the slots it dropped, -1).
    """

    num_experts: int

    @property
    def groups(self) -> tuple[dist.ProcessGroup, ...]:
        """The process groups its collectives use (what :func:`moeflux.comm_stats` maps to nodes)."""
        return ()

    @abstractmethod
    def dispatch(self, tokens: Tensor, positions: Tensor, capacity: int | None,
                 routing_counts: Tensor | None = None) -> tuple[ExpertBatch, Any]:
        """``tokens [T, H]``, ``positions [T, k]`` (-1 dropped) -> the experts' batch and a plan."""

    @abstractmethod
    def combine(self, expert_out: Tensor, plan: Any, weights: Tensor | None) -> Tensor:
        """``expert_out [M, H]`` in the batch's order -> ``out[t] = sum_j weights[t, j] * expert_out(t, j)``."""

    @abstractmethod
    def run(self, tokens: Tensor, positions: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts, schedule: Schedule,
            routing_counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(output [T, H], tokens_per_local_expert [E_local] int32)``."""

    @abstractmethod
    def wire_bytes(self, counts: np.ndarray, row_bytes: int) -> float:
        """What one of its all-to-alls of ``counts [P, E]`` (rows each rank routes to each position, the same on
        every rank) costs on the wire, for :class:`moeflux.ShadowCostModel`: the bytes through its busiest port
        (rows of ``row_bytes``). Pure arithmetic on the counts, identical on every rank."""

    def join_failed(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        """This rank's input failed a check: take part in the first collective the other ranks wait in,
        sending ``probe`` (:func:`failed_probe`), so that they raise too. Errors of the joined collective are
        swallowed here: the caller raises its own. (Nothing to do without collectives.)"""


def failed_probe(x: Tensor, width: int, like: Tensor) -> Tensor:
    """What a rank whose input ``x`` failed the layer's checks sends into the exchange: no tokens, with a header
    no healthy peer sends (they send exactly the layer's ``width``, in whatever dtype autocast gave them): ``x``'s
    own width where it differs, else the layer's + 1; ``x``'s dtype where the exchange can carry it (a float
    one), else the layer's (``like``'s: its experts' weight). On the layer's device, where its collectives run."""
    hidden = x.shape[-1] if x.dim() > 0 else 0
    if hidden in (0, width):
        hidden = width + 1
    dtype = x.dtype if x.dtype.is_floating_point else like.dtype
    return torch.empty((0, hidden), dtype=dtype, device=like.device)


def swallow_errors(collective, *args, **kwargs) -> None:
    """Run a collective a failed rank joins (its peers raise in it; this rank raises its own error after)."""
    try:
        collective(*args, **kwargs)
    except RuntimeError:
        pass


def join_count_exchange(probe: Tensor, group: dist.ProcessGroup, counts_per_rank: int, num_experts: int) -> None:
    """A failed rank's part in the one count/header exchange its peers start with (every transport's first
    collective): no rows for anyone, and ``probe``'s header, which every peer rejects, naming this rank."""
    counts = torch.zeros((dist.get_world_size(group), counts_per_rank), dtype=torch.int64, device=probe.device)
    swallow_errors(ops.count_exchange, probe, counts, num_experts, group)
