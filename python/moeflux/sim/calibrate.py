"""Fit the cost model's link parameters to measured all-to-alls (e.g. the emulated cluster: network
namespaces, one tc-shaped veth per node, ranks of a node over loopback, gloo).

Parameterisation, so that one fit serves runs at several configured link rates and delays:

    measured ≈ overhead_s + latency_factor · latency_s + all_to_all_time(traffic, topology), where the topology
    has intra = (intra_alpha_s, intra_beta_s_per_byte) and inter = (inter_alpha_s, 1 / (inter_efficiency · rate))

- ``rate`` / ``latency_s``: the configured inter-node link rate and one-way delay of the measurement;
- ``inter_efficiency``: payload rate / configured rate (TCP/IP framing, shaping, gloo);
- ``inter_alpha_s`` / ``intra_alpha_s``: per-message costs (per peer; see cost_model);
- ``latency_factor``: delays paid per collective (gloo posts all sends at once, so the delay is paid about
  once, not per message), ``overhead_s``: a fixed per-collective cost (launch, synchronisation);
- ``pair_serialization`` (θ, opt-in: 0 and not fitted unless asked for): a transport that moves the two
  directions of one connection one after the other instead of at once. gloo over TCP does (one socket per pair
  of ranks; on the emulated testbed a 2-rank exchange of X bytes each way takes 2·X/rate, but X/rate when the
  two directions use two process groups, i.e. two sockets); full-duplex transports (NCCL) do not. Each NIC's inter-node bytes become ``max(sent, received) + θ·D`` with
  ``D = E|Σ_c ±m_c|``: ``m_c`` the smaller direction of each of the NIC's remote connections ``c``, the signs
  (which direction of a connection goes first) random. With all first halves on one side of the link the other
  side idles, with half on each side the link stays busy: D = m for one connection (2·X in all), 0.5·X for a
  uniform 4-node exchange, 0.375·X for 2x2. Exact enumeration up to 12 connections, the normal approximation
  ``sqrt(2/π·Σ m_c²)`` beyond. Direct algorithm only.

The model is a max over ranks and branches, so it is fitted by iterated linearisation: with the current
parameters, find each measurement's critical rank and branch in every phase, which makes the time linear in
the parameters; solve the non-negative least squares of the *relative* errors; repeat until the critical
terms stop changing. A parameter the data cannot identify (a column of zeros, or one collinear with those
before it, e.g. the latency factor when all runs share one delay) keeps its ``prior`` value; ``fitted`` lists
the ones that were fitted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .cost_model import all_to_all_phases, all_to_all_time
from .links import LinkClass, Topology
from .nnls import nnls
from .routing import traffic_matrix, zipf

__all__ = ["RoutingSpec", "Measurement", "FittedLinks", "PARAMETERS", "DEFAULT_FIT", "fit", "predict",
           "load_measurements", "serialized_pair_bytes", "save_fitted", "load_fitted"]

# Parameter names, in the order a collinear one is dropped last-first.
PARAMETERS: tuple[str, ...] = ("inter_efficiency", "overhead_s", "inter_alpha_s", "intra_beta_s_per_byte",
                               "intra_alpha_s", "latency_factor", "pair_serialization")
# What fit() fits unless told otherwise (pair_serialization is a property of the transport: opt-in).
DEFAULT_FIT: tuple[str, ...] = PARAMETERS[:6]
_EXACT_CONNECTIONS = 12  # E|Σ ±m| by enumeration up to this many connections per NIC, else the normal approximation


@dataclass(frozen=True)
class RoutingSpec:
    """A synthetic routing to rebuild the traffic of a measurement: zipf (``skew`` = s; 0 is uniform) with
    ``num_experts`` (default 2 per rank) and a seed."""

    tokens_per_rank: int
    hidden: int
    bytes_per_elem: int = 2
    kind: str = "uniform"
    skew: float = 0.0
    top_k: int = 2
    num_experts: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:  # checked when read, so load_measurements names the entry
        if self.kind not in ("uniform", "zipf"):
            raise ValueError(f"RoutingSpec: kind must be 'uniform' or 'zipf', got {self.kind!r}")

    def traffic(self, world: int) -> np.ndarray:
        experts = self.num_experts or 2 * world
        s = 0.0 if self.kind == "uniform" else self.skew
        counts = zipf(world, experts, self.tokens_per_rank, self.top_k, s, self.seed)
        return traffic_matrix(counts, self.hidden, self.bytes_per_elem)


@dataclass(frozen=True)
class Measurement:
    """One timed all-to-all: the cluster shape, the configured inter-node link, the traffic (bytes
    ``[P, P]``, or a :class:`RoutingSpec` to rebuild it) and the measured seconds."""

    nodes: int
    ranks_per_node: int
    link_gbit_per_s: float
    latency_s: float
    measured_s: float
    traffic_bytes: np.ndarray | None = None
    routing: RoutingSpec | None = None
    algorithm: str = "direct"
    nics_per_node: int = 1

    def __post_init__(self) -> None:
        if (self.traffic_bytes is None) == (self.routing is None):
            raise ValueError("Measurement: give exactly one of traffic_bytes and routing")
        if not self.measured_s > 0:
            raise ValueError(f"Measurement: measured_s must be > 0, got {self.measured_s!r}")
        if not self.link_gbit_per_s > 0 or self.latency_s < 0:
            raise ValueError(f"Measurement: need link_gbit_per_s > 0 and latency_s >= 0, got "
                             f"{self.link_gbit_per_s!r}, {self.latency_s!r}")

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def rate_bytes_per_s(self) -> float:
        return self.link_gbit_per_s * 1e9 / 8

    def traffic(self) -> np.ndarray:
        if self.traffic_bytes is not None:
            return np.asarray(self.traffic_bytes, dtype=np.float64)
        return self.routing.traffic(self.world)


@dataclass(frozen=True)
class FittedLinks:
    """Fitted (or prior) parameters; see the module docstring for the model."""

    overhead_s: float = 0.0
    latency_factor: float = 0.0
    intra_alpha_s: float = 20e-6
    intra_beta_s_per_byte: float = 1 / 2e9  # loopback TCP, a few GB/s
    inter_alpha_s: float = 20e-6
    inter_efficiency: float = 0.94  # TCP payload per wire byte at a 1500-byte MTU
    pair_serialization: float = 0.0  # 0: full-duplex connections (NCCL); ~1: gloo over TCP
    fitted: tuple[str, ...] = ()
    rms_relative_error: float = float("nan")
    max_relative_error: float = float("nan")
    num_measurements: int = 0
    fit_iterations: int = 0

    @property
    def intra(self) -> LinkClass:
        return LinkClass(self.intra_alpha_s, self.intra_beta_s_per_byte)

    def inter(self, link_gbit_per_s: float) -> LinkClass:
        """The inter-node link class at a configured rate."""
        return LinkClass(self.inter_alpha_s, 8 / (link_gbit_per_s * 1e9 * self.inter_efficiency))

    def topology(self, nodes: int, ranks_per_node: int, link_gbit_per_s: float, nics_per_node: int = 1) -> Topology:
        return Topology(nodes, ranks_per_node, self.intra, self.inter(link_gbit_per_s), nics_per_node)

    def _vector(self) -> np.ndarray:
        """Parameters as the linear coefficients of the model: 1/efficiency, θ/efficiency, the others as is."""
        return np.array([1 / self.inter_efficiency if name == "inter_efficiency"
                         else self.pair_serialization / self.inter_efficiency if name == "pair_serialization"
                         else getattr(self, name) for name in PARAMETERS])

    def _with_vector(self, theta: np.ndarray, fitted: tuple[str, ...], **kw: Any) -> FittedLinks:
        values = {name: float(v) for name, v in zip(PARAMETERS, theta)}
        inverse = values["inter_efficiency"]
        values["inter_efficiency"] = 1 / inverse if inverse > 0 else np.inf
        if "pair_serialization" in fitted:
            values["pair_serialization"] = values["pair_serialization"] / inverse if inverse > 0 else 0.0
        else:
            values["pair_serialization"] = self.pair_serialization
        return replace(self, **values, fitted=fitted, **kw)


def serialized_pair_bytes(traffic: np.ndarray, topo: Topology) -> np.ndarray:
    """``D`` per rank (its NIC's; ``[..., P]``): the expected bytes that a NIC's link idles for when each of its
    remote connections moves its two directions one after the other, in a random order (see the module
    docstring): ``E|Σ_c ±min(traffic[a, b], traffic[b, a])|`` over the connections (a on the NIC, b on another
    node)."""
    t = np.asarray(traffic, dtype=np.float64)
    p, r, g = topo.world, topo.ranks_per_node, topo.ranks_per_nic
    smaller = np.minimum(t, np.swapaxes(t, -1, -2))
    node = np.arange(p) // r
    remote = node[:, None] != node[None, :]
    out = np.zeros(t.shape[:-1])
    for nic in range(p // g):
        ranks = np.arange(nic * g, (nic + 1) * g)
        a, b = np.nonzero(remote[ranks])
        m = smaller[..., ranks[a], b]  # [..., k]
        k = m.shape[-1]
        if k == 0:
            d = np.zeros(t.shape[:-2])
        elif k <= _EXACT_CONNECTIONS:
            # Signs of the connections 2..k (the first one's is +: |x| is symmetric).
            signs = 1 - 2 * ((np.arange(1 << (k - 1))[:, None] >> np.arange(k - 1)) & 1)
            signs = np.concatenate([np.ones((signs.shape[0], 1)), signs], axis=1)  # [2^(k-1), k]
            d = np.abs(m @ signs.T).mean(-1)
        else:
            d = np.sqrt(2 / np.pi * (m ** 2).sum(-1))
        out[..., ranks] = d[..., None]
    return out


def _critical_phases(m: Measurement, traffic: np.ndarray, fitted: FittedLinks):
    """The phases of the model at ``fitted`` and each phase's critical (branch, rank): yields (branch, rank,
    serialized bytes of the rank's NIC, phase time)."""
    topo = fitted.topology(m.nodes, m.ranks_per_node, m.link_gbit_per_s, m.nics_per_node)
    phases, _ = all_to_all_phases(traffic, topo, m.algorithm)
    extra = serialized_pair_bytes(traffic, topo) if m.algorithm == "direct" else np.zeros(topo.world)
    for phase in phases:
        times = []
        for b in phase:
            t = np.broadcast_to(b.time_s(topo), (topo.world,))
            if b.link == "inter":
                t = t + fitted.pair_serialization * extra * topo.inter.beta_s_per_byte
            times.append(t)
        times = np.stack(times)
        branch_index, rank = np.unravel_index(np.argmax(times), times.shape)
        yield phase[branch_index], int(rank), float(extra[rank]), float(times[branch_index, rank])


def predict(measurement: Measurement, fitted: FittedLinks) -> float:
    """Model seconds of a measurement's all-to-all with fitted parameters."""
    m = measurement
    if fitted.pair_serialization == 0:
        topo = fitted.topology(m.nodes, m.ranks_per_node, m.link_gbit_per_s, m.nics_per_node)
        network = float(all_to_all_time(m.traffic(), topo, m.algorithm))
    else:
        network = sum(t for *_, t in _critical_phases(m, m.traffic(), fitted))
    return fitted.overhead_s + fitted.latency_factor * m.latency_s + network


def _features(m: Measurement, traffic: np.ndarray, theta: FittedLinks, fit_serialization: bool) -> np.ndarray:
    """Coefficients of the parameters (PARAMETERS order; efficiency as 1/efficiency, θ as θ/efficiency) in the
    critical terms of the model at ``theta``: time = features · vector. When θ is not fitted its bytes join the
    efficiency's column (at θ's value)."""
    row = dict.fromkeys(PARAMETERS, 0.0)
    row["overhead_s"], row["latency_factor"] = 1.0, m.latency_s
    for branch, rank, serialized, _ in _critical_phases(m, traffic, theta):
        msgs = float(np.broadcast_to(branch.messages, (m.world,))[rank])
        nbytes = float(branch.bytes[rank])
        if branch.link == "intra":
            row["intra_alpha_s"] += msgs
            row["intra_beta_s_per_byte"] += nbytes
        else:
            row["inter_alpha_s"] += msgs
            row["inter_efficiency"] += nbytes / m.rate_bytes_per_s
            if fit_serialization:
                row["pair_serialization"] += serialized / m.rate_bytes_per_s
            else:
                row["inter_efficiency"] += theta.pair_serialization * serialized / m.rate_bytes_per_s
    return np.array([row[name] for name in PARAMETERS])


def _identifiable(x: np.ndarray) -> np.ndarray:
    """Columns kept greedily in PARAMETERS order while each adds rank (columns scaled to unit norm)."""
    norms = np.linalg.norm(x, axis=0)
    keep = np.zeros(x.shape[1], dtype=bool)
    for j in range(x.shape[1]):
        if norms[j] == 0:
            continue
        trial = keep.copy()
        trial[j] = True
        cols = x[:, trial] / norms[trial]
        if np.linalg.matrix_rank(cols, tol=1e-6) == trial.sum():
            keep = trial
    return keep


def fit(measurements: Sequence[Measurement], prior: FittedLinks | None = None,
        max_iterations: int = 50, parameters: Sequence[str] = DEFAULT_FIT) -> FittedLinks:
    """Least-squares (non-negative, relative error) fit of the link parameters; see the module docstring.
    ``parameters``: the ones to fit (the others keep their ``prior`` values); add ``"pair_serialization"``
    for a transport that serialises the directions of a connection (gloo over TCP)."""
    if not measurements:
        raise ValueError("fit: no measurements")
    unknown = set(parameters) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"fit: unknown parameter(s) {sorted(unknown)}; choose from {PARAMETERS}")
    wanted = np.array([name in parameters for name in PARAMETERS])
    fit_serialization = "pair_serialization" in parameters
    prior = prior or FittedLinks()
    traffic = [m.traffic() for m in measurements]
    y = np.array([m.measured_s for m in measurements])
    theta, best, best_err, seen = prior, prior, np.inf, []
    for iteration in range(1, max_iterations + 1):
        x = np.stack([_features(m, t, theta, fit_serialization) for m, t in zip(measurements, traffic)])
        if any(np.array_equal(x, s) for s in seen):
            break  # the critical terms repeat: converged (or cycling between the best ones seen)
        seen.append(x)
        keep = np.zeros(len(PARAMETERS), dtype=bool)
        keep[wanted] = _identifiable(x[:, wanted])
        vector = prior._vector()
        target = y - x[:, ~keep] @ vector[~keep]  # unidentified parameters contribute their prior values
        a = x[:, keep] / y[:, None]  # relative errors
        scale = np.linalg.norm(a, axis=0)
        vector[keep] = nnls(a / scale, target / y) / scale
        names = tuple(name for name, k in zip(PARAMETERS, keep) if k)
        theta = prior._with_vector(vector, names, fit_iterations=iteration)
        rel = np.array([predict(m, theta) for m in measurements]) / y - 1
        err = float(np.sqrt(np.mean(rel ** 2)))
        if err < best_err:
            best, best_err = replace(theta, rms_relative_error=err, max_relative_error=float(np.abs(rel).max()),
                                     num_measurements=len(measurements)), err
    return best


def _measurement_from_json(obj: dict[str, Any], index: int) -> Measurement:
    try:
        measured = obj["measured_s"]
        measured = float(np.median(measured)) if isinstance(measured, list) else float(measured)
        routing = RoutingSpec(**obj["routing"]) if obj.get("routing") is not None else None
        traffic = np.asarray(obj["traffic_bytes"], dtype=np.float64) if obj.get("traffic_bytes") is not None \
            else None
        return Measurement(int(obj["nodes"]), int(obj["ranks_per_node"]), float(obj["link_gbit_per_s"]),
                           float(obj["latency_s"]), measured, traffic, routing, obj.get("algorithm", "direct"),
                           int(obj.get("nics_per_node", 1)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"load_measurements: entry {index}: {e!s}") from e


def load_measurements(json_path: str | Path) -> list[Measurement]:
    """Read a JSON list of measurements: objects with ``nodes``, ``ranks_per_node``, ``link_gbit_per_s``,
    ``latency_s``, ``measured_s`` (seconds, or a list of repeats: their median), and either ``traffic_bytes``
    (``[P][P]``) or ``routing`` (:class:`RoutingSpec` fields); optional ``algorithm``, ``nics_per_node``."""
    data = json.loads(Path(json_path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"load_measurements: {json_path} must hold a JSON list, got {type(data).__name__}")
    return [_measurement_from_json(obj, i) for i, obj in enumerate(data)]


def save_fitted(path: str | Path, fitted: FittedLinks) -> None:
    """Write ``fitted`` as JSON (benchmarks/calibrate_sim.py's ``fitted.json``)."""
    Path(path).write_text(json.dumps({f.name: getattr(fitted, f.name) for f in fields(fitted)}, indent=1))


def load_fitted(path: str | Path) -> FittedLinks:
    """The :class:`FittedLinks` that :func:`save_fitted` wrote (e.g. for ``ShadowCostModel.from_fitted_links``)."""
    data = json.loads(Path(path).read_text())
    names = {f.name for f in fields(FittedLinks)}
    return FittedLinks(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})
