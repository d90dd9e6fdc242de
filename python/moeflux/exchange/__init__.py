"""How a MoE layer's routed tokens reach their experts and come back.

``MoE.forward`` does ``routing -> exchange.run``; the :class:`ExchangeEngine` composes three independent parts:

- a **transport** (:mod:`.transport`): local (every expert here), flat (all-to-all over the expert-parallel
  group) or hierarchical (rail then node); it owns the one count/header exchange;
- a **schedule** (:mod:`.schedule`): bulk, chunked (Lina) or pairwise (FasterMoE); staged schedules run in the
  C++ staged engine, which overlaps each stage's all-to-alls with another stage's experts;
- **shadowing** (:mod:`.shadowing`): FasterMoE's hot experts, a transform of the routing before the transport,
  chosen by a cost model that asks the transport what its all-to-alls move and can calibrate its rates
  (:mod:`.calibration`).

:func:`make_exchange` is the one place that picks the concrete parts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..placement import ExpertPlacement
from ..topology import node_groups_for
from .base import ExpertBatch, Transport, failed_probe
from .config import ExchangeConfig, shadow_policy
from .engine import ExchangeEngine
from .schedule import SCHEDULES, Schedule
from .shadowing import ShadowPolicy, Shadowing
from .transport.flat import FlatTransport
from .transport.hierarchical import HierarchicalTransport
from .transport.local import LocalTransport


def make_exchange(placement: ExpertPlacement, ep_group: dist.ProcessGroup | None,
                  config: ExchangeConfig | None = None, device: torch.device | str | None = None) -> ExchangeEngine:
    """The engine ``config`` describes, for a layer with ``placement`` over ``ep_group`` (``None``: every expert
    here, a local transport; nothing to shadow or stage). ``device``: the layer's, for ``shadowing="auto"``."""
    config = ExchangeConfig() if config is None else config
    config.check(ep_group)
    schedule = config.schedule_part()
    if ep_group is None:
        if placement.ep_size != 1:
            raise ValueError(f"make_exchange: without an expert-parallel group this process holds every expert: "
                             f"placement.ep_size must be 1, got {placement.ep_size}")
        return ExchangeEngine(placement, LocalTransport(placement.num_experts), Schedule())
    if placement.ep_size != dist.get_world_size(ep_group):
        raise ValueError(f"make_exchange: placement.ep_size ({placement.ep_size}) must equal the size of the "
                         f"expert-parallel group ({dist.get_world_size(ep_group)})")
    transport: Transport
    if config.transport == "hierarchical":
        nodes = config.nodes if config.nodes is not None else node_groups_for(ep_group)
        schedule.check_group(nodes.ranks_per_node, "a node (ranks_per_node)")
        transport = HierarchicalTransport(placement.num_experts, nodes)
    else:
        transport = FlatTransport(placement.num_experts, ep_group)
    device_type = torch.device(device).type if device is not None else "cpu"
    policy = shadow_policy(config.shadowing, device_type)
    shadowing = Shadowing(policy, ep_group, transport) if policy is not None else None
    return ExchangeEngine(placement, transport, schedule, shadowing)


__all__ = ["ExchangeConfig", "ExchangeEngine", "ExpertBatch", "Transport", "LocalTransport", "FlatTransport",
           "HierarchicalTransport", "Schedule", "SCHEDULES", "Shadowing", "ShadowPolicy", "failed_probe",
           "make_exchange"]
