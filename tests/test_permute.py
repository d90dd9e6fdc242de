import pytest
import torch

import reference
from conftest import DEVICES
from moeflux import ops


def random_expert_ids(num_tokens, num_experts, k, gen, device="cpu"):
    """k distinct experts per token, as the router produces."""
    ids = torch.empty(num_tokens, k, dtype=torch.int32)
    for t in range(num_tokens):
        ids[t] = torch.randperm(num_experts, generator=gen)[:k]
    return ids.to(device)


def random_tokens(num_tokens, hidden, dtype, device, gen):
    return torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)


def check_against_reference(tokens, ids, num_experts, capacity):
    out, counts, row_map = ops.permute(tokens, ids, num_experts, capacity)
    ref_out, ref_counts, ref_map = reference.permute(tokens.cpu(), ids.cpu(), num_experts, capacity)
    torch.testing.assert_close(row_map.cpu(), ref_map, rtol=0, atol=0)
    torch.testing.assert_close(counts.cpu(), ref_counts, rtol=0, atol=0)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=0, atol=0)  # a copy: exact


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 37])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (3, 2), (3, 3), (8, 2), (8, 8)])
@pytest.mark.parametrize("capacity", [None, 0, 1, 3, 1000])
def test_permute_matches_reference(num_tokens, num_experts, k, capacity, device, gen):
    tokens = random_tokens(num_tokens, 6, torch.float32, device, gen)
    ids = random_expert_ids(num_tokens, num_experts, k, gen, device)
    check_against_reference(tokens, ids, num_experts, capacity)


@pytest.mark.parametrize("hidden", [1, 8, 33, 256])
def test_permute_dtypes_and_widths(hidden, dtype, device, gen):
    tokens = random_tokens(21, hidden, dtype, device, gen)
    ids = random_expert_ids(21, 5, 2, gen, device)
    check_against_reference(tokens, ids, 5, None)
    check_against_reference(tokens, ids, 5, 4)


def test_permute_every_token_to_one_expert_overflows_capacity(device, gen):
    tokens = random_tokens(40, 8, torch.float32, device, gen)
    ids = torch.full((40, 1), 2, dtype=torch.int32, device=device)
    out, counts, row_map = ops.permute(tokens, ids, 4, capacity=10)
    assert counts.tolist() == [0, 0, 10, 0]
    assert (row_map[:10, 0].cpu() == torch.arange(20, 30, dtype=torch.int32)).all()
    assert (row_map[10:] == -1).all()
    check_against_reference(tokens, ids, 4, 10)
    check_against_reference(tokens, ids, 4, None)


def test_permute_dropped_ids(device, gen):
    tokens = random_tokens(12, 8, torch.float32, device, gen)
    ids = random_expert_ids(12, 4, 2, gen, device)
    ids[::3, 1] = -1
    check_against_reference(tokens, ids, 4, None)
    check_against_reference(tokens, ids, 4, 2)
    out, counts, _ = ops.permute(tokens, ids, 4)
    assert out.shape[0] == 24 and int(counts.sum()) == 20
    assert (out[20:] == 0).all()  # rows no token maps to are zero


def test_permute_non_contiguous(device, gen):
    tokens = random_tokens(16, 30, torch.float32, device, gen)[:, ::3]
    ids = random_expert_ids(16, 6, 4, gen, device)[:, ::2]
    assert not tokens.is_contiguous() and not ids.is_contiguous()
    check_against_reference(tokens, ids, 6, None)
    check_against_reference(tokens, ids, 6, 3)


@pytest.mark.parametrize("capacity", [None, 3000])
def test_permute_large_is_a_stable_sort(capacity, device, gen):
    """Many assignments, so the counting sort runs in several chunks on every device."""
    num_tokens, num_experts, k = 20000, 64, 2
    tokens = random_tokens(num_tokens, 4, torch.float32, device, gen)
    ids = torch.randint(0, num_experts, (num_tokens, k), generator=gen, dtype=torch.int32).to(device)
    out, counts, row_map = ops.permute(tokens, ids, num_experts, capacity)
    flat = ids.flatten().long().cpu()
    order = torch.sort(flat, stable=True).indices
    expected = torch.empty_like(order)
    expected[order] = torch.arange(flat.numel())
    ref_counts = torch.bincount(flat, minlength=num_experts)
    if capacity is not None:
        start = torch.cumsum(ref_counts, 0) - ref_counts
        rank = expected - start[flat]
        expected = torch.where(rank < capacity, flat * capacity + rank, -1)
        ref_counts = ref_counts.clamp(max=capacity)
    torch.testing.assert_close(row_map.flatten().cpu().long(), expected, rtol=0, atol=0)
    torch.testing.assert_close(counts.cpu().long(), ref_counts, rtol=0, atol=0)
    kept = expected >= 0
    torch.testing.assert_close(out.cpu()[expected[kept]], tokens.cpu()[torch.arange(flat.numel())[kept] // k])


@pytest.mark.parametrize("capacity", [None, 2])
def test_permute_gradcheck(capacity, device, gen):
    tokens = random_tokens(7, 5, torch.float64, device, gen).requires_grad_()
    ids = random_expert_ids(7, 4, 2, gen, device)
    assert torch.autograd.gradcheck(lambda x: ops.permute(x, ids, 4, capacity)[0], (tokens,))


@pytest.mark.parametrize("capacity", [None, 2])
def test_permute_opcheck(capacity, device, gen):
    tokens = random_tokens(7, 8, torch.float32, device, gen).requires_grad_()
    ids = random_expert_ids(7, 4, 2, gen, device)
    torch.library.opcheck(torch.ops.moeflux.permute.default, (tokens, ids, 4, capacity))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("capacity", [None, 100])
def test_permute_cuda_matches_cpu(capacity, dtype, gen):
    tokens = random_tokens(4096, 512, dtype, "cpu", gen)
    ids = random_expert_ids(4096, 64, 4, gen)
    ids[::7, 3] = -1
    cpu = ops.permute(tokens, ids, 64, capacity)
    gpu = ops.permute(tokens.cuda(), ids.cuda(), 64, capacity)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)


def on_threads(num_threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_permute_and_unpermute_do_not_depend_on_the_thread_count(gen):
    """Bitwise the same on 1, 2 and 3 threads at sizes where the CPU kernels split their work
    (csrc/cpu/permute_kernels.cpp): the counting sort above 2 * 4096 assignments, the row loops above 64 KiB of
    rows per task (here 256 B per token: tasks of 256 tokens). Sums over k in slot order whatever the split."""
    num_tokens, num_experts, k, hidden = 2100, 16, 4, 16
    tokens = random_tokens(num_tokens, hidden, torch.float32, "cpu", gen)
    ids = random_expert_ids(num_tokens, num_experts, k, gen)
    ids[::9, 1] = -1
    rows = torch.randn(num_tokens * k, hidden, generator=gen)  # stand-in for expert outputs
    weights = torch.rand(num_tokens, k, generator=gen)
    grad = torch.randn(num_tokens, hidden, generator=gen)

    def run():
        permuted, counts, row_map = ops.permute(tokens, ids, num_experts)
        r, w = rows.clone().requires_grad_(), weights.clone().requires_grad_()
        out = ops.unpermute(r, row_map, w)
        out.backward(grad)
        return permuted, counts, row_map, out, r.grad, w.grad

    serial = on_threads(1, run)
    for threads in (2, 3):
        for name, a, b in zip(("permuted", "counts", "row_map", "out", "grad rows", "grad weights"), serial,
                              on_threads(threads, run)):
            assert torch.equal(a, b), f"{name} on {threads} threads differs from 1 thread"


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("capacity", [None, 3])
def test_cuda_treats_out_of_range_ids_and_rows_as_dropped(capacity, gen):
    """The CUDA kernels do not check ids on the host (that would sync): ids outside [-1, E) are dropped, as -1 is on
    the CPU (which raises for them); so are rows outside [-1, rows) in unpermute's row map."""
    num_experts = 8
    tokens = random_tokens(64, 16, torch.float32, "cpu", gen)
    ids = random_expert_ids(64, num_experts, 2, gen)
    bad = ids.clone()
    bad[::5, 0], bad[1::5, 1], bad[2::7, 0] = num_experts, 1000, -7
    dropped = torch.where((bad >= 0) & (bad < num_experts), bad, -1)
    cpu = ops.permute(tokens, dropped, num_experts, capacity)
    gpu = ops.permute(tokens.cuda(), bad.cuda(), num_experts, capacity)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)

    rows, _, row_map = cpu
    bad_map = row_map.clone()
    bad_map[::3, 0], bad_map[1::4, 1] = rows.shape[0], -5
    weights = torch.rand(64, 2, generator=gen)
    expected = ops.unpermute(rows, torch.where((bad_map >= 0) & (bad_map < rows.shape[0]), bad_map, -1), weights)
    torch.testing.assert_close(ops.unpermute(rows.cuda(), bad_map.cuda(), weights.cuda()).cpu(), expected, rtol=0,
                               atol=0)
