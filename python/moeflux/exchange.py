"""How a MoE layer's routed tokens reach their experts and come back: one class per strategy.

The layer does ``routing -> exchange.dispatch -> experts -> exchange.combine``;
everything about moving tokens (which rank holds an expert, collectives, how
the experts' rows are laid out) lives behind this interface, so a new
strategy (pipelined, shadowed, hierarchical, ...) is a new class, not a branch
in :meth:`moeflux.MoE.forward`.

- :class:`LocalExchange`: every expert on this process: permute / unpermute.
- :class:`AllToAllExchange`: experts split over an expert-parallel group:
  dispatch / combine, one all-to-all each way (plus the count exchange when
  dropless).
- :class:`PipelinedExchange`: the same group, in stages whose all-to-alls
  overlap the experts of another stage (``"chunked"``: Lina; ``"pairwise"``:
  FasterMoE); it owns the expert compute too, in one C++ autograd function.
- :class:`ShadowedExchange`: the bulk all-to-all, except that the experts a
  policy picks each step (FasterMoE's shadows: the hot ones) are copied to
  every rank and their tokens computed where they are.
- :class:`moeflux.hierarchical.HierarchicalExchange`: node-aware: each token
  crosses to a remote node once (to this rank's peer there), then fans out to
  its experts inside that node.

Both read the layer's :class:`moeflux.ExpertPlacement` to turn global expert
ids into the positions the ops send by (rank * E_local + slot).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .balance import ExpertShape, FixedShadows, ShadowCostModel
from .placement import ExpertPlacement
from .topology import NodeGroups

if TYPE_CHECKING:
    from .experts import GroupedExperts

# Test-only: with a capacity, the flat and pipelined exchanges take the GPUs' fixed-split path (``capacity``
# rows per expert on the wire, ``capacity * ep_size`` rows per local expert) on the CPU too, so that CPU tests
# (tests/test_expert_parallel.py, the GPU suite's dry run) check it. Read in one place,
# :meth:`AllToAllExchange._wire_capacity`; not for use: on the CPU the packed path gives the same results faster.
FIXED_SPLITS_ON_CPU = False


@dataclass(frozen=True)
class ExpertBatch:
    """The rows this rank's experts must process, grouped by local expert (slot order)."""

    rows: Tensor  # [M, H]
    tokens_per_expert: Tensor  # [E_local] int32: rows of each local expert
    capacity: int | None  # rows each local expert owns (zero padded past its count); None: packed, dropless


class Exchange(ABC):
    """Moves one layer's tokens to its experts (:meth:`dispatch`) and their outputs back (:meth:`combine`).

    ``dispatch`` returns the experts' :class:`ExpertBatch` and an opaque plan;
    ``combine`` takes the experts' output rows (same order as the batch) and
    the plan, and returns ``out[t] = sum_j weights[t, j] * expert_output(t, j)``.
    Both are differentiable. ``capacity`` is the per-expert capacity of this
    rank's tokens (:meth:`moeflux.MoE.capacity`), ``None`` for dropless routing.
    """

    def __init__(self, placement: ExpertPlacement) -> None:
        self.placement = placement

    @property
    def groups(self) -> tuple[dist.ProcessGroup, ...]:
        """The process groups its collectives use (what :func:`moeflux.comm_stats` maps to nodes)."""
        return ()

    @abstractmethod
    def dispatch(self, tokens: Tensor, expert_ids: Tensor, capacity: int | None) -> tuple[ExpertBatch, Any]:
        """``tokens [T, H]``, ``expert_ids [T, k]`` (global ids, -1 dropped) -> the experts' batch and a plan."""

    @abstractmethod
    def combine(self, expert_out: Tensor, plan: Any, weights: Tensor | None) -> Tensor:
        """``expert_out [M, H]`` in the batch's order -> ``[T, H]``."""

    def run(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts) -> tuple[Tensor, Tensor]:
        """The whole exchange around the experts: ``(output [T, H], tokens_per_local_expert)``.
        Strategies that overlap communication with the experts override it."""
        batch, plan = self.dispatch(tokens, expert_ids, capacity)
        out = self.combine(experts(batch.rows, batch.tokens_per_expert, batch.capacity), plan, weights)
        return out, batch.tokens_per_expert

    def join_failed_dispatch(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        """This rank's input failed a check: take part in what the other ranks are waiting in, sending ``probe``
        (:func:`failed_probe`: no tokens, a header no healthy rank sends), so that they raise too instead of
        waiting (nothing to do without collectives). Errors of the joined collective are swallowed here: the
        caller raises its own."""

    def _positions(self, expert_ids: Tensor) -> Tensor:
        return self.placement.to_positions(expert_ids)


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


@dataclass(frozen=True)
class LocalPlan:
    row_map: Tensor  # [T, k] int32: row of each (token, slot) in the batch, -1 if dropped


class LocalExchange(Exchange):
    """All experts on this process: a scatter into rows grouped by expert and a weighted gather back."""

    def __init__(self, placement: ExpertPlacement) -> None:
        if placement.ep_size != 1:
            raise ValueError(f"LocalExchange holds every expert: placement.ep_size must be 1, got {placement.ep_size}")
        super().__init__(placement)

    def dispatch(self, tokens: Tensor, expert_ids: Tensor, capacity: int | None) -> tuple[ExpertBatch, LocalPlan]:
        rows, tokens_per_expert, row_map = ops.permute(
            tokens, self._positions(expert_ids), self.placement.num_experts, capacity)
        return ExpertBatch(rows, tokens_per_expert, capacity), LocalPlan(row_map)

    def combine(self, expert_out: Tensor, plan: LocalPlan, weights: Tensor | None) -> Tensor:
        return ops.unpermute(expert_out, plan.row_map, weights)


class AllToAllExchange(Exchange):
    """Experts split over the ``ep_size`` ranks of ``group``: every token goes straight to its expert's rank
    and back by all-to-all (:func:`moeflux.ops.dispatch` / :func:`moeflux.ops.combine`).

    Dropless: a count exchange and one host synchronisation per dispatch (to size the all-to-all). With a
    capacity on a GPU, every rank sends ``capacity`` rows per expert: fixed splits, no host synchronisation,
    and each local expert owns ``capacity * ep_size`` rows of the batch. On the CPU there is no
    synchronisation to spare, so the tokens the capacity kept travel packed, as dropless ones do: no padding
    rows on the wire or in the experts' GEMMs (the same outputs and gradients).
    """

    def __init__(self, placement: ExpertPlacement, group: dist.ProcessGroup) -> None:
        if placement.ep_size != dist.get_world_size(group):
            raise ValueError(f"AllToAllExchange: placement.ep_size ({placement.ep_size}) must equal the size of the "
                             f"expert-parallel group ({dist.get_world_size(group)})")
        super().__init__(placement)
        self.group = group

    @property
    def groups(self) -> tuple[dist.ProcessGroup, ...]:
        return (self.group,)

    @staticmethod
    def _wire_capacity(tokens: Tensor, capacity: int | None) -> int | None:
        """The capacity the exchange pads to: none on the CPU, where the ids already mark the dropped slots
        (-1) and the kept tokens travel packed; the layer's on a GPU (fixed splits, no host sync), and on the
        CPU too under the test-only :data:`FIXED_SPLITS_ON_CPU`."""
        return None if tokens.device.type == "cpu" and not FIXED_SPLITS_ON_CPU else capacity

    def dispatch(self, tokens: Tensor, expert_ids: Tensor,
                 capacity: int | None) -> tuple[ExpertBatch, ops.DispatchPlan]:
        capacity = self._wire_capacity(tokens, capacity)
        rows, plan = ops.dispatch(tokens, self._positions(expert_ids), self.placement.num_experts, capacity,
                                  self.group, agree_first=False)
        expert_capacity = None if capacity is None else capacity * self.placement.ep_size
        return ExpertBatch(rows, plan.tokens_per_local_expert, expert_capacity), plan

    def combine(self, expert_out: Tensor, plan: ops.DispatchPlan, weights: Tensor | None) -> Tensor:
        return ops.combine(expert_out, plan, weights)

    def join_failed_dispatch(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        # Dropless dispatch starts with the count exchange, which also compares every rank's hidden size and
        # dtype: joining it with no tokens makes it report the mismatch on every rank. (Capacity mode on a GPU
        # has no such exchange yet; on the CPU it travels dropless.)
        if self._wire_capacity(probe, capacity) is None:
            no_ids = torch.empty((0, top_k), dtype=torch.int32, device=probe.device)
            try:
                ops.dispatch(probe, no_ids, self.placement.num_experts, None, self.group, agree_first=False)
            except RuntimeError:
                pass


class PipelinedExchange(AllToAllExchange):
    """:class:`AllToAllExchange` in stages (:func:`moeflux.ops.pipelined_moe`): ``schedule="chunked"`` splits
    every block of rows into ``chunks`` parts, ``"pairwise"`` exchanges with one group of ``group_size`` ranks
    per stage. Dispatch, the experts' FFN and combine run in one C++ autograd function, so that backward
    overlaps the gradient all-to-alls with the experts' backward too. Outputs and gradients equal the bulk
    exchange's (the expert weight gradients are summed stage by stage)."""

    SCHEDULES = ("chunked", "pairwise")

    def __init__(self, placement: ExpertPlacement, group: dist.ProcessGroup, schedule: str = "chunked",
                 chunks: int = 2, group_size: int = 1) -> None:
        super().__init__(placement, group)
        if schedule not in self.SCHEDULES:
            raise ValueError(f"PipelinedExchange: schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"PipelinedExchange: chunks must be an int >= 1, got {chunks!r}")
        if not isinstance(group_size, int) or group_size < 1 or placement.ep_size % group_size:
            raise ValueError(f"PipelinedExchange: group_size must divide the expert-parallel size "
                             f"{placement.ep_size}, got {group_size!r}")
        self.schedule, self.chunks, self.group_size = schedule, chunks, group_size

    @property
    def stages(self) -> int:
        return self.chunks if self.schedule == "chunked" else self.placement.ep_size // self.group_size

    # torch.compile runs it eagerly (a graph break): its C++ autograd node keeps the stages' state in an opaque
    # object that a traced graph cannot hold. The bulk exchange traces whole (fullgraph=True works there).
    @torch.compiler.disable
    def run(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts) -> tuple[Tensor, Tensor]:
        return ops.pipelined_moe(tokens, self._positions(expert_ids), weights, experts.w_in, experts.w_out,
                                 experts.activation, self.placement.num_experts,
                                 self._wire_capacity(tokens, capacity), self.group,
                                 self.schedule, self.chunks, self.group_size, experts.b_in, experts.b_out)


ShadowPolicy = ShadowCostModel | FixedShadows


class ShadowedExchange(AllToAllExchange):
    """FasterMoE's dynamic shadowing (PPoPP'22) over the bulk all-to-all.

    Each forward: :func:`moeflux.ops.routing_counts` gives every rank the ``[P, E]`` routing counts (one small
    all-to-all and the layer's one host synchronisation: the dispatch that follows reuses them instead of
    exchanging counts again); ``policy`` picks the experts to shadow from them, the same on every rank
    (:class:`moeflux.ShadowCostModel`, or :class:`moeflux.FixedShadows`). The shadows' weights are broadcast
    from their owners (:func:`moeflux.ops.broadcast_expert_rows`), their tokens are computed on the rank they
    come from and never enter the all-to-all, and in backward their weight gradients are summed onto the
    owners by autograd, so they are complete before the owners' gradient hooks (and
    :class:`moeflux.DataParallel`'s buckets) see them. Outputs and gradients equal :class:`AllToAllExchange`'s
    up to the order of floating-point sums.

    With a capacity, the capacity is applied by the layer before the exchange as always; the kept tokens
    then travel dropless (packed rows, no padding), which gives the same result.
    """

    def __init__(self, placement: ExpertPlacement, group: dist.ProcessGroup, policy: ShadowPolicy) -> None:
        super().__init__(placement, group)
        if not isinstance(policy, (ShadowCostModel, FixedShadows)):
            raise TypeError(f"ShadowedExchange: policy must be a ShadowCostModel or FixedShadows, got {policy!r}")
        self.policy = policy
        self.shadowed_experts: tuple[int, ...] = ()  # global experts shadowed by the last forward

    def join_failed_dispatch(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        # The other ranks are in routing_counts (dropless or not), which compares hidden sizes and dtypes.
        no_ids = torch.empty((0, top_k), dtype=torch.int32, device=probe.device)
        try:
            ops.routing_counts(probe, no_ids, self.placement.num_experts, self.group, agree_first=False)
        except RuntimeError:
            pass

    def _shadow_positions(self, counts: Tensor, experts: GroupedExperts) -> list[int]:
        if isinstance(self.policy, FixedShadows):
            return list(self.policy.choose_experts(self.placement))
        shape = ExpertShape.of_ffn(experts.d_model, experts.d_ffn, experts.activation, experts.w_in.element_size())
        return list(self.policy.choose(counts.numpy(), shape))

    # torch.compile runs it eagerly (a graph break): the shadows are chosen on the host from this step's counts.
    @torch.compiler.disable
    def run(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts) -> tuple[Tensor, Tensor]:
        positions = self._positions(expert_ids)
        num_experts = self.placement.num_experts
        # No agreement collectives: the layer's num_experts was agreed at construction, and the shadows are
        # chosen from counts every rank holds. Hidden size and dtype are still compared, in the counts.
        counts = ops.routing_counts(tokens, positions, num_experts, self.group, agree_first=False)
        local = self.placement.local_experts
        # This rank's experts' load, shadowed tokens included (what the plain exchange reports, unpadded).
        routed_per_local_expert = counts[:, self.placement.ep_rank * local:(self.placement.ep_rank + 1) * local].sum(0)
        shadows = self._shadow_positions(counts, experts)
        self.shadowed_experts = tuple(self.placement.expert_at[p] for p in shadows)
        if shadows:
            # Shadow index of each position (-1: not shadowed); index num_experts is for dropped slots.
            index_of = torch.full((num_experts + 1,), -1, dtype=torch.int32)
            index_of[shadows] = torch.arange(len(shadows), dtype=torch.int32)
            shadow_ids = index_of.to(positions.device)[torch.where(positions >= 0, positions, num_experts).long()]
            positions = torch.where(shadow_ids >= 0, -1, positions)
            counts = counts.clone()
            counts[:, shadows] = 0
            shadow_w_in = ops.broadcast_expert_rows(experts.w_in, shadows, self.group, agree_first=False)
            shadow_w_out = ops.broadcast_expert_rows(experts.w_out, shadows, self.group, agree_first=False)
        rows, plan = ops.dispatch(tokens, positions, num_experts, None, self.group, routing_counts=counts,
                                  agree_first=False)
        out = ops.combine(experts(rows, plan.tokens_per_local_expert), plan, weights)
        if shadows:
            shadow_rows, shadow_counts, row_map = ops.permute(tokens, shadow_ids, len(shadows))
            shadow_out = experts.ffn(shadow_rows, shadow_counts, shadow_w_in, shadow_w_out)
            out = out + ops.unpermute(shadow_out, row_map, weights)
        return out, routed_per_local_expert.to(device=tokens.device, dtype=torch.int32)


SCHEDULES = ("bulk", *PipelinedExchange.SCHEDULES)


def check_exchange_options(ep_group: dist.ProcessGroup | None, schedule: str, shadowing: object = None,
                           hierarchical: bool | NodeGroups = False) -> None:
    """What :func:`make_exchange` accepts, checked before any collective (:class:`moeflux.MoE` runs it inside
    its agreement, so a rank that fails makes every rank raise). ``shadowing``: a policy, or None / ``"off"``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    shadowed = shadowing not in ("off", None)
    if shadowed and schedule != "bulk":
        raise ValueError(f"shadowing works with schedule='bulk' only, got schedule={schedule!r}")
    if not isinstance(hierarchical, (bool, NodeGroups)):
        raise TypeError(f"hierarchical must be a bool or a moeflux.NodeGroups, got {hierarchical!r}")
    if hierarchical is False:
        return
    if ep_group is None or schedule != "bulk" or shadowed:
        raise ValueError(f"hierarchical works with an ep_group, schedule='bulk' and shadowing='off' only, got "
                         f"ep_group={ep_group}, schedule={schedule!r}, shadowing={shadowing!r}")
    if isinstance(hierarchical, NodeGroups) and hierarchical.ep_group is not ep_group:
        raise ValueError("hierarchical: the NodeGroups were made for another expert-parallel group than ep_group "
                         "(pass init_node_groups(ep_group))")


def make_exchange(placement: ExpertPlacement, ep_group: dist.ProcessGroup | None, schedule: str = "bulk",
                  chunks: int = 2, group_size: int = 1, shadow_policy: ShadowPolicy | None = None,
                  nodes: NodeGroups | None = None) -> Exchange:
    """The strategy for a placement: local without a group; over it, all-to-all in bulk (``schedule="bulk"``),
    with shadowed experts (``shadow_policy``, bulk only), pipelined (``"chunked"``, ``"pairwise"``) or
    node-aware (``nodes``, bulk only)."""
    check_exchange_options(ep_group, schedule, shadow_policy, nodes if nodes is not None else False)
    if ep_group is None:
        return LocalExchange(placement)  # every expert is here: nothing to shadow
    if nodes is not None:
        from .hierarchical import HierarchicalExchange  # it builds on this module

        return HierarchicalExchange(placement, nodes)
    if shadow_policy is not None:
        return ShadowedExchange(placement, ep_group, shadow_policy)
    if schedule == "bulk":
        return AllToAllExchange(placement, ep_group)
    return PipelinedExchange(placement, ep_group, schedule, chunks, group_size)
