"""moeflux.balance: the shadow policies (ShadowCostModel, FixedShadows) and SmartMoE's greedy re-placement,
against hand computations. Pure host arithmetic: no process group."""

import itertools

import numpy as np
import pytest
import torch

import moeflux
from moeflux import ExpertPlacement, FixedShadows, ShadowCostModel
from moeflux.balance import ExpertShape, greedy_placement, imbalance, moved_experts, rank_loads
from moeflux.sim.calibrate import FittedLinks

# ---- ExpertShape


def test_expert_shape_of_ffn():
    # swiglu: w_in [16, 2 * 32] + w_out [32, 16] = 1024 + 512 = 1536 parameters
    shape = ExpertShape.of_ffn(16, 32, "swiglu", 4)
    assert shape == ExpertShape(row_bytes=64, param_bytes=1536 * 4, flops_per_row=6.0 * 1536)
    # gelu: w_in [16, 32] + w_out [32, 16] = 1024 parameters; bf16
    assert ExpertShape.of_ffn(16, 32, "gelu", 2) == ExpertShape(32, 1024 * 2, 6.0 * 1024)


# ---- ShadowCostModel.estimate_s by hand

# 2 ranks, 4 expert positions (2 per rank): counts[src, position]
COUNTS = np.array([[6, 2, 1, 1],
                   [3, 0, 2, 0]])
SMALL = ExpertShape(row_bytes=10, param_bytes=100, flops_per_row=1000.0)
MODEL = ShadowCostModel(link_bytes_per_s=1e3, flops_per_s=1e5)


@pytest.mark.parametrize("shadows, expected", [
    # No shadows. Rows src -> dst rank: [[6+2, 1+1], [3+0, 2+0]] = [[8, 2], [3, 2]]; remote: 0 -> 1: 2, 1 -> 0: 3;
    # busiest port 3 rows: comm = 4 * 3 * 10 / 1e3 = 0.12. Rank 0 computes 8 + 3 = 11 rows: 11 * 1000 / 1e5 = 0.11.
    ((), 0.12 + 0.11),
    # Shadow position 0: rows [[0+2, 2], [0, 2]], busiest port 2: comm 0.08. Rank 0: 2 + its own 6 rows of
    # the shadow = 8, rank 1: 4 + its own 3 = 7: compute 0.08. Shadow: 2 * 1 * 100 / 1e3 = 0.2.
    ((0,), 0.08 + 0.08 + 0.2),
    # Shadow position 1 (rank 0's second expert): rows [[6, 2], [3, 2]], busiest port 3: comm 0.12. Rank 0:
    # 9 + its own 2 shadow rows = 11: compute 0.11. Shadow 0.2.
    ((1,), 0.12 + 0.11 + 0.2),
    # Shadow 0 and 2: rows [[2, 1], [0, 0]], busiest port 1: comm 0.04. Rank 0: 2 + 6 + 1 = 9, rank 1:
    # 1 + 3 + 2 = 6: compute 0.09. Shadow 2 * 2 * 100 / 1e3 = 0.4.
    ((0, 2), 0.04 + 0.09 + 0.4),
    ([2, 0], 0.04 + 0.09 + 0.4),  # a list, any order
    # Every position shadowed: no traffic; rank 0 computes its 10 rows, rank 1 its 5. Shadow 0.8.
    ((0, 1, 2, 3), 0.0 + 0.1 + 0.8),
])
def test_estimate_matches_hand_computation(shadows, expected):
    assert MODEL.estimate_s(COUNTS, shadows, SMALL) == pytest.approx(expected, rel=1e-12)


def test_estimate_takes_the_busiest_port_either_way():
    # 3 ranks, one expert each; only comm costs (no parameters, no flops, 1 byte per row at 1 byte/s).
    model, shape = ShadowCostModel(1.0, 1.0), ExpertShape(row_bytes=1, param_bytes=0, flops_per_row=0.0)
    gather = np.array([[0, 0, 0], [2, 0, 0], [2, 0, 0]])  # ranks 1 and 2 send 2 rows each to rank 0
    assert model.estimate_s(gather, (), shape) == pytest.approx(4 * 4)  # rank 0 receives 4: four all-to-alls
    assert model.estimate_s(gather.T.copy(), (), shape) == pytest.approx(4 * 4)  # rank 0 sends 4
    assert model.estimate_s(np.eye(3) * 9, (), shape) == 0.0  # rows that stay home cost nothing
    assert model.estimate_s(gather, (0,), shape) == 0.0  # shadowed: nothing crosses


# ---- ShadowCostModel.choose

SHAPE = ExpertShape.of_ffn(16, 32, "swiglu", 4)  # 6 KiB of parameters, 64-byte rows
FAST_LINK_SLOW_COMPUTE = ShadowCostModel(1e12, 1e6)


def skewed(hot, rank_count=4, num_experts=8, rest=1):
    """counts [P, E]: every rank routes `rest` rows to each position and hot[p] rows to the hot positions."""
    counts = np.full((rank_count, num_experts), float(rest))
    for position, rows in hot.items():
        counts[:, position] = rows
    return counts


def test_choose_takes_the_best_prefix_when_no_single_shadow_pays():
    # Experts 0 (rank 0) and 2 (rank 1) are equally hot, with traffic both ways: shadowing one of them leaves the
    # other direction as busy (0.58 > 0.48), shadowing both empties the network (0.2).
    model = ShadowCostModel(1e3, 1e5)
    shape = ExpertShape(row_bytes=10, param_bytes=10, flops_per_row=1000.0)
    counts = np.array([[8, 0, 8, 0], [8, 0, 8, 0]])
    assert model.estimate_s(counts, (0,), shape) == pytest.approx(0.58)
    assert model.estimate_s(counts, (0, 2), shape) == pytest.approx(0.2)
    assert model.choose(counts, shape) == (0, 2)
    assert ShadowCostModel(1e3, 1e5, max_shadows=1).choose(counts, shape) == ()


def test_choose_counts_a_latency_per_collective():
    shape = ExpertShape(row_bytes=10, param_bytes=10, flops_per_row=1000.0)
    counts = np.array([[8, 0, 8, 0], [8, 0, 8, 0]])
    # Two owners x (2 weights x broadcast + reduce) = 8 collectives: 0.2 + 8 * 0.04 = 0.52 > 0.48.
    slow = ShadowCostModel(1e3, 1e5, latency_s=0.04)
    assert slow.estimate_s(counts, (0, 2), shape) == pytest.approx(0.52)
    assert slow.choose(counts, shape) == ()
    with pytest.raises(ValueError, match="latency_s"):
        ShadowCostModel(1e3, 1e5, latency_s=-1.0)


def test_choose_considers_only_experts_busier_than_the_mean():
    model = ShadowCostModel(1e3, 1e5)
    cheap = ExpertShape(row_bytes=10, param_bytes=1, flops_per_row=1000.0)
    # Estimates (see test_estimate_matches_hand_computation, shadows now cost 0.002 each):
    # () 0.23, (0,) 0.162, (0, 2) 0.134, (0, 2, 3) 0.106. Loads are [9, 2, 3, 1] (mean 3.75): only expert 0 is
    # a candidate, so the colder ones are never shadowed even where the estimate would drop.
    assert model.estimate_s(COUNTS, (0,), cheap) == pytest.approx(0.162)
    assert model.estimate_s(COUNTS, (0, 2), cheap) == pytest.approx(0.134)
    assert model.estimate_s(COUNTS, (0, 1, 2), cheap) == pytest.approx(0.136)
    assert model.estimate_s(COUNTS, (0, 2, 3), cheap) == pytest.approx(0.106)
    assert model.choose(COUNTS, cheap) == (0,)
    # With the real parameter size (100 bytes), no shadow pays for its broadcast: 0.36 > 0.23.
    assert model.choose(COUNTS, SMALL) == ()


def test_choose_shadows_the_hot_experts_under_skew():
    # Every rank routes 100 rows to position 0 and 30 to position 2. Rank 0 computes 404 rows unshadowed;
    # shadowing 0 leaves rank 1 with 224, shadowing 2 as well brings every rank to <= 138; shadowing a
    # cold expert then adds more rows to the busiest rank than it removes.
    counts = skewed({0: 100, 2: 30})
    assert FAST_LINK_SLOW_COMPUTE.choose(counts, SHAPE) == (0, 2)
    assert (FAST_LINK_SLOW_COMPUTE.estimate_s(counts, (0, 2), SHAPE)
            < FAST_LINK_SLOW_COMPUTE.estimate_s(counts, (0,), SHAPE)
            < FAST_LINK_SLOW_COMPUTE.estimate_s(counts, (), SHAPE))
    # The hot experts are found wherever they are; the result is ascending, not in the order chosen.
    assert FAST_LINK_SLOW_COMPUTE.choose(skewed({5: 100, 2: 30}), SHAPE) == (2, 5)
    # what shadowing (moeflux.exchange.shadowing.Shadowing) passes: routing_counts' CPU int64 tensor as numpy
    assert FAST_LINK_SLOW_COMPUTE.choose(torch.from_numpy(counts.astype(np.int64)).numpy(), SHAPE) == (0, 2)


def test_choose_respects_max_shadows():
    counts = skewed({0: 100, 2: 30})
    assert ShadowCostModel(1e12, 1e6, max_shadows=1).choose(counts, SHAPE) == (0,)
    assert ShadowCostModel(1e12, 1e6, max_shadows=0).choose(counts, SHAPE) == ()
    assert ShadowCostModel(1e12, 1e6, max_shadows=5).choose(counts, SHAPE) == (0, 2)


def test_choose_shadows_nothing_on_uniform_routing():
    uniform = np.full((4, 8), 25)
    for model in (FAST_LINK_SLOW_COMPUTE, ShadowCostModel(1e3, 1e6), ShadowCostModel(1e12, 1e12)):
        assert model.choose(uniform, SHAPE) == ()


def test_choose_shadows_nothing_over_a_slow_link():
    # 8 rows per rank to position 0: the 6 KiB broadcast + reduce costs more than the rows it saves
    # from crossing a slow link; over a fast link the compute imbalance makes it worth it.
    counts = skewed({0: 8})
    assert ShadowCostModel(1e3, 1e9).choose(counts, SHAPE) == ()
    assert ShadowCostModel(1e3, 1e9).estimate_s(counts, (0,), SHAPE) > ShadowCostModel(1e3, 1e9).estimate_s(
        counts, (), SHAPE)
    assert ShadowCostModel(1e12, 1e9).choose(counts, SHAPE) == (0,)


def test_choose_breaks_ties_by_position():
    # Two equally hot experts on the same rank: the lower position first, on every call.
    for first, second in ((0, 1), (4, 5), (6, 7)):
        counts = skewed({first: 100, second: 100})
        assert FAST_LINK_SLOW_COMPUTE.choose(counts, SHAPE) == (first, second)
        assert ShadowCostModel(1e12, 1e6, max_shadows=1).choose(counts, SHAPE) == (first,)
        assert all(ShadowCostModel(1e12, 1e6, max_shadows=1).choose(counts.copy(), SHAPE) == (first,)
                   for _ in range(3))


def test_choose_never_picks_an_expert_without_tokens():
    # Free shadows (no parameters, infinitely fast link): shadowing costs nothing, so only a lower
    # estimate could stop it; experts that get no rows must still not be chosen.
    free = ShadowCostModel(1e30, 1.0)
    shape = ExpertShape(row_bytes=1, param_bytes=0, flops_per_row=1.0)
    counts = np.zeros((2, 4))
    assert free.choose(counts, shape) == ()
    counts[:, 1] = [5, 7]  # rank 0's second expert: everyone's tokens
    chosen = free.choose(counts, shape)
    assert chosen == (1,) and all(counts[:, p].sum() > 0 for p in chosen)


@pytest.mark.parametrize("kwargs, message", [
    (dict(link_bytes_per_s=0.0, flops_per_s=1.0), "link_bytes_per_s and flops_per_s must be > 0"),
    (dict(link_bytes_per_s=-1.0, flops_per_s=1.0), "link_bytes_per_s and flops_per_s must be > 0"),
    (dict(link_bytes_per_s=1.0, flops_per_s=0.0), "link_bytes_per_s and flops_per_s must be > 0"),
    (dict(link_bytes_per_s=float("nan"), flops_per_s=1.0), "link_bytes_per_s and flops_per_s must be > 0"),
    (dict(link_bytes_per_s=1.0, flops_per_s=1.0, max_shadows=-1), "max_shadows must be an int >= 0 or None"),
    (dict(link_bytes_per_s=1.0, flops_per_s=1.0, max_shadows=1.5), "max_shadows must be an int >= 0 or None"),
    (dict(link_bytes_per_s=1.0, flops_per_s=1.0, max_shadows="2"), "max_shadows must be an int >= 0 or None"),
])
def test_cost_model_rejects_bad_rates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShadowCostModel(**kwargs)


def test_cost_model_rates():
    # the rough rates are only priors: the layer calibrates them from what it measures
    assert ShadowCostModel.default_for("cpu") == ShadowCostModel(10e9 / 8, 50e9, None, calibrate=True)
    assert ShadowCostModel.default_for("cuda", max_shadows=2) == ShadowCostModel(400e9 / 8, 400e12, 2, calibrate=True)
    # FittedLinks' default inter-node link: 10 Gbit/s at 94% TCP efficiency
    fitted = ShadowCostModel.from_fitted_links(FittedLinks(), 10.0, 5e10, max_shadows=3)
    assert fitted.link_bytes_per_s == pytest.approx(10e9 * 0.94 / 8)
    assert (fitted.flops_per_s, fitted.max_shadows) == (5e10, 3)


# ---- FixedShadows


def test_fixed_shadows_map_global_experts_to_positions():
    contiguous = ExpertPlacement(8, 4, 1)
    assert FixedShadows((6, 0, 3)).choose_experts(contiguous) == (0, 3, 6)
    # expert e at position expert_at.index(e): 0 -> 1, 3 -> 4, 6 -> 7, 5 -> 0
    permuted = ExpertPlacement.from_ranks([[5, 0], [1, 2], [3, 7], [4, 6]], ep_rank=2)
    assert FixedShadows((0, 6, 3)).choose_experts(permuted) == (1, 4, 7)
    assert FixedShadows((5,)).choose_experts(permuted) == (0,)
    assert FixedShadows(()).choose_experts(permuted) == ()
    assert moeflux.FixedShadows is FixedShadows and moeflux.ShadowCostModel is ShadowCostModel


@pytest.mark.parametrize("experts", [(1, 1), (-1,), (1.0,), (True,)])
def test_fixed_shadows_reject_bad_experts(experts):
    with pytest.raises(ValueError, match="FixedShadows: experts must be distinct ints >= 0"):
        FixedShadows(experts)


def test_fixed_shadows_reject_experts_past_the_layer():
    with pytest.raises(ValueError, match=r"FixedShadows: experts must be < num_experts=8, got \(3, 8\)"):
        FixedShadows((3, 8)).choose_experts(ExpertPlacement(8, 2))


# ---- greedy_placement (SmartMoE)


def assert_valid_replacement(old, new, load):
    """A permutation with E_local experts per rank; experts that stay on their rank keep their slot; the
    busiest rank's load drops."""
    assert isinstance(new, ExpertPlacement)
    assert (new.num_experts, new.ep_size, new.ep_rank) == (old.num_experts, old.ep_size, old.ep_rank)
    assert sorted(new.expert_at) == list(range(old.num_experts))
    assert all(len(new.experts_of(r)) == old.local_experts for r in range(old.ep_size))
    for e in range(old.num_experts):
        if new.rank_of(e) == old.rank_of(e):
            assert new.slot_of(e) == old.slot_of(e), (e, old.expert_at, new.expert_at)
    assert rank_loads(load, new).max() < rank_loads(load, old).max()
    assert imbalance(load, new) < imbalance(load, old)


def test_greedy_placement_two_ranks_by_hand():
    load = np.array([10.0, 8.0, 1.0, 1.0])
    old = ExpertPlacement(4, 2, 0)  # ranks hold [0, 1] (18) and [2, 3] (2)
    # LPT: 0 -> rank A (10), 1 -> rank B (8), 2 -> B (9, the lighter), 3 -> A (B is full): {0, 3} 11, {1, 2} 9.
    # Each group overlaps each rank by one expert: rank 0 takes {0, 3}, rank 1 {1, 2}; 0 and 2 keep their slots.
    new = greedy_placement(load, old)
    assert new.expert_at == (0, 3, 2, 1)
    assert rank_loads(load, new).tolist() == [11.0, 9.0]
    assert imbalance(load, old) == pytest.approx(18 / 10) and imbalance(load, new) == pytest.approx(11 / 10)
    assert moved_experts(old, new) == 2  # experts 1 and 3
    assert_valid_replacement(old, new, load)


def test_greedy_placement_from_a_permuted_placement_by_hand():
    load = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    old = ExpertPlacement.from_ranks([[4, 5], [0, 1], [2, 3]], ep_rank=1)  # loads 3, 16, 8
    # LPT: 0 -> A (9), 1 -> B (7), 2 -> C (5), 3 -> C (8), 4 -> B (9), 5 -> A (only A has room): A {0, 5} 10,
    # B {1, 4} 9, C {2, 3} 8. Matching: rank 2 already holds C (overlap 2); rank 0 ({4, 5}) and rank 1
    # ({0, 1}) overlap A and B by one each: rank 0 takes A (first in order), rank 1 takes B. Rank 0 keeps 5
    # in slot 1 and receives 0 in slot 0; rank 1 keeps 1 in slot 1 and receives 4.
    new = greedy_placement(load, old)
    assert new.expert_at == (0, 5, 4, 1, 2, 3)
    assert new.ep_rank == 1 and new.experts_of() == (4, 1)
    assert rank_loads(load, old).tolist() == [3.0, 16.0, 8.0]
    assert rank_loads(load, new).tolist() == [10.0, 9.0, 8.0]
    assert moved_experts(old, new) == 2  # 0 and 4 swap ranks; 1, 2, 3, 5 stay in their slots
    assert moved_experts(old, old) == 0
    assert imbalance(load, new) == pytest.approx(10 / 9)
    assert_valid_replacement(old, new, load)


def test_greedy_placement_declines_when_the_busiest_rank_cannot_drop():
    # Already balanced: LPT finds {0, 1} and {2, 3} at 5 each, no better than now.
    assert greedy_placement(np.array([4.0, 1.0, 3.0, 2.0]), ExpertPlacement(4, 2, 0)) is None
    # One expert carries everything: whichever rank holds it stays at 5.
    assert greedy_placement(np.array([0.0, 0.0, 5.0, 0.0]), ExpertPlacement(4, 2, 1)) is None
    assert greedy_placement(np.zeros(4), ExpertPlacement(4, 2, 0)) is None
    # One rank holds every expert: nowhere to move them.
    assert greedy_placement(np.array([9.0, 1.0, 0.0, 0.0]), ExpertPlacement(4, 1, 0)) is None
    # ... but the same loads over two ranks are re-placed
    assert greedy_placement(np.array([9.0, 1.0, 5.0, 0.0]), ExpertPlacement(4, 2, 0)) is not None


def test_greedy_placement_rejects_a_load_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"load must have shape \(4,\), got \(3,\)"):
        greedy_placement(np.ones(3), ExpertPlacement(4, 2, 0))


def test_greedy_placement_random_loads_are_valid_and_balanced():
    rng = np.random.default_rng(0)
    accepted = 0
    for trial in range(300):
        world, local = int(rng.integers(2, 5)), int(rng.integers(1, 4))
        num_experts = world * local
        old = ExpertPlacement(num_experts, world, int(rng.integers(world)),
                              tuple(int(e) for e in rng.permutation(num_experts)))
        load = rng.exponential(size=num_experts) if trial % 2 else rng.integers(0, 6, num_experts).astype(float)
        new = greedy_placement(load, old)
        if new is None:
            # declined: LPT's busiest rank is no lighter than today's
            continue
        accepted += 1
        assert_valid_replacement(old, new, load)
        # the groups are LPT's: rank loads are the same multiset whichever rank each group went to
        bins, bin_load = [[] for _ in range(world)], [0.0] * world
        for e in sorted(range(num_experts), key=lambda e: (-load[e], e)):
            b = min((b for b in range(world) if len(bins[b]) < local), key=lambda b: (bin_load[b], b))
            bins[b].append(e)
            bin_load[b] += load[e]
        assert sorted(map(frozenset, bins), key=sorted) == sorted(
            (frozenset(new.experts_of(r)) for r in range(world)), key=sorted)
        assert moved_experts(old, new) == sum(old.rank_of(e) != new.rank_of(e) for e in range(num_experts))
    assert accepted > 100


def test_greedy_placement_keeps_a_rank_whose_group_is_unchanged():
    # Rank 1 holds the LPT group {2, 3} already (in swapped slots): nothing of it moves, slots included.
    load = np.array([8.0, 7.0, 3.0, 2.0, 1.0, 0.5])
    old = ExpertPlacement.from_ranks([[0, 1], [3, 2], [4, 5]])
    new = greedy_placement(load, old)
    assert new is not None and new.experts_of(1) == (3, 2)
    for r in range(3):
        kept = set(old.experts_of(r)) & set(new.experts_of(r))
        assert all(old.slot_of(e) == new.slot_of(e) for e in kept)
    assert moved_experts(old, new) == min(
        sum(len(set(group) - set(old.experts_of(r))) for r, group in enumerate(groups))
        for groups in itertools.permutations([new.experts_of(r) for r in range(3)]))
