"""The shadow cost model asks the transport what its all-to-alls move (Transport.wire_bytes) and calibrates its
rates from the layer's own broadcasts, shadow compute and transport runs (moeflux.exchange.calibration): the
arithmetic by hand, the moving average and the agreement schedule (with the all-reduce stubbed), how measured
rates change the choice; and on 2 gloo ranks, a calibrated layer (flat and hierarchical) whose ranks agree on
the rates and the shadows at every step and whose outputs and gradients equal the unshadowed layer's."""

from __future__ import annotations

import math
from dataclasses import astuple
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

import moeflux
from moeflux import ExchangeConfig, FixedShadows, ShadowCostModel
from moeflux.balance import ExpertShape, Rates, flat_wire_bytes
from moeflux.exchange import HierarchicalTransport, LocalTransport, calibration
from moeflux.exchange.calibration import FLOP, SHADOW, WIRE, ShadowCalibration, agreed_rates, smooth
from moeflux.exchange.config import shadow_policy
from moeflux.exchange.transport.hierarchical import rail_wire_bytes
from multiprocess import run_ranks

# ==== what crosses the wire

# 2 ranks, 2 positions each: counts[src, position]. Rows src -> dst rank: [[8, 2], [3, 2]].
COUNTS = np.array([[6, 2, 1, 1],
                   [3, 0, 2, 0]])

# 2 nodes x 2 ranks, 2 positions per rank (positions 0-3 on node 0, 4-7 on node 1).
NODE_COUNTS = np.array([[1, 0, 2, 0, 3, 1, 0, 0],  # rank 0: 4 slots to node 1 (to rank 2)
                        [0, 0, 0, 0, 0, 0, 0, 5],  # rank 1: 5 to node 1 (to rank 3)
                        [2, 2, 0, 0, 9, 0, 0, 0],  # rank 2: 4 to node 0 (to rank 0), 9 stay on its node
                        [0, 0, 0, 1, 0, 0, 0, 0]])  # rank 3: 1 to node 0 (to rank 1)


def test_flat_wire_bytes_is_the_busiest_port():
    assert flat_wire_bytes(COUNTS, 10) == 3 * 10  # rank 0 receives 3 rows, sends 2
    gather = np.array([[0, 0, 0], [2, 0, 0], [2, 0, 0]])
    assert flat_wire_bytes(gather, 1) == 4 and flat_wire_bytes(gather.T.copy(), 1) == 4
    assert flat_wire_bytes(np.eye(3) * 9, 1) == 0.0  # rows to the rank's own experts stay
    # ranks sent [2 + 4, 5, 4, 1], received [4, 2 + 1, 4, 5]
    assert flat_wire_bytes(NODE_COUNTS, 1) == 6


def test_rail_wire_bytes_counts_what_crosses_nodes():
    # Rail sends [4, 5, 4, 1] and receives [4, 1, 4, 5]: traffic inside a node (rank 0 -> 1) does not count.
    assert rail_wire_bytes(NODE_COUNTS, 3, num_nodes=2, ranks_per_node=2) == 5 * 3
    # One rank per node: the flat all-to-all; one node: nothing crosses.
    assert rail_wire_bytes(NODE_COUNTS, 3, num_nodes=4, ranks_per_node=1) == flat_wire_bytes(NODE_COUNTS, 3)
    assert rail_wire_bytes(COUNTS, 10, num_nodes=2, ranks_per_node=1) == flat_wire_bytes(COUNTS, 10)
    assert rail_wire_bytes(NODE_COUNTS, 3, num_nodes=1, ranks_per_node=4) == 0.0
    # Slots, not tokens: a token with two experts on node 1 is counted twice (the documented upper bound).
    two_slots = np.zeros((4, 8))
    two_slots[0, [4, 6]] = 1
    assert rail_wire_bytes(two_slots, 1, 2, 2) == 2


def test_transports_answer_the_cost_model():
    hierarchical = HierarchicalTransport.__new__(HierarchicalTransport)  # its arithmetic needs no groups
    hierarchical.nodes = SimpleNamespace(num_nodes=2, ranks_per_node=2)
    assert hierarchical.wire_bytes(NODE_COUNTS, 3) == 15
    assert LocalTransport(8).wire_bytes(NODE_COUNTS, 3) == 0.0
    # The estimate's comm term is four all-to-alls of the transport's bytes.
    model, comm_only = ShadowCostModel(1.0, 1.0), ExpertShape(row_bytes=1, param_bytes=0, flops_per_row=0.0)
    assert model.estimate_s(NODE_COUNTS, (), comm_only) == 4 * 6  # no transport: flat
    assert model.estimate_s(NODE_COUNTS, (), comm_only, hierarchical) == 4 * 5
    assert model.estimate_s(NODE_COUNTS, (), comm_only, LocalTransport(8)) == 0.0
    # Shadowing position 7 (rank 1's 5 rows) leaves rank 0's 4 and rank 2's 4 on the rail.
    assert model.estimate_s(NODE_COUNTS, (7,), comm_only, hierarchical) == 4 * 4


# ==== rates: the model's and measured ones


def test_rates_and_calibrate_field():
    model = ShadowCostModel(1e9, 2e12, 3, 1e-5)
    assert model.rates == Rates(1e9, 1e9, 2e12, 1e-5) and not model.calibrate
    assert ShadowCostModel(1e9, 2e12, calibrate=True) != ShadowCostModel(1e9, 2e12)  # agreed by value
    with pytest.raises(ValueError, match="calibrate must be a bool"):
        ShadowCostModel(1.0, 1.0, calibrate=1)
    assert ShadowCostModel.default_for("cpu").calibrate and ShadowCostModel.default_for("cuda", 2).calibrate
    assert shadow_policy("auto", "cpu").calibrate and shadow_policy(2, "cpu").calibrate
    assert shadow_policy(model, "cpu") is model  # a user's model keeps its fixed rates
    # the fixed rates passed explicitly estimate what the model does
    shape = ExpertShape(row_bytes=10, param_bytes=100, flops_per_row=1000.0)
    for shadows in ((), (0,), (0, 2)):
        assert model.estimate_s(COUNTS, shadows, shape, rates=model.rates) == model.estimate_s(COUNTS, shadows, shape)


def test_moving_average_and_agreed_rates():
    assert smooth(math.nan, 2.0, 0.25) == 2.0  # the first measurement is taken whole
    assert smooth(2.0, 6.0, 0.25) == 3.0
    average = math.nan
    for _ in range(60):
        average = smooth(average, 1.0, 0.25)
    assert average == pytest.approx(1.0)
    prior = Rates(1e9, 2e9, 3e12, 1e-4)
    assert agreed_rates(prior, np.full(3, np.nan)) == prior
    assert agreed_rates(prior, np.array([np.nan, 1e-6, np.nan])) == Rates(1e9, 1e6, 3e12, 1e-4)
    # measured at no time: a finite rate
    assert astuple(agreed_rates(prior, np.array([4e-9, np.nan, 0.0]))) == pytest.approx((2.5e8, 2e9, 1e30, 1e-4))


class FixedSpan:
    """A span that took ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def stop(self) -> None:
        pass

    def seconds(self) -> float:
        return self._seconds


def test_calibration_smooths_measurements_and_agrees_on_schedule(monkeypatch):
    reduced = []
    monkeypatch.setattr(calibration.dist, "all_reduce",  # one rank: the MAX is its own vector
                        lambda tensor, op, group: reduced.append(tensor.clone()))
    prior = ShadowCostModel(1e9, 1e12, latency_s=1e-3, calibrate=True)
    cal = ShadowCalibration(prior, group=None, every=3, smoothing=0.5)
    cpu = torch.device("cpu")
    assert cal.step(cpu) == prior.rates and not reduced  # forward 1: nothing measured, no agreement
    # forward 1's measurements: 2 s less 1 s of latency over 1e6 parameter bytes; 3 s over 1e9 wire bytes
    cal.record(SHADOW, FixedSpan(2.0), 1.0, 1e6)
    cal.record(WIRE, FixedSpan(3.0), 0.0, 1e9)
    cal.record(FLOP, FixedSpan(5.0), 0.0, 0)  # no rows: no measurement
    rates = cal.step(cpu)  # forward 2: taken in and agreed
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64
    assert astuple(rates) == pytest.approx((1 / 3e-9, 1e6, 1e12, 1e-3), rel=1e-12)
    cal.record(SHADOW, FixedSpan(4.0), 1.0, 1e6)  # 3e-6 s per byte: the average moves half way, to 2e-6
    cal.record(WIRE, FixedSpan(0.5), 1.0, 1e9)  # less time than the overhead: free, clamped at 0
    assert cal.step(cpu) is rates  # forward 3: measured, not yet agreed (next at 2 + every)
    np.testing.assert_allclose(cal.measured[[WIRE, SHADOW]], [1.5e-9, 2e-6])
    assert np.isnan(cal.measured[FLOP])
    cal.record(FLOP, FixedSpan(1.0), 0.0, 4e9)
    cal.step(cpu)
    rates = cal.step(cpu)  # forward 5 = 2 + every: agreed
    assert len(reduced) == 2
    assert astuple(rates) == pytest.approx((1 / 1.5e-9, 5e5, 4e9, 1e-3), rel=1e-12)


def test_measured_rates_change_the_choice():
    # One hot expert (position 0) on rank 0; compute-heavy experts: shadowing pays unless broadcasts are slow.
    counts = np.array([[90, 2, 2, 2], [90, 2, 2, 2]])
    shape = ExpertShape(row_bytes=4, param_bytes=10_000, flops_per_row=1e6)
    model = ShadowCostModel(link_bytes_per_s=1e9, flops_per_s=1e12, calibrate=True)
    assert model.choose(counts, shape) == (0,)
    slow_broadcast = agreed_rates(model.rates, np.array([np.nan, 1e-3, np.nan]))  # 1 ms per parameter byte
    assert model.choose(counts, shape, rates=slow_broadcast) == ()
    fast = agreed_rates(model.rates, np.array([np.nan, 1e-12, np.nan]))
    assert model.choose(counts, shape, rates=fast) == (0,)
    # measured slow compute makes even costly broadcasts pay; a measured fast one makes them not
    prior_says_no = ShadowCostModel(link_bytes_per_s=1e6, flops_per_s=1e15)
    assert prior_says_no.choose(counts, shape) == ()
    slow_compute = agreed_rates(prior_says_no.rates, np.array([np.nan, np.nan, 1e-9]))
    assert prior_says_no.choose(counts, shape, rates=slow_compute) == (0,)


# ==== two ranks: a calibrated layer

H, F, LOCAL = 8, 6, 2
TOL = dict(rtol=1e-10, atol=1e-10)


def _layer(groups, shadowing, transport="flat", nodes=None, seed=3):
    torch.manual_seed(seed)
    layer = moeflux.MoE(H, F, LOCAL * groups.ep_size, top_k=2, ep_group=groups, dtype=torch.float64,
                        exchange=ExchangeConfig(transport=transport, nodes=nodes, shadowing=shadowing))
    with torch.no_grad():  # inputs are positive: the last expert is everyone's first choice
        layer.router.weight[-1] = 1.0
    return layer


def _step(layer, x, gy):
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = layer(xi)
    (y * gy).sum().backward()
    return [y.detach(), xi.grad, layer.router.weight.grad, layer.experts.w_in.grad, layer.experts.w_out.grad]


def _calibrated_worker(rank, world):
    groups = moeflux.init_expert_parallel(world)
    nodes = moeflux.init_node_groups(groups.ep_group, ranks_per_node=1)  # two "nodes" of one rank
    assert _layer(groups, "auto").exchange.shadowing.calibration is not None
    assert _layer(groups, ShadowCostModel(1e9, 1e9)).exchange.shadowing.calibration is None
    assert _layer(groups, FixedShadows((0,))).exchange.shadowing.calibration is None
    # Compute-bound priors: the hot expert is shadowed from the first step, so every rate gets measured.
    prior = ShadowCostModel(link_bytes_per_s=1e12, flops_per_s=1e3, calibrate=True)
    off = _layer(groups, "off")
    history = {}
    for transport in ("flat", "hierarchical"):
        layer = _layer(groups, prior, transport, nodes if transport == "hierarchical" else None)
        assert layer.exchange.shadowing.transport is layer.exchange.transport
        cal = layer.exchange.shadowing.calibration
        cal.every = 2  # agree at forwards 2, 4, 6
        steps = []
        for step in range(6):
            gen = torch.Generator().manual_seed(100 * step + rank)
            x = torch.rand(7 + rank, H, generator=gen, dtype=torch.float64) + 0.1
            gy = torch.randn(7 + rank, H, generator=gen, dtype=torch.float64)
            for name, got, want in zip(("y", "x", "router", "w_in", "w_out"), _step(layer, x, gy), _step(off, x, gy)):
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{transport} step {step} {name}: {m}")
            steps.append((cal.rates, layer.exchange.shadowed_experts))
        assert steps[0][0] == prior.rates and LOCAL * world - 1 in steps[0][1], steps[0]  # the priors shadow it
        assert not np.isnan(cal.agreed).any(), cal.agreed  # every rate measured by some rank and agreed
        measured = steps[-1][0]
        assert (measured.link_bytes_per_s != prior.link_bytes_per_s and measured.shadow_bytes_per_s !=
                prior.link_bytes_per_s and measured.flops_per_s != prior.flops_per_s), measured
        history[transport] = steps
    everyone = [None] * world
    dist.all_gather_object(everyone, history)
    return everyone


def test_ranks_agree_on_measured_rates_and_shadows():
    for everyone in run_ranks(2, _calibrated_worker, timeout=120):
        assert everyone[0] == everyone[1]  # the same rates and shadows at every step, on both ranks
