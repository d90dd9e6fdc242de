"""``moeflux.DataParallel``: DDP-style gradient synchronisation for models with
moeflux MoE layers, overlapped with backward, in C++ (``moeflux._C.GradientBucketer``).

Dense parameters are averaged over the data-parallel group; the parameters of
expert-parallel experts over their expert-data-parallel group (the ranks that
hold replicas of the same experts). Both are divided by the data-parallel world
size ``W``: an expert's gradient on one rank already sums the contributions of
every rank of its expert-parallel group (their tokens came to it by
all-to-all), so summing over the ``W / P`` replicas and dividing by ``W`` gives
exactly the gradient of the mean loss over the global batch. (Dividing by the
replica count instead makes expert gradients ``P`` times too large.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import _C
from .distributed import check_agreement, check_same_parameters
from .moe import MoE, expert_parameters

BUILTIN_HOOKS = ("allreduce", "bf16_compress")
DEFAULT_MICRO_OP_CAP_MB = 1.0  # benchmarks/results/priority/table.md: the largest that kept a 4 MiB all-to-all <= 1.15x at 1 Gbit/s


@dataclass
class CommHookState:
    """What a Python communication hook receives as ``state``: the bucket's group and your own state.

    The bucket's buffer already holds gradients divided by the data-parallel
    world size; a hook must reduce it by **sum** over ``process_group`` and
    return a ``torch.futures.Future`` of the reduced tensor (for example
    ``dist.all_reduce(buf, group=state.process_group, async_op=True).get_future().then(lambda f: f.value()[0])``).
    """

    process_group: dist.ProcessGroup
    user_state: Any = None


class DataParallel(nn.Module):
    """Wraps ``module`` so that ``backward()`` leaves every gradient averaged over the global batch.

    Args:
        module: any model; its :class:`moeflux.MoE` layers built with
            ``ep_group=moeflux.init_expert_parallel(...)`` have their experts
            reduced over the expert-data-parallel group, everything else over ``dp_group``.
        dp_group: the data-parallel group (default: the world).
        bucket_cap_mb: bucket size; the first bucket of each kind is ``first_bucket_cap_mb``
            so that communication starts early in backward.
        gradient_as_bucket_view: ``.grad`` aliases the bucket: no copy and no
            second buffer (like DDP's option of the same name).
        find_unused_parameters: parameters that get no gradient in a step
            count as zeros instead of raising (every rank must still run backward).
        comm_hook: ``"allreduce"``, ``"bf16_compress"``, or a callable
            ``hook(state: CommHookState, bucket: torch.distributed.GradBucket) -> Future``.
        broadcast_parameters: copy parameters and buffers from the first rank of
            each group at construction, so every replica starts equal.
        all_to_all_priority: give the MoE all-to-alls priority over the gradient
            all-reduce (Lina, ATC'23): each bucket is all-reduced in micro-ops of at
            most ``micro_op_cap_mb``, launched one at a time and only while no
            moeflux all-to-all of this process is queued or running, so an
            all-to-all waits behind at most one micro-op; the end of backward
            flushes what is left. Same sums, bit for bit, as without it.
            ``None`` (default): on when ``module`` has expert-parallel MoE layers and
            the gradients go over gloo (NCCL: opt-in, not yet run on GPUs).
            Applies to the built-in hooks; a Python ``comm_hook`` is never held back.
            The all-to-alls must use other process groups than the gradients
            (true for ``moeflux.init_expert_parallel`` groups).
        micro_op_cap_mb: size of the all-reduce micro-ops with ``all_to_all_priority`` (1 MiB: the
            largest that kept a 4 MiB all-to-all within 1.15x of its time alone on a 1 Gbit/s
            link, for ~6% more all-reduce time; benchmarks/results/priority/table.md).
    """

    def __init__(
        self,
        module: nn.Module,
        dp_group: dist.ProcessGroup | None = None,
        *,
        bucket_cap_mb: float = 25,
        first_bucket_cap_mb: float = 1,
        gradient_as_bucket_view: bool = False,
        find_unused_parameters: bool = False,
        comm_hook: str | Callable = "allreduce",
        comm_hook_state: Any = None,
        broadcast_parameters: bool = True,
        all_to_all_priority: bool | None = None,
        micro_op_cap_mb: float = DEFAULT_MICRO_OP_CAP_MB,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("moeflux.DataParallel: call torch.distributed.init_process_group first")
        if bucket_cap_mb <= 0 or first_bucket_cap_mb <= 0:
            raise ValueError(f"bucket sizes must be > 0, got {bucket_cap_mb} and {first_bucket_cap_mb}")
        if micro_op_cap_mb <= 0:
            raise ValueError(f"micro_op_cap_mb must be > 0, got {micro_op_cap_mb}")
        self.module = module
        dp_group = dp_group if dp_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(dp_group)

        expert_group: dict[int, dist.ProcessGroup] = {}
        error = None  # raised below on every rank at once: a rank raising alone would leave the others waiting
        for ep in expert_parameters(module):
            if ep.layer.ep_group is None:
                continue
            if ep.layer.edp_group is None:
                name = next(n for n, m in module.named_modules() if m is ep.layer)
                error = (f"MoE layer '{name}' was built with a bare ep_group; pass "
                         "ep_group=moeflux.init_expert_parallel(...) so that its experts' replicas are known")
            expert_group[id(ep.param)] = ep.layer.edp_group
        # Before the first collective on them: ranks must hold the same parameters, or the broadcasts and the
        # buckets' all-reduces would not match (sizes: an abort in gloo; counts: a hang).
        check_same_parameters(dp_group, "moeflux.DataParallel",
                              [(n, p) for n, p in module.named_parameters() if p.requires_grad], error)
        self.groups: list[dist.ProcessGroup] = [dp_group]
        params, names, param_group = [], [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            group = expert_group.get(id(p), dp_group)
            if all(group is not g for g in self.groups):
                self.groups.append(group)
            params.append(p)
            names.append(name)
            param_group.append(next(i for i, g in enumerate(self.groups) if g is group))
        if broadcast_parameters:
            self._broadcast(params, param_group, dp_group)
        self.all_to_all_priority = self._priority(all_to_all_priority)
        self.micro_op_cap_mb = micro_op_cap_mb
        micro_op_bytes = max(1, int(micro_op_cap_mb * 2**20))
        # Every rank must cut its gradients into the same buckets and micro-ops, or the collectives would not match.
        check_agreement(dp_group, "moeflux.DataParallel", all_to_all_priority=self.all_to_all_priority,
                        micro_op_bytes=micro_op_bytes if self.all_to_all_priority else None,
                        bucket_cap_mb=bucket_cap_mb, first_bucket_cap_mb=first_bucket_cap_mb)

        self._bucketer = _C.GradientBucketer(
            params, names, param_group, [g.group_name for g in self.groups], [float(self.world_size)] * len(self.groups),
            int(first_bucket_cap_mb * 2**20), int(bucket_cap_mb * 2**20), gradient_as_bucket_view,
            find_unused_parameters, self.all_to_all_priority, micro_op_bytes,
        )
        self.register_comm_hook(comm_hook, comm_hook_state)

    def _priority(self, asked: bool | None) -> bool:
        """Whether micro-ops are scheduled: asked, or (None) when there are expert-parallel all-to-alls."""
        all_to_all_groups = {m.ep_group.group_name: name for name, m in self.module.named_modules()
                             if isinstance(m, MoE) and m.ep_group is not None and dist.get_world_size(m.ep_group) > 1}
        clash = [name for group_name, name in all_to_all_groups.items()
                 if group_name in {g.group_name for g in self.groups}]
        if asked is None:
            # Auto only on gloo, where it is measured and the groups' collectives cannot deadlock each other.
            # On NCCL, ranks may issue micro-ops and all-to-alls to their two communicators in different orders,
            # which NCCL does not promise to survive; it stays opt-in there until a GPU run has checked it.
            return bool(all_to_all_groups) and not clash and dist.get_backend(self.groups[0]) == "gloo"
        if asked and clash:
            # The scheduler changes when micro-ops go out relative to all-to-alls; on one group
            # that would reorder collectives differently on different ranks.
            raise ValueError(f"moeflux.DataParallel: all_to_all_priority needs the all-to-alls on other process "
                             f"groups than the gradients, but MoE layer '{clash[0]}' uses one of them as ep_group")
        return bool(asked)

    def _broadcast(self, params: list[nn.Parameter], param_group: list[int], dp_group: dist.ProcessGroup) -> None:
        with torch.no_grad():
            for p, g in zip(params, param_group):
                group = self.groups[g]
                dist.broadcast(p.data, dist.get_global_rank(group, 0), group=group)
            for b in self.module.buffers():
                dist.broadcast(b, dist.get_global_rank(dp_group, 0), group=dp_group)

    def register_comm_hook(self, hook: str | Callable, state: Any = None) -> None:
        """Use a built-in hook by name or ``hook(CommHookState, GradBucket) -> Future`` for every bucket."""
        if isinstance(hook, str):
            if hook not in BUILTIN_HOOKS:
                raise ValueError(f"comm_hook must be one of {BUILTIN_HOOKS} or a callable, got {hook!r}")
            self._bucketer.set_builtin_comm_hook(hook)
        elif callable(hook):
            self._bucketer.set_python_comm_hook([CommHookState(g, state) for g in self.groups], _checked_hook(hook))
        else:
            raise TypeError(f"comm_hook must be a str or a callable, got {type(hook).__name__}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the next one outside synchronises the sum."""
        self._bucketer.set_require_sync(False)
        try:
            yield
        finally:
            self._bucketer.set_require_sync(True)

    # ---- introspection, for tests and tuning

    def bucket_indices(self) -> list[list[int]]:
        """Parameter indices (in named_parameters order, trainable only) of each bucket, in launch order."""
        return self._bucketer.bucket_indices()

    def launch_log(self) -> list[tuple[int, int]]:
        """(bucket, gradients still pending) for each bucket launched by the last synchronised backward."""
        return self._bucketer.launch_log()


def _checked_hook(hook: Callable) -> Callable:
    """``hook`` with its result checked: the bucketer needs a Future, and anything else (a hook that forgot to
    return one) would reach C++ as a null future."""

    def checked(state: CommHookState, bucket: Any) -> torch.futures.Future:
        future = hook(state, bucket)
        # Duck-typed: dist work's get_future() returns torch's C++ Future, the base of torch.futures.Future.
        if not (callable(getattr(future, "wait", None)) and callable(getattr(future, "then", None))):
            raise TypeError(f"DataParallel comm_hook {getattr(hook, '__name__', hook)!r} must return a "
                            f"torch.futures.Future of the bucket's reduced tensor, got {type(future).__name__}")
        return future

    return checked
