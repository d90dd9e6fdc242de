"""``moeflux.ExpertReplacement``: SmartMoE's dynamic expert re-placement (ATC'23) between training steps."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .balance import greedy_placement, imbalance, moved_experts
from .distributed import check_agreement
from .moe import MoE
from .placement import ExpertPlacement

PlacementPolicy = Callable[[np.ndarray, ExpertPlacement], "ExpertPlacement | None"]


@dataclass(frozen=True)
class Replacement:
    """One accepted re-placement of one layer."""

    step: int
    layer: str
    old: ExpertPlacement
    new: ExpertPlacement
    moved: int  # experts that changed rank
    imbalance_before: float  # busiest / mean rank load over the window, old placement
    imbalance_after: float  # the same with the new placement


class ExpertReplacement:
    """Moves experts between the ranks of their expert-parallel group as the load shifts.

    Call :meth:`step` once per training step, after ``optimizer.step()``, on every rank of ``group``. Every
    ``every`` steps the routed load of the last ``window`` steps (each layer's
    :attr:`moeflux.MoE.routed_tokens_per_expert`, summed over the training-mode forwards of each step by a
    forward hook, then over ``group``: one all-reduce) goes through
    ``policy`` (default: :func:`moeflux.balance.greedy_placement`, SmartMoE's greedy); for each layer whose
    new placement it accepts, the experts' parameters, their gradients if any and their optimizer state
    (every state tensor of the parameter's shape: AdamW's moments, SGD's momentum) are moved to their new
    rank and slot by one all-to-all each (:func:`moeflux.ops.move_expert_rows`), and the layer routes by the
    new placement. Training is unchanged: a token meets the same expert, with the same weights and state.

    ``group`` (default: the world) must hold every replica of the experts (all expert-parallel groups),
    so that every replica makes the same choice. Construction is collective over ``group`` once
    ``torch.distributed`` is initialised: ranks that pass another ``every``, ``window`` or ``policy`` (as
    :func:`policy_identity` tells them), or hold other MoE layers, all raise, as do all of them when one rank's
    arguments are invalid (the others quote its error). Checkpoints name experts by global index
    (:class:`moeflux.GroupedExperts`), so they load under any placement and rank count.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, every: int = 50,
                 window: int | None = None, policy: PlacementPolicy = greedy_placement,
                 group: dist.ProcessGroup | None = None) -> None:
        window = every if window is None else window
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and m.ep_size > 1]
        error = _config_error(every, window)
        if dist.is_initialized():
            # Ranks that re-place at other steps, or sum loads of other shapes, would wait in the all-reduce.
            check_agreement(group or dist.group.WORLD, "moeflux.ExpertReplacement", local_error=error, every=every,
                            window=window, policy=policy_identity(policy),
                            experts_per_layer=[layer.num_experts for _, layer in self.layers])
        elif error is not None:
            raise ValueError(f"moeflux.ExpertReplacement: {error}")
        self.optimizer, self.every, self.window, self.policy, self.group = optimizer, every, window, policy, group
        self.steps = 0
        self.history: list[Replacement] = []
        self._loads: deque[Tensor] = deque(maxlen=window)
        # Every training forward's routed load since the last step() (gradient accumulation runs several;
        # evaluation forwards do not count).
        self._pending: list[Tensor | None] = [None] * len(self.layers)
        self._hooks = [layer.register_forward_hook(self._recorder(i)) for i, (_, layer) in enumerate(self.layers)]

    def _recorder(self, index: int):
        def record(layer: MoE, inputs: object, output: object) -> None:
            routed = layer.routed_tokens_per_expert
            if layer.training and routed is not None:
                pending = self._pending[index]
                self._pending[index] = routed.clone() if pending is None else pending + routed
        return record

    def remove(self) -> None:
        """Stop recording loads (removes the forward hooks)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def step(self) -> list[Replacement]:
        """Record this step's loads; every ``every`` steps, re-place. Returns the re-placements made now."""
        if not self.layers:
            return []
        self.steps += 1
        self._loads.append(torch.stack([
            torch.zeros(layer.num_experts, dtype=torch.int64, device=layer.experts.w_in.device) if p is None else p
            for p, (_, layer) in zip(self._pending, self.layers)]))
        self._pending = [None] * len(self.layers)
        if self.steps % self.every:
            return []
        total = torch.stack(list(self._loads)).sum(0)
        dist.all_reduce(total, group=self.group)
        loads = ops.to_host(total, "replacement_loads").double().numpy()
        made = []
        for (name, layer), load in zip(self.layers, loads):
            new = self.policy(load, layer.placement)
            if new is None or new.expert_at == layer.placement.expert_at:
                continue
            old = layer.placement
            self.move(layer, new)
            made.append(Replacement(self.steps, name, old, new, moved_experts(old, new), imbalance(load, old),
                                    imbalance(load, new)))
        self.history.extend(made)
        return made

    @torch.no_grad()
    def move(self, layer: MoE, new: ExpertPlacement) -> None:
        """Move ``layer``'s experts (parameters, gradients, optimizer state) to ``new`` and route by it.
        Collective over the layer's expert-parallel group."""
        old = layer.placement
        if layer.ep_group is None:
            raise ValueError("ExpertReplacement.move: the layer has no expert-parallel group; every expert is "
                             "on this rank already")
        new = ExpertPlacement(new.num_experts, old.ep_size, old.ep_rank, new.expert_at)

        # Everything that is per expert: parameters, their gradients, optimizer state of their shape.
        tensors: list[Tensor] = []
        for param in layer.experts.parameters():
            tensors.append(param)
            if param.grad is not None:
                tensors.append(param.grad)
            state = self.optimizer.state.get(param, {}) if self.optimizer is not None else {}
            tensors.extend(state[key] for key in sorted(state)
                           if isinstance(state[key], Tensor) and state[key].shape == param.shape)
        # One all-to-all per dtype: each expert's rows of all the tensors side by side.
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            rows = torch.cat([t.reshape(t.shape[0], -1) for t in group], dim=1)
            rows = ops.move_expert_rows(rows, list(old.expert_at), list(new.expert_at), layer.ep_group)
            for t, part in zip(group, rows.split([t[0].numel() for t in group], dim=1)):
                t.copy_(part.view(t.shape))
        layer.set_placement(new)


def _config_error(every: object, window: object) -> str | None:
    for name, value in (("every", every), ("window", window)):
        if not isinstance(value, int) or value < 1:
            return f"{name} must be an int >= 1, got {value!r}"
    return None


def policy_identity(policy: object) -> str:
    """What tells ``policy`` from another on every rank: its repr without memory addresses (a function's name,
    a ``functools.partial``'s function and arguments, a dataclass's fields; instances of a class without a repr
    are told apart by class only)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(policy))


__all__ = ["ExpertReplacement", "Replacement"]
