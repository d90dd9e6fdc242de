"""Staged schedules (ops.pipelined_moe, MoE(exchange=ExchangeConfig(schedule="chunked" | "pairwise"))) against
the bulk exchange:
outputs and every gradient, dropless and capacity (with overflow), chunk counts from 1 to more chunks than
tokens, pairwise group sizes, a rank without tokens, world 2 and 4, ep < world, expert biases (GPT-OSS) with
every activation, and the number of collectives each schedule issues."""

import pytest
import torch
import torch.distributed as dist

import moeflux
from moeflux import ExchangeConfig, ops
from multiprocess import run_ranks

H, F = 8, 6


# Re-ordered sums: fp64 and fp32 agree to 1e-6 relative; bf16 to its own rounding of a re-ordered reduction.
TOLERANCE = {torch.float64: dict(rtol=1e-6, atol=1e-9), torch.float32: dict(rtol=1e-6, atol=1e-6),
             torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
TIGHT = dict(rtol=0, atol=1e-10)  # float64: both layers run the same expert op, only the sums' order differs
# GPT-OSS's experts: per-expert biases; its clamped SwiGLU clamped tightly enough to bite at this scale.
BIASED = dict(expert_bias=True)
GPT_OSS = dict(expert_bias=True, swiglu_limit=0.5, swiglu_alpha=1.702)


def make(groups, seed, dtype=torch.float64, exchange=None, **options):
    torch.manual_seed(seed)
    return moeflux.MoE(H, F, 4 * groups.ep_size, 2, dtype=dtype, ep_group=groups, exchange=exchange, **options)


def compare(groups, rank, num_tokens, capacity_factor, activation, schedule, dtype=torch.float64, tolerance=None,
            layer_options=None, **options):
    """``layer_options``: MoE options both layers get (expert biases, activation parameters)."""
    common = dict(capacity_factor=capacity_factor, activation=activation, dtype=dtype) | (layer_options or {})
    bulk = make(groups, 7, **common)
    piped = make(groups, 7, exchange=ExchangeConfig(schedule=schedule, **options), **common)
    assert piped.exchange.schedule.staged and not bulk.exchange.schedule.staged
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, H, generator=gen).to(dtype)
    grad = torch.randn(num_tokens, H, generator=gen).to(dtype)
    results = []
    for layer in (bulk, piped):
        xi = x.clone().requires_grad_(True)
        layer(xi).backward(grad)
        biases = [] if layer.experts.b_in is None else [layer.experts.b_in.grad, layer.experts.b_out.grad]
        results.append([layer(x).detach(), xi.grad, layer.router.weight.grad, layer.experts.w_in.grad,
                        layer.experts.w_out.grad, layer.tokens_per_expert, *biases])
    names = ("output", "tokens", "router", "w_in", "w_out", "counts", "b_in", "b_out")
    assert len(results[1]) == len(results[0]) and all(t is not None for t in results[1])
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(b, a, **(tolerance or TOLERANCE[dtype]),
                                   msg=lambda m: f"{name} ({schedule} {activation} {options}): {m}")


def equivalence_worker(rank, world, ep_size):
    groups = moeflux.init_expert_parallel(ep_size)
    uneven = 3 + 4 * groups.ep_rank if groups.ep_rank else 0  # dropless: rank 0 of each group routes no tokens
    cases = [
        (uneven, None, "swiglu", "chunked", dict(chunks=1)),
        (uneven, None, "swiglu", "chunked", dict(chunks=3)),
        (uneven, None, "gelu", "chunked", dict(chunks=40)),  # more chunks than tokens
        (uneven, None, "swiglu", "pairwise", dict(group_size=1)),
        (12, 1.0, "swiglu", "chunked", dict(chunks=2)),  # capacity: every rank the same number of tokens
        (12, 0.5, "gelu", "chunked", dict(chunks=5)),  # capacity overflow: assignments dropped
        (12, 0.5, "swiglu", "pairwise", dict(group_size=1)),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        compare(groups, rank, uneven, None, "swiglu", "chunked", dtype=dtype, chunks=3)
        compare(groups, rank, 12, 1.0, "gelu", "pairwise", dtype=dtype, group_size=1)
    if groups.ep_size > 2:
        cases.append((uneven, None, "swiglu", "pairwise", dict(group_size=2)))
        cases.append((12, 1.0, "gelu", "pairwise", dict(group_size=groups.ep_size)))
    for num_tokens, capacity_factor, activation, schedule, options in cases:
        compare(groups, rank, num_tokens, capacity_factor, activation, schedule, **options)
    # Expert biases (GPT-OSS) through the one expert op, clamped SwiGLU and GELU, dropless and capacity (its
    # padding rows travel through the experts too, and get biases: their gradients must not reach the biases).
    bias_cases = [
        (uneven, None, "clamped_swiglu", GPT_OSS, "chunked", dict(chunks=3)),
        (uneven, None, "gelu", BIASED, "pairwise", dict(group_size=1)),
        (12, 0.5, "clamped_swiglu", GPT_OSS, "pairwise", dict(group_size=1)),
        (12, 1.0, "gelu", BIASED, "chunked", dict(chunks=2)),
    ]
    for num_tokens, capacity_factor, activation, layer_options, schedule, options in bias_cases:
        compare(groups, rank, num_tokens, capacity_factor, activation, schedule, tolerance=TIGHT,
                layer_options=layer_options, **options)
    moeflux._C.set_cpu_grouped_mm_backend("aten")  # both layers' GEMMs in torch._grouped_mm (float32 on the CPU)
    try:
        compare(groups, rank, uneven, None, "clamped_swiglu", "chunked", dtype=torch.float32, layer_options=GPT_OSS,
                chunks=2)
    finally:
        moeflux._C.set_cpu_grouped_mm_backend("segments")
    return True


@pytest.mark.parametrize("world, ep_size", [(2, 2), (4, 4), (4, 2)])
def test_pipelined_schedules_equal_bulk(world, ep_size):
    assert all(run_ranks(world, equivalence_worker, ep_size))


def assert_stages_overlap(records, out_phase, stages):
    """From the engine's stage trace (its comm_stats records, each with its stage): stage s + 1's outgoing
    all-to-all was issued before stage s's experts finished, and each stage's experts ran after its own
    all-to-all was waited for."""
    issued, waited, experts = {}, {}, {}
    for r in records:
        if r.phase == out_phase:
            issued[r.stage], waited[r.stage] = r.start_s, r.start_s + r.seconds
        elif r.phase == "experts":
            experts[r.stage] = (r.start_s, r.start_s + r.seconds)
    assert sorted(issued) == sorted(experts) == list(range(stages)), (out_phase, issued, experts)
    for s in range(stages):
        assert waited[s] <= experts[s][0], (out_phase, s, waited[s], experts[s])
    for s in range(stages - 1):
        assert issued[s + 1] < experts[s][1], f"{out_phase} of stage {s + 1} issued after stage {s}'s experts ended"


def counts_worker(rank, world):
    """Collective counts per schedule and, from the pipelined schedules' stage trace, that stages overlap."""
    groups = moeflux.init_expert_parallel(world)
    x = torch.randn(10, H, dtype=torch.float64, requires_grad=True)
    seen = {}
    for schedule, options, stages in [("bulk", {}, 1), ("chunked", dict(chunks=3), 3),
                                      ("pairwise", dict(group_size=1), world)]:
        layer = make(groups, 3, exchange=ExchangeConfig(schedule=schedule, **options))
        ops.reset_collective_counts()
        with moeflux.comm_stats() as trace:
            out = layer(x)
            forward = ops.collective_counts()
            trace.step()
            out.sum().backward()
            trace.step()
        total = ops.collective_counts()
        seen[schedule] = (forward, total, stages)
        if schedule != "bulk":
            assert_stages_overlap(trace.records[0], "dispatch", stages)
            assert_stages_overlap(trace.records[1], "combine_backward", stages)
    return seen


def test_collectives_and_stage_overlap_follow_the_schedule():
    for seen in run_ranks(2, counts_worker):
        for schedule, (forward, total, stages) in seen.items():
            # One count exchange per step, forward only, read on the host once; the bulk layer's expert GEMMs
            # read their per-expert counts once more (the pipelined engine reuses the exchange's host counts).
            reads = 2 if schedule == "bulk" else 1
            assert forward == {"token_all_to_alls": 2 * stages, "count_exchanges": 1, "host_count_reads": reads}, \
                schedule
            assert total == {"token_all_to_alls": 4 * stages, "count_exchanges": 1, "host_count_reads": reads}, \
                schedule


def bad_options_worker(rank, world):
    groups = moeflux.init_expert_parallel(world)
    errors = []
    for options, message in [
        (dict(schedule="fancy"), "schedule must be one of \\('bulk', 'chunked', 'pairwise'\\), got 'fancy'"),
        (dict(schedule="chunked", chunks=0), "chunks must be an int >= 1"),
        (dict(schedule="pairwise", group_size=3),
         "schedule='pairwise': group_size \\(3\\) must divide the size of the expert-parallel group \\(2\\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(groups, 0, exchange=ExchangeConfig(**options))
        errors.append(message)
    # ranks that disagree on the schedule all raise
    with pytest.raises(ValueError, match="disagree on exchange_chunks"):
        make(groups, 0, exchange=ExchangeConfig(schedule="chunked", chunks=2 + rank))
    return errors


def test_bad_schedule_options_raise_on_every_rank():
    assert all(run_ranks(2, bad_options_worker))


def functional_worker(rank, world):
    """The op itself, on its own arguments: bad arguments name the argument."""
    x = torch.randn(4, H)
    ids = torch.zeros(4, 1, dtype=torch.int32)
    w_in, w_out = torch.randn(2, H, 2 * F), torch.randn(2, F, H)
    with pytest.raises(RuntimeError, match="w_in.size\\(2\\) must equal 2 \\* w_out.size\\(1\\)"):
        ops.pipelined_moe(x, ids, None, torch.randn(2, H, F), w_out, "swiglu", 2 * world)
    bad_calls = {
        "schedule must be 'bulk', 'chunked' or 'pairwise', got 'fancy'": dict(schedule="fancy"),
        "chunks must be >= 1": dict(chunks=0),
        "group_size must divide the expert-parallel group size": dict(schedule="pairwise", group_size=3),
        "activation must be 'swiglu', 'gelu' or 'clamped_swiglu": dict(activation="relu"),
        "num_experts must be a positive multiple": dict(num_experts=2 * world + 1),
        "expert weights must have the dtype of tokens": dict(w_in=w_in.double()),
        "weights must have the shape of expert_ids": dict(weights=torch.ones(4, 2)),
        "w_in.size\\(0\\) must equal num_experts / group size": dict(num_experts=4 * world),
        "tokens must be 2-D": dict(x=x[None]),
    }
    for message, change in bad_calls.items():
        args = dict(x=x, ids=ids, weights=None, w_in=w_in, w_out=w_out, activation="swiglu", num_experts=2 * world,
                    schedule="chunked", chunks=2, group_size=1) | change
        with pytest.raises(RuntimeError, match=message):
            ops.pipelined_moe(args["x"], args["ids"], args["weights"], args["w_in"], args["w_out"],
                              args["activation"], args["num_experts"], None, None, args["schedule"], args["chunks"],
                              args["group_size"])
    with pytest.raises(RuntimeError, match="b_in must have shape \\[2, 12\\]"):
        ops.pipelined_moe(x, ids, None, w_in, w_out, "swiglu", 2 * world, b_in=torch.zeros(2, F))
    with pytest.raises(RuntimeError, match="expert biases must have the dtype of tokens"):
        ops.pipelined_moe(x, ids, None, w_in, w_out, "swiglu", 2 * world, b_out=torch.zeros(2, H, dtype=torch.double))
    out, counts = ops.pipelined_moe(x, ids, None, w_in, w_out, "swiglu", 2 * world, chunks=2)
    assert out.shape == x.shape and counts.shape == (2,)
    # the bulk schedule: one stage, the same result
    bulk, bulk_counts = ops.pipelined_moe(x, ids, None, w_in, w_out, "swiglu", 2 * world, schedule="bulk")
    torch.testing.assert_close(bulk, out, **TOLERANCE[torch.float32])
    assert torch.equal(bulk_counts, counts)
    return True


def test_functional_pipelined_moe():
    assert all(run_ranks(2, functional_worker))
