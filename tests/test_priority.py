"""All-to-all priority in moeflux.DataParallel (the bucketer's all-reduce in
scheduled micro-ops, csrc/distributed/comm_scheduler.h) on 2 and 4 gloo ranks:
gradients bit-identical to the unscheduled bucketer.

A sum over ranks may be added up in another order when a bucket is cut into
micro-ops (a ring all-reduce's order depends on where an element falls in the
buffer it reduces). Over 2 ranks every order gives the same float (a + b ==
b + a). Over 4 ranks the tests make every order exact: the dense model's
weights and inputs are small dyadic numbers, so every gradient and every
partial sum is exactly representable; in the MoE model only two ranks of each
data-parallel group contribute a non-zero gradient (x + 0 is exact).
"""

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moeflux
from moeflux import _C
from multiprocess import GROUP_TIMEOUT, run_ranks

TINY = 512 / 2**20  # bucket caps in MB small enough to give several buckets
B = 1 / 2**20  # one byte, in MB
# micro-op caps: 2 floats (smaller than any parameter), a few parameters' worth, larger than any bucket
MICRO_OPS = {"8B": 8 * B, "200B": 200 * B, "1MB": 1.0}


class Dyadic(nn.Module):
    """Weights in multiples of 1/4, ReLU: every gradient is exact in float32, whatever the order of sums."""

    def __init__(self, unused=False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))  # a second dtype: its own bucket
        self.unused = nn.Linear(3, 3) if unused else None
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-4, 5, p.shape, generator=gen) / 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) * self.scale.float()


def dyadic_batch(rank, step, n=8):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randint(-2, 3, (n, 6), generator=gen).float(), torch.randint(-2, 3, (n, 4), generator=gen).float()


def dyadic_loss(model, rank, step):
    x, t = dyadic_batch(rank, step)
    return (model(x) * t).sum() / 8


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def assert_identical(ours, theirs, what):
    for name, g in theirs.items():
        assert torch.equal(ours[name], g), f"{what}: {name} differs by {(ours[name] - g).abs().max().item()}"


def settled_stats():
    """The scheduler's counters once the last micro-op's completion has been counted (a backend thread does
    that just after its future completes, so right after backward the count may still be catching up)."""
    deadline = time.monotonic() + 10
    while True:
        stats = _C.comm_scheduler_stats()
        if stats["micro_ops_in_flight"] == stats["all_to_alls_in_flight"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.001)


def judge(events, kind):
    """(launched while another of `kind` was in flight, launched while an all-to-all was, still in flight)."""
    overlapping = past_all_to_all = all_to_alls = 0
    in_flight = set()
    for what, begins, op, _ in sorted(events, key=lambda e: e[3]):
        if what == "all_to_all":
            all_to_alls += 1 if begins else -1
        elif what == kind and begins:
            overlapping += bool(in_flight)
            past_all_to_all += all_to_alls > 0
            in_flight.add(op)
        elif what == kind:
            in_flight.remove(op)
    return overlapping, past_all_to_all, in_flight


def broken_rules(kind="micro_op"):
    """The rules judged from this rank's scheduler trace alone (launch and completion stamps, not the
    scheduler's counters): how many micro-ops of `kind` were launched while another of that kind was in
    flight, and while an all-to-all was. Waits for the completions still being traced (a backend thread
    records them just after the future completes)."""
    deadline = time.monotonic() + 10
    while True:
        events, dropped = _C.comm_scheduler_trace()
        overlapping, past_all_to_all, in_flight = judge(events, kind)
        if not in_flight or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    assert dropped == 0 and not in_flight, (dropped, in_flight)
    return overlapping, past_all_to_all


def dense_worker(rank, world, view):
    for label, cap in MICRO_OPS.items():
        _C.reset_comm_scheduler_stats()
        _C.set_comm_scheduler_tracing(True)
        on = moeflux.DataParallel(Dyadic(), all_to_all_priority=True, micro_op_cap_mb=cap, bucket_cap_mb=TINY,
                                  first_bucket_cap_mb=TINY / 4, gradient_as_bucket_view=view)
        off = moeflux.DataParallel(Dyadic(), all_to_all_priority=False, bucket_cap_mb=TINY,
                                   first_bucket_cap_mb=TINY / 4, gradient_as_bucket_view=view)
        assert on.all_to_all_priority and not off.all_to_all_priority
        assert len(on.bucket_indices()) > 2
        for step in range(3):  # the buckets are rebuilt after the first step
            for model in (on, off):
                model.zero_grad(set_to_none=not view)
                dyadic_loss(model, rank, step).backward()
            assert_identical(grads(on.module), grads(off.module), f"{label} step {step}")
        assert on._bucketer.buckets_rebuilt() and on.bucket_indices() == off.bucket_indices()
        log = on.launch_log()  # buckets are still handed over in order while backward runs
        assert [b for b, _ in log] == list(range(len(on.bucket_indices()))) and log[0][1] > 0, log

        # no_sync: two local backward passes, then one synchronised: the sum over both, averaged
        for model in (on, off):
            model.zero_grad(set_to_none=not view)
            with model.no_sync():
                dyadic_loss(model, rank, 10).backward()
            dyadic_loss(model, rank, 11).backward()
        assert_identical(grads(on.module), grads(off.module), f"{label} no_sync")

        stats = settled_stats()
        elements = sum(p.numel() for p in on.parameters())
        if label == "8B":  # every float32 bucket in pairs of elements, the float64 one element by element
            assert stats["micro_ops_launched"] >= 4 * elements // 2, stats
        assert stats["micro_ops_queued"] == 0 and stats["micro_ops_in_flight"] == 0, stats
        assert broken_rules() == (0, 0)  # one micro-op in flight at a time, outside the flushes
    _C.set_comm_scheduler_tracing(False)
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("view", [False, True], ids=["copy", "bucket_view"])
def test_dense_gradients_bit_identical(world, view):
    run_ranks(world, dense_worker, view)


def hooks_worker(rank, world):
    def python_hook(state, bucket):
        return dist.all_reduce(bucket.buffer(), group=state.process_group, async_op=True).get_future().then(
            lambda f: f.value()[0])

    for hook in ("bf16_compress", python_hook):
        _C.reset_comm_scheduler_stats()
        on = moeflux.DataParallel(Dyadic(unused=True), all_to_all_priority=True, micro_op_cap_mb=64 * B,
                                  bucket_cap_mb=TINY, find_unused_parameters=True, comm_hook=hook)
        off = moeflux.DataParallel(Dyadic(unused=True), all_to_all_priority=False, bucket_cap_mb=TINY,
                                   find_unused_parameters=True, comm_hook=hook)
        for step in range(2):
            for model in (on, off):
                model.zero_grad()
                dyadic_loss(model, rank, step).backward()
            assert_identical(grads(on.module), grads(off.module), f"{hook} step {step}")
            assert (on.module.unused.weight.grad == 0).all()  # unused everywhere: zeros, launched at the end
        launched = _C.comm_scheduler_stats()["micro_ops_launched"]
        # bf16_compress is scheduled too (micro-ops of the bf16 copy); a Python hook is never held back
        assert (launched > 0) == (hook == "bf16_compress"), (hook, launched)
    return True


def test_comm_hooks_and_unused_parameters():
    run_ranks(2, hooks_worker)


class MoEModel(nn.Module):
    def __init__(self, ep_group=None, width=8):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.moe = moeflux.MoE(width, 10, num_experts=8, top_k=2, ep_group=ep_group, aux_loss_weight=0.0)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.moe(torch.tanh(self.embed(x))))


def moe_worker(rank, world, ep_size):
    groups = moeflux.init_expert_parallel(ep_size, timeout=GROUP_TIMEOUT)
    torch.manual_seed(3)
    on = moeflux.DataParallel(MoEModel(groups), bucket_cap_mb=TINY, first_bucket_cap_mb=TINY / 8,
                              micro_op_cap_mb=16 * B)
    torch.manual_seed(3)
    off = moeflux.DataParallel(MoEModel(groups), bucket_cap_mb=TINY, first_bucket_cap_mb=TINY / 8,
                               all_to_all_priority=False)
    assert on.all_to_all_priority  # the default with expert-parallel layers
    # Over 4 ranks, only ranks 0 and 1 contribute to the loss: every sum over a group is then exact.
    weight = 1.0 if world == 2 or rank < 2 else 0.0
    held = broken_off = 0
    for step in range(4):
        gen = torch.Generator().manual_seed(10 * rank + step)
        x, y = torch.randn(6 + rank, 6, generator=gen), torch.randn(6 + rank, 4, generator=gen)
        _C.reset_comm_scheduler_stats()
        _C.set_comm_scheduler_tracing(True)
        for model in (on, off):
            model.zero_grad()
            (weight * nn.functional.mse_loss(model(x), y)).backward()
            if model is on:
                stats = settled_stats()
        assert_identical(grads(on.module), grads(off.module), f"ep {ep_size} step {step}")
        # the all-to-alls of forward and backward registered, micro-ops went one at a time
        assert stats["all_to_alls"] >= 4 and stats["all_to_alls_in_flight"] == 0, stats
        assert stats["micro_ops_launched"] > 0, stats
        # from the trace: no micro-op launched past another or past an all-to-all, outside the flush
        assert broken_rules() == (0, 0)
        broken_off += sum(broken_rules("unscheduled"))  # the same judge on the model without priority
        held += stats["micro_ops_held"]
    _C.set_comm_scheduler_tracing(False)
    assert on._bucketer.buckets_rebuilt()
    return held, broken_off


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_moe_model_bit_identical(world, ep_size):
    held, broken_off = zip(*run_ranks(world, moe_worker, ep_size))
    # Micro-ops really waited for all-to-alls of backward somewhere (a bucket is ready before the MoE's backward).
    assert sum(held) > 0, held
    # Without priority the all-reduces do go out past each other and past all-to-alls: the judge can fail.
    assert sum(broken_off) > 0, broken_off


def options_worker(rank, world):
    groups = moeflux.init_expert_parallel(world, timeout=GROUP_TIMEOUT)
    assert not moeflux.DataParallel(Dyadic()).all_to_all_priority  # no all-to-alls: nothing to give way to
    assert moeflux.DataParallel(MoEModel(groups)).all_to_all_priority
    # All-to-alls over a group the gradients also use: the scheduler would reorder collectives on it.
    clash = MoEModel(groups)
    assert not moeflux.DataParallel(clash, dp_group=groups.ep_group).all_to_all_priority
    with pytest.raises(ValueError, match="all_to_all_priority needs the all-to-alls on other process groups"):
        moeflux.DataParallel(clash, dp_group=groups.ep_group, all_to_all_priority=True)
    with pytest.raises(ValueError, match="micro_op_cap_mb must be > 0"):
        moeflux.DataParallel(Dyadic(), micro_op_cap_mb=0)
    # Ranks that would cut their buckets differently fail at construction, not with mismatched collectives.
    with pytest.raises(ValueError, match="disagree on micro_op_bytes"):
        moeflux.DataParallel(Dyadic(), all_to_all_priority=True, micro_op_cap_mb=1 + rank)
    return True


def test_options():
    run_ranks(2, options_worker)
