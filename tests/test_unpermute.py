import pytest
import torch

import reference
from conftest import DEVICES, TOLERANCE
from moeflux import ops
from test_permute import random_expert_ids, random_tokens


def routed(num_tokens, num_experts, k, hidden, dtype, device, gen, capacity=None):
    """Rows and a row map as permute produces them, and random weights."""
    ids = random_expert_ids(num_tokens, num_experts, k, gen, device)
    tokens = random_tokens(num_tokens, hidden, dtype, device, gen)
    rows, _, row_map = ops.permute(tokens, ids, num_experts, capacity)
    rows = torch.randn(rows.shape, generator=gen).to(dtype).to(device)  # stand-in for expert outputs
    weights = torch.rand(num_tokens, k, generator=gen).to(device)
    return rows, row_map, weights


@pytest.mark.parametrize("num_tokens", [0, 1, 9, 40])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (4, 2), (4, 4), (8, 3)])
@pytest.mark.parametrize("capacity", [None, 0, 3])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_matches_reference(num_tokens, num_experts, k, capacity, weighted, device, gen):
    rows, row_map, weights = routed(num_tokens, num_experts, k, 7, torch.float32, device, gen, capacity)
    w = weights if weighted else None
    out = ops.unpermute(rows, row_map, w)
    ref = reference.unpermute(rows.cpu(), row_map.cpu(), None if w is None else w.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("hidden", [1, 8, 24, 256])
def test_unpermute_dtypes_and_widths(hidden, dtype, device, gen):
    rows, row_map, weights = routed(19, 6, 3, hidden, dtype, device, gen)
    for w in (weights, weights.to(dtype), None):
        out = ops.unpermute(rows, row_map, w)
        assert out.dtype == dtype
        ref = reference.unpermute(rows.cpu(), row_map.cpu(), None if w is None else w.cpu())
        # accumulated in float, rounded once at the end
        torch.testing.assert_close(out.cpu().double(), ref.to(dtype).double(), **TOLERANCE[dtype])


def test_unpermute_skips_dropped_and_non_contiguous(device, gen):
    rows, row_map, weights = routed(12, 4, 2, 16, torch.float32, device, gen)
    row_map = row_map.clone()
    row_map[::4, 0] = -1
    rows_nc = torch.cat([rows, rows], dim=1)[:, ::2]
    weights_nc = weights.t().contiguous().t()
    assert not rows_nc.is_contiguous() and not weights_nc.is_contiguous()
    out = ops.unpermute(rows_nc, row_map, weights_nc)
    ref = reference.unpermute(rows_nc.cpu(), row_map.cpu(), weights.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, **TOLERANCE[torch.float32])


def test_unpermute_is_deterministic(device, gen):
    rows, row_map, weights = routed(300, 8, 4, 64, torch.bfloat16, device, gen)
    first = ops.unpermute(rows, row_map, weights)
    for _ in range(3):
        assert torch.equal(ops.unpermute(rows, row_map, weights), first)


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_gradcheck(capacity, weighted, device, gen):
    rows, row_map, weights = routed(6, 4, 2, 5, torch.float64, device, gen, capacity)
    rows.requires_grad_()
    if weighted:
        weights = weights.double().requires_grad_()
        assert torch.autograd.gradcheck(lambda r, w: ops.unpermute(r, row_map, w), (rows, weights))
    else:
        assert torch.autograd.gradcheck(lambda r: ops.unpermute(r, row_map), (rows,))


def test_unpermute_gradient_of_float32_weights_with_bfloat16_rows(device, gen):
    rows, row_map, weights = routed(20, 4, 2, 32, torch.bfloat16, device, gen)
    rows.requires_grad_()
    weights.requires_grad_()
    out = ops.unpermute(rows, row_map, weights)
    grad = torch.randn(out.shape, generator=gen).to(out)
    grad_rows, grad_w = torch.autograd.grad(out, (rows, weights), grad)
    assert grad_w.dtype == torch.float32 and grad_rows.dtype == torch.bfloat16
    r, w = rows.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    ref = (w.unsqueeze(-1) * r[row_map.long()]).sum(1)
    ref_rows, ref_w = torch.autograd.grad(ref, (r, w), grad.double())
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_rows.double(), ref_rows, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_opcheck(weighted, device, gen):
    rows, row_map, weights = routed(9, 4, 2, 8, torch.float32, device, gen, capacity=3)
    rows.requires_grad_()
    w = weights.requires_grad_() if weighted else None
    torch.library.opcheck(torch.ops.moeflux.unpermute.default, (rows, row_map, w))
    grad = torch.randn(9, 8, device=device)
    w = None if w is None else w.detach()  # backward ops run without grad (no double backward)
    torch.library.opcheck(torch.ops.moeflux.unpermute_backward.default, (grad, rows.detach(), row_map, w))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_unpermute_cuda_matches_cpu(dtype, gen):
    rows, row_map, weights = routed(2048, 32, 4, 1024, dtype, "cpu", gen)
    for w in (weights, None):
        cpu = ops.unpermute(rows, row_map, w)
        gpu = ops.unpermute(rows.cuda(), row_map.cuda(), None if w is None else w.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, **TOLERANCE[dtype])
    grad = torch.randn(2048, 1024, generator=gen).to(dtype)
    cpu = ops._ops.unpermute_backward(grad, rows, row_map, weights)
    gpu = ops._ops.unpermute_backward(grad.cuda(), rows.cuda(), row_map.cuda(), weights.cuda())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=0)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-4, atol=1e-3)
