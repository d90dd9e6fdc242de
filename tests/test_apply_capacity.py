import pytest
import torch

import reference
from conftest import DEVICES
from moeflux import ops
from test_permute import random_expert_ids


@pytest.mark.parametrize("num_tokens", [0, 1, 13, 50])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (4, 2), (4, 4), (8, 2)])
@pytest.mark.parametrize("capacity", [0, 1, 5, 1000])
@pytest.mark.parametrize("by_probability", [False, True])
def test_apply_capacity_matches_reference(num_tokens, num_experts, k, capacity, by_probability, device, gen):
    ids = random_expert_ids(num_tokens, num_experts, k, gen, device)
    weights = torch.rand(num_tokens, k, generator=gen).to(device)
    kept = ops.apply_capacity(ids, weights, num_experts, capacity, by_probability)
    ref = reference.apply_capacity(ids.cpu(), weights.cpu(), num_experts, capacity, by_probability)
    torch.testing.assert_close(kept.cpu(), ref, rtol=0, atol=0)


def test_apply_capacity_first_choices_first(device):
    # Expert 0 can take 2: token 2's first choice beats tokens 0 and 1's second choices.
    ids = torch.tensor([[1, 0], [1, 0], [0, 1]], dtype=torch.int32, device=device)
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]], device=device)
    kept = ops.apply_capacity(ids, weights, 2, 2)
    assert kept.tolist() == [[1, 0], [1, -1], [0, -1]]
    kept = ops.apply_capacity(ids, weights, 2, 2, drop_by_probability=True)
    assert kept.tolist() == [[1, 0], [1, -1], [0, -1]]
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.35], [0.9, 0.1]], device=device)
    kept = ops.apply_capacity(ids, weights, 2, 1, drop_by_probability=True)
    assert kept.tolist() == [[-1, -1], [1, -1], [0, -1]]


def test_apply_capacity_keeps_dropped_and_non_contiguous(device, gen):
    ids = random_expert_ids(20, 4, 4, gen, device)[:, ::2]
    ids[::3, 0] = -1
    weights = torch.rand(20, 4, generator=gen).to(device)[:, 1::2]
    kept = ops.apply_capacity(ids, weights, 4, 3, True)
    ref = reference.apply_capacity(ids.cpu(), weights.cpu(), 4, 3, True)
    torch.testing.assert_close(kept.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("by_probability", [False, True])
def test_apply_capacity_opcheck(by_probability, device, gen):
    ids = random_expert_ids(10, 4, 2, gen, device)
    weights = torch.rand(10, 2, generator=gen).to(device)
    torch.library.opcheck(torch.ops.moeflux.apply_capacity.default, (ids, weights, 4, 3, by_probability))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_apply_capacity_cuda_matches_cpu(gen):
    ids = random_expert_ids(3000, 16, 2, gen)
    weights = torch.rand(3000, 2, generator=gen)
    for by_probability in (False, True):
        cpu = ops.apply_capacity(ids, weights, 16, 300, by_probability)
        gpu = ops.apply_capacity(ids.cuda(), weights.cuda(), 16, 300, by_probability)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
