import pytest
import torch

import reference
from conftest import DEVICES
from moeflux import ops


def random_logits(num_tokens, num_experts, dtype, device, gen):
    return (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(dtype).to(device)


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 65])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (4, 1), (4, 2), (4, 4), (33, 3), (64, 8), (64, 64)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_matches_reference(num_tokens, num_experts, k, renormalize, dtype, device, gen):
    logits = random_logits(num_tokens, num_experts, dtype, device, gen)
    weights, ids = ops.route(logits, k, renormalize)
    ref_w, ref_ids = reference.route(logits.cpu(), k, renormalize)
    assert weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ids.dtype == torch.int32 and ids.shape == (num_tokens, k)
    torch.testing.assert_close(ids.cpu(), ref_ids, rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(weights.cpu().double(), ref_w, rtol=tol, atol=tol)


def test_route_ties_go_to_lower_index(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]], device=device)
    _, ids = ops.route(logits, 2)
    assert ids.tolist() == [[1, 2]]


def test_route_every_token_to_one_expert(device, gen):
    logits = random_logits(50, 8, torch.float32, device, gen)
    logits[:, 5] += 100
    weights, ids = ops.route(logits, 2)
    assert (ids[:, 0] == 5).all()
    torch.testing.assert_close(weights[:, 0], torch.ones(50, device=device), atol=1e-6, rtol=0)


def test_route_non_contiguous(device, gen):
    base = random_logits(16, 40, torch.float32, device, gen)
    logits = base[:, ::2]
    assert not logits.is_contiguous()
    weights, ids = ops.route(logits, 3)
    ref_w, ref_ids = reference.route(logits.cpu(), 3)
    torch.testing.assert_close(ids.cpu(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights.cpu().double(), ref_w, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_gradcheck(k, renormalize, device, gen):
    logits = random_logits(5, 6, torch.float64, device, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.route(x, k, renormalize)[0], (logits,))


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_gradient_matches_torch(renormalize, dtype, device, gen):
    logits = random_logits(33, 16, dtype, device, gen).requires_grad_()
    weights, ids = ops.route(logits, 4, renormalize)
    grad = torch.randn(weights.shape, generator=gen, dtype=weights.dtype).to(device)
    (grad_ours,) = torch.autograd.grad(weights, logits, grad)

    x = logits.detach().double().requires_grad_()
    ref = torch.softmax(x, -1).gather(1, ids.long())
    if renormalize:
        ref = ref / ref.sum(-1, keepdim=True)
    (grad_ref,) = torch.autograd.grad(ref, x, grad.double())
    tol = 1e-10 if dtype == torch.float64 else 5e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_ours.double(), grad_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("renormalize", [False, True])
def test_route_opcheck(renormalize, device, gen):
    logits = random_logits(9, 12, torch.float32, device, gen).requires_grad_()
    torch.library.opcheck(torch.ops.moeflux.route.default, (logits, 3, renormalize))
    torch.library.opcheck(torch.ops.moeflux.route.default, (logits.detach().double(), 1, renormalize))


def test_route_backward_opcheck(device, gen):
    logits = random_logits(9, 12, torch.float32, device, gen)
    weights, ids = ops.route(logits, 3)
    grad = torch.randn_like(weights)
    torch.library.opcheck(torch.ops.moeflux.route_backward.default, (grad, logits, weights, ids, False, "softmax", 1.0))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_route_cuda_matches_cpu(dtype, gen):
    logits = random_logits(1000, 256, dtype, "cpu", gen)
    for renormalize in (False, True):
        w_cpu, ids_cpu = ops.route(logits, 8, renormalize)
        w_gpu, ids_gpu = ops.route(logits.cuda(), 8, renormalize)
        torch.testing.assert_close(ids_gpu.cpu(), ids_cpu, rtol=0, atol=0)
        torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-6, atol=1e-6)


DEEPSEEK_LIKE = [
    dict(scoring="sigmoid"),
    dict(scoring="sigmoid", renormalize=True, scale=2.5),
    dict(scoring="sigmoid", renormalize=True, bias=True),
    dict(scoring="sigmoid", renormalize=True, bias=True, num_groups=4, top_groups=2, scale=2.5),  # DeepSeek-V3
    dict(scoring="softmax", bias=True, num_groups=2, top_groups=1),
    dict(scoring="softmax", renormalize=True, scale=0.5),
    dict(scoring="softmax", num_groups=4, top_groups=2),  # groups ranked by scores, experts by logits
    dict(scoring="sigmoid", num_groups=4, top_groups=1),
    dict(scoring="softmax", num_groups=4, top_groups=2, group_score_top=1, scale=16.0),  # DeepSeek-V2
    dict(scoring="sigmoid", bias=True, num_groups=2, top_groups=1, group_score_top=3),
]


@pytest.mark.parametrize("options", DEEPSEEK_LIKE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_route_options_match_reference(options, dtype, device, gen):
    options = dict(options)
    bias = (torch.randn(16, generator=gen) * 0.3).to(device) if options.pop("bias", False) else None
    logits = random_logits(37, 16, dtype, device, gen)
    weights, ids = ops.route(logits, 3, expert_bias=bias, **options)
    ref_w, ref_ids = reference.route(logits.cpu(), 3, expert_bias=None if bias is None else bias.cpu(),
                                             **options)
    torch.testing.assert_close(ids.cpu(), ref_ids, rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    torch.testing.assert_close(weights.cpu().double(), ref_w, rtol=tol, atol=tol)


@pytest.mark.parametrize("options", DEEPSEEK_LIKE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_route_options_gradcheck(options, device, gen):
    options = dict(options)
    bias = (torch.randn(16, generator=gen, dtype=torch.float64) * 0.3).to(device) if options.pop("bias", False) \
        else None
    logits = random_logits(5, 16, torch.float64, device, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.route(x, 3, expert_bias=bias, **options)[0], (logits,))


def test_route_options_opcheck(device, gen):
    logits = random_logits(9, 16, torch.float32, device, gen).requires_grad_()
    bias = torch.randn(16, generator=gen).to(device)
    torch.library.opcheck(torch.ops.moeflux.route.default, (logits, 3, True, "sigmoid", bias, 4, 2, 2.5))
    torch.library.opcheck(torch.ops.moeflux.route.default, (logits, 3, False, "softmax", None, 4, 2, 1.0, 1))
