"""Record the main job's routing: how many token slots of each rank chose each expert, per layer and step,
in the layout of the SmartMoE trace that moeflux.sim reads ([step, source rank, layer, micro-batch, expert];
one micro-batch per step here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import moeflux
from moeflux.sim import save_trace


class RoutingRecorder:
    """Counts every routed slot through a forward hook on each layer's router (no change to the layers);
    :meth:`end_step` gathers the counts of every rank (one small all-gather), :meth:`save` writes them on
    rank 0. Only forwards between :meth:`start_step` and :meth:`end_step` count (not evaluation)."""

    def __init__(self, layers: list[moeflux.MoE]) -> None:
        self.num_experts = layers[0].num_experts
        self.counts = torch.zeros(len(layers), self.num_experts, dtype=torch.int64)
        self.recording = False
        self.steps: list[int] = []
        self.gathered: list[np.ndarray] = []  # per recorded step: [ranks, layers, experts]
        for index, layer in enumerate(layers):
            layer.router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, inputs, routing: moeflux.Routing) -> None:
            if self.recording:
                ids = routing.expert_ids.flatten()
                self.counts[index] += torch.bincount(ids[ids >= 0].long(), minlength=self.num_experts).cpu()
        return count

    def start_step(self) -> None:
        self.counts.zero_()
        self.recording = True

    def end_step(self, step: int) -> None:
        self.recording = False
        world = dist.get_world_size()
        # NCCL gathers device tensors only.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        mine = self.counts.to(device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        self.steps.append(step)
        self.gathered.append(torch.stack(everyone).cpu().numpy())

    def save(self, path: Path) -> Path | None:
        """Rank 0 writes ``path`` (npz: counts, iterations); other ranks return None."""
        if dist.get_rank() != 0 or not self.gathered:
            return None
        counts = np.stack(self.gathered)[:, :, :, None, :]  # [step, rank, layer, micro-batch = 1, expert]
        return save_trace(path, counts, np.asarray(self.steps, dtype=np.int64))
