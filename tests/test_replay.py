"""moeflux.sim.replay: a gate that reproduces recorded per-expert counts exactly, with the router's weights."""

import numpy as np
import pytest
import torch

import moeflux
from moeflux import ops
from moeflux.sim import DEFAULT_TRACE_PATH, RoutingTrace, load_stats, load_trace
from moeflux.sim.replay import (RoutingReplay, SampleRoutingReplay, attach_replay, fit_counts, merge_source_ranks,
                                replay_expert_ids, replay_weights, trace_replay_counts, trace_sample_counts,
                                uniform_replay_counts)

needs_trace = pytest.mark.skipif(not DEFAULT_TRACE_PATH.exists(), reason=f"no routing trace at {DEFAULT_TRACE_PATH}")


def skewed_counts(rng, num_experts, num_tokens, top_k, zeros=0.3):
    """Heavily skewed counts with some empty experts and one at the ceiling (= num_tokens)."""
    raw = rng.pareto(0.7, num_experts) * (rng.random(num_experts) > zeros)
    raw[rng.integers(num_experts)] = raw.sum() * 10 + 1  # far above the ceiling before fitting
    return fit_counts(raw, num_tokens, top_k)


# ---------------------------------------------------------------------------------------------- fit_counts


@pytest.mark.parametrize("num_tokens,top_k", [(1, 1), (7, 2), (1024, 2), (333, 4), (64, 8)])
def test_fit_counts_sum_and_ceiling(num_tokens, top_k):
    rng = np.random.default_rng(num_tokens)
    for _ in range(20):
        raw = rng.pareto(0.5, 16) * (rng.random(16) > 0.4)
        c = fit_counts(raw, num_tokens, top_k)
        assert c.dtype == np.int64 and c.shape == (16,)
        assert c.sum() == num_tokens * top_k
        assert c.min() >= 0 and c.max() <= num_tokens
        # Order is kept (up to one unit of rounding) wherever nothing was capped.
        uncapped = c < num_tokens
        big, small = np.argmax(np.where(uncapped, raw, -1)), np.argmin(np.where(uncapped, raw, np.inf))
        assert c[big] + 1 >= c[small]


def test_fit_counts_proportional_and_capped():
    assert fit_counts([1, 1, 2], 4, 1).tolist() == [1, 1, 2]
    assert fit_counts([10, 20, 30, 40], 100, 1).tolist() == [10, 20, 30, 40]
    # Expert 0 wants 90% of 2*10 slots but can take each of the 10 tokens once: capped, excess spread 1:3.
    assert fit_counts([90, 2.5, 7.5], 10, 2).tolist() == [10, 2, 8] or fit_counts([90, 2.5, 7.5], 10, 2).tolist() \
        == [10, 3, 7]
    c = fit_counts([90, 2.5, 7.5], 10, 2)
    assert c[0] == 10 and c.sum() == 20
    # Two experts above the ceiling with top-2: both capped, nothing left for the rest.
    assert fit_counts([50, 50, 1, 1], 10, 2).tolist() == [10, 10, 0, 0]
    # All zero: uniform.
    assert fit_counts([0, 0, 0, 0], 6, 2).tolist() == [3, 3, 3, 3]
    assert fit_counts([5, 1], 0, 1).tolist() == [0, 0]


@pytest.mark.parametrize("bad", [dict(counts=[-1, 2], num_tokens=4, top_k=1), dict(counts=[[1, 2]], num_tokens=4,
                                                                                     top_k=1),
                                 dict(counts=[1, float("nan")], num_tokens=4, top_k=1),
                                 dict(counts=[1, 2], num_tokens=4, top_k=3), dict(counts=[1, 2], num_tokens=-1,
                                                                                  top_k=1)])
def test_fit_counts_rejects(bad):
    with pytest.raises(ValueError, match="fit_counts"):
        fit_counts(**bad)


# ---------------------------------------------------------------------------------------------- replay_expert_ids


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("with_scores", [False, True])
def test_replay_ids_reproduce_counts_exactly(top_k, with_scores):
    rng = np.random.default_rng(top_k)
    num_experts = 32
    for trial in range(10):
        num_tokens = int(rng.integers(1, 700))
        counts = skewed_counts(rng, num_experts, num_tokens, top_k)
        if top_k > 1:
            assert counts.max() == num_tokens  # the hardest case: one expert on every token
        scores = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(trial)) \
            if with_scores else None
        ids = replay_expert_ids(counts, top_k, scores=scores, generator=torch.Generator().manual_seed(trial))
        assert ids.dtype == torch.int32 and ids.shape == (num_tokens, top_k)
        assert torch.bincount(ids.flatten().long(), minlength=num_experts).tolist() == counts.tolist()
        assert (ids.sort(1).values.diff(dim=1) > 0).all(), "a token got the same expert twice"


def test_replay_ids_follow_the_scores():
    # 8 tokens, expert 0 takes 4: the 4 tokens whose score for it is highest; each token's ids are best first.
    scores = torch.zeros(8, 3)
    scores[:, 0] = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6])
    scores[:, 1] = 0.5
    ids = replay_expert_ids([4, 8, 4], 2, scores=scores)
    assert sorted(torch.nonzero((ids == 0).any(1)).flatten().tolist()) == [1, 3, 5, 7]
    picked = scores.gather(1, ids.long())
    assert (picked[:, 0] >= picked[:, 1]).all()


def test_replay_ids_reject_impossible_counts():
    with pytest.raises(ValueError, match="only 2 tokens"):
        replay_expert_ids([3, 1], 2)  # 2 tokens, expert 0 would need 3 of them
    with pytest.raises(ValueError, match="multiple of top_k"):
        replay_expert_ids([3, 2], 2)
    with pytest.raises(ValueError, match="scores must be"):
        replay_expert_ids([2, 2], 2, scores=torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("scoring,renormalize,scale", [("softmax", False, 1.0), ("softmax", True, 1.0),
                                                       ("sigmoid", True, 2.5), ("sigmoid", False, 1.0)])
def test_replay_weights_equal_the_route_ops_for_its_own_choice(scoring, renormalize, scale):
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    weights, ids = ops.route(logits, 4, renormalize, scoring, None, 1, 1, scale)
    torch.testing.assert_close(replay_weights(logits, ids, scoring, renormalize, scale), weights)


def test_replay_weights_are_differentiable():
    logits = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    ids = replay_expert_ids(fit_counts([5, 1, 9, 0, 3, 6], 12, 2), 2, scores=logits)
    assert torch.autograd.gradcheck(lambda x: replay_weights(x, ids, "softmax", True), (logits,))
    assert torch.autograd.gradcheck(lambda x: replay_weights(x, ids, "sigmoid", False, 2.0), (logits,))


# ---------------------------------------------------------------------------------------------- in a layer


def test_replay_in_a_layer_routes_the_counts_and_trains_the_router():
    torch.manual_seed(0)
    layer = moeflux.MoE(16, 32, num_experts=8, top_k=2)
    x = torch.randn(4, 25, 16)
    plain = layer(x)
    recorded = np.array([[40, 30, 20, 5, 3, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]])  # [steps, E], any scale
    replay = RoutingReplay(recorded).attach(layer)
    out = layer(x)
    expected = fit_counts(recorded[0], 100, 2)
    assert layer.routed_tokens_per_expert.tolist() == expected.tolist()
    assert replay.last_counts.tolist() == expected.tolist() and replay.step == 1
    (out.square().sum() + layer.aux_loss).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_in.grad.abs().sum() > 0
    layer(x)  # step 1: everything on expert 7 would exceed the ceiling: capped at one slot per token
    assert layer.routed_tokens_per_expert[7] == 100 and layer.routed_tokens_per_expert.sum() == 200
    layer.eval()
    layer(x)
    assert replay.step == 2, "evaluation forwards do not advance the replay"
    replay.detach()
    torch.testing.assert_close(layer(x), plain)


def test_attach_replay_one_per_layer_and_checks():
    layers = [moeflux.MoE(8, 8, num_experts=4, top_k=1) for _ in range(2)]
    counts = np.zeros((3, 2, 4), dtype=np.int64)
    counts[:, 0, 1] = 1
    counts[:, 1, 3] = 1
    replays = attach_replay(layers, counts)
    x = torch.randn(10, 8)
    for layer, hot in zip(layers, (1, 3)):
        layer(x)
        assert layer.routed_tokens_per_expert.tolist() == [10 if e == hot else 0 for e in range(4)]
    with pytest.raises(RuntimeError, match="already attached"):
        replays[0].attach(layers[0])
    with pytest.raises(ValueError, match="attach_replay"):
        attach_replay(layers, counts[:, :1])
    with pytest.raises(ValueError, match="RoutingReplay"):
        RoutingReplay(np.zeros(4))
    wrong = RoutingReplay(np.ones((1, 5)))
    wrong.attach(moeflux.MoE(8, 8, num_experts=4, top_k=1))
    with pytest.raises(ValueError, match="5 experts"):
        wrong.routing(layers[0].router, layers[0].router(x))


# ---------------------------------------------------------------------------------------------- trace -> testbed


def test_merge_source_ranks_keeps_expert_load():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 100, (3, 16, 32))
    merged = merge_source_ranks(counts, 4)
    assert merged.shape == (3, 4, 32)
    np.testing.assert_array_equal(merged[:, 1], counts[:, 4:8].sum(1))
    np.testing.assert_array_equal(merged.sum(1), counts.sum(1))
    np.testing.assert_allclose(load_stats(merged).expert_max_over_mean, load_stats(counts).expert_max_over_mean)
    with pytest.raises(ValueError, match="divisor"):
        merge_source_ranks(counts, 3)


def test_trace_replay_counts_layout_and_wrap():
    counts = np.arange(5 * 4 * 3 * 2 * 6).reshape(5, 4, 3, 2, 6)  # [iteration, rank, layer, micro-batch, expert]
    trace = RoutingTrace(counts, np.arange(5))
    got = trace_replay_counts(trace, [2, 0], ranks=2, start=4, steps=3)
    assert got.shape == (3, 2, 2, 6)
    # step 0 = iteration 4, testbed rank 1 = trace ranks 2 and 3, layer index 0 = trace layer 2
    np.testing.assert_array_equal(got[0, 1, 0], counts[4, 2:4, 2].sum((0, 1)))
    np.testing.assert_array_equal(got[1, 0, 1], counts[0, 0:2, 0].sum((0, 1)))  # wrapped to iteration 0
    with pytest.raises(ValueError, match="layers"):
        trace_replay_counts(trace, [3], 2, 0, 1)
    assert (uniform_replay_counts(2, 4, 3, 8) == 1).all()
    noisy = uniform_replay_counts(2, 4, 3, 8, slots_per_rank=100, seed=1)
    assert noisy.shape == (2, 4, 3, 8) and (noisy.sum(-1) == 100).all() and noisy.std() > 0
    np.testing.assert_array_equal(noisy, uniform_replay_counts(2, 4, 3, 8, slots_per_rank=100, seed=1))


@needs_trace
def test_the_shared_trace_replayed_on_four_ranks_stays_skewed():
    trace = load_trace()
    counts = trace_replay_counts(trace, [6, 18], 4, 100, 2)
    fitted = np.stack([[fit_counts(counts[0, r, l], 1024, 2) for r in range(4)] for l in range(2)])  # [L, P, E]
    stats = load_stats(fitted)
    assert (stats.expert_max_over_mean > 8).all() and (stats.rank_max_over_mean > 1.8).all()
    for l in range(2):
        for r in range(4):
            ids = replay_expert_ids(fitted[l, r], 2)
            assert torch.bincount(ids.flatten().long(), minlength=32).tolist() == fitted[l, r].tolist()


def test_trace_sample_counts_takes_one_unit_per_sample():
    counts = np.arange(5 * 4 * 3 * 2 * 6).reshape(5, 4, 3, 2, 6)  # [iteration, rank, layer, micro-batch, expert]
    trace = RoutingTrace(counts, np.arange(5))
    got = trace_sample_counts(trace, [2, 0], samples=4, start=4, steps=2)
    assert got.shape == (2, 4, 2, 6)
    # 8 units (4 ranks x 2 micro-batches), 4 samples: sample g is unit 2g = (rank g, micro-batch 0)
    np.testing.assert_array_equal(got[0, 3, 0], counts[4, 3, 2, 0])
    np.testing.assert_array_equal(got[1, 1, 1], counts[0, 1, 0, 0])  # wrapped to iteration 0
    more = trace_sample_counts(trace, [1], samples=10, start=0, steps=1)  # more samples than units: cycled
    np.testing.assert_array_equal(more[0, 9, 0], counts[0, 0, 1, 1])  # unit 9 mod 8 = 1: rank 0, micro-batch 1
    with pytest.raises(ValueError, match="layers"):
        trace_sample_counts(trace, [3], 4, 0, 1)


def test_sample_replay_routes_a_sample_the_same_wherever_it_is():
    torch.manual_seed(0)
    layer = moeflux.MoE(8, 8, 6, top_k=2)
    counts = np.random.default_rng(0).integers(0, 20, size=(3, 4, 6))  # [steps, samples, experts]
    held = [(0, 1, 2, 3)]
    replay = SampleRoutingReplay(counts, lambda: held[0]).attach(layer)
    x = torch.randn(4, 5, 8)
    ids = layer.router.predict(x.reshape(-1, 8)).view(4, 5, 2)
    for s in range(4):
        assert torch.bincount(ids[s].flatten().long(), minlength=6).tolist() == \
            fit_counts(counts[0, s], 5, 2).tolist()
    layer(x)  # forward routes the predicted ids, then moves to the next step
    torch.testing.assert_close(layer.routed_tokens_per_expert, torch.bincount(ids.flatten().long(), minlength=6))
    assert replay.step == 1
    held[0] = (2, 0, 3, 1)  # the same samples, moved: each routes by its own counts
    ids = layer.router.predict(x.reshape(-1, 8)).view(4, 5, 2)
    for i, s in enumerate(held[0]):
        assert torch.bincount(ids[i].flatten().long(), minlength=6).tolist() == \
            fit_counts(counts[1, s], 5, 2).tolist()
