"""NetMoE's dynamic sample placement: move whole samples between the ranks of an expert-parallel group so that
fewer of their tokens cross nodes (then ranks) in the next MoE layer's exchange.

Every rank holds ``B`` samples (sequences) of the global batch. Before a MoE layer, :meth:`SamplePlacement.place`

1. counts, for each of this rank's samples, the slots its tokens route to each rank and the tokens that have a
   slot on each node (from the layer's routing: the layer's router applied to the layer's input, or ids given);
2. gathers those counts from every rank of the group (one small all-gather) and solves, on every rank alike, the
   assignment of the ``P * B`` samples to the ``P`` ranks, ``B`` each, in two stages (NetMoE's): samples to
   nodes minimising the vectors that cross nodes, then, within each node, samples to its ranks minimising the
   vectors that cross ranks. A sample's cost on a node counts its exchange traffic (dispatch and combine: two
   vectors per token copy that crosses; per remote node a token has experts on with the hierarchical exchange,
   per slot with the flat one) and, if it is not on that node now, its move (one vector per token);
3. moves the samples there (one all-to-all of whole samples, differentiable: gradients return the same way).

Whole samples move, so attention and everything else per sample is unaffected, and the residual stream moves
with its tokens. :meth:`SamplePlacement.restore` returns the samples to their original ranks and positions
(before the head, or compute the loss where they are: a sum over samples does not depend on their order).
What does depend on where samples are: a per-rank load-balancing loss and capacity drops (both computed over
the tokens a rank holds), as with any other split of the batch.

The move is its own all-to-all between the blocks (NetMoE fuses it into the previous layer's combine; the
vectors that cross are the same: a moved token's combined output or its residual, one vector either way).
The assignment (``scipy.optimize.linear_sum_assignment``, two stages) runs on the host of every rank, on the
step's critical path; :attr:`SamplePlacement.last` records its time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .distributed import ExpertParallelGroups, dtype_code, dtype_name, exchange_checked
from .instrumentation import layer_scope
from .moe import MoE
from .placement import ExpertPlacement
from .topology import NodeGroups, launcher_ranks_per_node, node_layout

OBJECTIVES = ("hierarchical", "flat")


@dataclass(frozen=True)
class SampleOrder:
    """Where the samples of the global batch are: the sample in global slot ``g`` (rank ``g // B``, position
    ``g % B``) is the one that started in slot ``origin[g]``."""

    origin: tuple[int, ...]
    samples_per_rank: int

    @classmethod
    def identity(cls, ranks: int, samples_per_rank: int) -> SampleOrder:
        return cls(tuple(range(ranks * samples_per_rank)), samples_per_rank)

    def samples_of(self, rank: int) -> tuple[int, ...]:
        """The original slots of the samples rank ``rank`` now holds, in its order."""
        b = self.samples_per_rank
        return self.origin[rank * b:(rank + 1) * b]

    @property
    def is_identity(self) -> bool:
        return self.origin == tuple(range(len(self.origin)))


@dataclass(frozen=True)
class PlacementRecord:
    """What the last :meth:`SamplePlacement.place` decided (the same on every rank)."""

    solve_s: float  # the two assignment stages on this rank's host
    moved_samples: int  # samples of the group that changed rank
    moved_across_nodes: int  # ... of which changed node
    inter_node_before: int  # predicted vectors crossing nodes in the layer's forward exchange, samples left put
    inter_node_after: int  # ... with the samples moved, plus the move itself (inter_node_vectors)


def sample_traffic(expert_ids: Tensor, samples: int, placement: ExpertPlacement, ranks_per_node: int) -> Tensor:
    """``[samples, P + N]`` int64: per sample, the slots its tokens route to each of the ``P`` ranks, then the
    tokens with at least one slot on each of the ``N`` nodes (``ranks_per_node`` consecutive ranks each).

    ``expert_ids``: ``[samples, ..., k]`` (or ``[samples * tokens, k]``) global expert ids, ``-1`` dropped."""
    ep, per_node = placement.ep_size, ranks_per_node
    ids = placement.to_positions(expert_ids.reshape(samples, -1, expert_ids.shape[-1])).long()
    rank = torch.where(ids >= 0, ids // placement.local_experts, -1)  # [B, S, k]
    ones = torch.ones_like(rank)
    slots = torch.zeros(samples, ep + 1, dtype=torch.int64, device=ids.device)
    slots.scatter_add_(1, (rank + 1).reshape(samples, -1), ones.reshape(samples, -1))
    node = torch.where(rank >= 0, rank // per_node, -1)
    present = torch.zeros(*rank.shape[:2], ep // per_node + 1, dtype=torch.int64, device=ids.device)
    present.scatter_(2, node + 1, 1)
    return torch.cat([slots[:, 1:], present[..., 1:].sum(1)], dim=1)


def solve_sample_placement(traffic: np.ndarray, samples_per_rank: int, ranks_per_node: int, tokens_per_sample: int,
                           objective: str = "hierarchical", move_cost: float = 1.0) -> np.ndarray:
    """The rank each sample goes to: ``[G]`` for ``traffic [G, P + N]`` (:func:`sample_traffic` of every rank's
    samples, global slot order), every rank receiving ``samples_per_rank`` samples.

    Stage 1 assigns samples to nodes (``samples_per_rank * ranks_per_node`` each) minimising the vectors that
    cross nodes: ``2 x`` the token copies (``objective="hierarchical"``: per remote node a token has slots on;
    ``"flat"``: per slot on a remote node) plus ``move_cost x tokens_per_sample`` if the sample changes node.
    Stage 2 assigns each node's samples to its ranks minimising the vectors that cross ranks in the node, the
    same way. Deterministic: every rank computes the same answer from the same counts."""
    from scipy.optimize import linear_sum_assignment  # a dependency of moeflux; imported where it is used

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    b, per_node = samples_per_rank, ranks_per_node
    g = traffic.shape[0]
    ranks = g // b
    nodes = ranks // per_node
    if traffic.shape != (g, ranks + nodes) or g != ranks * b or ranks != nodes * per_node:
        raise ValueError(f"solve_sample_placement: traffic must be [P * B, P + N] with P = N * ranks_per_node, got "
                         f"shape {traffic.shape}, samples_per_rank={b}, ranks_per_node={per_node}")
    traffic = traffic.astype(np.float64)
    slots = traffic[:, :ranks]
    slots_node = slots.reshape(g, nodes, per_node).sum(2)
    remote = remote_copies(traffic, per_node, objective)
    current_rank = np.arange(g) // b
    move = move_cost * tokens_per_sample
    node_cost = 2 * remote + move * (np.arange(nodes)[None, :] != (current_rank // per_node)[:, None])
    dest = np.empty(g, dtype=np.int64)
    node_of = _assign(linear_sum_assignment, node_cost, b * per_node)
    for n in range(nodes):
        members = np.flatnonzero(node_of == n)
        local = slice(n * per_node, (n + 1) * per_node)
        rank_cost = 2 * (slots_node[members, n][:, None] - slots[members, local])
        rank_cost += move * (np.arange(n * per_node, (n + 1) * per_node)[None, :] != current_rank[members, None])
        dest[members] = n * per_node + _assign(linear_sum_assignment, rank_cost, b)
    return dest


def remote_copies(traffic: np.ndarray, ranks_per_node: int, objective: str = "hierarchical") -> np.ndarray:
    """``[G, N]``: the token copies each sample sends to other nodes if it sits on node ``n`` (``traffic
    [G, P + N]`` of :func:`sample_traffic`): per remote node a token has slots on (``"hierarchical"``), or per
    slot on a remote node (``"flat"``)."""
    ranks = traffic.shape[1] // (ranks_per_node + 1) * ranks_per_node  # the width is P + N = N * (L + 1)
    slots, on_node = traffic[:, :ranks], traffic[:, ranks:]
    if objective == "hierarchical":
        return on_node.sum(1, keepdims=True) - on_node
    per_node = slots.reshape(slots.shape[0], -1, ranks_per_node).sum(2)
    return slots.sum(1, keepdims=True) - per_node


def inter_node_vectors(traffic: np.ndarray, dest_rank: np.ndarray, samples_per_rank: int, ranks_per_node: int,
                       tokens_per_sample: int, objective: str = "hierarchical") -> tuple[int, int]:
    """Vectors crossing nodes in a layer's forward exchange (dispatch and combine: two per remote copy), with
    every sample where it is, and with the samples on ``dest_rank`` (the moves' vectors, one per token, included).
    """
    remote = remote_copies(traffic, ranks_per_node, objective)
    rows = np.arange(dest_rank.size)
    current_node, dest_node = rows // samples_per_rank // ranks_per_node, dest_rank // ranks_per_node
    moved = int((current_node != dest_node).sum())
    return (int(2 * remote[rows, current_node].sum()),
            int(2 * remote[rows, dest_node].sum()) + tokens_per_sample * moved)


def _assign(linear_sum_assignment, cost: np.ndarray, per_column: int) -> np.ndarray:
    """Each row to a column of ``cost [rows, C]``, every column taking ``per_column`` rows, at least total cost."""
    columns = np.repeat(np.arange(cost.shape[1]), per_column)
    rows, chosen = linear_sum_assignment(cost[:, columns])
    out = np.empty(cost.shape[0], dtype=np.int64)
    out[rows] = columns[chosen]
    return out


def destination_slots(dest_rank: np.ndarray) -> np.ndarray:
    """``[G]``: the global slot of each sample on its new rank (``dest_rank`` giving every rank the same number
    of samples, as the solver does; a rank's samples keep their relative order)."""
    order = np.lexsort((np.arange(dest_rank.size), dest_rank))  # by rank, then by current slot
    slots = np.empty(dest_rank.size, dtype=np.int64)
    slots[order] = np.arange(dest_rank.size)
    return slots


class SamplePlacement:
    """NetMoE's sample placement over an expert-parallel group (see the module's docstring)::

        placement = moeflux.SamplePlacement(ep_group, nodes=ranks_per_node)
        order = None
        for block in blocks:                  # x: [B, S, d_model], B samples on every rank
            x = x + block.attn(x)
            x, order = placement.place(x, block.mlp, order, router_input=block.norm(x))
            x = x + block.mlp(block.norm(x))
        x = placement.restore(x, order)       # every sample back where it started

    Args:
        ep_group: the expert-parallel group (:class:`moeflux.ExpertParallelGroups` or a process group; default
            the world). The MoE layers placed for must use it.
        nodes: its node layout: a :class:`moeflux.NodeGroups`, the ranks per node (global ranks ``r`` on node
            ``r // nodes``), or None (torchrun's ``LOCAL_WORLD_SIZE``; without it one node).
        objective: the exchange whose inter-node traffic is minimised: ``"hierarchical"`` (a token crosses to a
            node once: ``ExchangeConfig(transport="hierarchical")``) or ``"flat"`` (once per slot).
        move_cost: weight of a moved sample's vectors against the exchange's (0: ignore what moves cost).

    :meth:`place` and :meth:`restore` are collective over the group; every rank must hold the same number of
    samples of one shape and dtype, or every rank raises.
    """

    def __init__(self, ep_group: ExpertParallelGroups | dist.ProcessGroup | None = None,
                 nodes: NodeGroups | int | None = None, *, objective: str = "hierarchical",
                 move_cost: float = 1.0) -> None:
        if not dist.is_initialized():
            raise RuntimeError("SamplePlacement: call torch.distributed.init_process_group first")
        if isinstance(ep_group, ExpertParallelGroups):
            ep_group = ep_group.ep_group
        self.group = ep_group if ep_group is not None else dist.group.WORLD
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if not (isinstance(move_cost, (int, float)) and move_cost >= 0):
            raise ValueError(f"move_cost must be a number >= 0, got {move_cost!r}")
        if isinstance(nodes, NodeGroups):
            if nodes.ep_group.group_name != self.group.group_name:
                raise ValueError("SamplePlacement: nodes were made for another expert-parallel group")
            self.ranks_per_node = nodes.ranks_per_node
        else:
            per_node = nodes if nodes is not None else launcher_ranks_per_node()
            ranks = dist.get_process_group_ranks(self.group)
            self.ranks_per_node = node_layout(ranks, per_node)[1] if per_node is not None else self.size
        self.objective, self.move_cost = objective, float(move_cost)
        self.last: PlacementRecord | None = None
        self.last_order: SampleOrder | None = None  # where the samples are after the last place / restore

    def place(self, x: Tensor, layer: MoE, order: SampleOrder | None = None, *, router_input: Tensor | None = None,
              expert_ids: Tensor | None = None) -> tuple[Tensor, SampleOrder]:
        """Move the samples of ``x [B, ...]`` to the ranks that make ``layer``'s exchange cheapest.

        The routing planned for: ``router_input [B, ..., d_model]`` through ``layer.router.predict``, or
        ``expert_ids [B, ..., k]``. ``order``: where the samples are now (None: where they started). Returns
        the moved ``x`` and the new order (pass it to the next ``place`` and to :meth:`restore`)."""
        error = _input_error(x, layer, self.group, order, router_input, expert_ids)
        b = self._agree("place", x, error)
        order = order if order is not None else SampleOrder.identity(self.size, b)
        if b == 0:
            return x, order
        if expert_ids is None:
            expert_ids = layer.router.predict(router_input.reshape(-1, router_input.shape[-1]))
        traffic = sample_traffic(expert_ids, b, layer.placement, self.ranks_per_node)
        counts = ops.to_host(self._all_gather(traffic).reshape(self.size * b, -1), "sample_traffic").numpy()
        tokens = math.prod(x.shape[1:-1])  # a sample's token vectors
        start = time.perf_counter()
        dest_rank = solve_sample_placement(counts, b, self.ranks_per_node, tokens, self.objective, self.move_cost)
        solve_s = time.perf_counter() - start
        before, after = inter_node_vectors(counts, dest_rank, b, self.ranks_per_node, tokens, self.objective)
        current = np.arange(dest_rank.size) // b
        self.last = PlacementRecord(solve_s, int((current != dest_rank).sum()),
                                    int((current // self.ranks_per_node != dest_rank // self.ranks_per_node).sum()),
                                    before, after)
        dest = destination_slots(dest_rank)
        with layer_scope(f"{layer.stats_name}.sample_move", (self.group,)):
            x = self._move(x, dest, b)
        origin = np.empty(dest.size, dtype=np.int64)
        origin[dest] = order.origin  # the sample of slot s is now in slot dest[s]
        self.last_order = SampleOrder(tuple(origin.tolist()), b)
        return x, self.last_order

    def restore(self, x: Tensor, order: SampleOrder | None) -> Tensor:
        """Return every sample of ``x [B, ...]`` (in ``order``) to the rank and position it started in."""
        if order is None:
            return x
        error = None if isinstance(order, SampleOrder) else f"order must be a SampleOrder, got {type(order)}"
        if error is None and (x.dim() == 0 or x.shape[0] != order.samples_per_rank
                              or len(order.origin) != self.size * order.samples_per_rank):
            error = (f"x must hold the order's {order.samples_per_rank} samples per rank of {self.size}, got shape "
                     f"{tuple(x.shape)}")
        b = self._agree("restore", x, error)
        with layer_scope("sample_restore", (self.group,)):
            x = self._move(x, np.asarray(order.origin, dtype=np.int64), b)
        self.last_order = SampleOrder.identity(self.size, b)
        return x

    def _agree(self, what: str, x: Tensor, error: str | None) -> int:
        """Every rank's check, sample count, sample size and dtype, compared on every rank (one agreement
        exchange); raises on every rank if any rank's check failed or the ranks differ. Returns the samples per
        rank."""
        mine = [x.shape[0], math.prod(x.shape[1:]), dtype_code(x.dtype)] if error is None else [-1, -1, -1]
        b, size, dtype = (list(column) for column in
                          exchange_checked(self.group, f"SamplePlacement.{what}", error, mine).T.tolist())
        if len(set(b)) > 1 or len(set(size)) > 1 or len(set(dtype)) > 1:
            per_rank = ", ".join(f"rank {r}: {b[r]} samples of {size[r]} elements, {dtype_name(dtype[r])}"
                                 for r in range(self.size))
            raise ValueError(f"SamplePlacement.{what}: every rank must hold the same number of samples of one "
                             f"shape and dtype, got {per_rank}")
        return b[0]

    def _all_gather(self, t: Tensor) -> Tensor:
        """``[P, t.numel()]``: every rank's ``t``, through moeflux's all-to-all (each rank sends its row to all)."""
        rows = t.reshape(1, -1).expand(self.size, -1).contiguous()
        ones = [1] * self.size
        return ops.all_to_all(rows, ones, ones, self.group, agree_first=False)

    def _move(self, x: Tensor, dest_slot: np.ndarray, b: int) -> Tensor:
        """Send the sample in each global slot ``s`` to slot ``dest_slot[s]`` (one all-to-all; none if no
        sample of the group moves)."""
        if np.array_equal(dest_slot, np.arange(dest_slot.size)):
            return x
        mine = dest_slot[self.rank * b:(self.rank + 1) * b]
        send_order = np.argsort(mine, kind="stable")  # by destination slot, so by destination rank
        send_splits = np.bincount(mine // b, minlength=self.size).tolist()
        arriving = np.flatnonzero(dest_slot // b == self.rank)  # global slots that come here, by source rank
        arriving = arriving[np.lexsort((dest_slot[arriving], arriving // b))]  # as each source sends them
        recv_splits = np.bincount(arriving // b, minlength=self.size).tolist()
        rows = x.reshape(b, -1)
        sent = rows.index_select(0, torch.from_numpy(send_order).to(x.device))
        received = ops.all_to_all(sent, recv_splits, send_splits, self.group, agree_first=False)
        where = np.empty(b, dtype=np.int64)
        where[dest_slot[arriving] - self.rank * b] = np.arange(b)  # received row of each local position
        return received.index_select(0, torch.from_numpy(where).to(x.device)).view(x.shape)


def _input_error(x: Tensor, layer: MoE, group: dist.ProcessGroup, order: SampleOrder | None,
                 router_input: Tensor | None, expert_ids: Tensor | None) -> str | None:
    """What is wrong with :meth:`SamplePlacement.place`'s arguments on this rank (None: nothing)."""
    if not isinstance(x, Tensor) or x.dim() == 0:
        return f"x must be a tensor [B, ...] of B samples, got {type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}"
    if not isinstance(layer, MoE):
        return f"layer must be a moeflux.MoE, got {type(layer).__name__}"
    if layer.ep_group is None or layer.ep_group.group_name != group.group_name:
        return "layer must be an expert-parallel MoE over the placement's group"
    if (router_input is None) == (expert_ids is None):
        return "give exactly one of router_input and expert_ids"
    if router_input is not None and (router_input.dim() < 2 or router_input.shape[0] != x.shape[0]
                                     or router_input.shape[-1] != layer.d_model):
        return (f"router_input must be [B={x.shape[0]}, ..., d_model={layer.d_model}], got shape "
                f"{tuple(router_input.shape)}")
    if expert_ids is not None and (expert_ids.dim() < 2 or expert_ids.shape[0] != x.shape[0]
                                   or expert_ids.shape[-1] != layer.top_k or expert_ids.is_floating_point()):
        return (f"expert_ids must be integer [B={x.shape[0]}, ..., k={layer.top_k}], got {expert_ids.dtype} of "
                f"shape {tuple(expert_ids.shape)}")
    if order is not None and (not isinstance(order, SampleOrder) or order.samples_per_rank != x.shape[0]):
        return f"order must be the SampleOrder of these {x.shape[0]} samples per rank, got {order!r}"
    return None
