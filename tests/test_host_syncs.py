"""Reads of routing counts on the host (each a host synchronisation on a GPU) per MoE layer step: the dropless
expert-parallel layer reads its split sizes once per forward (the count exchange of dispatch) and nothing
reads counts back again, forward or backward; the single-process layer reads none. (Capacity mode reads none
on a GPU; on the CPU, where a read costs nothing, its kept tokens travel packed after a count exchange.)
Counted by moeflux.ops.collective_counts()["host_count_reads"] on the CPU (torch._grouped_mm does the
expert GEMMs in float32 here, as it does in bfloat16 on Hopper GPUs)."""

import pytest
import torch

import moeflux
from moeflux import ops
from multiprocess import run_ranks


def reads_per_step(model, x):
    out = model(x)
    ops.reset_collective_counts()
    model(x)
    forward = ops.collective_counts()["host_count_reads"]
    ops.reset_collective_counts()
    out.square().mean().backward()
    return forward, ops.collective_counts()["host_count_reads"]


@pytest.mark.parametrize("capacity_factor, expected", [(None, 0), (1.25, 0)], ids=["dropless", "capacity"])
def test_single_process_layer_reads_no_counts(capacity_factor, expected):
    torch.manual_seed(0)
    model = moeflux.MoE(32, 16, 8, 2, capacity_factor=capacity_factor)
    assert reads_per_step(model, torch.randn(64, 32)) == (expected, 0)


def ep_worker(rank, world, schedule, capacity_factor, shadowing):
    torch.manual_seed(0)
    groups = moeflux.init_expert_parallel(world)
    model = moeflux.MoE(32, 16, 8, 2, capacity_factor=capacity_factor, ep_group=groups, schedule=schedule,
                        shadowing=shadowing)
    return reads_per_step(model, torch.randn(64, 32))


@pytest.mark.parametrize("schedule, capacity_factor, shadowing, expected", [
    ("bulk", None, "off", (1, 0)), ("bulk", 1.25, "off", (1, 0)), ("chunked", None, "off", (1, 0)),
    ("pairwise", None, "off", (1, 0)), ("bulk", None, 2, (1, 0)),
], ids=["bulk-dropless", "bulk-capacity", "chunked-dropless", "pairwise-dropless", "shadowed"])
def test_expert_parallel_layer_reads_its_counts_once_per_forward(schedule, capacity_factor, shadowing, expected):
    assert run_ranks(2, ep_worker, schedule, capacity_factor, shadowing) == [expected, expected]
