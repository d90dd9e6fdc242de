import pytest
import torch

import reference
from moeflux import ops
from test_permute import random_expert_ids


@pytest.mark.parametrize("num_tokens", [0, 1, 17])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (4, 2), (8, 8)])
def test_router_aux_loss_matches_reference(num_tokens, num_experts, k, dtype, device, gen):
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(dtype).to(device)
    ids = random_expert_ids(num_tokens, num_experts, k, gen, device)
    if num_tokens > 1:
        ids[0, 0] = -1  # dropped slots do not count
    lb, z = ops.router_aux_loss(logits, ids)
    ref_lb, ref_z = reference.router_aux_loss(logits.cpu(), ids.cpu())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lb.cpu().double(), ref_lb, rtol=tol, atol=tol)
    torch.testing.assert_close(z.cpu().double(), ref_z, rtol=tol, atol=tol)


def test_load_balancing_loss_is_one_when_uniform(device):
    logits = torch.zeros(8, 4, device=device)
    ids = torch.arange(8, dtype=torch.int32, device=device).remainder(4).view(8, 1)
    lb, _ = ops.router_aux_loss(logits, ids)
    assert lb.item() == pytest.approx(1.0)
    ids = torch.zeros(8, 1, dtype=torch.int32, device=device)  # all on expert 0
    logits[:, 0] = 10
    lb, _ = ops.router_aux_loss(logits, ids)
    assert lb.item() > 3.9


def test_router_aux_loss_gradcheck(device, gen):
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    ids = random_expert_ids(6, 5, 2, gen, device)
    assert torch.autograd.gradcheck(lambda x: ops.router_aux_loss(x, ids), (logits,))


def test_router_aux_loss_opcheck(device, gen):
    logits = torch.randn(6, 5, generator=gen).to(device).requires_grad_()
    ids = random_expert_ids(6, 5, 2, gen, device)
    torch.library.opcheck(torch.ops.moeflux.router_aux_loss.default, (logits, ids))
