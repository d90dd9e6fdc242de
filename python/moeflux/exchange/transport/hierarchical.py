"""The hierarchical (node-aware) transport: every token crosses to a remote node at most once.

The flat transport sends each (token, expert) slot straight to its expert's rank, so a token with two experts
on one remote node crosses the slow inter-node link twice, and back twice. Here (DeepEP's node-aware dispatch,
with Tutel's rail-matched inter-node step):

1. **node copies**: each token becomes one copy per node that holds at least one of its experts (``permute`` by
   node: the copies are grouped by destination node, tokens in order), carrying the token's slots as positions
   within that node (-1 for slots on other nodes);
2. **across nodes** (the rail step): one all-to-all over the rail group (the ranks with this rank's local index,
   one per node) sends each node's copies to this rank's peer on that node; copies for this rank's own node
   stay here;
3. **inside the node**: the rail peer sends the copies it received to the node's experts with the flat
   transport over the node group, in the layer's schedule (bulk, or the staged engine's chunked / pairwise
   stages, which overlap the node's all-to-alls with the experts);

and back: the node group's combine sums each copy's slots weighted (on the far side, so one row per copy
returns), the rail all-to-all takes the sums home, and each token adds its copies' sums (``unpermute``). Every
step is a differentiable moeflux op, so backward runs the same path the other way: gradients cross nodes once
per copy too.

Before any of it, the one count/header exchange (:func:`moeflux.ops.count_exchange`, over the expert-parallel
group) carries each rank's copy count for its rail peers and its tokens' hidden size and dtype, so that ranks
that disagree (or a rank whose input failed the layer's checks) make every rank raise instead of mismatching
inside the rail exchange. The node step exchanges its own counts (a second host read, as before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ... import ops
from ...topology import NodeGroups
from ..base import ExpertBatch, Transport, join_count_exchange
from .flat import FlatTransport

if TYPE_CHECKING:
    from ...experts import GroupedExperts
    from ..schedule import Schedule


def rail_wire_bytes(counts: np.ndarray, row_bytes: int, num_nodes: int, ranks_per_node: int) -> float:
    """The rail all-to-all of ``counts [P, E]`` (rows each rank routes to each position; ``P = num_nodes *
    ranks_per_node``, node-major): bytes through the busiest rail port, ``max(sent, received)`` across nodes.

    Rank ``(n, l)`` sends its rail peer ``(m, l)`` one copy per token with slots on node ``m``. The counts
    count slots, not tokens, so the copies are bounded by the slots ``(n, l)`` routes to node ``m``'s experts:
    exact when no token has two slots on one node (top-1 routing, or one expert per node), an over-estimate by
    at most ``min(top_k, experts per node)`` otherwise (the tighter ``min(slots, tokens of (n, l))`` needs the
    ranks' token counts, which the counts do not hold). Copies for the rank's own node do not cross; the node
    step inside each node is not counted (assumed much faster than the rail: a calibrated layer's measured
    seconds per wire byte absorbs it)."""
    counts = np.asarray(counts, dtype=np.float64)
    experts_per_node = counts.shape[1] // num_nodes
    # [src node, src local index, dst node]: slots each rank routes to each node
    to_node = counts.reshape(num_nodes, ranks_per_node, num_nodes, experts_per_node).sum(3)
    crossing = to_node * (1 - np.eye(num_nodes))[:, None, :]
    sent, received = crossing.sum(2), crossing.sum(0)  # [n, l] by the sender, [l, m] by the receiver
    return float(max(sent.max(), received.max()) * row_bytes)


@dataclass(frozen=True)
class RailPlan:
    copy_map: Tensor  # [T, c] int32: sent row of each of token t's copies (one per node it has slots on), -1: none
    copy_token: Tensor  # [C] int64: the token of each sent copy
    send_splits: list[int]  # copies sent to each node's rail peer
    recv_splits: list[int]  # copies received from each node's rail peer


@dataclass(frozen=True)
class HierarchicalPlan:
    rail: RailPlan
    inner: Any  # the node group's dispatch plan of the received copies


class HierarchicalTransport(Transport):
    """Tokens cross nodes once per (token, remote node) over the rail groups of ``nodes``, then fan out to their
    experts inside the node with the flat transport over the node group (see the module's docstring). Outputs
    and gradients equal the flat transport's up to the order of floating-point sums (a token's slots on one node
    are summed there first, in float32, and rounded to the tokens' dtype before they return: one more rounding
    per node in bf16/fp16).

    Dropless and capacity routing alike travel packed: the capacity has already marked dropped slots -1, so
    there is no padding on the wire (on a GPU that costs the host synchronisation the flat transport's fixed
    capacity splits avoid).
    """

    def __init__(self, num_experts: int, nodes: NodeGroups) -> None:
        size = dist.get_world_size(nodes.ep_group)
        if num_experts % size:
            raise ValueError(f"HierarchicalTransport: num_experts ({num_experts}) must be a multiple of the "
                             f"expert-parallel group's size ({size})")
        self.num_experts, self.nodes, self.group = num_experts, nodes, nodes.ep_group
        self.experts_per_node = nodes.ranks_per_node * (num_experts // size)
        self.inner = FlatTransport(self.experts_per_node, nodes.node_group)

    @property
    def groups(self) -> tuple[dist.ProcessGroup, ...]:
        return self.nodes.ep_group, self.nodes.rail_group, self.nodes.node_group

    def wire_bytes(self, counts: np.ndarray, row_bytes: int) -> float:
        """The busiest rail port's bytes across nodes, bounded from the slot counts (:func:`rail_wire_bytes`)."""
        return rail_wire_bytes(counts, row_bytes, self.nodes.num_nodes, self.nodes.ranks_per_node)

    def _exchange_counts(self, tokens: Tensor, copies_per_node: Tensor) -> tuple[list[int], list[int]]:
        """Send each rail peer its copy count (``copies_per_node [N]``, on the tokens' device) through the one
        count/header exchange over the expert-parallel group. Returns the copies sent to and received from each
        node's rail peer."""
        nodes = self.nodes
        peers = [m * nodes.ranks_per_node + nodes.local_rank for m in range(nodes.num_nodes)]  # host ints
        counts = torch.zeros((dist.get_world_size(self.group), 1), dtype=torch.int64, device=tokens.device)
        counts[peers, 0] = copies_per_node.long()
        sent, received = ops.count_exchange(tokens, counts, self.num_experts, self.group)
        return sent[peers, 0].tolist(), received[peers, 0].tolist()

    def _copy_nodes(self, node_of_slot: Tensor) -> Tensor:
        """``[T, min(k, N)]`` int32: the distinct nodes of each token's slots, -1 padding (so that permute's
        buffer holds ``T * min(k, N)`` rows, not ``T * N``)."""
        num_nodes = self.nodes.num_nodes
        node_ids = torch.arange(num_nodes, dtype=torch.int32, device=node_of_slot.device)
        has_copy = (node_of_slot.unsqueeze(1) == node_ids.view(1, -1, 1)).any(2)  # [T, N]
        present_first = torch.where(has_copy, node_ids, -1).sort(dim=1, descending=True).values
        return present_first[:, :min(node_of_slot.shape[1], num_nodes)]

    def _cross_nodes(self, tokens: Tensor, positions: Tensor,
                     weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, RailPlan]:
        """Steps 1 and 2: the copies that arrived here, their slots (positions within this node), their routing
        weights, and the plan of the way back."""
        num_nodes, num_tokens = self.nodes.num_nodes, tokens.shape[0]
        node_of_slot = torch.div(positions, self.experts_per_node, rounding_mode="floor")  # dropped: -1 // x = -1
        copy_nodes = self._copy_nodes(node_of_slot)  # [T, c]: the distinct nodes of each token's slots, -1 pad
        copies, copies_per_node, copy_map = ops.permute(tokens, copy_nodes, num_nodes)
        send_splits, recv_splits = self._exchange_counts(tokens, copies_per_node)
        sent = sum(send_splits)

        # Token and node of each sent copy (the copies are grouped by node, tokens in order within a node).
        row = copy_map.reshape(-1).long()
        row = torch.where(row >= 0, row, row.numel())  # one spare slot takes the absent copies
        token_of = torch.arange(num_tokens, device=tokens.device).repeat_interleave(copy_nodes.shape[1])
        node_of = copy_nodes.reshape(-1).long()
        spare = torch.empty(row.numel() + 1, dtype=torch.int64, device=tokens.device)
        copy_token = spare.scatter(0, row, token_of)[:sent]
        copy_node = spare.scatter(0, row, node_of)[:sent]
        # Each copy carries its token's slots as positions within its node; slots elsewhere (or dropped) are -1.
        local = positions.long()[copy_token] - copy_node.unsqueeze(1) * self.experts_per_node
        copy_slots = torch.where((local >= 0) & (local < self.experts_per_node), local, -1).to(torch.int32)

        rail = self.nodes.rail_group
        arrived = ops.all_to_all(copies[:sent], recv_splits, send_splits, rail, agree_first=False)
        arrived_slots = ops.all_to_all(copy_slots, recv_splits, send_splits, rail, agree_first=False)
        arrived_weights = None
        if weights is not None:
            arrived_weights = ops.all_to_all(weights.index_select(0, copy_token), recv_splits, send_splits, rail,
                                             agree_first=False)
        return arrived, arrived_slots, arrived_weights, RailPlan(copy_map, copy_token, send_splits, recv_splits)

    def _return_home(self, sums: Tensor, rail: RailPlan) -> Tensor:
        """The way back: each copy's weighted sum to its token's rank, and each token the sum of its copies."""
        returned = ops.all_to_all(sums, rail.send_splits, rail.recv_splits, self.nodes.rail_group, agree_first=False)
        return ops.unpermute(returned, rail.copy_map, None)

    def dispatch(self, tokens: Tensor, positions: Tensor, capacity: int | None,
                 routing_counts: Tensor | None = None) -> tuple[ExpertBatch, HierarchicalPlan]:
        # The routing weights cross with the copies at combine (the plan keeps what it needs to send them).
        arrived, arrived_slots, _, rail = self._cross_nodes(tokens, positions, None)
        batch, inner = self.inner.dispatch(arrived, arrived_slots, None)
        return batch, HierarchicalPlan(rail, inner)

    def combine(self, expert_out: Tensor, plan: HierarchicalPlan, weights: Tensor | None) -> Tensor:
        arrived_weights = None
        if weights is not None:
            arrived_weights = ops.all_to_all(weights.index_select(0, plan.rail.copy_token), plan.rail.recv_splits,
                                             plan.rail.send_splits, self.nodes.rail_group, agree_first=False)
        sums = self.inner.combine(expert_out, plan.inner, arrived_weights)  # one weighted sum per copy
        return self._return_home(sums, plan.rail)

    # torch.compile runs it eagerly (a graph break): the rail splits are read on the host in the middle of it.
    @torch.compiler.disable
    def run(self, tokens: Tensor, positions: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts, schedule: Schedule,
            routing_counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # routing_counts count slots per expert, not copies per node: the rail step needs its own counts.
        arrived, arrived_slots, arrived_weights, rail = self._cross_nodes(tokens, positions, weights)
        sums, tokens_per_local_expert = self.inner.run(arrived, arrived_slots, arrived_weights, None, experts,
                                                       schedule)
        return self._return_home(sums, rail), tokens_per_local_expert

    def join_failed(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        # The peers start with the count/header exchange: a header with the probe's width and dtype (and no
        # copies) makes each of them raise there.
        join_count_exchange(probe, self.group, 1, self.num_experts)
