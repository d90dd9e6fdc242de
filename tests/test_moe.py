import pytest
import torch

import moeflux
import reference
from conftest import DEVICES


def make_moe(device, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(d_model=12, d_ffn=10, num_experts=4, top_k=2)
    config.update(kwargs)
    return moeflux.MoE(**config).to(device=device, dtype=dtype)


CONFIGS = [
    dict(),
    dict(top_k=1),
    dict(top_k=4),
    dict(num_experts=1, top_k=1),
    dict(activation="gelu"),
    dict(renormalize=True),
    dict(capacity_factor=1.0),
    dict(capacity_factor=0.5, drop_policy="probability"),
    dict(capacity_factor=2.0, top_k=1, activation="gelu"),
    # GPT-OSS: router bias, expert biases, the clamped SwiGLU (a limit the values reach)
    dict(activation="clamped_swiglu", swiglu_limit=0.3, expert_bias=True, router_bias=True, renormalize=True),
    dict(expert_bias=True, capacity_factor=1.0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_moe_matches_naive_per_expert_loop(config, device):
    moe = make_moe(device, **config)
    x = torch.randn(3, 7, 12, dtype=torch.float64, device=device, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference.moe(moe, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)

    grad = torch.randn_like(y)
    params = [p for p in moe.parameters()]
    grads = torch.autograd.grad(y, [x, *params], grad, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], grad, allow_unused=True)
    names = ["input"] + [n for n, _ in moe.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        g = torch.zeros_like(g_ref) if g is None else g
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-9, msg=lambda m: f"gradient of {name}: {m}")


def test_expert_biases_are_saved_per_expert_and_refused_where_unsupported():
    moe = make_moe("cpu", expert_bias=True, router_bias=True, activation="clamped_swiglu")
    assert {k for k in moe.state_dict() if k.startswith("experts.2.")} == {
        "experts.2.w_in", "experts.2.w_out", "experts.2.b_in", "experts.2.b_out"}
    assert "router.bias" in moe.state_dict()
    other = make_moe("cpu", seed=1, expert_bias=True, router_bias=True, activation="clamped_swiglu")
    other.load_state_dict(moe.state_dict())
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(other(x), moe(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="swiglu_limit must be"):
        moeflux.MoE(12, 10, 4, activation="clamped_swiglu", swiglu_limit=0.0)
    # expert biases work with shadowing (without a group it changes nothing; test_shadowing checks a group)
    shadowed = make_moe("cpu", expert_bias=True, router_bias=True, activation="clamped_swiglu",
                        exchange=moeflux.ExchangeConfig(shadowing=1))
    torch.testing.assert_close(shadowed(x), moe(x), rtol=0, atol=0)


# (top_k, capacity): 10 tokens, 4 experts, f = 1; a formula without top_k or rounding down gives 3 or 2 slots
@pytest.mark.parametrize("top_k,capacity", [(1, 3), (2, 5)])
def test_moe_every_token_to_one_expert_with_capacity(top_k, capacity, device):
    moe = make_moe(device, capacity_factor=1.0, top_k=top_k)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3], moe.router.weight[0] = 1.0, 0.5
    x = torch.rand(10, 12, dtype=torch.float64, device=device) + 0.1  # positive: expert 3 first, expert 0 second
    y = moe(x)
    assert capacity == reference.capacity_for(1.0, 10, top_k, 4)
    assert moe.tokens_per_expert.tolist() == ([0, 0, 0, capacity] if top_k == 1 else [capacity, 0, 0, capacity])
    if top_k == 1:
        assert (y[capacity:] == 0).all()  # dropped tokens get no expert output
    torch.testing.assert_close(y, reference.moe(moe, x))


# Fractional f * T * k / E (rounding up matters) and top_k > 1 (k matters) for every factor.
@pytest.mark.parametrize("factor,num_tokens,top_k,num_experts", [
    (1.0, 21, 2, 4), (1.25, 7, 3, 8), (0.5, 9, 2, 4), (2.0, 5, 4, 6), (1.0, 1, 1, 4)])
def test_moe_capacity_is_the_documented_formula(factor, num_tokens, top_k, num_experts):
    moe = moeflux.MoE(4, 4, num_experts, top_k, capacity_factor=factor)
    assert moe.capacity(num_tokens) == reference.capacity_for(factor, num_tokens, top_k, num_experts)
    assert moeflux.MoE(4, 4, num_experts, top_k).capacity(num_tokens) is None  # dropless


def test_moe_zero_tokens(device):
    moe = make_moe(device)
    x = torch.zeros(0, 12, dtype=torch.float64, device=device, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, 12)
    (y.sum() + moe.aux_loss).backward()
    assert x.grad.shape == (0, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_low_precision_close_to_float64(dtype, device):
    moe = make_moe(device, dtype=torch.float64)
    x = torch.randn(64, 12, dtype=torch.float64, device=device)
    expected = moe(x)
    ids64 = moeflux.ops.route(moe.router(x).logits, moe.top_k)[1]
    y = moe.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    # Tokens whose experts differ after rounding are compared by nothing but their count.
    same = (moe.router(x.to(dtype)).expert_ids == ids64).all(-1)
    assert same.float().mean() > 0.9
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double()[same], expected[same], atol=tol, rtol=tol)


def test_moe_aux_loss_trains_balance(device):
    moe = make_moe(device, dtype=torch.float32, aux_loss_weight=1.0, z_loss_weight=1e-3)
    x = torch.randn(128, 12, device=device)
    moe(x)
    assert moe.aux_loss.requires_grad and moe.aux_loss.ndim == 0
    model = torch.nn.Sequential(moe, torch.nn.Linear(12, 12), make_moe(device, dtype=torch.float32, seed=1))
    model(x)
    torch.testing.assert_close(moeflux.aux_loss(model), model[0].aux_loss + model[2].aux_loss)


def test_moe_state_dict_round_trip(device):
    moe = make_moe(device, noisy_gating=True)
    keys = set(moe.state_dict())
    assert keys == {"router.weight", "router.noise_weight"} | {f"experts.{e}.{w}" for e in range(4) for w in ("w_in", "w_out")}
    other = make_moe(device, seed=7, noisy_gating=True)
    other.load_state_dict(moe.state_dict())
    x = torch.randn(5, 12, dtype=torch.float64, device=device)
    moe.eval(), other.eval()
    torch.testing.assert_close(other(x), moe(x), atol=0, rtol=0)


def identity_router(device, **noise):
    """A router over 4 experts of a 4-wide input with the identity as its weight: its logits are its input,
    so the noise it adds can be read back from them."""
    router = make_moe(device, d_model=4, num_experts=4, **noise).router
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    return router


def noisy_logits(router, x, seed):
    """The training-mode logits for `x` with the global generator at `seed` (the noise's draw)."""
    router.train()
    torch.manual_seed(seed)
    return router(x).logits.detach()


def test_router_jitter_multiplies_the_input_by_uniform_noise(device):
    jitter = 0.1
    router = identity_router(device, router_jitter=jitter)
    x = torch.randn(2000, 4, dtype=torch.float64, device=device)
    logits = noisy_logits(router, x, seed=5)
    torch.manual_seed(5)  # the same draw: x * U(1 - j, 1 + j), element by element
    expected = x * torch.empty_like(x).uniform_(1 - jitter, 1 + jitter)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=0)
    factor = logits / x  # the multiplier itself: uniform on [1 - j, 1 + j]
    assert factor.min() >= 1 - jitter and factor.max() <= 1 + jitter
    assert factor.min() < 1 - 0.95 * jitter and factor.max() > 1 + 0.95 * jitter
    assert abs(float(factor.mean()) - 1) < 0.01 and abs(float(factor.std()) - jitter / 3**0.5) < 0.005


def test_noisy_gating_adds_gaussian_noise_scaled_by_softplus(device):
    router = identity_router(device, noisy_gating=True)
    with torch.no_grad():
        router.noise_weight.copy_(torch.randn(4, 4, dtype=torch.float64))
    x = torch.randn(2000, 4, dtype=torch.float64, device=device)
    logits = noisy_logits(router, x, seed=6)
    scale = torch.nn.functional.softplus(x @ router.noise_weight.detach().t())
    torch.manual_seed(6)  # the same draw: x @ W + N(0, 1) * softplus(x @ W_noise)
    torch.testing.assert_close(logits, x + torch.randn_like(x) * scale, rtol=1e-12, atol=1e-12)
    noise = (logits - x) / scale  # standard normal
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05


def test_moe_training_noise_only_in_training(device):
    moe = make_moe(device, router_jitter=0.1, noisy_gating=True)
    with torch.no_grad():
        moe.router.noise_weight.fill_(0.5)
    x = torch.randn(20, 12, dtype=torch.float64, device=device)
    plain = x @ moe.router.weight.t()
    assert not torch.equal(noisy_logits(moe.router, x, seed=7), plain)
    moe.eval()
    assert torch.equal(moe.router(x).logits, plain) and torch.equal(moe(x), moe(x))


def test_moe_works_as_mlp_in_a_transformer_layer(device):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).to(device)
    moe = moeflux.MoE(16, 32, num_experts=4, top_k=2).to(device)
    x = torch.randn(2, 5, 16, device=device)
    h = layer.norm1(x + layer._sa_block(x, None, None))
    out = layer.norm2(h + moe(h))
    (out.square().mean() + moeflux.aux_loss(moe)).backward()
    assert all(p.grad is not None for p in moe.parameters())


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("config", CONFIGS[:7], ids=str)
def test_moe_cuda_matches_cpu(config):
    moe = make_moe("cpu", dtype=torch.float32, **config)
    x = torch.randn(256, 12)
    y = moe(x)
    y_gpu = moe.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y, atol=1e-5, rtol=1e-5)
