"""NetMoE's sample placement (moeflux.SamplePlacement): the per-sample traffic counts and the two-stage assignment
against brute force, the move and its inverse, a stack of MoE layers with placement equal to the unplaced one
(losses and gradients, world 2 and 4, node layouts declared on one machine), and its errors on every rank."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import moeflux
from moeflux.placement import ExpertPlacement
from moeflux.sample_placement import (SampleOrder, destination_slots, inter_node_vectors, sample_traffic,
                                      solve_sample_placement)
from multiprocess import carried, run_ranks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# ---- counts and solver (no processes)


def brute_traffic(ids, samples, placement, per_node):
    ranks, nodes = placement.ep_size, placement.ep_size // per_node
    out = np.zeros((samples, ranks + nodes), dtype=np.int64)
    for s, sample in enumerate(ids.reshape(samples, -1, ids.shape[-1]).tolist()):
        for token in sample:
            token_nodes = set()
            for e in token:
                if e >= 0:
                    out[s, placement.rank_of(e)] += 1
                    token_nodes.add(placement.rank_of(e) // per_node)
            for n in token_nodes:
                out[s, ranks + n] += 1
    return out


@pytest.mark.parametrize("per_node", [1, 2, 4])
@pytest.mark.parametrize("permuted", [False, True])
def test_sample_traffic_matches_brute_force(per_node, permuted):
    gen = torch.Generator().manual_seed(per_node)
    experts = 8
    order = torch.randperm(experts, generator=gen).tolist() if permuted else list(range(experts))
    placement = ExpertPlacement(experts, 4, 0, tuple(order))
    ids = torch.stack([torch.randperm(experts, generator=gen)[:3] for _ in range(5 * 6)]).int().view(5, 6, 3)
    ids[torch.rand(ids.shape, generator=gen) < 0.2] = -1  # dropped slots count nowhere
    ids[0] = -1  # a sample whose slots are all dropped
    got = sample_traffic(ids, 5, placement, per_node)
    np.testing.assert_array_equal(got.numpy(), brute_traffic(ids, 5, placement, per_node))


def objective(traffic, dest, b, per_node, tokens, kind, move_cost):
    """(inter-node, intra-node) vectors of one assignment, as the solver's stages count them."""
    g = traffic.shape[0]
    ranks = g // b
    nodes = ranks // per_node
    slots, on_node = traffic[:, :ranks], traffic[:, ranks:]
    slots_node = slots.reshape(g, nodes, per_node).sum(2)
    remote = on_node.sum(1) - on_node[np.arange(g), dest // per_node] if kind == "hierarchical" else \
        slots.sum(1) - slots_node[np.arange(g), dest // per_node]
    current = np.arange(g) // b
    inter = (2 * remote + move_cost * tokens * (current // per_node != dest // per_node)).sum()
    intra = (2 * (slots_node[np.arange(g), dest // per_node] - slots[np.arange(g), dest])
             + move_cost * tokens * (current != dest)).sum()
    return inter, intra


def all_assignments(g, ranks, b):
    """Every assignment of g samples to ranks with b each (as destination rank per sample)."""
    for perm in set(itertools.permutations(np.repeat(np.arange(ranks), b).tolist())):
        yield np.array(perm)


@pytest.mark.parametrize("kind", ["hierarchical", "flat"])
@pytest.mark.parametrize("ranks, b, per_node", [(4, 2, 2), (4, 1, 1), (4, 2, 4), (2, 3, 1), (6, 1, 3)])
@pytest.mark.parametrize("move_cost", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_solver_is_optimal_in_both_stages(kind, ranks, b, per_node, move_cost, seed):
    rng = np.random.default_rng(seed)
    g, nodes, tokens = ranks * b, ranks // per_node, 5
    slots = rng.integers(0, 6, size=(g, ranks))
    on_node = np.minimum(slots.reshape(g, nodes, per_node).sum(2), tokens)
    traffic = np.concatenate([slots, on_node], 1)
    dest = solve_sample_placement(traffic, b, per_node, tokens, kind, move_cost)
    assert np.bincount(dest, minlength=ranks).tolist() == [b] * ranks
    inter, intra = objective(traffic, dest, b, per_node, tokens, kind, move_cost)
    options = [objective(traffic, d, b, per_node, tokens, kind, move_cost) for d in all_assignments(g, ranks, b)]
    assert inter == min(o[0] for o in options)  # stage 1: the fewest vectors across nodes
    same_nodes = [objective(traffic, d, b, per_node, tokens, kind, move_cost) for d in all_assignments(g, ranks, b)
                  if np.array_equal(d // per_node, dest // per_node)]
    assert intra == min(o[1] for o in same_nodes)  # stage 2: then the fewest across ranks within the nodes


@pytest.mark.parametrize("kind", ["hierarchical", "flat"])
def test_inter_node_vectors_count_exchange_and_moves(kind):
    rng = np.random.default_rng(3)
    ranks, b, per_node, tokens = 4, 2, 2, 5
    slots = rng.integers(0, 6, size=(ranks * b, ranks))
    traffic = np.concatenate([slots, np.minimum(slots.reshape(-1, 2, per_node).sum(2), tokens)], 1)
    stay = np.arange(ranks * b) // b
    for dest in (stay, solve_sample_placement(traffic, b, per_node, tokens, kind, 0.0)):
        before, after = inter_node_vectors(traffic, dest, b, per_node, tokens, kind)
        assert before == objective(traffic, stay, b, per_node, tokens, kind, 1.0)[0]
        assert after == objective(traffic, dest, b, per_node, tokens, kind, 1.0)[0]


def test_solver_keeps_samples_when_moving_costs_more():
    # Sample 0 (rank 0, node 0) routes 2 slots to node 1; moving it there would cost 16 tokens: it stays.
    traffic = np.array([[0, 2, 0, 2], [0, 0, 0, 0]])
    assert solve_sample_placement(traffic, 1, 1, 16, move_cost=1.0).tolist() == [0, 1]
    # All its 16 tokens' slots on node 1: 32 vectors saved for 16 moved both ways; the samples swap.
    traffic = np.array([[0, 32, 0, 16], [0, 0, 0, 0]])
    assert solve_sample_placement(traffic, 1, 1, 16, move_cost=1.0).tolist() == [1, 0]


def test_solver_objectives_differ_where_a_token_has_two_slots_on_a_node():
    # 2 nodes of 2 ranks, 2 samples each, 10 tokens per sample. Sample 0 (node 0): 8 tokens with both slots on
    # node 1 (16 slots, 8 node copies); sample 4 (node 1): 12 slots on node 0, one per token (12 copies).
    traffic = np.zeros((8, 6), dtype=np.int64)
    traffic[0, [2, 3, 5]] = [8, 8, 8]
    traffic[4, [0, 4]] = [12, 12]
    # move_cost 1: swapping the two costs 2 x 10 vectors, staying 2 x (8 + 12) or 2 x (16 + 12): both swap.
    for kind in ("hierarchical", "flat"):
        dest = solve_sample_placement(traffic, 2, 2, 10, kind, 1.0)
        assert dest[0] // 2 == 1 and dest[4] // 2 == 0
    # move_cost 2.5: swapping costs 50; staying 40 counted by node copies, 56 by slots.
    assert (solve_sample_placement(traffic, 2, 2, 10, "hierarchical", 2.5) // 2).tolist() == [0] * 4 + [1] * 4
    dest = solve_sample_placement(traffic, 2, 2, 10, "flat", 2.5)
    assert dest[0] // 2 == 1 and dest[4] // 2 == 0


def test_destination_slots_keep_relative_order():
    assert destination_slots(np.array([1, 0, 1, 0])).tolist() == [2, 0, 3, 1]
    assert destination_slots(np.array([0, 0, 1, 1])).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("args, message", [
    ((np.zeros((4, 5)), 2, 2, 3, "nearest"), "objective must be one of"),
    ((np.zeros((4, 5)), 2, 2, 3), "traffic must be"),
    ((np.zeros((4, 6)), 2, 4, 3), "traffic must be"),
])
def test_solver_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        solve_sample_placement(*args)


@pytest.mark.parametrize("kwargs", [{}, {"scoring": "sigmoid", "use_expert_bias": True, "bias": True},
                                    {"router_dtype": torch.float64, "num_groups": 2, "top_groups": 1},
                                    {"router_jitter": 0.5, "noisy_gating": True}])
def test_router_predict_is_forward_without_noise(kwargs):
    torch.manual_seed(0)
    router = moeflux.Router(6, 8, 2, **kwargs)
    x = torch.randn(20, 6)
    router.eval()  # forward without its training noise
    expected = router(x).expert_ids
    router.train()
    state = torch.get_rng_state()
    torch.testing.assert_close(router.predict(x), expected)
    assert torch.equal(torch.get_rng_state(), state)  # drew no random numbers


def test_sample_order():
    order = SampleOrder.identity(2, 3)
    assert order.is_identity and order.samples_of(1) == (3, 4, 5)
    assert not SampleOrder((1, 0), 1).is_identity


# ---- on ranks: the move and its inverse


def _move_and_restore(rank, world, per_node, b):
    torch.manual_seed(0)
    ep = moeflux.init_expert_parallel(world)
    layer = moeflux.MoE(4, 4, 2 * world, top_k=2, ep_group=ep, dtype=torch.float64)
    placement = moeflux.SamplePlacement(ep, nodes=per_node, move_cost=0.0)  # free moves: samples do move
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(b, 3, 4, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 2 * world, (b, 3, 2), generator=gen)
    ids[..., 1] = (ids[..., 0] + 1) % (2 * world)  # distinct experts per token
    everyone = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everyone, x)
    moved, order = placement.place(x, layer, expert_ids=ids)
    for i, origin in enumerate(order.samples_of(rank)):  # each local sample is the one the order says
        torch.testing.assert_close(moved[i], everyone[origin // b][origin % b], rtol=0, atol=0)
    moved2, order2 = placement.place(moved * 2, layer, order, expert_ids=ids)  # a second move composes
    for i, origin in enumerate(order2.samples_of(rank)):
        torch.testing.assert_close(moved2[i], 2 * everyone[origin // b][origin % b], rtol=0, atol=0)
    back = placement.restore(moved2, order2)
    torch.testing.assert_close(back, 2 * x, rtol=0, atol=0)
    x.requires_grad_(True)  # gradients travel back the same way
    moved, order = placement.place(x, layer, expert_ids=ids)
    (moved * torch.arange(1.0, b + 1, dtype=torch.float64).view(b, 1, 1)).sum().backward()
    slot_weight = torch.tensor([order.origin.index(rank * b + i) % b + 1.0 for i in range(b)], dtype=torch.float64)
    torch.testing.assert_close(x.grad, slot_weight.view(b, 1, 1).expand_as(x), rtol=0, atol=0)
    return placement.last.moved_samples


@pytest.mark.parametrize("world, per_node, b", [(2, 1, 3), (2, 2, 2), (4, 2, 2), (4, 1, 1), (4, 4, 3)])
def test_move_and_restore(world, per_node, b):
    moved = run_ranks(world, _move_and_restore, per_node, b)
    assert len(set(moved)) == 1 and moved[0] > 0  # every rank decided the same, and samples did move


def test_no_samples_is_a_no_op():
    run_ranks(2, _no_samples)


def _no_samples(rank, world):
    ep = moeflux.init_expert_parallel(world)
    layer = moeflux.MoE(4, 4, 2, top_k=1, ep_group=ep)
    placement = moeflux.SamplePlacement(ep, nodes=1)
    x, order = placement.place(torch.empty(0, 3, 4), layer, router_input=torch.empty(0, 3, 4))
    assert x.shape == (0, 3, 4) and order.origin == ()


# ---- a stack of MoE layers: placed equals unplaced


def _lm_equivalence(rank, world, per_node, hierarchical, objective):
    sys.path.insert(0, str(EXAMPLES))
    from moe_lm.model import ByteLM, ModelConfig

    torch.set_default_dtype(torch.float64)
    ep = moeflux.init_expert_parallel(world)
    nodes = moeflux.init_node_groups(ep.ep_group, ranks_per_node=per_node)
    config = ModelConfig(layers=3, d_model=16, heads=2, d_ffn=8, experts=2 * world, top_k=2, seq_len=5)
    exchange = moeflux.ExchangeConfig(transport="hierarchical", nodes=nodes) if hierarchical else None
    losses, grads, moved = [], [], 0
    for placed in (False, True):
        torch.manual_seed(0)
        placement = moeflux.SamplePlacement(ep, nodes, objective=objective, move_cost=0.0) if placed else None
        model = ByteLM(config, ep, exchange, placement)
        gen = torch.Generator().manual_seed(7 + rank)
        idx = torch.randint(0, 256, (3, config.seq_len + 1), generator=gen)
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(), reduction="sum")
        loss.backward()
        experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total)
        summed = {}
        for name, p in model.named_parameters():
            g = p.grad.clone()
            if id(p) not in experts:  # dense parameters: what data parallelism would average
                dist.all_reduce(g)
            summed[name] = g
        grads.append(summed)
        if placed:
            moved = placement.last.moved_samples
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12, msg=name)
    return moved


@pytest.mark.parametrize("world, per_node, hierarchical, objective", [
    (2, 1, True, "hierarchical"), (2, 2, False, "flat"), (4, 2, True, "hierarchical"), (4, 2, False, "flat"),
    (4, 1, True, "hierarchical"), (4, 4, False, "hierarchical"),
])
def test_placed_lm_equals_unplaced(world, per_node, hierarchical, objective):
    moved = run_ranks(world, _lm_equivalence, per_node, hierarchical, objective)
    assert moved[0] > 0  # the placement did move samples


# ---- errors: every rank raises


def _bad_input(rank, world, case):
    ep = moeflux.init_expert_parallel(world)
    layer = moeflux.MoE(4, 4, 2, top_k=1, ep_group=ep)
    placement = moeflux.SamplePlacement(ep, nodes=1)
    x, router_input = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    moved = SampleOrder((1, 0, 3, 2), 2)
    good = {"place": lambda: placement.place(x, layer, router_input=router_input),
            "restore": lambda: placement.restore(x, moved)}
    bad = {  # what rank 1 does instead
        "samples": lambda: placement.place(torch.randn(3, 3, 4), layer, router_input=torch.randn(3, 3, 4)),
        "dtype": lambda: placement.place(x.double(), layer, router_input=router_input),
        "width": lambda: placement.place(x, layer, router_input=torch.randn(2, 3, 5)),
        "both": lambda: placement.place(x, layer, router_input=router_input,
                                        expert_ids=torch.zeros(2, 3, 1, dtype=torch.long)),
        "float ids": lambda: placement.place(x, layer, expert_ids=torch.zeros(2, 3, 1)),
        "scalar": lambda: placement.place(torch.tensor(1.0), layer, router_input=router_input),
        "not a MoE": lambda: placement.place(x, torch.nn.Linear(4, 4), router_input=router_input),
        "order": lambda: placement.place(x, layer, SampleOrder.identity(2, 3), router_input=router_input),
        "restore": lambda: placement.restore(torch.randn(3, 3, 4), moved),
        "restore order": lambda: placement.restore(x, (1, 0, 3, 2)),
    }
    call = bad[case] if rank == 1 else good["restore" if case.startswith("restore") else "place"]
    try:
        call()
    except ValueError as e:
        return str(e)
    return None


FAILED_ELSEWHERE = None  # rank 1's own error, carried to rank 0


@pytest.mark.parametrize("case, mine, theirs", [
    ("samples", "every rank must hold the same number of samples", "every rank must hold the same number"),
    ("dtype", "rank 1: 2 samples of 12 elements, float64", "rank 0: 2 samples of 12 elements, float32"),
    ("width", "router_input must be", FAILED_ELSEWHERE),
    ("both", "give exactly one of router_input and expert_ids", FAILED_ELSEWHERE),
    ("float ids", "expert_ids must be integer", FAILED_ELSEWHERE),
    ("scalar", "x must be a tensor \\[B, ...\\] of B samples", FAILED_ELSEWHERE),
    ("not a MoE", "layer must be a moeflux.MoE, got Linear", FAILED_ELSEWHERE),
    ("order", "order must be the SampleOrder of these 2 samples per rank", FAILED_ELSEWHERE),
    ("restore", "x must hold the order's 2 samples per rank", FAILED_ELSEWHERE),
    ("restore order", "order must be a SampleOrder, got <class 'tuple'>", FAILED_ELSEWHERE),
])
def test_bad_input_raises_on_every_rank(case, mine, theirs):
    errors = run_ranks(2, _bad_input, case)
    assert errors[1] is not None and re.search(mine, errors[1]), errors
    assert errors[0] is not None and (errors[0] == carried(errors[1], 1) if theirs is FAILED_ELSEWHERE else
                                      re.search(theirs, errors[0])), errors


def _construction_errors(rank, world):
    errors = []
    for kwargs in ({"objective": "nearest"}, {"move_cost": -1}, {"nodes": 0}):
        try:
            moeflux.SamplePlacement(None, **kwargs)
        except ValueError as e:
            errors.append(str(e))
    ep = moeflux.init_expert_parallel(1)  # a group of one rank: not the placement's group
    try:
        moeflux.SamplePlacement(None, moeflux.init_node_groups(ep.ep_group, ranks_per_node=1))
    except ValueError as e:
        errors.append(str(e))
    layer = moeflux.MoE(4, 4, 2, top_k=1, ep_group=ep)
    try:
        moeflux.SamplePlacement(None, nodes=1).place(torch.randn(2, 3, 4), layer, router_input=torch.randn(2, 3, 4))
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_construction_errors():
    errors = run_ranks(2, _construction_errors)[0]
    assert "objective must be one of" in errors[0]
    assert "move_cost must be a number >= 0" in errors[1]
    assert "ranks_per_node must be a positive int" in errors[2]
    assert "nodes were made for another expert-parallel group" in errors[3]
    assert "layer must be an expert-parallel MoE over the placement's group" in errors[4]


def test_placement_needs_a_process_group():
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group first"):
        moeflux.SamplePlacement()
