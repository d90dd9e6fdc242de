import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moeflux
from conftest import DEVICES, TOLERANCE
from moeflux import ops

# in_features x out_features: (16, 24) runs in torch._grouped_mm wherever it exists (16-byte rows), (6, 10) in
# the per-segment loop.
SHAPES = [(16, 24), (6, 10)]
COUNTS = [[0], [5], [3, 0, 4], [0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8], [0, 9, 0]]


@pytest.fixture(params=["segments", "aten"], autouse=True)
def cpu_backend(request):
    """Both ways the CPU runs the GEMMs: per segment into workspace buffers (the default) and torch._grouped_mm."""
    moeflux._C.set_cpu_grouped_mm_backend(request.param)
    yield request.param
    moeflux._C.set_cpu_grouped_mm_backend("segments")


def reference_grouped_mm(x, w, counts):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts.tolist()):
        out[start:start + n] = x[start:start + n].double() @ w[e].double()
        start += n
    return out


def _tolerance(dtype):
    return dict(TOLERANCE[dtype]) if dtype in (torch.float32, torch.float64) else dict(atol=0.25, rtol=2e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_grouped_mm_matches_reference(counts, shape, dtype, device, gen):
    num_rows = sum(counts) + 2  # two tail rows past the last segment: zero (counts on the host)
    x = torch.randn(num_rows, shape[0], generator=gen).to(dtype).to(device)
    w = torch.randn(len(counts), *shape, generator=gen).to(dtype).to(device)
    tpe = torch.tensor(counts, dtype=torch.int32)
    out = ops.grouped_mm(x, w, tpe)
    torch.testing.assert_close(out.cpu().double(), reference_grouped_mm(x.cpu(), w.cpu(), tpe), **_tolerance(dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_grouped_mm_gradients_match_reference(counts, shape, device, gen):
    x = torch.randn(sum(counts) + 1, shape[0], generator=gen).to(device).requires_grad_()
    w = torch.randn(len(counts), *shape, generator=gen).to(device).requires_grad_()
    tpe = torch.tensor(counts, dtype=torch.int32, device=device)
    grad = torch.randn(x.shape[0], shape[1], generator=gen).to(device)
    got = torch.autograd.grad(ops.grouped_mm(x, w, tpe), (x, w), grad)
    x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    want = torch.autograd.grad(reference_grouped_mm(x64, w64, tpe.cpu()), (x64, w64), grad.double().cpu())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), r, atol=1e-4, rtol=1e-4)
    assert (got[0][-1] == 0).all()  # the row past the last segment gets no gradient


def test_grouped_mm_non_contiguous_inputs_and_expanded_gradient(device, gen):
    # A transposed weight, a column-sliced input and the stride-0 gradient of a sum.
    counts = torch.tensor([3, 0, 5], dtype=torch.int32, device=device)
    for k, m in SHAPES:
        base = torch.randn(8, 2 * k, generator=gen).to(device)
        x = base[:, :k].detach().requires_grad_()
        w = torch.randn(3, m, k, generator=gen).to(device).transpose(1, 2).detach().requires_grad_()
        assert not x.is_contiguous() and not w.is_contiguous()
        grad_x, grad_w = torch.autograd.grad(ops.grouped_mm(x, w, counts).sum(), (x, w))
        x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
        want = torch.autograd.grad(reference_grouped_mm(x64, w64, counts.cpu()).sum(), (x64, w64))
        torch.testing.assert_close(grad_x.cpu().double(), want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad_w.cpu().double(), want[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("counts", [[4, 0, 5], [0, 0, 9], [9]], ids=str)
def test_grouped_mm_gradcheck(counts, device, gen):
    x = torch.randn(sum(counts), 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(len(counts), 4, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    tpe = torch.tensor(counts, dtype=torch.int32, device=device)
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, tpe), (x, w))


def test_grouped_mm_experts_without_rows_get_zero_gradients(device, gen):
    # Backward must reach every weight and the input even when no expert has rows:
    # under expert parallelism every rank has to run its backward all-to-alls.
    for counts in ([0, 0, 0], [0, 3, 0]):
        for k, m in SHAPES:
            x = torch.randn(sum(counts), k, generator=gen).to(device).requires_grad_()
            w = torch.randn(3, k, m, generator=gen).to(device).requires_grad_()
            out = ops.grouped_mm(x, w, torch.tensor(counts, dtype=torch.int32, device=device))
            assert out.requires_grad
            grad_x, grad_w = torch.autograd.grad(out.sum(), (x, w))
            assert grad_x.shape == x.shape and (grad_w[0] == 0).all() and (grad_w[2] == 0).all()


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, [tuple(t.shape) for t in args if isinstance(t, torch.Tensor)]))
        return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grouped_mm_backward_writes_the_weight_gradient_once(shape, cpu_backend):
    # No per-expert zero fill or accumulation into a whole-weight buffer (that work grows as E^2), and with
    # torch._grouped_mm the backward's op count does not grow with the number of experts.
    op_counts = []
    for experts in (4, 64):
        x = torch.randn(8 * experts, shape[0], requires_grad=True)
        w = torch.randn(experts, *shape, requires_grad=True)
        out = ops.grouped_mm(x, w, torch.full((experts,), 8, dtype=torch.int32))
        with _OpLog() as log:
            out.backward(torch.ones_like(out))
        whole = (experts, *shape)
        touched = [f for f, shapes in log.calls if whole in shapes and f.__name__.split(".")[0] in
                   ("fill_", "zero_", "add_", "add", "zeros_like", "index_put_", "copy_")]
        assert not touched, touched
        op_counts.append(len(log.calls))
    if shape == SHAPES[0] and cpu_backend == "aten":
        assert op_counts[0] == op_counts[1], op_counts


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grouped_mm_opcheck(shape, device, gen):
    x = torch.randn(9, shape[0], generator=gen).to(device).requires_grad_()
    w = torch.randn(3, *shape, generator=gen).to(device).requires_grad_()
    tpe = torch.tensor([4, 0, 5], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.moeflux.grouped_mm.default, (x, w, tpe))
    grad = torch.randn(9, shape[1], generator=gen).to(device)
    torch.library.opcheck(torch.ops.moeflux.grouped_mm_backward.default, (grad, x.detach(), w.detach(), tpe,
                                                                         [True, True]))


def test_grouped_mm_reads_counts_once_in_forward(gen):
    # Counts on the rows' device (the CPU here) are read on the host once in forward, counted as a GPU's read
    # would be; backward reuses the host copy.
    ops.reset_collective_counts()
    x = torch.randn(9, 6, generator=gen, requires_grad=True)
    w = torch.randn(3, 6, 10, generator=gen, requires_grad=True)
    out = ops.grouped_mm(x, w, torch.tensor([4, 0, 5], dtype=torch.int32))
    assert ops.host_reads() == {"counts:expert_gemms": 1}
    out.sum().backward()
    assert ops.host_reads() == {"counts:expert_gemms": 1}


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_grouped_mm_cuda_reads_device_counts_once(gen):
    # float32 on CUDA runs per segment: forward reads the counts once, backward reuses them.
    x = torch.randn(9, 6, generator=gen).cuda().requires_grad_()
    w = torch.randn(3, 6, 10, generator=gen).cuda().requires_grad_()
    ops.reset_collective_counts()
    ops.grouped_mm(x, w, torch.tensor([4, 0, 5], dtype=torch.int32, device="cuda")).sum().backward()
    assert ops.collective_counts()["host_count_reads"] == 1


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_grouped_mm_cuda_bfloat16_matches_cpu(gen):
    counts = torch.tensor([100, 0, 37, 491, 12, 256, 8, 120], dtype=torch.int32)
    x = torch.randn(int(counts.sum()), 256, generator=gen).bfloat16()
    w = (torch.randn(8, 256, 512, generator=gen) / 16).bfloat16()
    cpu = ops.grouped_mm(x, w, counts)
    gpu = ops.grouped_mm(x.cuda(), w.cuda(), counts.cuda())
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=5e-2, rtol=2e-2)
