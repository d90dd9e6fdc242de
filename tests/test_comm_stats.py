"""moeflux.comm_stats: per-layer records of every collective, bytes by link class, the layer tag carried into
backward, the bucketer's exposed all-reduce wait, torch.profiler ranges, and nothing recorded when off."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moeflux
from moeflux import _C
from multiprocess import run_ranks

H, EXPERTS = 8, 4


class TwoLayers(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.first = moeflux.MoE(H, 16, EXPERTS, 2, ep_group=groups)
        self.second = moeflux.MoE(H, 16, EXPERTS, 2, ep_group=groups)

    def forward(self, x):
        return self.second(self.first(x))


def expected_bytes_to_peer(model, x, rank):
    """Rows this rank's tokens send to the other rank in the first layer's dispatch, times the row size."""
    ids = model.first.router(x).expert_ids
    return int(((ids // (EXPERTS // 2)) != rank).sum()) * H * x.element_size()


def comm_stats_worker(rank, world, ranks_per_node):
    torch.manual_seed(0)
    groups = moeflux.init_expert_parallel(world)
    model = moeflux.DataParallel(TwoLayers(groups), bucket_cap_mb=1e-4)
    x = torch.randn(5 + 3 * rank, H, requires_grad=True)
    model(x).sum().backward()  # outside the block: not recorded
    assert _C.drain_comm_stats() == []
    with moeflux.comm_stats(model, ranks_per_node=ranks_per_node) as stats:
        for _ in range(2):
            model(x).sum().backward()
            step = stats.step()
    assert not _C.comm_stats_enabled()
    assert set(step.layers) == {"module.first", "module.second"}
    first = step.layers["module.first"]
    phases = ("count_exchange", "dispatch", "combine", "combine_backward", "dispatch_backward")
    assert set(first.seconds) == set(phases)  # backward's all-to-alls carry the layer that issued the forward
    assert all(first.seconds[p] > 0 and 0 <= first.wait_seconds[p] <= first.seconds[p] for p in phases)
    assert first.expert_compute_s > 0
    assert step.grad_allreduce_wait_s > 0  # the bucketer's wait at the end of backward
    # bytes: the dispatch sends the rows of the other rank's experts; intra when both ranks share a node
    records = [r for r in stats.records[-1] if r.layer == "module.first" and r.phase == "dispatch"]
    sent = expected_bytes_to_peer(model.module, x.detach(), rank)
    assert len(records) == 1 and records[0].bytes_to_rank[1 - rank] == sent
    assert (records[0].bytes_intra, records[0].bytes_inter) == ((sent, 0) if ranks_per_node == 2 else (0, sent))
    assert "module.first" in stats.table() and len(stats.steps) == 2
    return True


@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_comm_stats_per_layer_and_link(ranks_per_node):
    assert all(run_ranks(2, comm_stats_worker, ranks_per_node))


def profiler_worker(rank, world):
    groups = moeflux.init_expert_parallel(world)
    moe = moeflux.MoE(H, 16, EXPERTS, 2, ep_group=groups)
    x = torch.randn(6, H, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        moe(x).sum().backward()
    names = {e.name for e in prof.events()}
    return {n for n in names if n.startswith("moeflux::")}


def test_collectives_show_in_torch_profiler():
    names = run_ranks(2, profiler_worker)[0]
    assert {"moeflux::count_exchange", "moeflux::dispatch", "moeflux::combine", "moeflux::combine_backward",
            "moeflux::dispatch_backward"} <= names


def test_comm_stats_does_not_nest_and_is_off_by_default():
    assert not _C.comm_stats_enabled()
    with moeflux.comm_stats():
        assert _C.comm_stats_enabled()
        with pytest.raises(RuntimeError, match="already recording"):
            with moeflux.comm_stats():
                pass
    assert not _C.comm_stats_enabled()


def test_mean_needs_steps():
    with moeflux.comm_stats() as stats:
        pass
    with pytest.raises(ValueError, match="no steps recorded"):
        stats.mean()
