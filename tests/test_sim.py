"""moeflux.sim: the α-β cost model, routing sources and traces, calibration and the CLI (numpy only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeflux.sim import (DEFAULT_TRACE_PATH, IB_400G, NVLINK_H100, FittedLinks, LinkClass, Measurement, RoutingSpec,
                         Topology, algbw, all_to_all_breakdown, all_to_all_time, busbw_from_algbw, expert_ranks, fit,
                         load_fitted, load_measurements, load_stats, load_trace, moe_layer_all_to_all_time, node_dedup,
                         predict, ring_all_reduce_time, save_fitted, save_trace, scale_counts, step_time,
                         traffic_matrix, uniform, uniform_all_to_all_time, uniform_traffic, zipf)
from moeflux.sim.__main__ import main as cli_main

REPO = Path(__file__).resolve().parents[1]
needs_trace = pytest.mark.skipif(not DEFAULT_TRACE_PATH.exists(), reason=f"no routing trace at {DEFAULT_TRACE_PATH}")

# Round numbers so the hand computations below stay readable.
INTRA = LinkClass(alpha_s=1.0, beta_s_per_byte=0.01)
INTER = LinkClass(alpha_s=10.0, beta_s_per_byte=0.1)
# 2 nodes x 2 ranks: rank 0 -> 1 (intra), 0 -> 2 and 1 -> 2 (inter), 2 -> 3 (intra); 5 bytes to itself (free).
HAND = np.array([[5.0, 10, 20, 0],
                 [0, 0, 40, 0],
                 [0, 0, 0, 30],
                 [0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------- links, topology


def test_link_from_bandwidth_and_presets():
    link = LinkClass.from_bandwidth(gbit_per_s=400, latency_s=5e-6)
    assert link.bandwidth_bytes_per_s == pytest.approx(50e9)
    assert LinkClass.from_bandwidth(bytes_per_s=50e9, latency_s=5e-6) == link
    half = LinkClass.from_bandwidth(gbit_per_s=1, latency_s=0, efficiency=0.5)
    assert half.bandwidth_bytes_per_s == pytest.approx(62.5e6)
    assert NVLINK_H100.bandwidth_bytes_per_s == pytest.approx(370e9)
    assert IB_400G.bandwidth_bytes_per_s == pytest.approx(46e9)
    with pytest.raises(ValueError, match="exactly one"):
        LinkClass.from_bandwidth(gbit_per_s=1, bytes_per_s=1, latency_s=0)
    with pytest.raises(ValueError, match="alpha_s"):
        LinkClass(-1.0, 0.0)


def test_topology():
    topo = Topology(4, 8, NVLINK_H100, IB_400G, nics_per_node=2)
    assert topo.world == 32 and topo.ranks_per_nic == 4
    assert topo.node_of(9) == 1
    np.testing.assert_array_equal(topo.node_of(np.array([0, 7, 8, 31])), [0, 0, 1, 3])
    with pytest.raises(ValueError, match="node_of"):
        topo.node_of(32)
    with pytest.raises(ValueError, match="nics_per_node"):
        Topology(2, 8, INTRA, INTER, nics_per_node=3)


# ---------------------------------------------------------------------------------------------- all-to-all


@pytest.mark.parametrize("n", [2, 16, 1024])
def test_uniform_all_to_all_closed_form_and_busbw(n):
    nbytes = 64e6
    closed = (n - 1) / n * nbytes * IB_400G.beta_s_per_byte + (n - 1) * IB_400G.alpha_s
    # One flat link class, whether as n single-rank nodes or one node of n ranks.
    assert uniform_all_to_all_time(nbytes, Topology.flat(n, IB_400G)) == pytest.approx(closed, rel=1e-12)
    assert uniform_all_to_all_time(nbytes, Topology(1, n, IB_400G, INTER)) == pytest.approx(closed, rel=1e-12)
    # Without latency, nccl-tests' bus bandwidth is the link bandwidth.
    no_alpha = LinkClass(0.0, IB_400G.beta_s_per_byte)
    t = uniform_all_to_all_time(nbytes, Topology.flat(n, no_alpha))
    assert busbw_from_algbw(algbw(nbytes, t), n) == pytest.approx(46e9, rel=1e-12)


def test_busbw_from_algbw():
    assert busbw_from_algbw(100.0, 4) == 75.0
    assert busbw_from_algbw(100.0, 1) == 0.0
    assert algbw(10.0, 2.0) == 5.0


def test_direct_by_hand():
    # intra: ranks 0/1 move 10 bytes, 2/3 move 30: 1 + 0.01 * 30 = 1.3 at most.
    # inter, one NIC per node: node 0 sends 60, node 1 receives 60: 2 peers * 10 + 0.1 * 60 = 26.
    shared = all_to_all_breakdown(HAND, Topology(2, 2, INTRA, INTER))
    assert float(shared.time_s) == pytest.approx(26.0)
    assert int(shared.slowest_rank) == 2  # all four ranks wait 26 s for their NIC; rank 2 moves the most bytes
    # A NIC per rank: rank 2 receives 60 alone (20 + 6); rank 1 sends 40 (20 + 4).
    b = all_to_all_breakdown(HAND, Topology(2, 2, INTRA, INTER, nics_per_node=2))
    np.testing.assert_allclose(b.inter_time_s, [22, 24, 26, 20])
    np.testing.assert_allclose(b.intra_time_s, [1.1, 1.1, 1.3, 1.3])
    assert float(b.time_s) == pytest.approx(26.0)
    # Slowest rank 2 moves max(30 sent, 60 received) = 60; a balanced rank 100 / 4 = 25.
    assert int(b.slowest_rank) == 2
    assert float(b.slowest_rank_bytes) == 60 and float(b.mean_rank_bytes) == 25
    assert float(b.slowest_over_mean_bytes) == pytest.approx(2.4)
    np.testing.assert_allclose(b.bytes_sent_inter, [20, 40, 0, 0])
    np.testing.assert_allclose(b.bytes_received_intra, [0, 10, 0, 30])


def test_hierarchical_by_hand():
    topo = Topology(2, 2, INTRA, INTER)
    # (A) gather: rank 0 sends 10 direct + half its 20 remote bytes, receives half of rank 1's 40: 20 each way;
    #     rank 2 sends 30 direct -> 1 + 0.3 = 1.3.
    # (B) cross: node 0's 60 bytes, 30 per relay, both relays on the one NIC: 1 * 10 + 0.1 * 60 = 16.
    # (C) fan-out: rank 3 (relay) forwards 30 of rank 2's 60 to rank 2: 1 + 0.3 = 1.3.
    b = all_to_all_breakdown(HAND, topo, "hierarchical")
    np.testing.assert_allclose([float(t) for t in b.phase_time_s], [1.3, 16.0, 1.3])
    assert all_to_all_time(HAND, topo, "hierarchical") == pytest.approx(18.6)
    # A NIC per relay halves (B): 10 + 0.1 * 30.
    assert all_to_all_time(HAND, Topology(2, 2, INTRA, INTER, 2), "hierarchical") == pytest.approx(15.6)
    # Half the inter-node bytes deduplicated: (B) = 10 + 0.1 * 30; (A), (C) still bound by rank 2/3's 30 bytes.
    assert all_to_all_time(HAND, topo, "hierarchical", dedup=0.5) == pytest.approx(15.6)
    with pytest.raises(ValueError, match="dedup"):
        all_to_all_time(HAND, topo, "direct", dedup=0.5)


def test_node_aware_by_hand():
    topo = Topology(2, 2, INTRA, INTER)
    # (B) rail: rank 0 sends its 20 remote bytes to rank 2, rank 1 its 40 to rank 3; node 0's NIC carries 60:
    #     1 remote node * 10 + 0.1 * 60 = 16 for every rank of the NIC (node 1's receives the same 60).
    # (C) relay: rank 3 hands rank 2 the 40 that rank 1 sent it; rank 2 hands rank 3 its own 30; rank 0 hands
    #     rank 1 its own 10: max over ranks 1 + 0.01 * 40 = 1.4.
    b = all_to_all_breakdown(HAND, topo, "node_aware")
    np.testing.assert_allclose([float(t) for t in b.phase_time_s], [16.0, 1.4])
    assert all_to_all_time(HAND, topo, "node_aware") == pytest.approx(17.4)
    # A NIC per rank: (B) is rank 1's (and 3's) 40 alone: 10 + 4.
    assert all_to_all_time(HAND, Topology(2, 2, INTRA, INTER, 2), "node_aware") == pytest.approx(15.4)
    # Half the inter-node bytes deduplicated; dedup may differ per batch entry.
    assert all_to_all_time(HAND, topo, "node_aware", dedup=0.5) == pytest.approx(14.4)
    np.testing.assert_allclose(all_to_all_time(np.stack([HAND, HAND]), topo, "node_aware", np.array([0.0, 0.5])),
                               [17.4, 14.4])
    # Combine retraces dispatch's route backwards (relay, then rail): the same cost, four times a step.
    assert moe_layer_all_to_all_time(HAND, topo, "node_aware") == pytest.approx(4 * 17.4)
    with pytest.raises(ValueError, match="an array only for node_aware"):
        all_to_all_time(np.stack([HAND, HAND]), topo, "hierarchical", np.array([0.0, 0.5]))


def test_node_dedup():
    uniform_counts = np.full((4, 32), 64.0)
    # 2 nodes, top-2: a remote node gets 2 * 1/2 slots per token but 1 - (1/2)^2 copies: 25% saved.
    assert float(node_dedup(uniform_counts, 2, 2)) == pytest.approx(0.25)
    assert float(node_dedup(uniform_counts, 1, 2)) == pytest.approx(0.125)  # 4 nodes: 1 - (1 - 7/16) / (1/2)
    assert float(node_dedup(uniform_counts, 2, 1)) == 0.0  # top-1: nothing to share
    skewed = np.zeros((2, 4))
    skewed[0, 2:] = 10  # rank 0 routes only to node 1 (experts 2, 3): every token has both experts there
    skewed[1, 2:] = 10  # rank 1 stays on its node
    assert float(node_dedup(skewed, 1, 2)) == pytest.approx(0.5)
    assert node_dedup(np.stack([uniform_counts, uniform_counts]), 2, 2).shape == (2,)
    with pytest.raises(ValueError, match="ranks_per_node"):
        node_dedup(uniform_counts, 3, 2)


def test_nic_sharing_uniform():
    # 2 nodes x 4 ranks, uniform: each rank sends B/2 off-node. Shared NIC: 4 ranks' worth through one link.
    nbytes = 8e6
    shared = Topology(2, 4, NVLINK_H100, IB_400G, nics_per_node=1)
    own = Topology(2, 4, NVLINK_H100, IB_400G, nics_per_node=4)
    beta, alpha = IB_400G.beta_s_per_byte, IB_400G.alpha_s
    assert uniform_all_to_all_time(nbytes, shared) == pytest.approx(4 * alpha + 2 * nbytes * beta)
    assert uniform_all_to_all_time(nbytes, own) == pytest.approx(4 * alpha + nbytes / 2 * beta)


def test_hierarchical_equals_direct_with_one_rank_per_node():
    rng = np.random.default_rng(0)
    traffic = rng.uniform(0, 1e6, size=(8, 8))
    topo = Topology(8, 1, INTRA, IB_400G)
    assert all_to_all_time(traffic, topo, "hierarchical") == pytest.approx(all_to_all_time(traffic, topo))


def test_batched_and_layer_step():
    rng = np.random.default_rng(1)
    traffic = rng.uniform(0, 1e6, size=(3, 16, 16))
    topo = Topology(4, 4, NVLINK_H100, IB_400G)
    for algorithm in ("direct", "hierarchical"):
        batched = all_to_all_time(traffic, topo, algorithm)
        assert batched.shape == (3,)
        single = [all_to_all_time(t, topo, algorithm) for t in traffic]
        np.testing.assert_allclose(batched, single)
        transposed = [all_to_all_time(t.T, topo, algorithm) for t in traffic]
        count = uniform_all_to_all_time(16 * 16, topo, algorithm)
        np.testing.assert_allclose(moe_layer_all_to_all_time(traffic, topo, algorithm, count_bytes_per_peer=16),
                                   2 * np.array(single) + 2 * np.array(transposed) + count)
    with pytest.raises(ValueError, match=r"\[\.\.\., 16, 16\]"):
        all_to_all_time(traffic[:, :8], topo)
    with pytest.raises(ValueError, match=">= 0"):
        all_to_all_time(-traffic, topo)


def test_uniform_breakdown_is_balanced_and_skew_is_seen():
    topo = Topology(2, 8, NVLINK_H100, IB_400G)
    assert float(all_to_all_breakdown(uniform_traffic(16, 1e6), topo).max_over_mean_bytes) == pytest.approx(1.0)
    counts = np.zeros((16, 32), dtype=np.int64)
    counts[:, 0] = 100  # every rank's tokens to expert 0, on rank 0
    b = all_to_all_breakdown(traffic_matrix(counts, 8, 2), topo)
    assert int(b.slowest_rank) in range(8)  # node 0, whose NIC receives everything from node 1
    assert float(b.max_over_mean_bytes) == pytest.approx(16.0)


def test_ring_all_reduce():
    nbytes = 1e9
    single = Topology(1, 8, NVLINK_H100, IB_400G)
    assert ring_all_reduce_time(nbytes, single) == pytest.approx(
        2 * 7 / 8 * nbytes * NVLINK_H100.beta_s_per_byte + 14 * NVLINK_H100.alpha_s)
    multi = Topology(4, 8, NVLINK_H100, IB_400G, nics_per_node=1)
    assert ring_all_reduce_time(nbytes, multi) == pytest.approx(
        2 * 31 / 32 * nbytes * IB_400G.beta_s_per_byte + 62 * IB_400G.alpha_s)
    # 8 NICs: 8 rings, each NIC carries 1/8.
    multi8 = Topology(4, 8, NVLINK_H100, IB_400G, nics_per_node=8)
    assert ring_all_reduce_time(nbytes, multi8) == pytest.approx(
        2 * 31 / 32 * nbytes * IB_400G.beta_s_per_byte / 8 + 62 * IB_400G.alpha_s)
    assert ring_all_reduce_time(nbytes, Topology(1, 1, INTRA, INTER)) == 0.0


def test_step_time():
    s = step_time(10.0, 4.0, 3.0, overlap=False)
    assert s.total_s == 17.0 and s.all_to_all_share == pytest.approx(4 / 17)
    s = step_time(10.0, 4.0, 3.0, overlap=True)  # all-reduce hidden, all-to-all exposed
    assert (s.exposed_all_reduce_s, s.total_s) == (0.0, 14.0)
    s = step_time(10.0, 4.0, 13.0, overlap=True, a2a_hidden_fraction=0.5)  # 2 s of a2a + 8 of 13 hidden
    assert (s.exposed_all_to_all_s, s.exposed_all_reduce_s, s.total_s) == (2.0, 5.0, 17.0)
    with pytest.raises(ValueError, match="a2a_hidden_fraction"):
        step_time(1.0, 1.0, 1.0, True, 1.5)


# ---------------------------------------------------------------------------------------------- routing


def test_sources_shapes_and_sums():
    u = uniform(8, 16, 1000, 2, rng=0)
    z = zipf(8, 16, 1000, 2, 1.5, rng=0)
    for counts in (u, z):
        assert counts.shape == (8, 16) and counts.dtype == np.int64
        np.testing.assert_array_equal(counts.sum(1), 2000)
    assert load_stats(z).expert_max_over_mean > 2 * load_stats(u).expert_max_over_mean
    np.testing.assert_array_equal(uniform(8, 16, 1000, 2, rng=3), uniform(8, 16, 1000, 2, rng=3))


def test_traffic_matrix_placement():
    counts = np.arange(4 * 8).reshape(4, 8)
    t = traffic_matrix(counts, hidden=4, bytes_per_elem=2)
    np.testing.assert_array_equal(t, counts.reshape(4, 4, 2).sum(-1) * 8)
    placement = np.array([3, 0, 0, 1, 2, 3, 1, 2])
    expected = np.zeros((4, 4))
    for e, r in enumerate(placement):
        expected[:, r] += counts[:, e] * 8
    np.testing.assert_array_equal(traffic_matrix(counts, 4, 2, placement), expected)
    np.testing.assert_array_equal(traffic_matrix(counts, 4, 2, np.zeros(8, dtype=int))[:, 1:], 0)  # empty ranks
    np.testing.assert_array_equal(expert_ranks(8, 4), [0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="placement ranks"):
        expert_ranks(8, 4, np.full(8, 4))
    with pytest.raises(ValueError, match="multiple"):
        expert_ranks(6, 4)


def test_trace_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 500, size=(3, 4, 2, 1, 8))
    written = save_trace(tmp_path / "t", counts, np.array([0, 10, 20]))
    assert written.name == "t.npz"
    with np.load(written) as raw:
        assert raw["counts"].dtype == np.uint16 and raw["iterations"].dtype == np.int32
    trace = load_trace(written)
    np.testing.assert_array_equal(trace.counts, counts)
    assert trace.counts.dtype == np.int64
    assert (trace.num_ranks, trace.num_layers, trace.num_micro_batches, trace.num_experts) == (4, 2, 1, 8)
    np.testing.assert_array_equal(trace.layer_counts(1, 1), counts[1, :, 1, 0])
    big = counts * 1000
    save_trace(tmp_path / "big.npz", big, np.arange(3))
    with np.load(tmp_path / "big.npz") as raw:
        assert raw["counts"].dtype == np.uint32
    np.testing.assert_array_equal(load_trace(tmp_path / "big.npz").counts, big)


def test_trace_validation(tmp_path):
    counts = np.ones((2, 4, 3, 1, 8), dtype=np.int64)
    with pytest.raises(ValueError, match=r"counts must have 5 dimensions.*\(2, 4, 3, 8\)"):
        save_trace(tmp_path / "x.npz", counts[:, :, :, 0], np.arange(2))
    with pytest.raises(ValueError, match="counts must be an integer ndarray, got float64"):
        save_trace(tmp_path / "x.npz", counts.astype(float), np.arange(2))
    with pytest.raises(ValueError, match=r"iterations must have shape \(2,\).*\(3,\)"):
        save_trace(tmp_path / "x.npz", counts, np.arange(3))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        save_trace(tmp_path / "x.npz", -counts, np.arange(2))
    np.savez(tmp_path / "only_counts.npz", counts=counts)
    with pytest.raises(ValueError, match="iterations"):
        load_trace(tmp_path / "only_counts.npz")
    np.savez(tmp_path / "float_iterations.npz", counts=counts, iterations=np.arange(2.0))
    with pytest.raises(ValueError, match="iterations must be an integer ndarray"):
        load_trace(tmp_path / "float_iterations.npz")


@needs_trace
def test_real_trace():
    trace = load_trace()
    assert trace.counts.shape == (251, 16, 24, 4, 32)
    assert (trace.counts.sum(-1) == 4096).all()
    assert trace.iterations[0] == 1 and trace.iterations[-1] == 2501
    assert (trace.layer_counts(10, 3).sum(1) == 4 * 4096).all()
    # The skew the README states: global max/mean over experts, median 11.3 and p90 15.5 over samples and layers.
    expert_load = trace.counts.sum(axis=(1, 3)).astype(float)
    ratio = expert_load.max(-1) / expert_load.mean(-1)
    assert np.median(ratio) == pytest.approx(11.3, abs=0.05)
    assert np.percentile(ratio, 90) == pytest.approx(15.5, abs=0.05)


@pytest.mark.parametrize("ranks", [16, 64, 1024])
def test_scale_counts(ranks):
    rng = np.random.default_rng(0)
    base = np.stack([zipf(16, 32, 2048, 2, s, rng) for s in (0.5, 1.2)])  # [layers, 16, 32]
    scaled = scale_counts(base, ranks, experts_per_rank=2, slots_per_rank=8192)
    assert scaled.shape == (2, ranks, 2 * ranks) and scaled.dtype == np.int64
    np.testing.assert_array_equal(scaled.sum(-1), 8192)
    np.testing.assert_array_equal(scaled[:, ranks - 1], scaled[:, 15])  # rank r follows trace rank r mod 16
    # Replica j of trace expert e is expert j * 32 + e: each replica has about 1/(E/32) of e's scaled share.
    replicas = 2 * ranks // 32
    per_trace_expert = scaled[:, :16].reshape(2, 16, replicas, 32).sum(2)
    np.testing.assert_allclose(per_trace_expert, base * 8192 / 4096, atol=replicas)
    np.testing.assert_allclose(load_stats(scaled).expert_max_over_mean, load_stats(base).expert_max_over_mean,
                               rtol=0.01)
    with pytest.raises(ValueError, match="multiple"):
        scale_counts(base, 24, 1, 8192)  # 24 experts: not replicas of 32


@needs_trace
def test_scale_counts_identity_on_real_trace():
    trace = load_trace()
    layer = trace.layer_counts(100, 5)
    np.testing.assert_array_equal(scale_counts(layer, 16, 2, 4 * 4096), layer)


# ---------------------------------------------------------------------------------------------- calibration


TRUE = FittedLinks(overhead_s=300e-6, latency_factor=2.0, intra_alpha_s=15e-6, intra_beta_s_per_byte=1 / 3e9,
                   inter_alpha_s=40e-6, inter_efficiency=0.9)


def _synthetic_measurements(noise: float, seed: int = 1) -> list[Measurement]:
    rng = np.random.default_rng(seed)
    out = []
    for nodes, per_node in [(1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4)]:
        for rate in (0.2, 1.0):
            for latency in (50e-6, 100e-6):
                for tokens in (1, 16, 256, 2048):
                    for kind, skew in (("uniform", 0.0), ("zipf", 1.2)):
                        spec = RoutingSpec(tokens, 512, 2, kind, skew, seed=int(rng.integers(1 << 30)))
                        m = Measurement(nodes, per_node, rate, latency, 1.0, routing=spec)
                        measured = predict(m, TRUE) * (1 + noise * rng.standard_normal())
                        out.append(Measurement(nodes, per_node, rate, latency, measured, routing=spec))
    return out


def test_calibration_recovers_parameters():
    fitted = fit(_synthetic_measurements(noise=0.01))
    assert set(fitted.fitted) == {"overhead_s", "latency_factor", "intra_alpha_s", "intra_beta_s_per_byte",
                                  "inter_alpha_s", "inter_efficiency"}
    for name, rel in [("inter_efficiency", 0.02), ("inter_alpha_s", 0.03), ("overhead_s", 0.03),
                      ("latency_factor", 0.03), ("intra_beta_s_per_byte", 0.05), ("intra_alpha_s", 0.1)]:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=rel), name
    assert fitted.rms_relative_error < 0.015


def test_calibration_from_a_bad_prior_and_unidentified_parameters():
    ms = _synthetic_measurements(noise=0.0)
    prior = FittedLinks(intra_beta_s_per_byte=1e-6, inter_alpha_s=1e-3, inter_efficiency=0.2)  # intra looks critical
    fitted = fit(ms, prior=prior)
    assert fitted.inter_efficiency == pytest.approx(0.9, rel=1e-6)
    assert fitted.rms_relative_error < 1e-6
    # One delay only: the latency factor cannot be told from the overhead and keeps its prior.
    same_delay = [m for m in ms if m.latency_s == 100e-6]
    fitted = fit(same_delay, prior=FittedLinks(latency_factor=0.0))
    assert "latency_factor" not in fitted.fitted and fitted.latency_factor == 0.0
    assert fitted.overhead_s == pytest.approx(TRUE.overhead_s + 2.0 * 100e-6, rel=1e-6)


def test_load_measurements(tmp_path):
    traffic = uniform_traffic(4, 4e6)
    entries = [
        {"nodes": 2, "ranks_per_node": 2, "link_gbit_per_s": 1.0, "latency_s": 1e-4, "measured_s": [0.3, 0.1, 0.2],
         "traffic_bytes": traffic.tolist()},
        {"nodes": 4, "ranks_per_node": 1, "link_gbit_per_s": 0.2, "latency_s": 1e-4, "measured_s": 0.5,
         "routing": {"tokens_per_rank": 64, "hidden": 256, "kind": "zipf", "skew": 1.0}},
    ]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(entries))
    ms = load_measurements(path)
    assert ms[0].measured_s == 0.2
    np.testing.assert_array_equal(ms[0].traffic(), traffic)
    assert ms[1].traffic().shape == (4, 4) and ms[1].traffic().sum() == 4 * 64 * 2 * 256 * 2
    topo = FittedLinks(inter_alpha_s=0.0, inter_efficiency=1.0).topology(2, 2, 1.0)
    assert topo.inter.bandwidth_bytes_per_s == pytest.approx(125e6)
    path.write_text(json.dumps([{"nodes": 2}]))
    with pytest.raises(ValueError, match="entry 0"):
        load_measurements(path)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_synthetic_and_nccl_check(tmp_path, capsys):
    out = tmp_path / "zipf.json"
    assert cli_main(["--routing", "zipf", "--gpus", "16", "32", "--samples", "1", "--layers", "2",
                     "--tokens-per-rank", "256", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["gpus"] for r in results] == [16, 32]
    for r in results:
        s = r["summary"]
        assert s["hierarchical_s"]["median"] > 0 and s["direct_s"]["p90"] >= s["direct_s"]["median"] > 0
        assert s["max_over_mean_bytes"]["median"] > 1
    assert cli_main(["--check-nccl-formula", "--gpus", "8", "64"]) == 0
    assert "busBw" in capsys.readouterr().out


@needs_trace
def test_cli_end_to_end_on_trace(tmp_path):
    out = tmp_path / "trace.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "moeflux.sim", "--gpus", "16", "64", "--samples", "2",
                           "--layers", "3", "--per-layer", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a2a direct ms" in proc.stdout and "smartmoe_gpt_16x32" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [(r["gpus"], r["nodes"], r["experts"], r["samples"], r["layers"]) for r in results] == [
        (16, 2, 32, 2, 3), (64, 8, 128, 2, 3)]
    for r in results:
        assert len(r["per_layer_median"]["direct_s"]) == 3
        assert r["summary"]["expert_max_over_mean"]["median"] > 2  # the trace's skew survives the scaling


def test_pipelined_layer_time():
    from moeflux.sim import pipelined_layer_time

    assert pipelined_layer_time(3.0, 2.0, 1) == pytest.approx(5.0)  # bulk: the sum
    # 4 stages: 5/4 + 3/4 * 3
    assert pipelined_layer_time(3.0, 2.0, 4) == pytest.approx(1.25 + 2.25)
    # many stages: the slower part alone
    assert pipelined_layer_time(3.0, 2.0, 10_000) == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(ValueError, match="stages >= 1"):
        pipelined_layer_time(1.0, 1.0, 0)


# ---------------------------------------------------------------------------------------------- calibration: gloo pairs


def test_serialized_pair_bytes():
    from moeflux.sim.calibrate import serialized_pair_bytes

    def uniform_d(nodes: int, per_node: int) -> np.ndarray:
        p = nodes * per_node
        t = np.ones((p, p))
        np.fill_diagonal(t, 0)
        return serialized_pair_bytes(t, FittedLinks().topology(nodes, per_node, 1.0)) / t[:per_node, per_node:].sum()

    # One pair: its smaller direction waits for the other (D = X); random orders of k equal pairs: E|Σ ±1|/k.
    np.testing.assert_allclose(uniform_d(2, 1), 1.0)
    np.testing.assert_allclose(uniform_d(4, 1), 0.5)
    np.testing.assert_allclose(uniform_d(2, 2), 0.375)
    # Many connections: the normal approximation, close to the exact value.
    assert uniform_d(4, 4)[0] == pytest.approx(np.sqrt(2 / np.pi * 48) / 48, rel=1e-9)  # 4 x 12 connections
    # One-way traffic has nothing to serialise; batches work.
    one_way = np.triu(np.ones((4, 4)), 1)
    d = serialized_pair_bytes(np.stack([one_way, np.ones((4, 4))]), FittedLinks().topology(4, 1, 1.0))
    assert d.shape == (2, 4) and np.all(d[0] == 0) and np.all(d[1] > 0)


def test_calibration_fits_pair_serialization():
    from dataclasses import replace

    from moeflux.sim.calibrate import DEFAULT_FIT

    true = replace(TRUE, pair_serialization=0.8)
    rng = np.random.default_rng(3)
    ms = []
    for nodes, per_node in [(1, 2), (1, 4), (2, 1), (2, 2), (4, 1), (4, 2)]:
        for rate in (0.2, 1.0):
            for latency in (50e-6, 100e-6):
                for tokens in (16, 2048):
                    spec = RoutingSpec(tokens, 512, 2, "zipf", 1.0, seed=int(rng.integers(1 << 30)))
                    m = Measurement(nodes, per_node, rate, latency, 1.0, routing=spec)
                    ms.append(replace(m, measured_s=predict(m, true)))
    assert predict(ms[-1], true) > predict(ms[-1], TRUE)  # the serialised bytes cost time
    fitted = fit(ms, parameters=(*DEFAULT_FIT, "pair_serialization"))
    assert "pair_serialization" in fitted.fitted
    assert fitted.pair_serialization == pytest.approx(0.8, rel=1e-3)
    assert fitted.inter_efficiency == pytest.approx(0.9, rel=1e-3)
    assert fitted.rms_relative_error < 1e-6
    # Not asked for: keeps its prior (0 by default: full-duplex connections), as before.
    assert "pair_serialization" not in fit(ms).fitted and fit(ms).pair_serialization == 0.0
    with pytest.raises(ValueError, match="unknown parameter"):
        fit(ms, parameters=("overhead_s", "nope"))


def _bad_inputs(tmp_path):
    """Every ValueError of the library's input checks that other tests do not reach: (call, message)."""
    from moeflux.sim import all_to_all_time, expert_ranks, fit, load_measurements, step_time, traffic_matrix, zipf
    from moeflux.sim.links import Topology

    two_by_two = Topology(2, 2, NVLINK_H100, IB_400G)
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text("{}")
    bad_kind = tmp_path / "bad_kind.json"
    bad_kind.write_text(json.dumps([{"nodes": 2, "ranks_per_node": 1, "link_gbit_per_s": 1, "latency_s": 0,
                                     "measured_s": 0.1, "routing": {"tokens_per_rank": 8, "hidden": 4,
                                                                    "kind": "pareto"}}]))
    return {
        "rate must be > 0": lambda: LinkClass.from_bandwidth(gbit_per_s=-1.0, latency_s=0.0),
        "efficiency must be in \\(0, 1\\]": lambda: LinkClass.from_bandwidth(gbit_per_s=1.0, latency_s=0.0,
                                                                             efficiency=1.5),
        "Topology: nodes must be a positive int": lambda: Topology(0, 2, NVLINK_H100, IB_400G),
        "algorithm must be one of": lambda: all_to_all_time(np.ones((4, 4)), two_by_two, "ring"),
        "dedup must be in \\[0, 1\\)": lambda: all_to_all_time(np.ones((4, 4)), two_by_two, "hierarchical", 1.0),
        "step_time: times must be >= 0": lambda: step_time(-1.0, 1.0, 1.0),
        "placement must be an integer array of shape": lambda: expert_ranks(4, 2, np.zeros(3, dtype=int)),
        "traffic_matrix: counts must be \\[..., ranks, experts\\]": lambda: traffic_matrix(np.ones(4), 8, 2),
        "need num_ranks, num_experts, top_k >= 1": lambda: zipf(0, 4, 8, 2, 1.0, 0),
        "give exactly one of traffic_bytes and routing": lambda: Measurement(1, 2, 1.0, 0.0, 0.1),
        "measured_s must be > 0": lambda: Measurement(1, 2, 1.0, 0.0, 0.0, traffic_bytes=np.ones((2, 2))),
        "need link_gbit_per_s > 0": lambda: Measurement(1, 2, 0.0, 0.0, 0.1, traffic_bytes=np.ones((2, 2))),
        "fit: no measurements": lambda: fit([]),
        "must hold a JSON list": lambda: load_measurements(not_a_list),
        "entry 0: RoutingSpec: kind must be 'uniform' or 'zipf'": lambda: load_measurements(bad_kind),
    }


def test_bad_inputs_raise_clear_errors(tmp_path):
    for message, call in _bad_inputs(tmp_path).items():
        with pytest.raises(ValueError, match=message):
            call()


def test_cli_rejects_a_cluster_that_does_not_fill_its_nodes(capsys):
    with pytest.raises(SystemExit, match="--gpus 12 is not a multiple of --ranks-per-node 8"):
        cli_main(["--gpus", "12", "--routing", "uniform"])


def test_fitted_links_round_trip(tmp_path):
    fitted = FittedLinks(overhead_s=1e-4, intra_beta_s_per_byte=2e-9, pair_serialization=0.5,
                         fitted=("overhead_s", "pair_serialization"), rms_relative_error=0.1,
                         max_relative_error=0.2, num_measurements=3)
    save_fitted(tmp_path / "fitted.json", fitted)
    assert load_fitted(tmp_path / "fitted.json") == fitted
    # Unknown keys (a newer writer) are ignored; missing ones take the defaults.
    (tmp_path / "old.json").write_text(json.dumps({"overhead_s": 2e-4, "future_key": 1}))
    assert load_fitted(tmp_path / "old.json") == FittedLinks(overhead_s=2e-4)


def test_sample_placement_gain_needs_affinity():
    from moeflux.sim.sample_placement import affinity_counts, placement_gain

    rng = np.random.default_rng(0)
    none = placement_gain(affinity_counts(16, 16, 2, 256, 0.0, rng), 8, 4, 2, 128)
    assert none["after"] <= none["before"]  # never worse than staying: staying is a feasible assignment
    strong = placement_gain(affinity_counts(16, 16, 2, 256, 0.9, rng), 8, 4, 2, 128)
    assert strong["moved_across_nodes"] > 0 and strong["after"] < 0.9 * strong["before"]
