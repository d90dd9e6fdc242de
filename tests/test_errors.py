"""Bad input raises a clear error that names the argument; never a crash or a hang."""

import re

import pytest
import torch

import moeflux
from conftest import DEVICES
from moeflux import ops

i32 = dict(dtype=torch.int32)
logits = torch.randn(4, 3)
ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2]], **i32)
tokens = torch.randn(4, 8)
rows, counts, row_map = ops.permute(tokens, ids, 3)
weights = torch.rand(4, 2)

OP_CASES = {
    # route
    "route: integer logits": (lambda: ops.route(logits.long(), 1), "logits must be float32"),
    "route: 1-D logits": (lambda: ops.route(logits[0], 1), "logits must be 2-D"),
    "route: no experts": (lambda: ops.route(torch.randn(4, 0), 1), "at least one expert"),
    "route: k = 0": (lambda: ops.route(logits, 0), "k must be in [1, num_experts = 3], got 0"),
    "route: k < 0": (lambda: ops.route(logits, -2), "k must be in [1, num_experts = 3], got -2"),
    "route: k > E": (lambda: ops.route(logits, 4), "k must be in [1, num_experts = 3], got 4"),
    "route: unknown scoring": (lambda: ops.route(logits, 1, scoring="tanh"), "scoring must be 'softmax' or 'sigmoid'"),
    "route: groups do not divide": (lambda: ops.route(logits, 1, num_groups=2), "num_groups must divide num_experts"),
    "route: too many top groups": (lambda: ops.route(logits, 1, num_groups=3, top_groups=4), "top_groups must be in"),
    "route: k beyond the groups": (lambda: ops.route(logits, 2, num_groups=3, top_groups=1), "k = 2 exceeds the 1"),
    "route: group score of no expert": (lambda: ops.route(logits, 1, num_groups=3, group_score_top=0),
                                        "group_score_top must be >= 1, got 0"),
    "route: bias shape": (lambda: ops.route(logits, 1, expert_bias=torch.zeros(4)), "expert_bias must have shape"),
    "route: scale": (lambda: ops.route(logits, 1, scale=0.0), "scale must be a positive number"),
    "route_backward: mismatched grad": (
        lambda: ops._ops.route_backward(torch.ones(3, 2), logits, weights, ids, False, "softmax", 1.0),
        "grad_weights.size(0)"),
    # permute
    "permute: int64 ids": (lambda: ops.permute(tokens, ids.long(), 3), "expert_ids must be Int"),
    "permute: a huge num_experts": (lambda: ops.permute(tokens, ids, 2**40),
                                    "num_experts must be in [1, 16777216], got 1099511627776"),
    "apply_capacity: a huge num_experts": (lambda: ops.apply_capacity(ids, weights, 2**31, 2),
                                           "num_experts must be in [1, 16777216], got 2147483648"),
    "permute: meta tokens, CPU ids": (lambda: ops.permute(tokens.to("meta"), ids, 3),
                                      "expert_ids must be on the same device as tokens (meta), got cpu"),
    "unpermute: meta rows, CPU row_map": (lambda: ops.unpermute(rows.to("meta"), row_map),
                                          "row_map must be on the same device as rows (meta), got cpu"),
    "permute: id too large": (lambda: ops.permute(tokens, ids + 1, 3), "expert_ids must be in [0, num_experts = 3)"),
    "permute: id below -1": (lambda: ops.permute(tokens, ids - 2, 3), "or -1 (dropped), got -2"),
    "permute: mismatched lengths": (lambda: ops.permute(tokens[:3], ids, 3), "expert_ids.size(0) must equal"),
    "permute: 3-D tokens": (lambda: ops.permute(tokens.view(2, 2, 8), ids, 3), "tokens must be 2-D"),
    "permute: integer tokens": (lambda: ops.permute(tokens.int(), ids, 3), "tokens must be float32"),
    "permute: negative capacity": (lambda: ops.permute(tokens, ids, 3, -1), "capacity must be >= 0"),
    "permute: zero experts": (lambda: ops.permute(tokens, ids, 0), "num_experts must be in [1, 16777216], got 0"),
    # unpermute
    "unpermute: weights shape": (lambda: ops.unpermute(rows, row_map, weights[:, :1]), "weights must have the shape"),
    "unpermute: integer weights": (lambda: ops.unpermute(rows, row_map, weights.int()), "weights must be float32"),
    "unpermute: row out of range": (lambda: ops.unpermute(rows[:5], row_map), "row_map must hold -1 or a row"),
    "unpermute: int64 row map": (lambda: ops.unpermute(rows, row_map.long()), "row_map must be Int"),
    "unpermute_backward: duplicate rows": (
        lambda: ops._ops.unpermute_backward(tokens, rows, torch.zeros_like(row_map), weights), "names row 0 twice"),
    "unpermute_backward: hidden mismatch": (
        lambda: ops._ops.unpermute_backward(tokens[:, :4], rows, row_map, weights), "grad_output.size(1)"),
    # apply_capacity
    "apply_capacity: negative capacity": (lambda: ops.apply_capacity(ids, weights, 3, -5), "capacity must be >= 0"),
    "apply_capacity: id out of range": (lambda: ops.apply_capacity(ids + 5, weights, 3, 2), "expert_ids must be in"),
    "apply_capacity: weights shape": (lambda: ops.apply_capacity(ids, weights.t(), 3, 2), "weights must have the shape"),
    # router_aux_loss
    "router_aux_loss: mismatched lengths": (lambda: ops.router_aux_loss(logits[:2], ids), "expert_ids.size(0)"),
    # grouped_mm
    "grouped_mm: in_features": (
        lambda: ops.grouped_mm(rows, torch.randn(3, 4, 5), counts), "weight.size(1) must equal input.size(1)"),
    "grouped_mm: dtype": (
        lambda: ops.grouped_mm(rows, torch.randn(3, 8, 5).double(), counts), "weight must have the dtype of input"),
    "grouped_mm: counts too large": (
        lambda: ops.grouped_mm(rows, torch.randn(3, 8, 5), counts * 2), "sum to at most input.size(0)"),
    "grouped_mm: counts length": (
        lambda: ops.grouped_mm(rows, torch.randn(2, 8, 5), counts), "tokens_per_expert.size(0)"),
}


@pytest.mark.parametrize("case", OP_CASES, ids=list(OP_CASES))
def test_op_rejects_bad_input(case):
    fn, message = OP_CASES[case]
    with pytest.raises(RuntimeError) as info:
        fn()
    assert message in str(info.value)
    assert "moeflux." in str(info.value)


MODULE_CASES = {
    "top_k > num_experts": (dict(num_experts=4, top_k=5), "top_k must be an int in [1, num_experts=4]"),
    "top_k = 0": (dict(top_k=0), "top_k must be an int in [1"),
    "negative capacity factor": (dict(capacity_factor=-1.0), "capacity_factor must be a finite number > 0"),
    "infinite capacity factor": (dict(capacity_factor=float("inf")), "capacity_factor must be a finite number > 0"),
    "NaN capacity factor": (dict(capacity_factor=float("nan")), "capacity_factor must be a finite number > 0"),
    "zero experts": (dict(num_experts=0), "num_experts must be a positive int"),
    "unknown activation": (dict(activation="relu6"), "activation must be one of"),
    "unknown drop policy": (dict(capacity_factor=1.0, drop_policy="random"), "drop_policy must be one of"),
    "negative aux weight": (dict(aux_loss_weight=-1.0), "aux_loss_weight"),
    "jitter too large": (dict(router_jitter=1.5), "jitter must be in [0, 1)"),
    "unknown scoring": (dict(scoring="relu"), "scoring must be 'softmax' or 'sigmoid'"),
    "groups do not divide": (dict(num_groups=3), "num_groups must divide num_experts (4)"),
    "top_k beyond the groups": (dict(num_groups=4, top_groups=1), "top_k=2 exceeds the 1 experts of top_groups=1"),
    "non-positive scale": (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be > 0"),
    "group score of no expert": (dict(num_groups=2, group_score_top=0), "group_score_top must be an int >= 1"),
    "clamp limit 0": (dict(activation="clamped_swiglu", swiglu_limit=0.0), "swiglu_limit must be a finite number > 0"),
    "infinite clamp alpha": (dict(activation="clamped_swiglu", swiglu_alpha=float("inf")), "swiglu_alpha finite"),
    "an ops activation name": (dict(activation="clamped_swiglu:7:1.7"), "activation must be one of"),
}


@pytest.mark.parametrize("case", MODULE_CASES, ids=list(MODULE_CASES))
def test_module_rejects_bad_config(case):
    overrides, message = MODULE_CASES[case]
    config = dict(d_model=8, d_ffn=16, num_experts=4, top_k=2) | overrides
    with pytest.raises(ValueError, match=re.escape(message)):
        moeflux.MoE(**config)


def test_module_rejects_wrong_width():
    moe = moeflux.MoE(8, 16, 4)
    with pytest.raises(ValueError, match=r"expects input \[..., d_model=8\], got shape \(2, 3, 7\)"):
        moe(torch.randn(2, 3, 7))


@pytest.mark.parametrize("x, message", [
    (torch.tensor(1.0), "expects input [..., d_model=8], got shape ()"),
    (torch.randn(3, 8, dtype=torch.float64), "expects input of dtype torch.float32 (its experts' dtype), got "
                                             "torch.float64"),
    (torch.ones(3, 8, dtype=torch.int64), "expects input of dtype torch.float32 (its experts' dtype), got torch.int64"),
    (torch.empty(3, 8, device="meta"), "expects input on cpu (its weights' device), got meta"),
], ids=["scalar", "float64", "int64", "meta"])
def test_module_rejects_input_of_another_dtype_or_device(x, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        moeflux.MoE(8, 16, 4)(x)


@pytest.mark.parametrize("activation, message", [
    ("clamped_swiglu:a:b", "limit and alpha must be numbers"),
    ("swiglu:1:2", "activation must be one of"),
    ("clamped_swiglu:7", "activation must be one of"),
    ("clamped_swiglu:-1:1.7", "swiglu_limit must be a finite number > 0"),
])
def test_grouped_experts_checks_the_activation_name(activation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        moeflux.GroupedExperts(2, 8, 4, activation)
    assert moeflux.GroupedExperts(2, 8, 4, "clamped_swiglu").activation == "clamped_swiglu:7.0:1.702"


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_ops_reject_mixed_devices():
    with pytest.raises(RuntimeError, match="expert_ids must be on the same device as tokens"):
        ops.permute(tokens.cuda(), ids, 3)
    with pytest.raises(RuntimeError, match="weights must be on the same device as row_map"):
        ops.unpermute(rows.cuda(), row_map.cuda(), weights)
