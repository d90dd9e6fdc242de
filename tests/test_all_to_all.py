"""all_to_all, dispatch and combine ops on 2 and 4 gloo ranks (spawned processes)."""

import pytest
import torch
import torch.distributed as dist

from moeflux import ops
from multiprocess import distributed_gradcheck, run_ranks


def split_table(world, seed):
    """splits[src][dst]: rows src sends to dst, including zeros."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (world, world), generator=gen).tolist()


def encode(src, dst, i, width):
    return torch.full((width,), float(src * 10000 + dst * 100 + i), dtype=torch.float64)


def all_to_all_worker(rank, world):
    splits = split_table(world, 7)
    send = splits[rank]
    recv = [splits[src][rank] for src in range(world)]
    rows = [encode(rank, dst, i, 3) for dst in range(world) for i in range(send[dst])]
    x = (torch.stack(rows) if rows else torch.empty(0, 3, dtype=torch.float64)).requires_grad_()
    y = ops.all_to_all(x, recv, send)
    expected = [encode(src, rank, i, 3) for src in range(world) for i in range(recv[src])]
    assert torch.equal(y, torch.stack(expected) if expected else torch.empty(0, 3, dtype=torch.float64))
    # Backward: the gradient of each sent row is the gradient of the row it became.
    grad_y = torch.randn_like(y) if y.numel() else y.detach().clone()
    (grad_x,) = torch.autograd.grad(y, x, grad_y) if y.requires_grad else (torch.zeros_like(x),)
    back = ops.all_to_all(grad_y, send, recv)
    assert torch.equal(grad_x, back)
    x2 = torch.randn(sum(send), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    distributed_gradcheck(lambda t: ops.all_to_all(t, recv, send), (x2,))
    return ops.collective_counts()


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_uneven_splits_forward_and_backward(world):
    run_ranks(world, all_to_all_worker)


def routed_batch(rank, world, num_experts, k, tokens_per_rank, seed=3):
    """Every rank's tokens, expert ids and weights, the same on all ranks."""
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for r in range(world):
        t = tokens_per_rank[r]
        x = torch.randn(t, 5, generator=gen, dtype=torch.float64)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(t)]).int() if t else \
            torch.empty(0, k, dtype=torch.int32)
        w = torch.rand(t, k, generator=gen, dtype=torch.float64)
        batch.append((x, ids, w))
    return batch


def dispatch_combine_worker(rank, world, capacity, tokens_per_rank):
    num_experts, k = 2 * world, 2
    batch = routed_batch(rank, world, num_experts, k, tokens_per_rank)
    x, ids, w = batch[rank]
    local = num_experts // world
    ops.reset_collective_counts()
    rows, plan = ops.dispatch(x, ids, num_experts, capacity)
    # The rows of each local expert: its tokens from every source rank, sources in order, tokens in order.
    expected, counts = [], []
    for e in range(rank * local, (rank + 1) * local):
        mine = []
        for src_x, src_ids, _ in batch:
            hits = [src_x[t] for t in range(src_x.shape[0]) for j in range(k) if src_ids[t, j] == e]
            if capacity is not None:
                hits = hits[:capacity] + [torch.zeros(5, dtype=torch.float64)] * max(0, capacity - len(hits))
            mine += hits
        counts.append(len(mine))
        expected += mine
    assert torch.equal(rows, torch.stack(expected) if expected else torch.empty(0, 5, dtype=torch.float64))
    assert plan.tokens_per_local_expert.tolist() == counts
    # Identity experts: combine(dispatch(x)) is the weighted sum of each token's kept copies.
    out = ops.combine(rows * 2, plan, w)
    reference = ops.unpermute(*(lambda p: (p[0], p[2]))(ops.permute(x, ids, num_experts, capacity)), w) * 2
    assert torch.allclose(out, reference, atol=1e-12)
    assert ops.collective_counts() == {"token_all_to_alls": 2, "count_exchanges": 0 if capacity else 1,
                                       "host_count_reads": 0 if capacity else 1}

    n = 2 if capacity is None else x.shape[0]  # fewer elements: the check perturbs them one by one

    def layer(xs, ws):  # a non-linear "expert" between dispatch and combine
        r, p = ops.dispatch(xs, ids[:n], num_experts, capacity)
        return ops.combine(r.sin(), p, ws)

    distributed_gradcheck(layer, (x[:n], w[:n]))
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("capacity", [None, 1, 3])
def test_dispatch_combine_route_rows_across_ranks(world, capacity):
    tokens = [5, 0, 3, 7][:world] if capacity is None else [4] * world
    run_ranks(world, dispatch_combine_worker, capacity, tokens)


def mismatched_hidden_worker(rank, world):
    x = torch.randn(3, 8 if rank == 0 else 6)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="ranks of the process group disagree: .*hidden size"):
        ops.dispatch(x, ids, world)  # the agreement first
    with pytest.raises(RuntimeError, match="ranks of the expert-parallel group disagree"):
        ops.dispatch(x, ids, world, agree_first=False)  # the count exchange's own check
    dist.barrier()  # the group is still usable after the error
    return True


def test_dispatch_raises_on_every_rank_when_hidden_sizes_differ():
    run_ranks(2, mismatched_hidden_worker)


def bad_splits_worker(rank, world):
    x = torch.zeros(3, 2)
    cases = {
        "input_split_sizes must have one entry per rank of the group (2), got 1": ([3, 0], [3]),
        "output_split_sizes must be >= 0, got -1 for rank 1": ([4, -1], [3, 0]),
        "input_split_sizes must sum to input.size(0) = 3, got 4": ([3, 1], [2, 2]),
    }
    for message, (out_splits, in_splits) in cases.items():  # every rank fails the same way, before any collective
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ops.all_to_all(x, out_splits, in_splits)
    with pytest.raises(RuntimeError, match="num_experts must be a positive multiple of the expert-parallel group "
                                           "size 2, got 3"):
        ops.dispatch(x, torch.zeros(3, 1, dtype=torch.int32), 3)
    dist.barrier()
    return True


def test_bad_split_sizes_and_expert_counts_raise():
    run_ranks(2, bad_splits_worker)


def test_unknown_group_name_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no process group is registered under group_name 'nope'"):
        ops.all_to_all(torch.zeros(2, 2), [2], [2], "nope")
