"""moeflux.DataParallel (the C++ gradient bucketer) on 2 and 4 gloo ranks:
against torch DDP for dense models, and against one process on the global
batch for models with expert-parallel MoE layers."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import moeflux
from multiprocess import GROUP_TIMEOUT, run_ranks

TINY = 512 / 2**20  # bucket caps in MB small enough to give several buckets


class Dense(nn.Module):
    def __init__(self, unused=False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))  # a second dtype: its own bucket
        self.unused = nn.Linear(3, 3) if unused else None
        self.register_buffer("shift", torch.zeros(4))  # a buffer: broadcast too

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))))) * self.scale.float() + self.shift


def batch(rank, step, n=8):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 4, generator=gen)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def assert_same_grads(ours, theirs, atol=1e-6, skip=()):
    for name, g in theirs.items():
        if name in skip:
            continue
        torch.testing.assert_close(ours[name], g, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def gathered_state(module):
    """Every rank's state dict (parameters and buffers)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: v.detach().clone() for k, v in module.state_dict().items()})
    return everyone


def dense_worker(rank, world, view):
    torch.manual_seed(rank)  # different initial weights: DataParallel and DDP broadcast rank 0's
    dense = Dense()
    with torch.no_grad():
        dense.scale.add_(rank)
        dense.shift.fill_(rank)
    before = gathered_state(dense)
    assert all(not torch.equal(before[0][k], before[r][k]) for r in range(1, world) for k in before[0])
    ours = moeflux.DataParallel(dense, bucket_cap_mb=TINY, first_bucket_cap_mb=TINY / 4, gradient_as_bucket_view=view)
    for r, state in enumerate(gathered_state(ours.module)):
        for k, v in state.items():
            assert torch.equal(v, before[0][k]), f"rank {r} holds its own {k}, not rank 0's"
    reference = DDP(Dense())
    reference.module.load_state_dict(ours.module.state_dict())
    assert len(ours.bucket_indices()) > 2
    for step in range(3):  # the buckets are rebuilt after the first step
        for model in (ours, reference):
            model.zero_grad(set_to_none=not view)
            x, y = batch(rank, step)
            nn.functional.mse_loss(model(x), y).backward()
        assert_same_grads(grads(ours.module), grads(reference.module))
    assert ours._bucketer.buckets_rebuilt()
    # Overlap: the first bucket went out while other gradients were still being computed.
    log = ours.launch_log()
    assert len(log) == len(ours.bucket_indices()) and log[0][1] > 0, log

    # no_sync: two local backward passes, then one synchronised: the sum over both, averaged
    for model in (ours, reference):
        model.zero_grad(set_to_none=not view)
        with model.no_sync():
            x, y = batch(rank, 10)
            nn.functional.mse_loss(model(x), y).backward()
        x, y = batch(rank, 11)
        nn.functional.mse_loss(model(x), y).backward()
    assert_same_grads(grads(ours.module), grads(reference.module))
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("view", [False, True], ids=["copy", "bucket_view"])
def test_dense_model_matches_torch_ddp(world, view):
    run_ranks(world, dense_worker, view)


def hooks_and_unused_worker(rank, world):
    torch.manual_seed(0)
    model = Dense(unused=True)
    reference = DDP(Dense(unused=True), find_unused_parameters=True)
    reference.module.load_state_dict(model.state_dict())
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return dist.all_reduce(bucket.buffer(), group=state.process_group, async_op=True).get_future().then(
            lambda f: f.value()[0])

    for hook, atol in (("allreduce", 1e-6), ("bf16_compress", 2e-2), (counting_hook, 1e-6)):
        ours = moeflux.DataParallel(model, bucket_cap_mb=TINY, find_unused_parameters=True, comm_hook=hook)
        for m in (ours, reference):
            m.zero_grad()
            x, y = batch(rank, 0)
            nn.functional.mse_loss(m(x), y).backward()
        assert_same_grads(grads(model), grads(reference.module), atol=atol, skip=("unused.weight", "unused.bias"))
        assert (model.unused.weight.grad == 0).all()  # unused on every rank: a zero gradient
        del ours
    assert sorted(calls) == list(range(len(calls))) and calls

    strict = moeflux.DataParallel(Dense(unused=True))
    x, y = batch(rank, 0)
    with pytest.raises(RuntimeError, match="these parameters got no gradient in this backward: unused.weight"):
        nn.functional.mse_loss(strict(x), y).backward()
    return True


def test_comm_hooks_and_unused_parameters():
    run_ranks(2, hooks_and_unused_worker)


class MoEModel(nn.Module):
    def __init__(self, ep_group=None):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.moe = moeflux.MoE(8, 10, num_experts=8, top_k=2, ep_group=ep_group, aux_loss_weight=0.0)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.moe(torch.tanh(self.embed(x))))


def moe_worker(rank, world, ep_size, view):
    groups = moeflux.init_expert_parallel(ep_size, timeout=GROUP_TIMEOUT)
    torch.manual_seed(3)
    reference = MoEModel()
    torch.manual_seed(3)
    module = MoEModel(groups)
    with torch.no_grad():  # replicas that differ: each must start from the first rank of its group, rank % ep_size
        for name, p in module.named_parameters():  # for experts (their expert-data-parallel group), 0 for the rest
            p.add_(rank - (rank % ep_size if ".experts." in name else 0))
    model = moeflux.DataParallel(module, bucket_cap_mb=TINY, gradient_as_bucket_view=view)
    first, local = model.module.moe.experts.global_experts[0], model.module.moe.experts.num_experts
    inputs = [batch(r, 0, n=5) for r in range(world)]  # the same number of tokens on every rank
    for step in range(2):
        model.zero_grad(set_to_none=not view)
        reference.zero_grad()
        x, y = inputs[rank]
        nn.functional.mse_loss(model(x), y).backward()
        # the reference: one process, all experts, the global batch (the mean of the per-rank means)
        nn.functional.mse_loss(reference(torch.cat([i[0] for i in inputs])), torch.cat([i[1] for i in inputs])
                               ).backward()
        ref = grads(reference)
        ours = grads(model.module)
        for name in ("embed.weight", "embed.bias", "moe.router.weight", "head.weight", "head.bias"):
            torch.testing.assert_close(ours[name], ref[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        for name in ("moe.experts.w_in", "moe.experts.w_out"):
            torch.testing.assert_close(ours[name], ref[name][first:first + local], atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")

    # Every token to experts 0 and 1: the other experts (on ranks other than the first with ep > 1)
    # get no rows, still produce zero gradients, and nobody waits for them.
    x = torch.full((4, 6), 0.5)
    with torch.no_grad():
        hidden = torch.tanh(model.module.embed(x[:1]))[0]  # what the router sees
        model.module.moe.router.weight.zero_()
        model.module.moe.router.weight[:2] = 10 * hidden  # large logits for experts 0 and 1 only
    model.zero_grad()
    nn.functional.mse_loss(model(x), torch.zeros(4, 4)).backward()
    if first >= 2:
        assert int(model.module.moe.tokens_per_expert.sum()) == 0
        assert (model.module.moe.experts.w_in.grad == 0).all()
    return True


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_moe_model_matches_global_batch(ep_size):
    run_ranks(4, moe_worker, ep_size, ep_size == 2)


def bad_config_worker(rank, world):
    groups = moeflux.init_expert_parallel(world, timeout=GROUP_TIMEOUT)
    bare = MoEModel(groups.ep_group)  # a bare group: where are the experts' replicas?
    with pytest.raises(ValueError, match="MoE layer 'moe' was built with a bare ep_group"):
        moeflux.DataParallel(bare)
    with pytest.raises(ValueError, match="comm_hook must be one of"):
        moeflux.DataParallel(Dense(), comm_hook="fp8")
    # A Python hook that returns no Future raises a clear error in backward (it reached C++ as a null future).
    forgetful = moeflux.DataParallel(Dense(), comm_hook=lambda state, bucket: None)
    with pytest.raises(Exception, match="must return a torch.futures.Future.*got NoneType"):
        forgetful(torch.randn(4, 6)).sum().backward()
    return True


def test_bad_configurations_raise():
    run_ranks(2, bad_config_worker)


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group first"):
        moeflux.DataParallel(Dense())
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group first"):
        moeflux.init_expert_parallel(1)


def bucketer_arguments_worker(rank, world):
    with pytest.raises(ValueError, match="bucket sizes must be > 0"):
        moeflux.DataParallel(Dense(), bucket_cap_mb=0)
    frozen = Dense()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(RuntimeError, match="no parameters to synchronise"):
        moeflux.DataParallel(frozen)
    return True


def test_bucketer_rejects_bad_arguments():
    run_ranks(2, bucketer_arguments_worker)
