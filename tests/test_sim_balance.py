"""moeflux.sim.balance: simulator estimates of none / shadowing / re-placement / both (numpy only, fast)."""

import json

import numpy as np
import pytest

from moeflux.balance import ShadowCostModel, greedy_placement
from moeflux.placement import ExpertPlacement
from moeflux.sim import (DEFAULT_TRACE_PATH, IB_400G, NVLINK_H100, LinkClass, Topology, moe_layer_all_to_all_time,
                         traffic_matrix, uniform, zipf)
from moeflux.sim.balance import (METHODS, BalanceConfig, expert_shape, layer_cost, main, shadow_policy,
                                 simulate_methods, summarise)
from moeflux.sim.sweep import ModelShape

needs_trace = pytest.mark.skipif(not DEFAULT_TRACE_PATH.exists(), reason=f"no routing trace at {DEFAULT_TRACE_PATH}")

TOPO = Topology(2, 4, NVLINK_H100, IB_400G, 4)  # 8 GPUs, one NIC each
SHAPE = ModelShape(hidden=1024, ffn=2048, tokens_per_rank=2048, experts_per_rank=2, expert_flop_per_s=100e12)
CONFIG = BalanceConfig(SHAPE, window=1, replace_every=10)


def skewed(samples, seed=0, s=1.5):
    """[samples, layers=2, P=8, E=16] zipf routing, the same popularity in every sample (a stable skew)."""
    rng = np.random.default_rng(seed)
    popularity_seed = int(rng.integers(1 << 30))
    return np.stack([np.stack([zipf(8, 16, SHAPE.tokens_per_rank, 2, s, np.random.default_rng([popularity_seed, l]))
                               for l in range(2)]) for _ in range(samples)])


def test_layer_cost_terms_by_hand():
    counts = zipf(8, 16, 2048, 2, 1.2, 1).astype(float)
    placement = ExpertPlacement(16, 8)
    cost = layer_cost(counts, placement, (), TOPO, SHAPE)
    traffic = traffic_matrix(counts, SHAPE.hidden, SHAPE.bytes_per_elem)
    assert cost.a2a_s == pytest.approx(moe_layer_all_to_all_time(traffic, TOPO, "direct", 0.0,
                                                                 SHAPE.count_bytes * 2))
    rows = counts.reshape(8, 8, 2).sum(2).sum(0)  # received by each rank, contiguous placement
    np.testing.assert_allclose(cost.rank_rows, rows)
    assert cost.compute_s == pytest.approx(rows.max() * SHAPE.flop_per_slot / SHAPE.expert_flop_per_s)
    assert cost.shadow_s == 0 and cost.move_s == 0 and cost.total_s == pytest.approx(cost.a2a_s + cost.compute_s)
    # Shadowing the busiest expert: its slots stay on their ranks, its parameters cross twice.
    hot = int(counts.sum(0).argmax())
    shadowed = layer_cost(counts, placement, (hot,), TOPO, SHAPE)
    assert shadowed.rank_rows.sum() == pytest.approx(counts.sum())  # every slot still computed once
    assert shadowed.rank_remote_rows.sum() < cost.rank_remote_rows.sum()
    assert shadowed.shadow_s == pytest.approx(2 * (expert_shape(SHAPE).param_bytes * IB_400G.beta_s_per_byte
                                                   + 3 * IB_400G.alpha_s))
    # A placement is read by global expert: swapping two experts' ranks moves their rows.
    swapped = list(range(16))
    swapped[0], swapped[15] = 15, 0
    moved = layer_cost(counts, ExpertPlacement(16, 8, 0, tuple(swapped)), (), TOPO, SHAPE)
    assert moved.rank_rows[0] == pytest.approx(rows[0] - counts[:, 0].sum() + counts[:, 15].sum())


def test_shadowing_never_worse_than_none_under_its_own_cost_model():
    policy = shadow_policy(TOPO, SHAPE)
    eshape = expert_shape(SHAPE)
    for seed in range(30):
        s = [0.0, 0.8, 1.5, 2.5][seed % 4]
        counts = zipf(8, 16, 2048, 2, s, seed)
        chosen = policy.choose(counts, eshape)
        assert policy.estimate_s(counts, chosen, eshape) <= policy.estimate_s(counts, (), eshape)


def test_simulated_methods_on_a_stable_skew():
    result = simulate_methods(skewed(4), TOPO, CONFIG)
    assert set(result) == set(METHODS) and all(len(rows) == 3 and len(rows[0]) == 2 for rows in result.values())
    for i in range(3):
        for l in range(2):
            none, shad, repl, both = (result[m][i][l] for m in METHODS)
            # Re-placement from the previous sample's load lowers the busiest rank's load (the skew is stable).
            assert repl.rank_rows.max() < none.rank_rows.max()
            assert none.rank_rows.sum() == pytest.approx(repl.rank_rows.sum())
            assert shad.shadows >= 1 and both.shadows >= 1 and none.shadows == repl.shadows == 0
            assert shad.rank_rows.max() < none.rank_rows.max()
            assert shad.total_s < none.total_s and both.total_s < none.total_s
    # The first re-placement moves experts; a steady one afterwards moves none (same load, same choice).
    assert result["replacement"][0][0].moved > 0 and result["replacement"][0][0].move_s > 0
    assert result["replacement"][2][0].moved == 0 and result["replacement"][2][0].move_s == 0
    summary = summarise(result)
    assert summary["none"]["speedup"] == 1.0
    assert summary["shadowing"]["speedup"] > 1 and summary["replacement"]["speedup"] > 1
    assert summary["both"]["slowest_rank_rows"] < summary["none"]["slowest_rank_rows"]
    assert summarise(result, layers=[1])["none"]["total_s"] == pytest.approx(
        np.median([result["none"][i][1].total_s for i in range(3)]))


def test_uniform_routing_gains_nothing_and_loses_nothing():
    counts = np.stack([np.stack([uniform(8, 16, 2048, 2, np.random.default_rng([i, l])) for l in range(2)])
                       for i in range(3)])
    # Exactly uniform: the greedy finds nothing better and no shadow pays: every method costs what none does.
    flat = np.full_like(counts, 2048 * 2 // 16)
    flat_summary = summarise(simulate_methods(flat, TOPO, CONFIG))
    assert all(flat_summary[m]["speedup"] == pytest.approx(1.0) for m in METHODS)
    assert all(flat_summary[m]["shadows"] == 0 and flat_summary[m]["moved_per_replacement"] == 0 for m in METHODS)
    # Multinomial noise: still no shadow pays. Where the greedy re-places on the previous sample's noise (a gain
    # over its 5% minimum), the moves are costed.
    result = simulate_methods(counts, TOPO, CONFIG)
    summary = summarise(result)
    assert summary["shadowing"]["shadows"] == 0 and summary["shadowing"]["speedup"] == pytest.approx(1.0)
    for rows in result["replacement"]:
        for cost in rows:
            assert (cost.move_s > 0) == (cost.moved > 0)


def test_library_rule_shadows_tied_hot_experts():
    # Two equally hot experts on two ranks: shadowing either alone leaves the other rank as busy as before; the
    # library's best-prefix rule shadows both.
    counts = np.full((4, 8), 10.0)
    counts[:, 0] = counts[:, 2] = 2000.0  # experts 0 (rank 0) and 2 (rank 1)
    policy = ShadowCostModel(link_bytes_per_s=1e9, flops_per_s=1e12)
    shape = expert_shape(ModelShape(hidden=256, ffn=256, tokens_per_rank=1024, experts_per_rank=2))
    assert policy.estimate_s(counts, (0,), shape) >= policy.estimate_s(counts, (), shape)
    chosen = policy.choose(counts, shape)
    assert chosen == (0, 2)
    assert policy.estimate_s(counts, chosen, shape) < policy.estimate_s(counts, (), shape)


def test_replacement_every_n_samples_spreads_its_move_cost():
    counts = skewed(6)
    config = BalanceConfig(SHAPE, window=2, replace_every=2, samples_per_replacement=2)
    rows = simulate_methods(counts, TOPO, config, methods=("replacement",))["replacement"]
    assert len(rows) == 4  # samples 2..5; re-placements before samples 2 and 4
    first, second = rows[0][0], rows[1][0]
    assert first.moved > 0 and second.moved == first.moved and second.move_s == pytest.approx(first.move_s)
    np.testing.assert_allclose(first.rank_rows.max(), layer_cost(counts[2, 0], greedy_placement(
        counts[:2, 0].sum((0, 1)).astype(float), ExpertPlacement(16, 8)), (), TOPO, SHAPE).rank_rows.max())
    assert rows[2][0].moved == 0 and rows[3][0].move_s == 0  # the same skew again: nothing to move
    with pytest.raises(ValueError, match="samples_per_replacement"):
        simulate_methods(counts, TOPO, BalanceConfig(SHAPE, samples_per_replacement=0))


def test_greedy_is_the_librarys_and_reads_the_window():
    counts = skewed(3)
    result = simulate_methods(counts, TOPO, BalanceConfig(SHAPE, window=2), methods=("replacement",))
    assert len(result["replacement"]) == 1
    expected = greedy_placement(counts[:2, 0].sum((0, 1)).astype(float), ExpertPlacement(16, 8))
    mine = layer_cost(counts[2, 0], expected, (), TOPO, SHAPE)
    np.testing.assert_allclose(result["replacement"][0][0].rank_rows, mine.rank_rows)


def test_argument_checks():
    with pytest.raises(ValueError, match="samples, layers, 8 ranks"):
        simulate_methods(np.zeros((2, 8, 16)), TOPO, CONFIG)
    with pytest.raises(ValueError, match="more than window"):
        simulate_methods(skewed(1), TOPO, CONFIG)
    with pytest.raises(ValueError, match="unknown method"):
        simulate_methods(skewed(2), TOPO, CONFIG, methods=("none", "magic"))
    with pytest.raises(ValueError, match="layer_cost"):
        layer_cost(np.zeros((4, 16)), ExpertPlacement(16, 8), (), TOPO, SHAPE)
    flat = Topology.flat(8, LinkClass(0.0, 1e-9))
    empty = layer_cost(np.zeros((8, 16)), ExpertPlacement(16, 8), (), flat, SHAPE)
    assert empty.compute_s == 0 and empty.total_s == pytest.approx(empty.a2a_s)  # the count exchange only


@needs_trace
def test_cli_on_the_trace(tmp_path, capsys):
    out = tmp_path / "balance.json"
    assert main(["--gpus", "16", "--samples", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (entry,) = data["results"]
    assert entry["gpus"] == 16 and entry["experts"] == 32
    s = entry["skewed_layers"]
    assert s["none"]["speedup"] == 1.0 and s["shadowing"]["speedup"] > 1.2
    assert s["both"]["slowest_rank_rows"] < s["none"]["slowest_rank_rows"]
    assert "replacement" in capsys.readouterr().out
