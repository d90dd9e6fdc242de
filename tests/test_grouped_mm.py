import pytest
import torch

from conftest import DEVICES, TOLERANCE
from moeflux import ops


def reference_grouped_mm(x, w, counts):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts.tolist()):
        out[start:start + n] = x[start:start + n].double() @ w[e].double()
        start += n
    return out


@pytest.mark.parametrize("counts", [[0], [5], [3, 0, 4], [0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
def test_grouped_mm_matches_reference(counts, dtype, device, gen):
    num_rows = sum(counts) + 2  # two tail rows past the last segment: zero
    x = torch.randn(num_rows, 16, generator=gen).to(dtype).to(device)
    w = torch.randn(len(counts), 16, 24, generator=gen).to(dtype).to(device)
    tpe = torch.tensor(counts, dtype=torch.int32, device=device)
    out = ops.grouped_mm(x, w, tpe)
    ref = reference_grouped_mm(x.cpu(), w.cpu(), tpe.cpu())
    tol = dict(TOLERANCE[dtype]) if dtype in (torch.float32, torch.float64) else dict(atol=0.25, rtol=2e-2)
    torch.testing.assert_close(out.cpu().double(), ref, **tol)


def test_grouped_mm_gradcheck(device, gen):
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    tpe = torch.tensor([4, 0, 5], dtype=torch.int32, device=device)
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, tpe), (x, w))


def test_grouped_mm_experts_without_rows_get_zero_gradients(device, gen):
    # Backward must reach every weight and the input even when no expert has rows:
    # under expert parallelism every rank has to run its backward all-to-alls.
    for counts in ([0, 0, 0], [0, 3, 0]):
        x = torch.randn(sum(counts), 4, generator=gen).to(device).requires_grad_()
        w = torch.randn(3, 4, 5, generator=gen).to(device).requires_grad_()
        out = ops.grouped_mm(x, w, torch.tensor(counts, dtype=torch.int32, device=device))
        assert out.requires_grad
        grad_x, grad_w = torch.autograd.grad(out.sum(), (x, w))
        assert grad_x.shape == x.shape and (grad_w[0] == 0).all() and (grad_w[2] == 0).all()


def test_grouped_mm_opcheck(device, gen):
    # The per-expert path reads the counts on the host, so only the schema and
    # the autograd registration are checked (no FakeTensor / AOT tracing).
    x = torch.randn(9, 4, generator=gen).to(device).requires_grad_()
    w = torch.randn(3, 4, 5, generator=gen).to(device).requires_grad_()
    tpe = torch.tensor([4, 0, 5], dtype=torch.int32, device=device)
    torch.library.opcheck(
        torch.ops.moeflux.grouped_mm.default, (x, w, tpe), test_utils=("test_schema", "test_autograd_registration")
    )


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_grouped_mm_cuda_bfloat16_matches_cpu(gen):
    counts = torch.tensor([100, 0, 37, 491, 12, 256, 8, 120], dtype=torch.int32)
    x = torch.randn(int(counts.sum()), 256, generator=gen).bfloat16()
    w = (torch.randn(8, 256, 512, generator=gen) / 16).bfloat16()
    cpu = ops.grouped_mm(x, w, counts)
    gpu = ops.grouped_mm(x.cuda(), w.cuda(), counts.cuda())
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=5e-2, rtol=2e-2)
