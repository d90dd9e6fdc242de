"""The hierarchical (node-aware) transport: node groups, equivalence with the flat transport and a brute-force
reference (outputs and gradients), deduplication across nodes, the MoE option (ExchangeConfig(transport=
"hierarchical"), with every schedule and shadowing), and its errors. Nodes are declared on one machine
(ranks_per_node), world 2 and 4, gloo, spawned processes."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

import moeflux
from moeflux import ExchangeConfig, FixedShadows
from moeflux.exchange import FlatTransport, HierarchicalTransport, make_exchange
from moeflux.topology import launcher_ranks_per_node, node_layout
from multiprocess import run_ranks
from test_exchange import reference, scaled_by_expert

# ---- node layouts (no processes)


@pytest.mark.parametrize("ranks, per_node, layout", [
    ([0, 1, 2, 3], 2, (2, 2)), ([0, 1, 2, 3], 1, (4, 1)), ([0, 1, 2, 3], 4, (1, 4)), ([0, 1, 2, 3], 8, (1, 4)),
    ([2, 3], 2, (1, 2)), ([1, 3, 5, 7], 2, (4, 1)), ([0, 1, 4, 5], 4, (2, 2)),
])
def test_node_layout(ranks, per_node, layout):
    assert node_layout(ranks, per_node) == layout


@pytest.mark.parametrize("ranks, per_node, message", [
    ([0, 1, 2, 3], 3, "every node must hold the same number"),
    ([0, 1, 2], 2, "every node must hold the same number"),
    ([1, 0, 2, 3], 2, "must be ascending global ranks"),
    ([0, 1], 0, "ranks_per_node must be a positive int"),
    ([0, 1], True, "ranks_per_node must be a positive int"),
])
def test_node_layout_rejects(ranks, per_node, message):
    with pytest.raises(ValueError, match=message):
        node_layout(ranks, per_node)


# ---- the exchange against the flat one and the reference


def routing(rank, num_tokens, num_experts, k, case, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_tokens, 6, generator=gen, dtype=torch.float64)
    if case == "one expert":  # every token of every rank to the last expert (k = 1)
        ids = torch.full((num_tokens, k), num_experts - 1, dtype=torch.int32)
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_tokens)]).int() \
            if num_tokens else torch.empty(0, k, dtype=torch.int32)
    if case == "dropped":
        ids[torch.rand(ids.shape, generator=gen) < 0.3] = -1
    weights = torch.rand(num_tokens, k, generator=gen, dtype=torch.float64)
    if case == "non-contiguous":
        tokens = torch.randn(6, num_tokens, generator=gen, dtype=torch.float64).t()
        weights = torch.rand(k, num_tokens, generator=gen, dtype=torch.float64).t()
    return tokens, ids, weights


def node_copies(ids, placement, experts_per_node):
    """Brute force: copies this rank sends to each node, one per (token, node holding one of its experts)."""
    counts = [0] * (placement.num_experts // experts_per_node)
    for row in ids.tolist():
        for node in {placement.rank_of(e) * placement.local_experts // experts_per_node for e in row if e >= 0}:
            counts[node] += 1
    return counts


CASES = {  # name: (tokens of rank r, k, capacity)
    "uneven": (lambda r: 3 * r + 2, 2, None),
    "a rank without tokens": (lambda r: 0 if r == 1 else 7, 2, None),
    "no tokens anywhere": (lambda r: 0, 2, None),
    "k = E": (lambda r: 4 + r, None, None),
    "one expert": (lambda r: 6, 1, None),
    "dropped": (lambda r: 9, 3, None),
    "capacity": (lambda r: 8, 2, 2),
    "non-contiguous": (lambda r: 5, 2, None),
}


def check_exchange(rank, world, nodes, layout, case):
    num_experts = 2 * world
    if layout == "permuted":
        placement = moeflux.ExpertPlacement.from_ranks([[2 * r + 1, 2 * r] for r in reversed(range(world))], rank)
    else:
        placement = moeflux.ExpertPlacement(num_experts, world, rank)
    count, k, capacity = CASES[case]
    k = k or num_experts
    tokens, ids, weights = routing(rank, count(rank), num_experts, k, case, seed=100 * world + rank)
    if capacity is not None:
        ids = moeflux.ops.apply_capacity(ids, weights.float(), num_experts, capacity)
    results = []
    positions = placement.to_positions(ids)
    for exchange in (FlatTransport(num_experts, dist.group.WORLD), HierarchicalTransport(num_experts, nodes)):
        x, w = tokens.detach().clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)
        batch, plan = exchange.dispatch(x, positions, capacity)
        out = exchange.combine(scaled_by_expert(batch, placement.experts_of()), plan, w)
        torch.testing.assert_close(out, reference(tokens, ids, weights), rtol=1e-12, atol=1e-12)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out, x.grad, w.grad, batch.tokens_per_expert))
        if isinstance(exchange, HierarchicalTransport):
            assert plan.rail.send_splits == node_copies(ids, placement, exchange.experts_per_node), case
    for flat, hier in zip(*results):
        torch.testing.assert_close(hier, flat, rtol=1e-12, atol=1e-12)


def exchange_worker(rank, world, ranks_per_node):
    nodes = moeflux.init_node_groups(dist.group.WORLD, ranks_per_node=ranks_per_node)
    assert (nodes.num_nodes, nodes.ranks_per_node) == node_layout(list(range(world)), ranks_per_node)
    assert nodes.node == rank // nodes.ranks_per_node and nodes.local_rank == rank % nodes.ranks_per_node
    for layout in ("contiguous", "permuted"):
        for case in CASES:
            check_exchange(rank, world, nodes, layout, case)
    return True


@pytest.mark.parametrize("world, ranks_per_node", [(2, 1), (2, 2), (4, 2), (4, 1), (4, 4)],
                         ids=["2x1", "1x2", "2x2", "4x1", "1x4"])
def test_hierarchical_exchange_equals_flat_and_reference(world, ranks_per_node):
    """Outputs, token and weight gradients and the experts' loads equal the flat exchange's and the reference's,
    and each rank sends each node one copy per token with an expert there."""
    assert all(run_ranks(world, exchange_worker, ranks_per_node))


def gradcheck_worker(rank, world):
    nodes = moeflux.init_node_groups(dist.group.WORLD, ranks_per_node=2)
    placement = moeflux.ExpertPlacement(8, world, rank)
    exchange = HierarchicalTransport(placement.num_experts, nodes)
    tokens, ids, weights = routing(rank, 3, 8, 3, "uneven", seed=rank)  # same size on every rank: same calls

    def layer(x, w):
        batch, plan = exchange.dispatch(x, placement.to_positions(ids), None)
        return exchange.combine(scaled_by_expert(batch, placement.experts_of()), plan, w)

    return torch.autograd.gradcheck(layer, (tokens.requires_grad_(True), weights.requires_grad_(True)))


def test_hierarchical_exchange_gradcheck():
    assert all(run_ranks(4, gradcheck_worker))


# ---- fewer bytes across nodes


def bytes_worker(rank, world):
    nodes = moeflux.init_node_groups(dist.group.WORLD, ranks_per_node=2)
    inter = {}
    for name in ("flat", "hierarchical"):
        torch.manual_seed(0)
        moe = moeflux.MoE(16, 8, 8, top_k=4, dtype=torch.float64, ep_group=dist.group.WORLD,
                          exchange=ExchangeConfig(transport=name, nodes=nodes if name == "hierarchical" else None))
        x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        with moeflux.comm_stats(ranks_per_node=2) as stats:
            moe(x).sum().backward()
            step = stats.step()
        inter[name] = step.bytes_inter
    return inter


def test_hierarchical_sends_fewer_bytes_across_nodes():
    """top-4 of 8 experts on 2 nodes: most tokens have several experts on the other node; each crosses once."""
    for rank, inter in enumerate(run_ranks(4, bytes_worker)):
        assert inter["hierarchical"] < 0.8 * inter["flat"], (rank, inter)


# ---- the layer


LAYER_OPTIONS = {
    "dropless": {},
    "capacity": {"capacity_factor": 1.0},
    "expert bias, router bias, renormalize": {"expert_bias": True, "router_bias": True, "renormalize": True},
    "top-1 of 4": {"top_k": 1, "num_experts": 4},
}


def layer_worker(rank, world, ranks_per_node, from_launcher):
    groups = moeflux.init_expert_parallel(world)
    if from_launcher:
        os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_node)
        hierarchical = ExchangeConfig(transport="hierarchical")
    else:
        nodes = moeflux.init_node_groups(groups.ep_group, ranks_per_node=ranks_per_node)
        hierarchical = ExchangeConfig(transport="hierarchical", nodes=nodes)
    for name, options in LAYER_OPTIONS.items():
        options = {"num_experts": 8, "top_k": 2, **options}
        grads = []
        for config in (None, hierarchical):
            torch.manual_seed(0)
            moe = moeflux.MoE(12, 10, ep_group=groups, exchange=config, dtype=torch.float64, **options)
            tokens = 6 if "capacity_factor" in options else 5 + rank  # a capacity needs equal token counts
            x = torch.randn(2, tokens, 12, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
            out = moe(x)
            (out.pow(2).sum() + moe.aux_loss).backward()
            grads.append([out, x.grad, moe.tokens_per_expert] + [p.grad for p in moe.parameters()])
        assert isinstance(moe.exchange.transport, HierarchicalTransport)
        assert not moe.exchange.schedule.staged and moe.exchange.shadowing is None
        for flat, hier in zip(*grads):
            torch.testing.assert_close(hier, flat, rtol=1e-10, atol=1e-12, msg=name)
    check_composed(rank, groups, hierarchical)
    return True


COMPOSED = {  # the hierarchical transport with the other parts (tests/test_composed_exchange.py: every one)
    "chunked": dict(schedule="chunked", chunks=3),
    "pairwise": dict(schedule="pairwise"),
    "fixed shadows": dict(shadowing=FixedShadows((0, 7))),
}


def check_composed(rank, groups, hierarchical):
    """The hierarchical transport with a staged schedule or with shadowing equals the plain flat layer."""
    results = {}
    for name, config in {"flat": None, **{n: dataclasses.replace(hierarchical, **c) for n, c in COMPOSED.items()}
                         }.items():
        torch.manual_seed(0)
        moe = moeflux.MoE(12, 10, 8, 2, ep_group=groups, exchange=config, dtype=torch.float64)
        x = torch.randn(5 + rank, 12, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        out = moe(x)
        (out.pow(2).sum() + moe.aux_loss).backward()
        results[name] = [out, x.grad, moe.tokens_per_expert] + [p.grad for p in moe.parameters()]
        if config is not None:
            assert isinstance(moe.exchange.transport, HierarchicalTransport), name
            assert moe.exchange.schedule.staged == ("schedule" in COMPOSED[name]), name
            assert (moe.exchange.shadowing is not None) == ("shadowing" in COMPOSED[name]), name
    for name in COMPOSED:
        for flat, composed in zip(results["flat"], results[name]):
            torch.testing.assert_close(composed, flat, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("world, ranks_per_node, from_launcher", [(4, 2, False), (4, 1, True), (2, 1, False)],
                         ids=["2x2", "4x1 from LOCAL_WORLD_SIZE", "2x1"])
def test_moe_hierarchical_equals_flat(world, ranks_per_node, from_launcher):
    """moeflux.MoE(exchange=ExchangeConfig(transport="hierarchical", ...)): outputs, input and every parameter's
    gradients equal the flat layer's, with the bulk schedule, the staged ones and shadowing."""
    assert all(run_ranks(world, layer_worker, ranks_per_node, from_launcher))


# ---- errors


def test_launcher_ranks_per_node(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert launcher_ranks_per_node() is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launcher_ranks_per_node() == 8
    for bad in ("0", "x", "-2"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", bad)
        with pytest.raises(ValueError, match=f"LOCAL_WORLD_SIZE must be a positive int, got '{bad}'"):
            launcher_ranks_per_node()


def test_init_node_groups_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group first"):
        moeflux.init_node_groups(ranks_per_node=2)


def test_hierarchical_without_expert_parallelism_is_local():
    torch.manual_seed(0)
    plain = moeflux.MoE(8, 8, 4)
    torch.manual_seed(0)
    layer = moeflux.MoE(8, 8, 4, exchange=ExchangeConfig(transport="hierarchical"))  # every expert here
    assert type(layer.exchange.transport) is type(plain.exchange.transport)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("exchange, error, message", [
    (True, TypeError, "exchange must be a moeflux.ExchangeConfig or None"),
    ("hierarchical", TypeError, "exchange must be a moeflux.ExchangeConfig or None"),
    (ExchangeConfig(transport="yes"), ValueError, "exchange transport must be one of \\('flat', 'hierarchical'\\)"),
    (ExchangeConfig(transport="hierarchical", nodes="yes"), TypeError,
     "exchange nodes must be a moeflux.NodeGroups or None"),
])
def test_bad_hierarchical_options_raise(exchange, error, message):
    with pytest.raises(error, match=message):
        moeflux.MoE(8, 8, 4, exchange=exchange)


def errors_worker(rank, world):
    outcomes = {}

    def attempt(name, fn):
        try:
            fn()
            outcomes[name] = "no error"
        except (ValueError, RuntimeError, TypeError) as error:
            outcomes[name] = str(error)

    os.environ.pop("LOCAL_WORLD_SIZE", None)
    attempt("no LOCAL_WORLD_SIZE", lambda: moeflux.init_node_groups())
    os.environ["LOCAL_WORLD_SIZE"] = "two" if rank == 0 else "2"
    attempt("LOCAL_WORLD_SIZE malformed on rank 0", lambda: moeflux.init_node_groups())
    os.environ.pop("LOCAL_WORLD_SIZE")
    pair = dist.new_group([0, 1])  # ranks 0 and 1 name it, the others the world: the groups overlap
    attempt("overlapping groups", lambda: moeflux.init_node_groups(pair if rank < 2 else None, ranks_per_node=2))
    attempt("ranks_per_node differs", lambda: moeflux.init_node_groups(ranks_per_node=1 if rank == 0 else 2))
    attempt("ranks_per_node 3", lambda: moeflux.init_node_groups(ranks_per_node=3))
    nodes = moeflux.init_node_groups(ranks_per_node=2)
    hierarchical = ExchangeConfig(transport="hierarchical", nodes=nodes)
    world_group = dist.group.WORLD
    # the pairwise groups tile a node (2 ranks), not only the group (4): every rank raises
    attempt("pairwise groups of 4", lambda: moeflux.MoE(8, 8, 4, ep_group=world_group, exchange=dataclasses.replace(
        hierarchical, schedule="pairwise", group_size=4)))
    attempt("nodes with the flat transport", lambda: moeflux.MoE(8, 8, 4, ep_group=world_group,
                                                                 exchange=ExchangeConfig(nodes=nodes)))
    other = dist.new_group(list(range(world)))
    attempt("other group", lambda: moeflux.MoE(8, 8, 4, ep_group=other, exchange=hierarchical))
    attempt("placement of another size", lambda: make_exchange(moeflux.ExpertPlacement(4), world_group, hierarchical))
    attempt("num_experts not a multiple", lambda: HierarchicalTransport(6, nodes))
    attempt("only rank 0 hierarchical", lambda: moeflux.MoE(8, 8, 4, ep_group=world_group,
                                                            exchange=hierarchical if rank == 0 else None))
    # the transport's one count/header exchange: rank r tells rank q 10 * r + q; a rank whose header differs
    # makes every rank raise, naming it
    counts = torch.tensor([[10 * rank + q] for q in range(world)])
    sent, received = moeflux.ops.count_exchange(torch.randn(3, 6), counts, 8, world_group)
    assert sent.tolist() == counts.tolist() and received.tolist() == [[10 * r + rank] for r in range(world)]
    attempt("count_exchange: hidden size differs on rank 0",
            lambda: moeflux.ops.count_exchange(torch.randn(3, 7 if rank == 0 else 6), counts, 8, world_group))
    dist.barrier()  # nobody was left waiting
    return outcomes


def test_hierarchical_errors_raise_on_every_rank():
    expected = {
        "no LOCAL_WORLD_SIZE": "ranks_per_node was not given and LOCAL_WORLD_SIZE is not set",
        "ranks_per_node differs": "ranks disagree on ranks_per_node",
        "LOCAL_WORLD_SIZE malformed on rank 0": "LOCAL_WORLD_SIZE must be a positive int, got 'two'",
        "overlapping groups": "the ranks' expert-parallel groups overlap",
        "ranks_per_node 3": "every node must hold the same number",
        "placement of another size": "placement.ep_size (1) must equal the size of the expert-parallel group (4)",
        "pairwise groups of 4": "schedule='pairwise': group_size (4) must divide the size of a node "
                                "(ranks_per_node) (2)",
        "nodes with the flat transport": "exchange nodes are for transport='hierarchical'",
        "other group": "NodeGroups were made for another expert-parallel group",
        "num_experts not a multiple": "num_experts (6) must be a multiple of the expert-parallel group's size (4)",
        "only rank 0 hierarchical": "disagree on exchange_nodes, exchange_transport",
        "count_exchange: hidden size differs on rank 0": "moeflux.count_exchange: ranks of the expert-parallel "
                                                          "group disagree: rank ",
    }
    for outcomes in run_ranks(4, errors_worker):
        for name, message in expected.items():
            assert message in outcomes[name], (name, outcomes[name])
