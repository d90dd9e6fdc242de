"""How a layer's tokens cross the expert-parallel group: one typed, validated object (``MoE(exchange=...)``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist

from ..balance import FixedShadows, ShadowCostModel
from ..topology import NodeGroups
from .schedule import Schedule
from .shadowing import ShadowPolicy

TRANSPORTS = ("flat", "hierarchical")


@dataclass(frozen=True)
class ExchangeConfig:
    """The exchange's three independent parts; every combination works.

    Args:
        transport: ``"flat"`` (every slot straight to its expert's rank, one all-to-all each way) or
            ``"hierarchical"`` (node-aware: each token crosses to a remote node once, to this rank's peer
            there, and fans out to its experts inside that node; its slots on one node are summed there
            before it returns: see :mod:`moeflux.exchange.transport.hierarchical`).
        nodes: the hierarchical transport's nodes: the :class:`moeflux.NodeGroups` of
            :func:`moeflux.init_node_groups`, or ``None`` for the launcher's (torchrun's ``LOCAL_WORLD_SIZE``;
            the groups are made on first use, collectively over the world, so every rank of the world must
            build such a layer, and shared by every layer of the group).
        schedule: ``"bulk"`` (one all-to-all each way), ``"chunked"`` (``chunks`` stages whose all-to-alls
            overlap the experts of another stage, forward and backward: Lina) or ``"pairwise"`` (one stage per
            group of ``group_size`` ranks: stage ``s`` sends to group ``g + s``; FasterMoE). With the
            hierarchical transport the schedule stages the node step (its all-to-alls over the node group);
            the rail step across nodes moves in bulk.
        shadowing: FasterMoE's dynamic shadowing of hot experts (:mod:`moeflux.exchange.shadowing`):
            ``"off"``, ``"auto"`` (a :class:`moeflux.ShadowCostModel` starting from rates for the device,
            :meth:`moeflux.ShadowCostModel.default_for`, then calibrated from the layer's own broadcasts and
            all-to-alls: :mod:`moeflux.exchange.calibration`), an int (the same with at most that many shadows
            per step), or a policy (a :class:`moeflux.ShadowCostModel` with your cluster's fixed rates, or
            calibrated with ``calibrate=True``; or :class:`moeflux.FixedShadows`).

    Outputs and gradients are those of the flat bulk exchange up to the order of floating-point sums (and, with
    the hierarchical transport in bf16/fp16, one rounding per node). Without an expert-parallel group the
    layer holds every expert and the exchange is local whatever this says.
    """

    transport: str = "flat"
    nodes: NodeGroups | None = None
    schedule: str = "bulk"
    chunks: int = 2
    group_size: int = 1
    shadowing: str | int | ShadowPolicy = "off"

    def check(self, ep_group: dist.ProcessGroup | None = None) -> None:
        """Raise a clear error for a bad option, or for one that does not fit ``ep_group``. Not done at
        construction: :class:`moeflux.MoE` runs it inside its construction agreement, so that a rank whose
        config is bad makes every rank raise instead of leaving them waiting."""
        if self.transport not in TRANSPORTS:
            raise ValueError(f"exchange transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.nodes is not None and not isinstance(self.nodes, NodeGroups):
            raise TypeError(f"exchange nodes must be a moeflux.NodeGroups or None, got {self.nodes!r}")
        if self.nodes is not None and self.transport != "hierarchical":
            raise ValueError("exchange nodes are for transport='hierarchical'")
        self.schedule_part()  # raises on a bad schedule, chunks or group_size
        _check_shadowing(self.shadowing)
        self._check_group(ep_group)

    def schedule_part(self) -> Schedule:
        return Schedule(self.schedule, self.chunks, self.group_size)

    @property
    def shadowed(self) -> bool:
        return self.shadowing not in ("off", None)

    def _check_group(self, ep_group: dist.ProcessGroup | None) -> None:
        if ep_group is None:
            return
        nodes = self.nodes
        if nodes is not None and nodes.ep_group is not ep_group:
            raise ValueError("exchange nodes: the NodeGroups were made for another expert-parallel group than "
                             "ep_group (pass init_node_groups(ep_group))")
        if self.transport == "hierarchical":
            # The schedule stages the node step: pairwise groups tile a node (known once the groups exist).
            if nodes is not None:
                self.schedule_part().check_group(nodes.ranks_per_node, "a node (ranks_per_node)")
        else:
            self.schedule_part().check_group(dist.get_world_size(ep_group), "the expert-parallel group")

    def agreement_fields(self) -> dict[str, object]:
        """Every field, as the construction agreement compares it (``exchange_<field>``): derived from the
        dataclass's fields, so a new option is agreed on without a hand-kept list."""
        return {f"exchange_{f.name}": _describe(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _describe(value: object) -> object:
    return value.describe() if isinstance(value, NodeGroups) else value


def _check_shadowing(shadowing: object) -> None:
    if shadowing is None or shadowing in ("off", "auto") or isinstance(shadowing, (ShadowCostModel, FixedShadows)):
        return
    if isinstance(shadowing, int) and not isinstance(shadowing, bool) and shadowing >= 0:
        return
    raise ValueError(f"shadowing must be 'off', 'auto', an int >= 0 or a ShadowCostModel / FixedShadows, "
                     f"got {shadowing!r}")


def shadow_policy(shadowing: str | int | ShadowPolicy | None, device_type: str) -> ShadowPolicy | None:
    """The policy a config's ``shadowing`` names, for a layer on ``device_type``."""
    _check_shadowing(shadowing)
    if shadowing is None or shadowing == "off":
        return None
    if isinstance(shadowing, (ShadowCostModel, FixedShadows)):
        return shadowing
    if shadowing == "auto":
        return ShadowCostModel.default_for(device_type)
    return ShadowCostModel.default_for(device_type, max_shadows=shadowing)
