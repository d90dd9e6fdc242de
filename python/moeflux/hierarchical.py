"""The hierarchical (node-aware) exchange: every token crosses to a remote node at most once.

The flat exchange sends each (token, expert) slot straight to its expert's rank, so a token with two experts on
one remote node crosses the slow inter-node link twice, and back twice. Here (DeepEP's node-aware dispatch, with
Tutel's rail-matched inter-node step):

1. **node copies**: each token becomes one copy per node that holds at least one of its experts (``permute`` by
   node: the copies are grouped by destination node, tokens in order), carrying the token's slots as positions
   within that node (-1 for slots on other nodes);
2. **across nodes**: one all-to-all over the rail group (the ranks with this rank's local index, one per node)
   sends each node's copies to this rank's peer on that node; copies for this rank's own node stay here;
3. **inside the node**: the rail peer dispatches the copies it received to the node's experts (the ordinary
   :func:`moeflux.ops.dispatch` over the node group);

and back: the node group's :func:`moeflux.ops.combine` sums each copy's slots weighted (on the far side, so one
row per copy returns), the rail all-to-all takes the sums home, and each token adds its copies' sums
(``unpermute``). Every step is a differentiable moeflux op, so backward runs the same path the other way:
gradients cross nodes once per copy too.

Before any of it, one small all-to-all over the expert-parallel group carries each rank's copy count for its
rail peers and its tokens' hidden size and dtype, so that ranks that disagree (or a rank whose input failed the
layer's checks) make every rank raise instead of mismatching inside the rail exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .distributed import dtype_code, dtype_name
from .exchange import ExpertBatch, Exchange
from .placement import ExpertPlacement
from .topology import NodeGroups

if TYPE_CHECKING:
    from .experts import GroupedExperts

@dataclass(frozen=True)
class HierarchicalPlan:
    copy_map: Tensor  # [T, c] int32: sent row of each of token t's copies (one per node it has slots on), -1: none
    copy_token: Tensor  # [C] int64: the token of each sent copy
    send_splits: list[int]  # copies sent to each node's rail peer
    recv_splits: list[int]  # copies received from each node's rail peer
    inner: ops.DispatchPlan  # the node group's dispatch of the received copies


class HierarchicalExchange(Exchange):
    """Tokens cross nodes once per (token, remote node) over the rail groups of ``nodes``, then fan out to their
    experts inside the node (see the module's docstring). Outputs and gradients equal
    :class:`moeflux.exchange.AllToAllExchange`'s up to the order of floating-point sums (a token's slots on
    one node are summed there first, in float32, and rounded to the tokens' dtype before they return: one more
    rounding per node in bf16/fp16).

    Dropless and capacity routing alike travel packed: the capacity has already marked dropped slots -1, so
    there is no padding on the wire (on a GPU that costs the host synchronisation the flat exchange's fixed
    capacity splits avoid).
    """

    def __init__(self, placement: ExpertPlacement, nodes: NodeGroups) -> None:
        if placement.ep_size != dist.get_world_size(nodes.ep_group):
            raise ValueError(f"HierarchicalExchange: placement.ep_size ({placement.ep_size}) must equal the size of "
                             f"the expert-parallel group ({dist.get_world_size(nodes.ep_group)})")
        super().__init__(placement)
        self.nodes = nodes
        self.group = nodes.ep_group
        self.experts_per_node = nodes.ranks_per_node * placement.local_experts

    @property
    def groups(self) -> tuple[dist.ProcessGroup, ...]:
        return self.nodes.ep_group, self.nodes.rail_group, self.nodes.node_group

    def _exchange_header(self, tokens: Tensor, copies_per_node: Tensor) -> tuple[list[int], list[int]]:
        """Send each rail peer its copy count (``copies_per_node [N]``, on the tokens' device), and every rank
        this rank's hidden size and dtype; check what arrives. Returns the copies sent to and received from
        each node's rail peer, read on the host together (the one host read before the rail exchange)."""
        nodes, ep = self.nodes, self.placement.ep_size
        header = torch.zeros(ep, 3, dtype=torch.int64, device=tokens.device)
        header[:, 1], header[:, 2] = tokens.shape[1], dtype_code(tokens.dtype)
        rail_peers = torch.arange(nodes.num_nodes, device=tokens.device) * nodes.ranks_per_node + nodes.local_rank
        header[rail_peers, 0] = copies_per_node.long()
        ones = [1] * ep
        received = ops.all_to_all(header, ones, ones, self.group, agree_first=False)
        both = ops.to_host(torch.cat([header[rail_peers, 0], received.reshape(-1)]), "counts:hierarchical").tolist()
        sent, received = both[:nodes.num_nodes], both[nodes.num_nodes:]
        for src in range(ep):
            hidden, dtype = received[3 * src + 1], received[3 * src + 2]
            if (hidden, dtype) != (tokens.shape[1], dtype_code(tokens.dtype)):
                raise RuntimeError(
                    f"moeflux.HierarchicalExchange: ranks of the expert-parallel group disagree: rank {src} sends "
                    f"tokens with hidden size {hidden}, dtype {dtype_name(dtype)}; rank {self.placement.ep_rank} "
                    f"has hidden size {tokens.shape[1]}, dtype {tokens.dtype}")
        return sent, received[3 * nodes.local_rank::3 * nodes.ranks_per_node]

    def _copy_nodes(self, node_of_slot: Tensor) -> Tensor:
        """``[T, min(k, N)]`` int32: the distinct nodes of each token's slots, -1 padding (so that permute's
        buffer holds ``T * min(k, N)`` rows, not ``T * N``)."""
        num_nodes = self.nodes.num_nodes
        node_ids = torch.arange(num_nodes, dtype=torch.int32, device=node_of_slot.device)
        has_copy = (node_of_slot.unsqueeze(1) == node_ids.view(1, -1, 1)).any(2)  # [T, N]
        present_first = torch.where(has_copy, node_ids, -1).sort(dim=1, descending=True).values
        return present_first[:, :min(node_of_slot.shape[1], num_nodes)]

    def dispatch(self, tokens: Tensor, expert_ids: Tensor,
                 capacity: int | None) -> tuple[ExpertBatch, HierarchicalPlan]:
        positions = self._positions(expert_ids)
        num_nodes, num_tokens = self.nodes.num_nodes, tokens.shape[0]
        node_of_slot = torch.div(positions, self.experts_per_node, rounding_mode="floor")  # dropped: -1 // x = -1
        copy_nodes = self._copy_nodes(node_of_slot)  # [T, c]: the distinct nodes of each token's slots, -1 pad
        copies, copies_per_node, copy_map = ops.permute(tokens, copy_nodes, num_nodes)
        send_splits, recv_splits = self._exchange_header(tokens, copies_per_node)
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
        rows, inner = ops.dispatch(arrived, arrived_slots, self.experts_per_node, None, self.nodes.node_group,
                                   agree_first=False)
        plan = HierarchicalPlan(copy_map, copy_token, send_splits, recv_splits, inner)
        return ExpertBatch(rows, inner.tokens_per_local_expert, None), plan

    def combine(self, expert_out: Tensor, plan: HierarchicalPlan, weights: Tensor | None) -> Tensor:
        rail = self.nodes.rail_group
        arrived_weights = None
        if weights is not None:
            arrived_weights = ops.all_to_all(weights.index_select(0, plan.copy_token), plan.recv_splits,
                                             plan.send_splits, rail, agree_first=False)
        sums = ops.combine(expert_out, plan.inner, arrived_weights)  # one weighted sum per copy, on its node
        returned = ops.all_to_all(sums, plan.send_splits, plan.recv_splits, rail, agree_first=False)
        return ops.unpermute(returned, plan.copy_map, None)  # each token: the sum of its copies

    # torch.compile runs it eagerly (a graph break): the rail splits are read on the host in the middle of it.
    @torch.compiler.disable
    def run(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor | None, capacity: int | None,
            experts: GroupedExperts) -> tuple[Tensor, Tensor]:
        return super().run(tokens, expert_ids, weights, capacity, experts)

    def join_failed_dispatch(self, probe: Tensor, top_k: int, capacity: int | None) -> None:
        # The other ranks start with the header exchange: a header with the probe's width and dtype (and no
        # copies) makes each of them raise there.
        try:
            self._exchange_header(probe, torch.zeros(self.nodes.num_nodes, device=probe.device))
        except RuntimeError:
            pass
