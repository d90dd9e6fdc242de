"""One rank with bad input, or ranks that disagree, at the layer and module level: moeflux.MoE's forward on every
exchange strategy, its construction, init_expert_parallel and DataParallel. Every rank must raise a clear error
naming the problem within seconds (no hang until the group's timeout, no abort), or get a correct result, and
the group must stay usable. World 2 and 4, gloo, spawned processes (multiprocess.py: 60 s group timeout).
(The ops' own cases are in test_rank_faults.py.)"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import moeflux
from moeflux import _C, ExchangeConfig
from multiprocess import GROUP_TIMEOUT, carried, run_ranks

D_MODEL, D_FFN, EXPERTS = 8, 12, 8

HIERARCHICAL = dict(transport="hierarchical")  # nodes from LOCAL_WORLD_SIZE (set by layer_faults)
EXCHANGES = {  # name: MoE options
    "bulk": {},
    "bulk, capacity": {"capacity_factor": 1.5},
    "chunked": {"exchange": ExchangeConfig(schedule="chunked", chunks=2)},
    "pairwise": {"exchange": ExchangeConfig(schedule="pairwise")},
    "shadowing": {"exchange": ExchangeConfig(shadowing=2)},
    "chunked, shadowing": {"exchange": ExchangeConfig(schedule="chunked", shadowing=2)},
    "hierarchical": {"exchange": ExchangeConfig(**HIERARCHICAL)},
    "hierarchical, capacity": {"exchange": ExchangeConfig(**HIERARCHICAL), "capacity_factor": 1.5},
    "hierarchical, pairwise, shadowing": {"exchange": ExchangeConfig(**HIERARCHICAL, schedule="pairwise",
                                                                     shadowing=2)},
}

# What one rank (the last) feeds the layer: (input, pattern of the message on that rank).
BAD_INPUTS = {
    "wrong width": (lambda: torch.randn(5, D_MODEL + 3), r"expects input \[\.\.\., d_model=8\], got shape \(5, 11\)"),
    "float64 tokens": (lambda: torch.randn(5, D_MODEL, dtype=torch.float64),
                       r"expects input of dtype torch.float32 .*got torch.float64"),
    "int64 tokens": (lambda: torch.ones(5, D_MODEL, dtype=torch.int64),
                     r"expects input of dtype torch.float32 .*got torch.int64"),
    "a scalar": (lambda: torch.tensor(1.0), r"expects input \[\.\.\., d_model=8\], got shape \(\)"),
    "meta tokens": (lambda: torch.empty(5, D_MODEL, device="meta"), r"expects input on cpu .*got meta"),
}
PEER_ERROR = r"ranks of the expert-parallel group disagree"

AUTOCAST_ON_ONE_RANK = "autocast on one rank only"

# Inputs that are not errors: (tokens on the first rank, tokens on the others).
GOOD_INPUTS = {"a rank without tokens": (0, 7), "different token counts": (9, 4)}


def reference_layer(options: dict, world: int) -> moeflux.MoE:
    """The same layer on one process, holding every expert (weights from the same seed)."""
    torch.manual_seed(0)
    ref = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, top_k=2, **{k: v for k, v in options.items()
                                                            if k == "capacity_factor"})
    return ref


def layer_faults(rank: int, world: int) -> dict:
    os.environ["LOCAL_WORLD_SIZE"] = str(world // 2)  # the hierarchical layers' nodes: 2 x 2 or 2 x 1
    groups = moeflux.init_expert_parallel(world)
    last = rank == world - 1
    outcomes = {}
    for exchange, options in EXCHANGES.items():
        torch.manual_seed(0)
        moe = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, top_k=2, ep_group=groups, **options)
        for name, (make_bad, _) in BAD_INPUTS.items():
            x = make_bad() if last else torch.randn(6, D_MODEL)
            start = time.monotonic()
            try:
                moe(x).sum().backward()
                outcomes[f"{exchange}: {name}"] = ("no error", time.monotonic() - start)
            except (ValueError, RuntimeError) as error:
                outcomes[f"{exchange}: {name}"] = (str(error).splitlines()[0], time.monotonic() - start)
        # Healthy ranks whose tokens differ in dtype only: autocast on the last rank alone (its tokens go out in
        # bf16), which no rank's own check can see: the exchange's header makes every rank raise.
        start = time.monotonic()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=last):
                moe(torch.randn(6, D_MODEL)).sum().backward()
            outcomes[f"{exchange}: {AUTOCAST_ON_ONE_RANK}"] = ("no error", time.monotonic() - start)
        except (ValueError, RuntimeError) as error:
            outcomes[f"{exchange}: {AUTOCAST_ON_ONE_RANK}"] = (str(error).splitlines()[0], time.monotonic() - start)
        for name, (first, others) in GOOD_INPUTS.items():
            # Every rank's output equals what the single-process layer gives for the same tokens: the
            # capacity is per rank, so the reference runs each rank's tokens on their own.
            torch.manual_seed(100 + rank)
            x = torch.randn(first if rank == 0 else others, D_MODEL)
            out = moe(x)
            out.sum().backward()
            ref = reference_layer(options, world)
            with torch.no_grad():
                ref.router.weight.copy_(moe.router.weight)
                for param in ("w_in", "w_out"):
                    full = [torch.empty_like(getattr(moe.experts, param)) for _ in range(world)]
                    dist.all_gather(full, getattr(moe.experts, param).detach(), group=groups.ep_group)
                    getattr(ref.experts, param).copy_(torch.cat(full))
            torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
            outcomes[f"{exchange}: {name}"] = ("correct", 0.0)
    dist.barrier()  # the group is still usable
    return outcomes


@pytest.mark.parametrize("world", [2, 4])
def test_a_bad_input_on_one_rank_raises_on_every_rank_of_every_exchange(world):
    results = run_ranks(world, layer_faults, timeout=300)
    for rank, outcomes in enumerate(results):
        for exchange in EXCHANGES:
            for name, (_, own) in BAD_INPUTS.items():
                message, seconds = outcomes[f"{exchange}: {name}"]
                pattern = own if rank == world - 1 else PEER_ERROR
                assert re.search(pattern, message), (exchange, name, rank, message)
                assert seconds < 15, (exchange, name, rank, seconds)
            message, seconds = outcomes[f"{exchange}: {AUTOCAST_ON_ONE_RANK}"]
            assert re.search(rf"{PEER_ERROR}: .*dtype", message) and seconds < 15, (exchange, rank, message)
            for name in GOOD_INPUTS:
                assert outcomes[f"{exchange}: {name}"][0] == "correct"


# ---- construction: init_expert_parallel, MoE, DataParallel


def _model(rank: int, world: int, groups, *, wider_on_last=False, extra_on_last=False, float64_on_last=False,
           bare_on_last=False) -> torch.nn.Module:
    last = rank == world - 1
    torch.manual_seed(0)
    layers = [torch.nn.Linear(D_MODEL, D_MODEL + (1 if wider_on_last and last else 0))]
    layers.append(torch.nn.Linear(layers[0].out_features, D_MODEL))
    if extra_on_last and last:
        layers.append(torch.nn.Linear(D_MODEL, D_MODEL))
    layers.append(moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups.ep_group if bare_on_last and last
                              else groups))
    model = torch.nn.Sequential(*layers)
    return model.double() if float64_on_last and last else model


def _ep_size(rank, world, pattern):
    return {"differ": 1 if rank == 0 else world, "invalid on one rank": 3 if rank == world - 1 else world}[pattern]


CONSTRUCTION = {
    # name: (what every rank does, pattern on the odd rank (the last, or rank 0 where it differs), on the others)
    "init_expert_parallel: ep_size differs":
        (lambda rank, world, groups: moeflux.init_expert_parallel(_ep_size(rank, world, "differ")),
         r"init_expert_parallel: ranks of the process group disagree on ep_size", None),
    "init_expert_parallel: invalid ep_size on one rank":
        (lambda rank, world, groups: moeflux.init_expert_parallel(_ep_size(rank, world, "invalid on one rank")),
         r"init_expert_parallel: ep_size must be a positive divisor of the world size \d, got 3",
         r"init_expert_parallel: rank \d of the process group failed its check: ep_size must be"),
    "MoE: num_experts not a multiple on one rank":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS + (1 if rank == world - 1 else 0),
                                                 ep_group=groups),
         r"moeflux.MoE: num_experts \(9\) must be a multiple of the expert-parallel size",
         r"moeflux.MoE: rank \d of the process group failed its check: num_experts \(9\)"),
    "MoE: top_k out of range on one rank":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, top_k=0 if rank == world - 1 else 2,
                                                 ep_group=groups),
         r"moeflux.MoE: top_k must be an int in \[1, num_experts=8\], got 0",
         r"rank \d of the process group failed its check: top_k must be"),
    "MoE: d_ffn differs":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN + rank, EXPERTS, ep_group=groups),
         r"moeflux.MoE: ranks of the process group disagree on d_ffn", None),
    "MoE: schedule differs":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups, exchange=ExchangeConfig(
            schedule="chunked" if rank == 0 else "bulk")),
         r"moeflux.MoE: ranks of the process group disagree on exchange_schedule", None),
    "MoE: a bad exchange option on one rank":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups, exchange=ExchangeConfig(
            schedule="chunked", chunks=0 if rank == world - 1 else 2)),
         r"moeflux.MoE: chunks must be an int >= 1, got 0",
         r"moeflux.MoE: rank \d of the process group failed its check: chunks must be an int >= 1"),
    "MoE: an exchange that is not a config on one rank (TypeError)":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups,
                                                 exchange="chunked" if rank == world - 1 else None),
         r"moeflux.MoE: exchange must be a moeflux.ExchangeConfig or None",
         r"failed its check: exchange must be a moeflux.ExchangeConfig or None"),
    "MoE: router_dtype differs":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups,
                                                 router_dtype=torch.float64 if rank == 0 else None),
         r"moeflux.MoE: ranks of the process group disagree on router_dtype", None),
    "MoE: capacity factor differs":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups,
                                                 capacity_factor=1.0 if rank == 0 else None),
         r"moeflux.MoE: ranks of the process group disagree on capacity_factor", None),
    "MoE: infinite capacity factor on one rank":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups,
                                                 capacity_factor=float("inf") if rank == world - 1 else 1.0),
         r"capacity_factor must be a finite number > 0", r"failed its check: capacity_factor must be"),
    "MoE: a capacity factor of the wrong type on one rank (TypeError)":
        (lambda rank, world, groups: moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups,
                                                 capacity_factor="1.5" if rank == world - 1 else 1.5),
         r"moeflux.MoE: '>' not supported", r"failed its check: '>' not supported"),
    "DataParallel: a parameter's shape differs":
        (lambda rank, world, groups: moeflux.DataParallel(_model(rank, world, groups, wider_on_last=True)),
         r"moeflux.DataParallel: ranks hold different parameters: parameter 0 is '0.weight' \[\d, 8\] float32", None),
    "DataParallel: one rank has one more parameter":
        (lambda rank, world, groups: moeflux.DataParallel(_model(rank, world, groups, extra_on_last=True)),
         r"moeflux.DataParallel: ranks hold different parameters: rank \d has \d+ trainable parameters, rank \d "
         r"has \d+", None),
    "DataParallel: dtypes differ":
        (lambda rank, world, groups: moeflux.DataParallel(_model(rank, world, groups, float64_on_last=True)),
         r"moeflux.DataParallel: ranks hold different parameters: parameter 0 is '0.weight' \[8, 8\] float", None),
    "DataParallel: a bare ep_group on one rank":
        (lambda rank, world, groups: moeflux.DataParallel(_model(rank, world, groups, bare_on_last=True)),
         r"MoE layer '\d' was built with a bare ep_group", r"rank \d of the process group failed its check: "
                                                          r"MoE layer '\d' was built with a bare ep_group"),
    "DataParallel: bucket sizes differ":
        (lambda rank, world, groups: moeflux.DataParallel(_model(rank, world, groups), bucket_cap_mb=1 + rank),
         r"moeflux.DataParallel: ranks of the process group disagree on bucket_cap_mb", None),
}


def construction_faults(rank: int, world: int) -> dict:
    groups = moeflux.init_expert_parallel(world)
    outcomes = {}
    for name, (action, _, _) in CONSTRUCTION.items():
        start = time.monotonic()
        try:
            action(rank, world, groups)
            outcomes[name] = ("no error", time.monotonic() - start)
        except (ValueError, RuntimeError, TypeError) as error:
            outcomes[name] = (str(error).splitlines()[0], time.monotonic() - start)
    # init_expert_parallel's groups run under the world's timeout (GROUP_TIMEOUT, not torch's 30 minutes), or
    # the one given.
    inherited = moeflux.init_expert_parallel(world)
    given = moeflux.init_expert_parallel(world, timeout=timedelta(seconds=7))
    outcomes["timeouts"] = [_C.group_timeout_ms(g.group_name) for g in (inherited.ep_group, inherited.edp_group,
                                                                        given.ep_group, given.edp_group)]
    dist.barrier()
    return outcomes


@pytest.mark.parametrize("world", [2, 4])
def test_construction_faults_raise_on_every_rank(world):
    results = run_ranks(world, construction_faults, timeout=300)
    for rank, outcomes in enumerate(results):
        for name, (_, odd, others) in CONSTRUCTION.items():
            message, seconds = outcomes[name]
            odd_rank = world - 1
            pattern = odd if others is None or rank == odd_rank else others
            assert re.search(pattern, message), (name, rank, message)
            if others is not None and rank != odd_rank:  # the odd rank's own error, carried
                assert message == carried(results[odd_rank][name][0], odd_rank), (name, rank, message)
            assert seconds < 15, (name, rank, seconds)
        world_ms = int(GROUP_TIMEOUT.total_seconds() * 1000)
        assert outcomes["timeouts"] == [world_ms, world_ms, 7_000, 7_000]
