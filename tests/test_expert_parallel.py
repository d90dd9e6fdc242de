"""moeflux.MoE with expert parallelism on 2 and 4 gloo ranks against one process
holding all experts and seeing every rank's tokens. The capacity scenarios run twice: as the CPU sends them
(the kept tokens packed, after a count exchange) and on the GPUs' fixed splits (``capacity`` rows per expert
on the wire, ``capacity * ep_size`` per local expert; the test-only
moeflux.exchange.transport.flat.FIXED_SPLITS_ON_CPU)."""

import pytest
import torch
import torch.distributed as dist

import moeflux
from moeflux import ops
from moeflux.exchange.transport import flat
from multiprocess import GROUP_TIMEOUT, run_ranks

D_MODEL, D_FFN, EXPERTS = 6, 5, 8

SCENARIOS = [
    dict(top_k=2, tokens=[5, 0, 9, 3]),  # uneven, one rank without tokens
    dict(top_k=1, tokens=[4, 4, 1, 4], activation="gelu"),  # most experts get nothing
    dict(top_k=4, tokens=[6, 1, 2, 0], renormalize=True),
    dict(top_k=2, tokens=[6, 6, 6, 6], capacity_factor=1.0),  # capacity with drops
    dict(top_k=1, tokens=[8, 8, 8, 8], capacity_factor=0.5, drop_policy="probability"),
]
# Fixed splits need every rank to route the same number of tokens: the capacity scenarios do.
FIXED_SPLIT_SCENARIOS = [s for s in SCENARIOS if "capacity_factor" in s]


def make_pair(groups, **config):
    """The reference (all experts, one process) and this rank's expert-parallel layer, same weights."""
    config = dict(config, dtype=torch.float64)
    torch.manual_seed(11)
    reference = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, **config)
    torch.manual_seed(11)
    model = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups.ep_group, **config)
    return reference, model


def check_scenario(rank, world, groups, tokens, fixed_splits=False, **config):
    tokens = tokens[:world]
    reference, model = make_pair(groups, **config)
    local, first = model.experts.num_experts, model.experts.global_experts[0]
    assert local == EXPERTS // groups.ep_size and first == groups.ep_rank * local
    assert model.experts.global_experts == tuple(range(first, first + local))
    assert torch.equal(model.experts.w_in, reference.experts.w_in[first:first + local])  # same experts

    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(t, D_MODEL, generator=gen, dtype=torch.float64) for t in tokens]
    gys = [torch.randn(t, D_MODEL, generator=gen, dtype=torch.float64) for t in tokens]

    x = xs[rank].clone().requires_grad_()
    before = ops.collective_counts()
    y = model(x)
    (y * gys[rank]).sum().backward()
    after = ops.collective_counts()
    assert after["token_all_to_alls"] - before["token_all_to_alls"] == 4
    dropless = config.get("capacity_factor") is None
    # One count exchange with a capacity too: on the CPU the kept tokens travel packed (no padding rows);
    # none on fixed splits, where every local expert holds capacity * ep_size rows (padding included).
    assert after["count_exchanges"] - before["count_exchanges"] == (0 if fixed_splits else 1)
    if fixed_splits:
        assert model.tokens_per_expert.tolist() == [model.capacity(tokens[rank]) * groups.ep_size] * local

    # Reference: dropless routing does not depend on the batch, so one pass over the concatenated
    # batch; capacity applies per source rank, so one pass per rank's tokens.
    ref_xs = [t.clone().requires_grad_() for t in xs]
    ref_ys = [reference(torch.cat(ref_xs))] if dropless else [reference(t) for t in ref_xs]
    sum((ry * gy).sum() for ry, gy in zip(ref_ys if not dropless else [ref_ys[0]],
                                          gys if not dropless else [torch.cat(gys)])).backward()
    ref_y = torch.cat(ref_ys).split(tokens)[rank]
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(x.grad, ref_xs[rank].grad, atol=1e-12, rtol=1e-10)

    router_grad = model.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # every rank's tokens, as the reference saw them
    torch.testing.assert_close(router_grad, reference.router.weight.grad, atol=1e-12, rtol=1e-10)
    for name in ("w_in", "w_out"):
        grad = getattr(model.experts, name).grad.clone()
        dist.all_reduce(grad, group=groups.edp_group)  # the replicas of these experts
        torch.testing.assert_close(grad, getattr(reference.experts, name).grad[first:first + local],
                                   atol=1e-12, rtol=1e-10)


def check_state_dict(rank, world, groups):
    reference, model = make_pair(groups)
    local, first = model.experts.num_experts, model.experts.global_experts[0]
    state = model.state_dict()
    assert set(state) == {"router.weight"} | {f"experts.{e}.{w}" for e in range(first, first + local)
                                              for w in ("w_in", "w_out")}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(reference.state_dict())  # a full checkpoint: each rank takes its experts
    assert torch.equal(model.experts.w_out, reference.experts.w_out[first:first + local])
    with pytest.raises(RuntimeError, match=f"Missing key.*experts.{first}.w_in"):
        model.load_state_dict({k: v for k, v in state.items() if k != f"experts.{first}.w_in"})


def ep_worker(rank, world, ep_size):
    groups = moeflux.init_expert_parallel(ep_size, timeout=GROUP_TIMEOUT)
    assert groups.ep_size == ep_size and dist.get_world_size(groups.edp_group) == world // ep_size
    for scenario in SCENARIOS:
        check_scenario(rank, world, groups, **scenario)
    flat.FIXED_SPLITS_ON_CPU = True
    try:
        for scenario in FIXED_SPLIT_SCENARIOS:
            check_scenario(rank, world, groups, fixed_splits=True, **scenario)
    finally:
        flat.FIXED_SPLITS_ON_CPU = False
    check_state_dict(rank, world, groups)
    return True


@pytest.mark.parametrize("world,ep_size", [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4)])
def test_expert_parallel_matches_single_process(world, ep_size):
    run_ranks(world, ep_worker, ep_size)


def mismatch_worker(rank, world):
    groups = moeflux.init_expert_parallel(world, timeout=GROUP_TIMEOUT)
    with pytest.raises(ValueError, match=r"moeflux.MoE: ranks of the process group disagree on d_ffn, top_k "
                                         r"\(rank 0: d_ffn=5, top_k=2; rank 1: d_ffn=7, top_k=1\)"):
        moeflux.MoE(D_MODEL, 5 + 2 * rank, EXPERTS, top_k=2 - rank, ep_group=groups.ep_group)
    with pytest.raises(ValueError, match=r"num_experts \(7\) must be a multiple of the expert-parallel size \(2\)"):
        moeflux.MoE(D_MODEL, D_FFN, 7, ep_group=groups.ep_group)
    with pytest.raises(ValueError, match="ep_size must be a positive divisor of the world size"):
        moeflux.init_expert_parallel(3)
    # A rank whose input has the wrong width makes every rank raise at the count exchange, none waits.
    moe = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups.ep_group)
    x = torch.randn(4, D_MODEL if rank == 0 else D_MODEL - 1)
    if rank == 0:
        with pytest.raises(RuntimeError, match=f"ranks of the expert-parallel group disagree: .*hidden size "
                                               f"{D_MODEL - 1}"):
            moe(x)
    else:
        with pytest.raises(ValueError, match=rf"expects input \[..., d_model={D_MODEL}\], got shape \(4, {D_MODEL - 1}\)"):
            moe(x)
    moe(torch.randn(3, D_MODEL)).sum().backward()  # and the group still works
    return True


def test_ranks_that_disagree_raise_on_every_rank():
    run_ranks(2, mismatch_worker)
