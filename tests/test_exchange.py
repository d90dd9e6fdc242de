"""The exchange seam: ExpertPlacement, the local and flat transports against a brute-force reference, with
contiguous and permuted placements, and moeflux.expert_parameters."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moeflux
from moeflux.exchange import ExchangeEngine, FlatTransport, LocalTransport, Schedule, make_exchange
from multiprocess import run_ranks

# ---- placement


def test_placement_default_is_contiguous():
    p = moeflux.ExpertPlacement(8, ep_size=4, ep_rank=2)
    assert p.is_contiguous and p.local_experts == 2
    assert p.experts_of() == (4, 5) and p.experts_of(0) == (0, 1)
    assert [p.rank_of(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.global_expert(1) == 5 and p.global_expert(0, rank=3) == 6
    ids = torch.tensor([[7, -1], [0, 3]], dtype=torch.int32)
    assert p.to_positions(ids) is ids  # no lookup for the contiguous layout


def test_placement_permuted():
    p = moeflux.ExpertPlacement.from_ranks([[5, 0], [1, 2], [3, 7], [4, 6]], ep_rank=1)
    assert not p.is_contiguous and p.num_experts == 8 and p.ep_size == 4
    assert p.experts_of() == (1, 2)
    assert p.rank_of(5) == 0 and p.slot_of(0) == 1 and p.rank_of(6) == 3 and p.slot_of(6) == 1
    table = p.position_table()
    assert table.dtype == torch.int32
    assert [p.expert_at[int(table[e])] for e in range(8)] == list(range(8))
    ids = torch.tensor([[5, -1], [6, 0]], dtype=torch.int32)
    assert p.to_positions(ids).tolist() == [[0, -1], [7, 1]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(num_experts=6, ep_size=4), "ep_size must be a positive divisor of num_experts"),
    (dict(num_experts=4, ep_size=2, ep_rank=2), "ep_rank must be in"),
    (dict(num_experts=4, expert_at=(0, 1, 1, 3)), "must be a permutation of range"),
])
def test_placement_rejects_bad_layouts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moeflux.ExpertPlacement(**kwargs)


# ---- exchanges against a brute-force reference


def scaled_by_expert(batch, global_experts):
    """A stand-in for the experts: row of global expert e -> row * (e + 1), padding rows untouched."""
    counts = batch.tokens_per_expert.tolist()
    per_expert = batch.capacity
    out, start = batch.rows.clone(), 0
    for slot, expert in enumerate(global_experts):
        n = counts[slot]
        out[start:start + n] *= expert + 1
        start += per_expert if per_expert is not None else n
    return out


def reference(tokens, ids, weights):
    """sum_j w[t, j] * tokens[t] * (ids[t, j] + 1) over slots that are not dropped."""
    factor = torch.where(ids >= 0, ids.double() + 1, torch.zeros_like(ids, dtype=torch.float64))
    return (tokens.double() * (weights.double() * factor).sum(1, keepdim=True)).to(tokens.dtype)


def routed(num_tokens, num_experts, k, seed, drop=0.0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_tokens, 6, generator=gen, dtype=torch.float64)
    ids = torch.empty(num_tokens, k, dtype=torch.int32)
    for t in range(num_tokens):  # k distinct experts per token
        ids[t] = torch.randperm(num_experts, generator=gen)[:k]
    ids[torch.rand(ids.shape, generator=gen) < drop] = -1
    weights = torch.rand(num_tokens, k, generator=gen, dtype=torch.float64)
    return tokens, ids, weights


LOCAL_PLACEMENTS = {
    "contiguous": moeflux.ExpertPlacement(6),
    "permuted": moeflux.ExpertPlacement.from_ranks([[4, 0, 5, 2, 1, 3]]),
}


@pytest.mark.parametrize("placement", LOCAL_PLACEMENTS.values(), ids=LOCAL_PLACEMENTS.keys())
@pytest.mark.parametrize("num_tokens, k, capacity, drop", [
    (13, 2, None, 0.0), (13, 2, None, 0.3), (0, 2, None, 0.0), (9, 6, None, 0.0), (13, 2, 3, 0.0), (13, 1, 0, 0.0),
])
def test_local_exchange_matches_reference(placement, num_tokens, k, capacity, drop):
    tokens, ids, weights = routed(num_tokens, 6, k, seed=num_tokens + k, drop=drop)
    if capacity is not None:
        ids = moeflux.ops.apply_capacity(ids, weights.float(), 6, capacity)
    transport = LocalTransport(placement.num_experts)
    tokens.requires_grad_(True)
    batch, plan = transport.dispatch(tokens, placement.to_positions(ids), capacity)
    assert batch.capacity == capacity and batch.tokens_per_expert.shape == (6,)
    out = transport.combine(scaled_by_expert(batch, placement.experts_of()), plan, weights)
    torch.testing.assert_close(out, reference(tokens.detach(), ids, weights), rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    factor = torch.where(ids >= 0, ids.double() + 1, torch.zeros_like(ids, dtype=torch.float64))
    torch.testing.assert_close(tokens.grad, grad * (weights * factor).sum(1, keepdim=True))


@pytest.mark.parametrize("options, message", [
    (dict(name="zigzag"), "schedule must be one of"),
    (dict(chunks=0), "chunks must be an int >= 1"),
    (dict(group_size="2"), "group_size must be an int >= 1"),
])
def test_bad_schedules_raise(options, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**options)


def test_local_exchange_needs_every_expert():
    # Without an expert-parallel group the exchange is local: the placement must hold every expert on this rank.
    with pytest.raises(ValueError, match="ep_size"):
        make_exchange(moeflux.ExpertPlacement(4, ep_size=2), None)


def check_all_to_all_exchange(rank, world, layout, capacity):
    num_experts = 2 * world
    if layout == "permuted":  # reversed: rank r holds the experts of rank world - 1 - r, in swapped slots
        ranks = [[2 * r + 1, 2 * r] for r in reversed(range(world))]
        placement = moeflux.ExpertPlacement.from_ranks(ranks, ep_rank=rank)
    else:
        placement = moeflux.ExpertPlacement(num_experts, world, rank)
    exchange = make_exchange(placement, dist.group.WORLD)
    assert isinstance(exchange.transport, FlatTransport) and exchange.shadowing is None
    assert not exchange.schedule.staged and exchange.placement is placement
    with pytest.raises(ValueError, match="placement.ep_size \\(1\\) must equal the size of the expert-parallel group"):
        make_exchange(moeflux.ExpertPlacement(num_experts), dist.group.WORLD)
    check_part_errors(placement, num_experts)
    num_tokens = 8 if capacity is not None else 3 * rank  # dropless: uneven, rank 0 without tokens
    tokens, ids, weights = routed(num_tokens, num_experts, 2, seed=10 + rank)
    if capacity is not None:
        ids = moeflux.ops.apply_capacity(ids, weights.float(), num_experts, capacity)
    tokens.requires_grad_(True)
    batch, plan = exchange.transport.dispatch(tokens, placement.to_positions(ids), capacity)
    assert batch.capacity is None  # on the CPU the tokens a capacity kept travel packed, as dropless ones
    out = exchange.transport.combine(scaled_by_expert(batch, placement.experts_of()), plan, weights)
    torch.testing.assert_close(out, reference(tokens.detach(), ids, weights), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    factor = torch.where(ids >= 0, ids.double() + 1, torch.zeros_like(ids, dtype=torch.float64))
    torch.testing.assert_close(tokens.grad, (weights * factor).sum(1, keepdim=True).expand_as(tokens))


def check_part_errors(placement, num_experts):
    """The parts' own checks, each raised on this rank before any collective (every rank fails alike)."""
    with pytest.raises(ValueError, match="must be a multiple of the group's size"):
        FlatTransport(num_experts + 1, dist.group.WORLD)
    with pytest.raises(ValueError, match="the transport moves .* experts, the placement holds"):
        ExchangeEngine(placement, FlatTransport(2 * num_experts, dist.group.WORLD), Schedule())
    tokens = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="counts must be an integer"):
        moeflux.ops.count_exchange(tokens, torch.zeros(dist.get_world_size(), 1), num_experts, dist.group.WORLD)
    w_in, w_out = torch.zeros(num_experts // dist.get_world_size(), 4, 6), torch.zeros(
        num_experts // dist.get_world_size(), 3, 4)
    counts = torch.zeros(dist.get_world_size(), num_experts, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="routing_counts are for dropless routing"):
        moeflux.ops.pipelined_moe(tokens, torch.zeros(2, 1, dtype=torch.int32), None, w_in, w_out, "swiglu",
                                  num_experts, 2, dist.group.WORLD, "chunked", 2, 1, routing_counts=counts)


def all_to_all_exchange_worker(rank, world):
    for layout in ("contiguous", "permuted"):
        for capacity in (None, 3):
            check_all_to_all_exchange(rank, world, layout, capacity)
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_exchange_matches_reference(world):
    """Contiguous and permuted placements, dropless (uneven tokens, a rank with none) and capacity."""
    assert all(run_ranks(world, all_to_all_exchange_worker))


# ---- the layer uses the seam; expert parameters have one home


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = moeflux.MoE(8, 16, 4, 2, shared_expert_ffn=8)
        self.dense = nn.Linear(8, 8)
        self.inner = nn.Sequential(moeflux.MoE(8, 16, 2, 1))


def test_moe_layer_builds_a_local_exchange_over_its_placement():
    moe = moeflux.MoE(8, 16, 4, 2)
    assert isinstance(moe.exchange.transport, LocalTransport)
    assert moe.exchange.shadowing is None and not moe.exchange.schedule.staged
    assert moe.exchange.placement is moe.placement is moe.experts.placement
    assert moe.experts.global_experts == (0, 1, 2, 3)


def test_expert_parameters_are_the_routed_experts_of_every_layer():
    model = TwoLayers()
    found = moeflux.expert_parameters(model)
    assert [e.name for e in found] == ["first.experts.w_in", "first.experts.w_out", "inner.0.experts.w_in",
                                       "inner.0.experts.w_out"]
    named = dict(model.named_parameters())
    assert all(named[e.name] is e.param for e in found)
    assert [e.layer for e in found] == [model.first, model.first, model.inner[0], model.inner[0]]
