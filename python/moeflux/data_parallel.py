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
from .moe import expert_parameters

BUILTIN_HOOKS = ("allreduce", "bf16_compress")


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
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("moeflux.DataParallel: call torch.distributed.init_process_group first")
        if bucket_cap_mb <= 0 or first_bucket_cap_mb <= 0:
            raise ValueError(f"bucket sizes must be > 0, got {bucket_cap_mb} and {first_bucket_cap_mb}")
        self.module = module
        dp_group = dp_group if dp_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(dp_group)

        expert_group: dict[int, dist.ProcessGroup] = {}
        for ep in expert_parameters(module):
            if ep.layer.ep_group is None:
                continue
            if ep.layer.edp_group is None:
                name = next(n for n, m in module.named_modules() if m is ep.layer)
                raise ValueError(
                    f"moeflux.DataParallel: MoE layer '{name}' was built with a bare ep_group; pass "
                    "ep_group=moeflux.init_expert_parallel(...) so that its experts' replicas are known")
            expert_group[id(ep.param)] = ep.layer.edp_group
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

        self._bucketer = _C.GradientBucketer(
            params, names, param_group, [g.group_name for g in self.groups], [float(self.world_size)] * len(self.groups),
            int(first_bucket_cap_mb * 2**20), int(bucket_cap_mb * 2**20), gradient_as_bucket_view,
            find_unused_parameters,
        )
        self.register_comm_hook(comm_hook, comm_hook_state)

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
            self._bucketer.set_python_comm_hook([CommHookState(g, state) for g in self.groups], hook)
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
