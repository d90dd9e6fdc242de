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

import torch
import torch.distributed as dist
from torch import Tensor

from . import _C

# What a small integer header says of a tensor's dtype (inputs are floating point; -1: anything else), so that
# ranks can compare dtypes inside a tensor collective.
_HEADER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_code(dtype: torch.dtype) -> int:
    return _HEADER_DTYPES.index(dtype) if dtype in _HEADER_DTYPES else -1


def dtype_name(code: int) -> str:
    """The dtype of a :func:`dtype_code`, for error messages."""
    return str(_HEADER_DTYPES[code]).removeprefix("torch.") if 0 <= code < len(_HEADER_DTYPES) else \
        "a non-float dtype"


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
    it with the same ``ep_size``; ranks that pass different ones, or a rank whose
    ``ep_size`` is invalid, make every rank raise the same error. The new groups
    use the backend of ``group`` (gloo for CPU tensors, NCCL for CUDA tensors)
    and its timeout, unless ``timeout`` is given (torch's ``new_group`` would
    give them its 30-minute default).
    """
    if not dist.is_initialized():
        raise RuntimeError("init_expert_parallel: call torch.distributed.init_process_group first")
    parent = group if group is not None else dist.group.WORLD
    ranks = dist.get_process_group_ranks(parent)
    world, me = len(ranks), dist.get_rank()
    error = None
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size != 0:
        error = f"ep_size must be a positive divisor of the world size {world}, got {ep_size!r}"
    # Before any group is made: ranks that went on with different sizes would create different groups and wait.
    check_agreement(parent, "init_expert_parallel", local_error=error, ep_size=ep_size)
    if timeout is None:
        timeout = timedelta(milliseconds=_C.group_timeout_ms(parent.group_name))
    ep_group = new_groups([ranks[start:start + ep_size] for start in range(0, world, ep_size)], timeout)
    edp_group = new_groups([ranks[offset::ep_size] for offset in range(ep_size)], timeout)
    if ep_group is None or edp_group is None:
        raise RuntimeError(f"init_expert_parallel: rank {me} is not in the group {ranks}")
    return ExpertParallelGroups(ep_group, edp_group, ep_size, dist.get_rank(ep_group))


def new_groups(member_lists: list[list[int]], timeout: timedelta) -> dist.ProcessGroup | None:
    """Create a group of each list of global ranks, in order (every rank must create every group, in the same
    order, as ``new_group`` requires); return the one this rank is in (None: none)."""
    mine = None
    for members in member_lists:
        created = dist.new_group(members, timeout=timeout)
        if dist.get_rank() in members:
            mine = created
    return mine


def check_agreement(group: dist.ProcessGroup, what: str, local_error: str | None = None, **values: object) -> None:
    """Raise the same clear error on every rank of ``group`` if any rank's ``local_error`` is set (its own
    check failed: that rank raises its message, the others name it and quote it, as :func:`exchange_checked`)
    or the ranks pass different ``values``.

    Two small collectives; meant for construction time, not for every step.
    """
    gathered = _gather_checked(group, what, local_error, values)
    differing = sorted(k for k in values if len({repr(g[k]) for g in gathered}) > 1)
    if differing:
        per_rank = "; ".join(
            f"rank {r}: " + ", ".join(f"{k}={g[k]!r}" for k in differing) for r, g in enumerate(gathered)
        )
        raise ValueError(f"{what}: ranks of the process group disagree on {', '.join(differing)} ({per_rank})")


def check_same_parameters(group: dist.ProcessGroup, what: str, parameters: list[tuple[str, object]],
                          local_error: str | None = None) -> None:
    """Raise the same clear error on every rank of ``group`` unless all ranks hold parameters of the same names,
    shapes and dtypes, in the same order (what DDP verifies at construction), or if a rank's ``local_error`` is
    set. ``parameters``: ``(name, tensor)``. One all-gather of the descriptions."""
    mine = [(name, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for name, p in parameters]
    for rank, theirs in enumerate(_gather_checked(group, what, local_error, mine)):
        if theirs == mine:
            continue
        me = dist.get_rank(group)
        if len(theirs) != len(mine):
            raise ValueError(f"{what}: ranks hold different parameters: rank {rank} has {len(theirs)} trainable "
                             f"parameters, rank {me} has {len(mine)}")
        i = next(i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b)
        show = lambda d: f"'{d[0]}' {list(d[1])} {d[2]}"  # noqa: E731
        raise ValueError(f"{what}: ranks hold different parameters: parameter {i} is {show(theirs[i])} on rank "
                         f"{rank} and {show(mine[i])} on rank {me}")


def exchange_checked(group: dist.ProcessGroup, what: str, local_error: str | None,
                     fields: list[int] | tuple[int, ...] = ()) -> Tensor:
    """Every rank's ``fields`` (``[world, len(fields)]`` int64 on the CPU; as many on every rank), after raising
    a ``ValueError`` on every rank if any rank's own check failed: that rank with ``"moeflux.<what>:
    <local_error>"``, the others with ``"moeflux.<what>: rank r of the process group failed its check: <r's
    local_error>"`` (its first 512 bytes). The C++ ops' agreement exchange (``csrc/distributed/agreement.cpp``):
    one fixed-size collective, so a failure reads the same from the ops and from Python."""
    op = what.removeprefix("moeflux.")
    error = "" if local_error is None else f"moeflux.{op}: {local_error}"
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    everyone, failure = _C.exchange_checks(group.group_name, list(fields), op, str(device), error)
    if failure is not None:
        raise ValueError(failure)
    return everyone


def _gather_checked(group: dist.ProcessGroup, what: str, local_error: str | None, payload: object) -> list:
    """Every rank's ``payload`` (one all-gather), after raising on every rank if any rank's own check failed
    (:func:`exchange_checked`)."""
    exchange_checked(group, what, local_error)
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, payload, group=group)
    return gathered
