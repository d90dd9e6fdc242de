"""Which ranks of an expert-parallel group share a node: the groups a hierarchical (node-aware) exchange uses.

Node membership follows the launcher: global rank ``r`` is on node ``r // ranks_per_node`` (torchrun numbers
ranks node by node), and ``ranks_per_node`` defaults to torchrun's ``LOCAL_WORLD_SIZE``. Tests and runs on one
machine declare it instead (``ranks_per_node=2`` makes 4 ranks two "nodes" of two).

For an expert-parallel group of ``N`` nodes with ``L`` of its ranks each (``P = N * L``, node-major: its ranks
are ascending global ranks):

- the **node group** of a rank: the ``L`` ranks of the group on its node (rank within it: the local index);
- the **rail group** of a rank: the ``N`` ranks of the group with its local index, one per node (rank within
  it: the node index). Inter-node traffic of the hierarchical exchange goes between rail peers only, as
  between the same-numbered GPUs (and NICs) of a rail-optimised cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from . import _C
from .distributed import _gather_checked, new_groups


@dataclass(frozen=True, eq=False)
class NodeGroups:
    """The node and rail groups of one expert-parallel group, as seen from this rank (:func:`init_node_groups`)."""

    ep_group: dist.ProcessGroup
    node_group: dist.ProcessGroup  # this rank's node: L ranks, by local index
    rail_group: dist.ProcessGroup  # this rank's local index on every node: N ranks, by node
    ranks_per_node: int  # L: ranks of the expert-parallel group on each node
    num_nodes: int  # N

    @property
    def node(self) -> int:
        return dist.get_rank(self.rail_group)

    @property
    def local_rank(self) -> int:
        return dist.get_rank(self.node_group)

    def describe(self) -> str:
        return f"{self.num_nodes} nodes x {self.ranks_per_node} ranks"


def node_layout(ep_ranks: list[int], ranks_per_node: int) -> tuple[int, int]:
    """``(N, L)`` for an expert-parallel group of global ranks ``ep_ranks`` on nodes of ``ranks_per_node``
    ranks; raises ValueError unless every node holds the same number of the group's ranks, node-major."""
    if not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool) or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be a positive int, got {ranks_per_node!r}")
    if list(ep_ranks) != sorted(ep_ranks):
        raise ValueError(f"the expert-parallel group's ranks must be ascending global ranks, got {list(ep_ranks)}")
    per_node: dict[int, int] = {}
    for rank in ep_ranks:
        per_node[rank // ranks_per_node] = per_node.get(rank // ranks_per_node, 0) + 1
    sizes = set(per_node.values())
    if len(sizes) != 1:
        layout = ", ".join(f"node {n}: {c}" for n, c in per_node.items())
        raise ValueError(f"every node must hold the same number of the expert-parallel group's ranks "
                         f"{list(ep_ranks)} with ranks_per_node={ranks_per_node}, got {layout}")
    return len(per_node), sizes.pop()


def launcher_ranks_per_node() -> int | None:
    """Ranks per node as the launcher says (torchrun's ``LOCAL_WORLD_SIZE``), None if it does not; ValueError if
    it is not a positive int."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive int, got {value!r}")
    return int(value)


def init_node_groups(ep_group: dist.ProcessGroup | None = None, ranks_per_node: int | None = None,
                     timeout: timedelta | None = None) -> NodeGroups:
    """Make the node and rail groups of every expert-parallel group and return this rank's.

    Collective over the whole world (every rank calls it, with the same ``ranks_per_node``, so every rank must
    build the layers that ask for it with ``ExchangeConfig(transport="hierarchical")``): torch's
    ``new_group`` must be called by every rank for every group, so each rank learns every rank's
    expert-parallel group and all create the same groups in the same order. A bad or disagreeing
    ``ranks_per_node`` makes every rank raise the same error. The groups take ``ep_group``'s timeout unless
    ``timeout`` is given.
    """
    if not dist.is_initialized():
        raise RuntimeError("init_node_groups: call torch.distributed.init_process_group first")
    ep_group = ep_group if ep_group is not None else dist.group.WORLD
    error = None
    if ranks_per_node is None:  # read here, raised by the gather: a rank raising alone would leave the rest in it
        try:
            ranks_per_node = launcher_ranks_per_node()
            if ranks_per_node is None:
                error = ("ranks_per_node was not given and LOCAL_WORLD_SIZE is not set (start with torchrun, or "
                         "pass it)")
        except ValueError as e:
            error = str(e)
    mine = (ranks_per_node, dist.get_process_group_ranks(ep_group))
    gathered = _gather_checked(dist.group.WORLD, "init_node_groups", error, mine)
    if len({rpn for rpn, _ in gathered}) > 1:
        per_rank = ", ".join(f"rank {r}: {rpn}" for r, (rpn, _) in enumerate(gathered))
        raise ValueError(f"init_node_groups: ranks disagree on ranks_per_node ({per_rank})")
    ep_groups = sorted({tuple(ranks) for _, ranks in gathered})
    if len({r for ranks in ep_groups for r in ranks}) != sum(len(ranks) for ranks in ep_groups):
        raise ValueError(f"init_node_groups: the ranks' expert-parallel groups overlap: {ep_groups}")
    try:  # the same data on every rank: every rank raises alike
        layouts = [node_layout(list(ranks), ranks_per_node) for ranks in ep_groups]
    except ValueError as e:
        raise ValueError(f"init_node_groups: {e}") from None
    if timeout is None:
        timeout = timedelta(milliseconds=_C.group_timeout_ms(ep_group.group_name))
    mine = None
    for ranks, (num_nodes, per_node) in zip(ep_groups, layouts):  # every rank creates every group, in order
        node_group = new_groups([list(ranks[n * per_node:(n + 1) * per_node]) for n in range(num_nodes)], timeout)
        rail_group = new_groups([list(ranks[local::per_node]) for local in range(per_node)], timeout)
        if dist.get_rank() in ranks:
            mine = NodeGroups(ep_group, node_group, rail_group, per_node, num_nodes)
    return mine


_made: dict[str, NodeGroups] = {}


def node_groups_for(ep_group: dist.ProcessGroup) -> NodeGroups:
    """The node groups of ``ep_group`` from the launcher's ``LOCAL_WORLD_SIZE``, made on first use (collective
    over the world, as :func:`init_node_groups`) and shared by every layer of that group afterwards."""
    made = _made.get(ep_group.group_name)
    if made is None or made.ep_group is not ep_group:  # a group of a later process group with a reused name
        made = _made[ep_group.group_name] = init_node_groups(ep_group)
    return made
