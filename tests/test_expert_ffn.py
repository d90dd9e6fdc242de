import re

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCE
import moeflux
from moeflux import ops
from test_grouped_mm import _OpLog, cpu_backend  # noqa: F401 - the fixture runs every test on both CPU paths

# (hidden, ffn): (16, 8) runs in torch._grouped_mm wherever it exists (16-byte rows), (6, 5) per segment.
SHAPES = [(16, 8), (6, 5)]
COUNTS = [[3, 0, 5, 2], [0, 0, 0], [7], [0, 9], [4, 4, 4, 4], [12, 0, 0, 0]]


CLAMPED = "clamped_swiglu:1.5:1.702"  # GPT-OSS's activation, with a limit the test values reach


def activate(h, activation):
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(gate) * up
    _, limit, alpha = activation.split(":")
    gate = gate.clamp(max=float(limit))  # transformers' GptOssExperts._apply_gate, gate and up de-interleaved
    return (up.clamp(-float(limit), float(limit)) + 1) * gate * torch.sigmoid(gate * float(alpha))


def reference_ffn(x, w_in, w_out, counts, activation, capacity=None, b_in=None, b_out=None):
    """Per expert, in float64, from the definition: only token rows are computed (padding gets zeros)."""
    x, w_in, w_out = x.double(), w_in.double(), w_out.double()
    out = torch.zeros(x.shape[0], w_out.shape[2], dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts):
        rows = n
        if capacity is not None:
            start = e * capacity
        h = x[start:start + rows] @ w_in[e] + (0 if b_in is None else b_in[e].double())
        out[start:start + rows] = activate(h, activation) @ w_out[e] + (0 if b_out is None else b_out[e].double())
        start += rows
    return out


def make_args(counts, shape, activation, capacity, dtype, device, gen):
    hidden, ffn = shape
    experts = len(counts)
    rows = experts * capacity if capacity is not None else sum(counts) + 1  # one row past the last segment
    f_in = ffn if activation == "gelu" else 2 * ffn
    x = torch.randn(rows, hidden, generator=gen).to(dtype).to(device)
    w_in = (torch.randn(experts, hidden, f_in, generator=gen) / hidden ** 0.5).to(dtype).to(device)
    w_out = (torch.randn(experts, ffn, hidden, generator=gen) / ffn ** 0.5).to(dtype).to(device)
    tpe = torch.tensor(counts if capacity is None else [min(c, capacity) for c in counts], dtype=torch.int32,
                       device=device)
    if capacity is not None:  # padding past each expert's count is zero, as permute and dispatch leave it
        for e, n in enumerate(tpe.tolist()):
            x[e * capacity + n:(e + 1) * capacity] = 0
    return x, w_in, w_out, tpe


@pytest.mark.parametrize("capacity", [None, 3], ids=["dropless", "capacity"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_expert_ffn_matches_reference(counts, shape, activation, capacity, dtype, device, gen):
    x, w_in, w_out, tpe = make_args(counts, shape, activation, capacity, dtype, device, gen)
    params = [t.requires_grad_() for t in (x, w_in, w_out)]
    out = ops.expert_ffn(x, w_in, w_out, tpe, activation, capacity)
    grad = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    got = torch.autograd.grad(out, params, grad)
    refs = [t.detach().cpu().double().requires_grad_() for t in params]
    ref = reference_ffn(*refs, tpe.tolist(), activation, capacity)
    want = torch.autograd.grad(ref, refs, grad.cpu().double())
    tol = dict(TOLERANCE[dtype]) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    if dtype in (torch.bfloat16, torch.float16):
        tol = dict(atol=0.1, rtol=5e-2)
    torch.testing.assert_close(out.cpu().double(), ref.detach(), **tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, **tol)


@pytest.mark.parametrize("capacity", [None, 3], ids=["dropless", "capacity"])
@pytest.mark.parametrize("activation", ["swiglu", CLAMPED, "gelu"])
@pytest.mark.parametrize("biases", ["both", "in", "out", "none"])
@pytest.mark.parametrize("counts", COUNTS[:4], ids=str)
def test_expert_ffn_with_biases_and_the_clamped_swiglu_matches_reference(counts, biases, activation, capacity,
                                                                         device, gen):
    """GPT-OSS's experts: a bias after each GEMM and the clamped SwiGLU; the rows past the segments (and the
    padding) are never read, so only the token rows are compared."""
    x, w_in, w_out, tpe = make_args(counts, SHAPES[1], activation, capacity, torch.float64, device, gen)
    x, w_in = x * 2, w_in * 2  # reach the clamps
    b_in = torch.randn(len(counts), w_in.shape[2], generator=gen, dtype=torch.float64).to(device) \
        if biases in ("both", "in") else None
    b_out = torch.randn(len(counts), w_out.shape[2], generator=gen, dtype=torch.float64).to(device) \
        if biases in ("both", "out") else None
    params = [t.requires_grad_() for t in (x, w_in, w_out, b_in, b_out) if t is not None]
    out = ops.expert_ffn(x, w_in, w_out, tpe, activation, capacity, b_in, b_out)
    refs = [t.detach().cpu().requires_grad_() for t in params]
    it = iter(refs)
    rx, rw_in, rw_out = next(it), next(it), next(it)
    rb_in = next(it) if b_in is not None else None
    rb_out = next(it) if b_out is not None else None
    ref = reference_ffn(rx, rw_in, rw_out, tpe.tolist(), activation, capacity, rb_in, rb_out)
    token_rows = torch.zeros(x.shape[0], dtype=torch.bool)
    for e, n in enumerate(tpe.tolist()):
        start = e * capacity if capacity is not None else sum(tpe.tolist()[:e])
        token_rows[start:start + n] = True
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64) * token_rows[:, None]
    got = torch.autograd.grad(out, params, grad.to(device))
    want = torch.autograd.grad(ref, refs, grad, allow_unused=True)
    torch.testing.assert_close(out.detach().cpu()[token_rows], ref.detach()[token_rows], rtol=1e-10, atol=1e-10)
    for g, w, t in zip(got, want, params):
        torch.testing.assert_close(g.cpu(), w if w is not None else torch.zeros_like(t.cpu()), rtol=1e-10,
                                   atol=1e-10)
    if counts == COUNTS[0]:
        def ffn(*args):
            rest = list(args[3:])
            return ops.expert_ffn(*args[:3], tpe, activation, capacity, rest.pop(0) if b_in is not None else None,
                                  rest.pop(0) if b_out is not None else None)

        torch.autograd.gradcheck(ffn, tuple(t.detach().clone().requires_grad_() for t in params))
        x, w_in, w_out, b_in, b_out = (None if t is None else t.detach() for t in (x, w_in, w_out, b_in, b_out))
        torch.library.opcheck(torch.ops.moeflux.expert_ffn_forward.default,
                              (x, w_in, w_out, tpe, activation, capacity, b_in, b_out))
        _, h, a = torch.ops.moeflux.expert_ffn_forward(x, w_in, w_out, tpe, activation, capacity, b_in, b_out)
        torch.library.opcheck(torch.ops.moeflux.expert_ffn_backward.default,
                              (torch.randn_like(out), x, w_in, w_out, tpe, h, a, activation, capacity, True))


def test_expert_ffn_non_contiguous_rows_and_expanded_gradient(device, gen):
    for shape in SHAPES:
        x, w_in, w_out, tpe = make_args([3, 0, 5], shape, "swiglu", None, torch.float32, device, gen)
        x = torch.cat([x, x], dim=1)[:, :shape[0]].detach().requires_grad_()  # a column slice: row stride 2H
        w_out = w_out.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_()
        w_in.requires_grad_()
        assert not x.is_contiguous() and not w_out.is_contiguous()
        got = torch.autograd.grad(ops.expert_ffn(x, w_in, w_out, tpe).sum(), (x, w_in, w_out))
        refs = [t.detach().double().cpu().requires_grad_() for t in (x, w_in, w_out)]
        want = torch.autograd.grad(reference_ffn(*refs, tpe.tolist(), "swiglu").sum(), refs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu().double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("capacity", [None, 2], ids=["dropless", "capacity"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_ffn_gradcheck(activation, capacity, device, gen):
    x, w_in, w_out, tpe = make_args([2, 0, 3], (4, 3), activation, capacity, torch.float64, device, gen)
    params = tuple(t.requires_grad_() for t in (x, w_in, w_out))
    assert torch.autograd.gradcheck(lambda *p: ops.expert_ffn(*p, tpe, activation, capacity), params)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_expert_ffn_backward_writes_each_gradient_once(shape, cpu_backend):
    # No zero fill of a whole-weight buffer, no chunk/cat of the activation's gradient, and with
    # torch._grouped_mm an op count that does not grow with the number of experts.
    op_counts = []
    for experts in (4, 64):
        x, w_in, w_out, tpe = make_args([8] * experts, shape, "swiglu", None, torch.float32, "cpu",
                                        torch.Generator().manual_seed(0))
        params = [t.requires_grad_() for t in (x, w_in, w_out)]
        out = ops.expert_ffn(*params, tpe)
        with _OpLog() as log:
            out.backward(torch.ones_like(out))
        names = [f.__name__.split(".")[0] for f, _ in log.calls]
        assert "cat" not in names and "fill_" not in names and "zero_" not in names, names
        op_counts.append(len(log.calls))
    if shape == SHAPES[0] and cpu_backend == "aten":
        assert op_counts[0] == op_counts[1], op_counts


@pytest.mark.parametrize("capacity", [None, 3], ids=["dropless", "capacity"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_expert_ffn_opcheck(shape, capacity, device, gen):
    x, w_in, w_out, tpe = make_args([3, 0, 5], shape, "swiglu", capacity, torch.float32, device, gen)
    torch.library.opcheck(torch.ops.moeflux.expert_ffn.default,
                          ([t.requires_grad_() for t in (x, w_in, w_out)] + [tpe, "swiglu", capacity]))
    out, h, a = torch.ops.moeflux.expert_ffn_forward(x.detach(), w_in.detach(), w_out.detach(), tpe, "swiglu",
                                                     capacity)
    torch.library.opcheck(torch.ops.moeflux.expert_ffn_forward.default,
                          (x.detach(), w_in.detach(), w_out.detach(), tpe, "swiglu", capacity))
    torch.library.opcheck(torch.ops.moeflux.expert_ffn_backward.default,
                          (torch.randn_like(out), x.detach(), w_in.detach(), w_out.detach(), tpe, h, a, "swiglu",
                           capacity))


@pytest.mark.parametrize("make, message", [
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi[:, :, :5], wo, c), "w_in.size(2) must equal 2 * w_out.size(1)"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c, "relu"),
     "activation must be 'swiglu', 'gelu' or 'clamped_swiglu:<limit>:<alpha>'"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c, "clamped_swiglu:0:1.7"), "(limit > 0, finite), got"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c, "clamped_swiglu:7"), "got 'clamped_swiglu:7'"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c, b_in=torch.zeros(2, 3)), "b_in must have shape [num_experts"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c, b_out=torch.zeros(wo.shape[0], wo.shape[2],
                                                                         dtype=torch.float64)),
     "b_out must have the dtype of rows"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c, capacity=2), "must hold num_experts * capacity"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c * 2), "sum to at most input.size(0)"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi.double(), wo, c), "w_in must have the dtype of rows"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo[:2], c), "w_out.size(0) must equal w_in.size(0)"),
    (lambda x, wi, wo, c: ops.expert_ffn(x, wi, wo, c.long()), "tokens_per_expert must be Int"),
], ids=["swiglu width", "activation", "clamp limit", "clamp alpha missing", "b_in shape", "b_out dtype",
        "capacity rows", "counts", "dtype", "experts", "counts dtype"])
def test_expert_ffn_errors_name_the_argument(make, message, gen):
    x, w_in, w_out, tpe = make_args([3, 0, 5], (6, 5), "swiglu", None, torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        make(x, w_in, w_out, tpe)


def test_expert_ffn_reuses_cpu_workspace(gen):
    # Large buffers come back to the pool when freed and serve the next step; results do not change.
    x, w_in, w_out, tpe = make_args([1000, 0, 2000, 1096], (256, 512), "swiglu", None, torch.float32, "cpu", gen)
    params = [t.requires_grad_() for t in (x, w_in, w_out)]
    ops.release_cpu_workspace()
    first = [ops.expert_ffn(*params, tpe).sum()]
    first += torch.autograd.grad(first[0], params)
    first = [t.clone() for t in first]
    assert ops.cpu_workspace_bytes() > 0
    second = [ops.expert_ffn(*params, tpe).sum()]
    second += torch.autograd.grad(second[0], params)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ops.release_cpu_workspace()
    assert ops.cpu_workspace_bytes() == 0


def test_expert_ffn_backward_and_capacity_errors(gen):
    x, w_in, w_out, tpe = make_args([3, 0, 2], (6, 5), "swiglu", 3, torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match=re.escape("with capacity 3 tokens_per_expert must be in [0, 3], got 4")):
        ops.expert_ffn(x, w_in, w_out, torch.tensor([4, 0, 2], dtype=torch.int32), "swiglu", 3)
    out, h, a = torch.ops.moeflux.expert_ffn_forward(x, w_in, w_out, tpe, "swiglu", 3)
    with pytest.raises(RuntimeError, match="grad_output must have the shape of rows"):
        torch.ops.moeflux.expert_ffn_backward(out[:-1], x, w_in, w_out, tpe, h, a, "swiglu", 3)
    with pytest.raises(RuntimeError, match=re.escape("grouped_mm_backward: grad_output must be [9, 10]")):
        torch.ops.moeflux.grouped_mm_backward(torch.randn(9, 9), x, w_in, tpe, [True, True])
    with pytest.raises(RuntimeError, match="backend must be 'aten' or 'segments'"):
        moeflux._C.set_cpu_grouped_mm_backend("fast")
