"""torch.compile: every op traces (opcheck with its fake-tensor, dynamic-shape and AOT-dispatch tests, the
collectives on 2 gloo ranks), and a compiled MoE layer equals the eager one (outputs and every gradient) with
no graph break under fullgraph=True and no recompilation when the routing changes: on one process, expert-
parallel on 2 ranks (dropless and capacity) and in a converted Hugging Face model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import moeflux
from multiprocess import run_ranks

D_MODEL, D_FFN, EXPERTS = 16, 24, 4


def assert_same_step(compiled, eager, make_input, steps=3):
    """Each step, on new tokens (so new routing): the compiled module's output, input gradient and parameter
    gradients equal the eager module's (the same parameters)."""
    for step in range(steps):
        torch.manual_seed(100 + step + 10 * (dist.get_rank() if dist.is_initialized() else 0))
        x = make_input().requires_grad_()
        results = []
        for module in (compiled, eager):
            eager.zero_grad(set_to_none=True)
            x.grad = None
            out = module(x)
            out = out.logits if hasattr(out, "logits") else out
            (out.float().square().mean() + moeflux.aux_loss(eager)).backward()
            results.append((out.detach(), x.grad, {n: p.grad for n, p in eager.named_parameters()}))
        (out_c, gx_c, grads_c), (out_e, gx_e, grads_e) = results
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        if gx_e is not None:
            torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            if grads_e[name] is None:
                assert grads_c[name] is None, name
            else:
                torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def compile_stats() -> dict:
    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["dropless", "capacity"])
def test_compiled_layer_equals_eager_with_no_graph_break_or_recompile(capacity_factor):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    moe = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, top_k=2, capacity_factor=capacity_factor, z_loss_weight=1e-3)
    assert_same_step(torch.compile(moe, fullgraph=True), moe, lambda: torch.randn(3, 7, D_MODEL), steps=4)
    assert compile_stats() == {"graphs": 1, "breaks": 0}  # routing changed every step: compiled once


def _expert_parallel(rank, world, capacity_factor, schedule, shadowing, hierarchical):
    counters.clear()
    groups = moeflux.init_expert_parallel(world)
    nodes = moeflux.init_node_groups(groups.ep_group, ranks_per_node=1) if hierarchical else None
    exchange = moeflux.ExchangeConfig(transport="hierarchical" if hierarchical else "flat", nodes=nodes,
                                      schedule=schedule, shadowing=shadowing)
    torch.manual_seed(0)
    moe = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, top_k=2, capacity_factor=capacity_factor, ep_group=groups,
                      exchange=exchange)
    traced_whole = schedule == "bulk" and shadowing == "off" and not hierarchical
    # Ranks hold different numbers of tokens (dropless); in capacity mode the capacity is per rank.
    assert_same_step(torch.compile(moe, fullgraph=traced_whole), moe, lambda: torch.randn(9 + 3 * rank, D_MODEL))
    return compile_stats()


@pytest.mark.parametrize("capacity_factor,schedule,shadowing,hierarchical", [
    (None, "bulk", "off", False), (1.25, "bulk", "off", False),  # traced whole
    # run eagerly inside the compiled layer (a graph break)
    (None, "chunked", "off", False), (None, "bulk", 1, False), (None, "bulk", "off", True),
], ids=["dropless", "capacity", "chunked", "shadowing", "hierarchical"])
def test_compiled_expert_parallel_layer_equals_eager(capacity_factor, schedule, shadowing, hierarchical):
    for stats in run_ranks(2, _expert_parallel, capacity_factor, schedule, shadowing, hierarchical, timeout=300):
        if schedule == "bulk" and shadowing == "off" and not hierarchical:
            assert stats == {"graphs": 1, "breaks": 0}


def test_fullgraph_names_the_exchange_that_does_not_trace():
    """The staged schedules and shadowing keep opaque C++ state or choose on the host: under fullgraph=True
    torch.compile says where, rather than failing inside a kernel."""
    run_ranks(2, _fullgraph_refusal)


def _fullgraph_refusal(rank, world):
    groups = moeflux.init_expert_parallel(world)
    moe = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, ep_group=groups, exchange=moeflux.ExchangeConfig(schedule="chunked"))
    with pytest.raises(Exception, match="torch.compiler.disable|skip"):
        torch.compile(moe, fullgraph=True)(torch.randn(5, D_MODEL))


def test_compiled_hf_model_equals_eager():
    transformers = pytest.importorskip("transformers")
    import moeflux.hf

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=D_MODEL, intermediate_size=32,
                                         moe_intermediate_size=D_FFN, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, num_experts=EXPERTS, num_experts_per_tok=2,
                                         norm_topk_prob=True, mlp_only_layers=[])
    model = transformers.Qwen3MoeForCausalLM(config)
    moeflux.hf.convert_model(model, aux_loss_weight=0.01)
    torch._dynamo.reset()
    counters.clear()
    ids = lambda: torch.randint(0, 64, (2, 11))  # noqa: E731
    compiled = torch.compile(model, fullgraph=True)
    for step in range(2):
        torch.manual_seed(step)
        batch = ids()
        outs = []
        for module in (compiled, model):
            model.zero_grad(set_to_none=True)
            logits = module(batch).logits
            (logits.square().mean() + moeflux.aux_loss(model)).backward()
            outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
        for name, grad in outs[1][1].items():
            torch.testing.assert_close(outs[0][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert compile_stats()["breaks"] == 0


# ---- opcheck of the collective ops (the single-process ops are opchecked in their own test files)

def _opcheck_collectives(rank, world):
    group = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randn(6 + rank, D_MODEL, generator=gen, requires_grad=True)
    ids = torch.randint(0, EXPERTS, (tokens.shape[0], 2), generator=gen, dtype=torch.int32)
    weights = torch.rand(tokens.shape[0], 2, generator=gen, requires_grad=True)
    checked = []

    def check(op, args, **kwargs):
        torch.library.opcheck(op, args, **kwargs)
        checked.append(str(op))

    send = [2] * world
    check(torch.ops.moeflux.all_to_all.default, (torch.randn(2 * world, 3, requires_grad=True), send, send, group))
    for capacity in (None, 3):
        check(torch.ops.moeflux.dispatch.default, (tokens, ids, EXPERTS, capacity, group))
        rows, counts, row_map, regroup_map, send_splits, recv_splits = torch.ops.moeflux.dispatch(
            tokens.detach(), ids, EXPERTS, capacity, group)
        plan = (row_map, regroup_map, send_splits, recv_splits)
        check(torch.ops.moeflux.dispatch_backward.default, (torch.randn_like(rows), *plan, group))
        expert_out = torch.randn_like(rows).requires_grad_()
        check(torch.ops.moeflux.combine.default, (expert_out, *plan, weights, group))
        _, returned = torch.ops.moeflux.combine(expert_out.detach(), *plan, weights.detach(), group)
        check(torch.ops.moeflux.combine_backward.default,
              (torch.randn_like(tokens), returned, *plan, weights.detach(), group))
    check(torch.ops.moeflux.routing_counts.default, (tokens.detach(), ids, EXPERTS, group))
    # the one count/header exchange (the hierarchical transport's): [P, m] counts on the tokens' device
    check(torch.ops.moeflux.count_exchange.default,
          (tokens.detach(), torch.arange(world * 3, dtype=torch.int64).view(world, 3), EXPERTS, group))
    local = torch.randn(EXPERTS // world, 3, 5, requires_grad=True)
    check(torch.ops.moeflux.broadcast_expert_rows.default, (local, [0, EXPERTS - 1], group))
    check(torch.ops.moeflux.reduce_expert_rows.default, (torch.randn(2, 3, 5), [0, EXPERTS - 1], EXPERTS // world,
                                                          group))
    order = list(range(EXPERTS))
    check(torch.ops.moeflux.move_expert_rows.default, (local.detach(), order, order[::-1], group))
    # pipelined_moe's C++ autograd node keeps its stages' state in an opaque object: AOT dispatch cannot trace
    # it, so the layer runs it eagerly under torch.compile (test_fullgraph_names_...); its fake kernel and
    # autograd registration are checked. (test_schema: torch's SchemaCheckMode fails on a Device argument of an
    # ATen op it calls inside, "Cannot inspect value of type Device".)
    w_in = torch.randn(EXPERTS // world, D_MODEL, 2 * D_FFN, requires_grad=True)
    w_out = torch.randn(EXPERTS // world, D_FFN, D_MODEL, requires_grad=True)
    check(torch.ops.moeflux.pipelined_moe.default,
          (tokens, ids, weights, w_in, w_out, "swiglu", EXPERTS, None, group, "chunked", 2, 1),
          test_utils=("test_autograd_registration", "test_faketensor"))
    b_in = torch.randn(EXPERTS // world, 2 * D_FFN, requires_grad=True)  # GPT-OSS's expert biases
    b_out = torch.randn(EXPERTS // world, D_MODEL, requires_grad=True)
    check(torch.ops.moeflux.pipelined_moe.default,
          (tokens, ids, weights, w_in, w_out, "swiglu", EXPERTS, None, group, "pairwise", 2, 1, b_in, b_out),
          test_utils=("test_autograd_registration", "test_faketensor"))
    # the bulk schedule, with the routing counts in place of its count exchange (what shadowing passes)
    counts = torch.ops.moeflux.routing_counts(tokens.detach(), ids, EXPERTS, group)
    check(torch.ops.moeflux.pipelined_moe.default,
          (tokens, ids, weights, w_in, w_out, "swiglu", EXPERTS, None, group, "bulk", 1, 1, None, None, counts),
          test_utils=("test_autograd_registration", "test_faketensor"))
    return checked


def test_collective_ops_pass_opcheck_on_2_ranks():
    checked = run_ranks(2, _opcheck_collectives, timeout=300)
    assert checked[0] == checked[1] and len(checked[0]) == 17
