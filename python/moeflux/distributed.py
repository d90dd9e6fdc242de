"""Process groups for expert parallelism.

With ``W`` ranks and an expert-parallel size ``P`` (``W % P == 0``), ranks are
split into ``W / P`` expert-parallel groups of ``P`` consecutive ranks; each
group holds all experts, ``E / P`` per rank. Ranks at the same position of
different expert-parallel groups hold the same experts: they form an
expert-data-parallel group of ``W / P`` ranks, over which those experts'
gradients are averaged.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

import torch.distributed as dist


class ExpertParallelGroups(NamedTuple):
    ep_group: dist.ProcessGroup  # the ranks that split the experts between them
    edp_group: dist.ProcessGroup  # the ranks that hold replicas of this rank's experts
    ep_size: int
    ep_rank: int


def init_expert_parallel(
    ep_size: int, group: dist.ProcessGroup | None = None, timeout: timedelta | None = None
) -> ExpertParallelGroups:
    """Create the expert-parallel and expert-data-parallel groups of this rank.

    Collective: every rank of ``group`` (default: the world, after
    ``torch.distributed.init_process_group``, e.g. under ``torchrun``) must call
    it with the same ``ep_size``. The new groups use the backend of the world
    (gloo for CPU tensors, NCCL for CUDA tensors).
    """
    if not dist.is_initialized():
        raise RuntimeError("init_expert_parallel: call torch.distributed.init_process_group first")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    world, me = len(ranks), dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"ep_size must be a positive divisor of the world size {world}, got {ep_size!r}")
    ep_group = edp_group = None
    for start in range(0, world, ep_size):  # every rank creates every group, in the same order
        members = ranks[start:start + ep_size]
        created = dist.new_group(members, timeout=timeout)
        if me in members:
            ep_group = created
    for offset in range(ep_size):
        members = ranks[offset::ep_size]
        created = dist.new_group(members, timeout=timeout)
        if me in members:
            edp_group = created
    if ep_group is None or edp_group is None:
        raise RuntimeError(f"init_expert_parallel: rank {me} is not in the group {ranks}")
    return ExpertParallelGroups(ep_group, edp_group, ep_size, dist.get_rank(ep_group))


def check_agreement(group: dist.ProcessGroup, what: str, **values: object) -> None:
    """Raise the same clear error on every rank of ``group`` unless all ranks pass equal ``values``.

    One small all-gather; meant for construction time, not for every step.
    """
    gathered: list[dict[str, object]] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(gathered, values, group=group)
    differing = sorted(k for k in values if len({repr(g[k]) for g in gathered}) > 1)
    if differing:
        per_rank = "; ".join(
            f"rank {r}: " + ", ".join(f"{k}={g[k]!r}" for k in differing) for r, g in enumerate(gathered)
        )
        raise ValueError(f"{what}: ranks of the process group disagree on {', '.join(differing)} ({per_rank})")
