"""A router in another dtype than its experts (DeepSeek-style checkpoints keep the gate and its correction bias
in float32 next to bfloat16 experts; Megatron-Core's moe_router_dtype), and autocast: the input check, the
router, the exchange and the experts' GEMMs work with every mix, single process and on 2 expert-parallel ranks,
against a float64 copy of the same layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import moeflux
from multiprocess import GROUP_TIMEOUT, run_ranks

D_MODEL, D_FFN, EXPERTS = 16, 12, 8
HALF_TOL = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=4e-3, rtol=4e-3),
            torch.float32: dict(atol=1e-5, rtol=1e-5)}

# (experts' dtype, router's parameter dtype, router_dtype, extra MoE options)
MIXES = {
    "bf16 experts, fp32 router, fp32 logits (DeepSeek-V3)": (torch.bfloat16, torch.float32, torch.float32,
                                                             dict(scoring="sigmoid", use_expert_bias=True,
                                                                  num_groups=4, top_groups=2, renormalize=True)),
    "bf16 experts, fp32 router": (torch.bfloat16, torch.float32, None, {}),
    "fp16 experts, fp32 router, fp32 logits": (torch.float16, torch.float32, torch.float32, dict(top_k=3)),
    "bf16 experts and router, fp32 logits": (torch.bfloat16, torch.bfloat16, torch.float32, {}),
    "fp32 experts, bf16 router": (torch.float32, torch.bfloat16, None, dict(shared_expert_ffn=8)),
    "bf16 experts, fp32 router with bias, shared expert": (torch.bfloat16, torch.float32, None,
                                                           dict(router_bias=True, shared_expert_ffn=8,
                                                                shared_expert_gate=True)),
}


def mixed_layer(experts_dtype, router_dtype_params, router_dtype, options, ep_group=None, seed=3):
    torch.manual_seed(seed)
    moe = moeflux.MoE(D_MODEL, D_FFN, EXPERTS, **{"top_k": 2, **options}, router_dtype=router_dtype,
                      dtype=experts_dtype, ep_group=ep_group)
    moe.router.to(router_dtype_params)
    if moe.router.expert_bias is not None:  # a trained correction bias, float32 as checkpoints keep it
        moe.router.expert_bias.copy_(torch.randn(EXPERTS, generator=torch.Generator().manual_seed(1)) * 0.05)
    return moe


def float64_copy(moe):
    return copy.deepcopy(moe).double()


def inputs(dtype, tokens=24, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D_MODEL, generator=gen).to(dtype)
    return x, torch.randn(tokens, D_MODEL, generator=gen).to(dtype)


def run(moe, x, grad_out):
    x = x.clone().requires_grad_()
    y = moe(x)
    (y.double() * grad_out.double()).sum().backward()
    return y, x.grad


def assert_grads_close(moe, ref, tol):
    refs = dict(ref.named_parameters())
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        torch.testing.assert_close(p.grad.double(), refs[name].grad, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mix", MIXES)
def test_mixed_router_and_experts_equal_the_float64_layer(mix):
    experts_dtype, router_params, router_dtype, options = MIXES[mix]
    moe = mixed_layer(experts_dtype, router_params, router_dtype, options)
    assert moe.router.weight.dtype == router_params and moe.experts.w_in.dtype == experts_dtype
    ref = float64_copy(moe)
    x, grad_out = inputs(experts_dtype)
    y, x_grad = run(moe, x, grad_out)
    ref_y, ref_x_grad = run(ref, x.double(), grad_out)
    assert y.dtype == experts_dtype and x_grad.dtype == experts_dtype
    tol = HALF_TOL[torch.bfloat16 if torch.bfloat16 in (experts_dtype, router_params) else experts_dtype]
    torch.testing.assert_close(y.double(), ref_y, **tol)
    torch.testing.assert_close(x_grad.double(), ref_x_grad, **tol)
    assert_grads_close(moe, ref, tol)


@pytest.mark.parametrize("mix", MIXES)
def test_router_computes_in_router_dtype_else_in_its_weights_dtype(mix):
    experts_dtype, router_params, router_dtype, options = MIXES[mix]
    moe = mixed_layer(experts_dtype, router_params, router_dtype, options)
    x, _ = inputs(experts_dtype)
    logits = moe.router(x).logits
    dtype = router_dtype or router_params
    assert logits.dtype == dtype
    bias = None if moe.router.bias is None else moe.router.bias.to(dtype)
    # exactly the router's linear in that dtype: the same choice as transformers' fp32 gate makes
    assert torch.equal(logits, F.linear(x.to(dtype), moe.router.weight.to(dtype), bias))


def test_input_in_the_routers_dtype_is_refused_naming_the_experts_dtype():
    moe = mixed_layer(torch.bfloat16, torch.float32, torch.float32, {})
    with pytest.raises(ValueError, match=r"input of dtype torch\.bfloat16 \(its experts' dtype\), got torch\.float32"):
        moe(torch.randn(4, D_MODEL))


@pytest.mark.parametrize("router_dtype", [None, torch.float32], ids=["autocast logits", "fp32 logits"])
@pytest.mark.parametrize("schedule", ["local", "capacity"])
def test_autocast_runs_the_experts_in_autocasts_dtype(router_dtype, schedule):
    options = dict(capacity_factor=1.0) if schedule == "capacity" else {}
    moe = mixed_layer(torch.float32, torch.float32, router_dtype, dict(options, shared_expert_ffn=8))
    ref = float64_copy(moe)
    seen = {}
    moe.router.register_forward_hook(lambda m, a, out: seen.update(logits=out.logits.dtype))
    x, grad_out = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, x_grad = run(moe, x, grad_out)
    ref_y, ref_x_grad = run(ref, x.double(), grad_out)
    assert y.dtype == torch.bfloat16 and x_grad.dtype == torch.float32  # as nn.Linear under autocast
    assert seen["logits"] == (router_dtype or torch.bfloat16)
    tol = HALF_TOL[torch.bfloat16]
    torch.testing.assert_close(y.double(), ref_y, **tol)
    torch.testing.assert_close(x_grad.double(), ref_x_grad, **tol)
    assert_grads_close(moe, ref, tol)  # float32 weights get float32 gradients through autocast's casts


def test_autocast_expert_ops_cast_their_operands():
    from moeflux import ops
    rows = torch.randn(6, D_MODEL)
    w_in, w_out = torch.randn(2, D_MODEL, 2 * D_FFN, requires_grad=True), torch.randn(2, D_FFN, D_MODEL)
    counts = torch.tensor([4, 2], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.expert_ffn(rows, w_in, w_out, counts, "swiglu")
        mm = ops.grouped_mm(rows, w_in, counts)
    assert out.dtype == mm.dtype == torch.bfloat16
    expected = ops.expert_ffn(rows.bfloat16(), w_in.bfloat16(), w_out.bfloat16(), counts, "swiglu")
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert w_in.grad.dtype == torch.float32


# ---- 2 expert-parallel ranks against one process holding every expert, same mix


EP_CASES = {
    "bf16 experts, fp32 router, fp32 logits": (torch.bfloat16, torch.float32, torch.float32, {}, False),
    "autocast bf16, fp32 weights": (torch.float32, torch.float32, torch.float32, {}, True),
    "autocast bf16, chunked schedule": (torch.float32, torch.float32, None,
                                        dict(exchange=moeflux.ExchangeConfig(schedule="chunked")), True),
}


def ep_worker(rank, world):
    groups = moeflux.init_expert_parallel(world, timeout=GROUP_TIMEOUT)
    for case, (experts_dtype, router_params, router_dtype, options, autocast) in EP_CASES.items():
        reference = mixed_layer(experts_dtype, router_params, router_dtype,
                                {k: v for k, v in options.items() if k != "exchange"})
        model = mixed_layer(experts_dtype, router_params, router_dtype, options, ep_group=groups)
        tokens = [7, 0, 5, 9][:world]
        xs = [inputs(experts_dtype, t, seed=20 + r) for r, t in enumerate(tokens)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, x_grad = run(model, *xs[rank])
            ref_y, _ = run(reference, torch.cat([x for x, _ in xs]), torch.cat([g for _, g in xs]))
        tol = HALF_TOL[torch.bfloat16]
        torch.testing.assert_close(y, ref_y.split(tokens)[rank], **tol, msg=lambda m: f"{case}: {m}")
        assert model.router.weight.grad.dtype == router_params
        grad = model.router.weight.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, reference.router.weight.grad, **tol, msg=lambda m: f"{case}: {m}")
        local = model.experts.global_experts
        for name in ("w_in", "w_out"):
            grad = getattr(model.experts, name).grad
            assert grad.dtype == experts_dtype
            torch.testing.assert_close(grad.double(), getattr(reference.experts, name).grad[list(local)].double(),
                                       **tol, msg=lambda m: f"{case} {name}: {m}")
    return True


def test_mixed_dtypes_and_autocast_on_two_expert_parallel_ranks():
    assert run_ranks(2, ep_worker) == [True, True]
