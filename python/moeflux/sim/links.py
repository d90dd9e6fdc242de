"""Link classes (α-β: latency per message, seconds per byte), their public-spec presets, and the cluster topology.

Kept apart from the cost formulas so that calibration and the CLI can build
topologies without touching the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinkClass:
    """One class of link: a message of ``n`` bytes takes ``alpha_s + n * beta_s_per_byte`` seconds."""

    alpha_s: float
    beta_s_per_byte: float

    def __post_init__(self) -> None:
        for name in ("alpha_s", "beta_s_per_byte"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LinkClass: {name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_bandwidth(cls, *, gbit_per_s: float | None = None, bytes_per_s: float | None = None,
                       latency_s: float, efficiency: float = 1.0) -> LinkClass:
        """From a rate (exactly one of Gbit/s (10^9 bit/s) or bytes/s), a per-message latency and the fraction
        of the rate that payload achieves (e.g. 0.94 for TCP over a 1500-byte MTU)."""
        if (gbit_per_s is None) == (bytes_per_s is None):
            raise ValueError("LinkClass.from_bandwidth: give exactly one of gbit_per_s and bytes_per_s")
        rate = gbit_per_s * 1e9 / 8 if gbit_per_s is not None else bytes_per_s
        if not rate or rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"LinkClass.from_bandwidth: the rate must be > 0, got {gbit_per_s or bytes_per_s!r}")
        if not 0 < efficiency <= 1:
            raise ValueError(f"LinkClass.from_bandwidth: efficiency must be in (0, 1], got {efficiency!r}")
        return cls(float(latency_s), 1.0 / (rate * efficiency))

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Effective payload rate (inf for a zero β)."""
        return math.inf if self.beta_s_per_byte == 0 else 1.0 / self.beta_s_per_byte

    def message_time_s(self, nbytes: float) -> float:
        """Time of one message of ``nbytes``."""
        return self.alpha_s + nbytes * self.beta_s_per_byte


# Presets. Bandwidths are effective payload rates per GPU (NVLink) or per NIC (network), latencies the
# small-message cost of one send/recv through the communication library; both are starting points that
# calibrate.fit replaces with measured values.
# - NVLink 4 (H100 SXM): 900 GB/s bidirectional = 450 GB/s per direction (NVIDIA H100 datasheet); nccl-tests
#   on DGX H100 reach ~370 GB/s bus bandwidth, so 370 GB/s effective; NCCL intra-node latency a few µs.
# - InfiniBand NDR 400 Gbit/s (ConnectX-7): 50 GB/s line rate; ib_write_bw / NCCL reach ~46 GB/s (encoding,
#   headers); ~5 µs per message through NCCL's proxy (≈1-2 µs HCA + switch hardware latency).
# - Ethernet N Gbit/s with TCP: payload 1448 of 1538 wire bytes per 1500-byte-MTU frame = 0.94 of the line
#   rate; latencies are typical kernel-stack one-message costs (RoCE-class for 100G), order of magnitude only.
TCP_EFFICIENCY = 1448 / 1538

LINK_PRESETS: dict[str, LinkClass] = {
    "nvlink-h100": LinkClass.from_bandwidth(bytes_per_s=370e9, latency_s=3e-6),
    "ib-400g": LinkClass.from_bandwidth(bytes_per_s=46e9, latency_s=5e-6),
    "eth-100g": LinkClass.from_bandwidth(gbit_per_s=100, latency_s=10e-6, efficiency=TCP_EFFICIENCY),
    "eth-25g": LinkClass.from_bandwidth(gbit_per_s=25, latency_s=15e-6, efficiency=TCP_EFFICIENCY),
    "eth-10g": LinkClass.from_bandwidth(gbit_per_s=10, latency_s=25e-6, efficiency=TCP_EFFICIENCY),
    "eth-1g": LinkClass.from_bandwidth(gbit_per_s=1, latency_s=50e-6, efficiency=TCP_EFFICIENCY),
}
NVLINK_H100 = LINK_PRESETS["nvlink-h100"]
IB_400G = LINK_PRESETS["ib-400g"]
ETH_100G = LINK_PRESETS["eth-100g"]
ETH_25G = LINK_PRESETS["eth-25g"]
ETH_10G = LINK_PRESETS["eth-10g"]
ETH_1G = LINK_PRESETS["eth-1g"]


@dataclass(frozen=True)
class Topology:
    """``nodes`` nodes of ``ranks_per_node`` ranks; rank ``r`` is on node ``r // ranks_per_node``.

    Ranks of a node talk over ``intra`` (each rank its own port, full duplex). Traffic leaving a node goes over
    ``nics_per_node`` links of class ``inter``, each shared by ``ranks_per_node / nics_per_node`` consecutive
    ranks: 1 (the default) is one link per node, as in the emulated testbed (one shaped veth per node);
    ``ranks_per_node`` is one NIC per GPU, as in a DGX H100 (8 x 400G).
    """

    nodes: int
    ranks_per_node: int
    intra: LinkClass
    inter: LinkClass
    nics_per_node: int = 1

    def __post_init__(self) -> None:
        for name in ("nodes", "ranks_per_node", "nics_per_node"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Topology: {name} must be a positive int, got {value!r}")
        if self.ranks_per_node % self.nics_per_node:
            raise ValueError(f"Topology: nics_per_node ({self.nics_per_node}) must divide ranks_per_node "
                             f"({self.ranks_per_node})")

    @classmethod
    def flat(cls, world: int, link: LinkClass) -> Topology:
        """``world`` ranks, each with its own link of one class (every pair of ranks talks over ``link``)."""
        return cls(world, 1, link, link, 1)

    @property
    def world(self) -> int:
        """Number of ranks."""
        return self.nodes * self.ranks_per_node

    @property
    def ranks_per_nic(self) -> int:
        """Ranks sharing one inter-node link."""
        return self.ranks_per_node // self.nics_per_node

    def node_of(self, rank: int | np.ndarray) -> int | np.ndarray:
        """Node of a rank (or of each rank of an array)."""
        ranks = np.asarray(rank)
        if np.any((ranks < 0) | (ranks >= self.world)):
            raise ValueError(f"Topology.node_of: ranks must be in [0, {self.world}), got {rank!r}")
        nodes = ranks // self.ranks_per_node
        return int(nodes) if nodes.ndim == 0 else nodes
