"""The layer shape and the one set of weights and inputs that every library gets.

Canonical layout (nn.Linear's ``[out, in]``, per global expert ``e``)::

    router [E, d_model]          logits = x @ router.T
    gate   [E, d_ffn, d_model]   up [E, d_ffn, d_model]   down [E, d_model, d_ffn]
    expert_e(x) = down_e(silu(gate_e(x)) * up_e(x))

Routing is Mixtral's: softmax over the E logits, top-k, the k weights divided by their sum
(= top-k-then-softmax), output = sum over the k experts of weight * expert(x).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerSpec:
    tokens: int = 4096  # per rank
    d_model: int = 512
    d_ffn: int = 1024
    experts: int = 16
    top_k: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    def capacity(self, factor: float, tokens: int | None = None) -> int:
        """moeflux's (and DeepSpeed's top-2) capacity: ceil(factor * tokens * top_k / E)."""
        return math.ceil(factor * (tokens or self.tokens) * self.top_k / self.experts)


@dataclass
class Weights:
    """Global weights in the canonical layout, float32 (cast by each adapter to its dtype)."""

    router: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]


def make_weights(spec: LayerSpec, seed: int = 0) -> Weights:
    """nn.Linear-like init (U(+-1/sqrt(fan_in))) for the experts; the router a little sharper (std 1/sqrt(d) *
    2, so the softmax is not nearly uniform and routing is not at a near-tie for most tokens)."""
    g = torch.Generator().manual_seed(seed)
    d, f, e = spec.d_model, spec.d_ffn, spec.experts

    def uniform(shape, fan_in):
        bound = 1 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=g)

    router = torch.randn(e, d, generator=g) * (2 / math.sqrt(d))
    return Weights(router, uniform((e, f, d), d), uniform((e, f, d), d), uniform((e, d, f), f))


@dataclass
class Inputs:
    x: Tensor  # [tokens, d_model] float32
    grad_out: Tensor  # [tokens, d_model] float32: the fixed output gradient (loss = sum(out * grad_out))


def make_inputs(spec: LayerSpec, rank: int = 0, skew: float = 0.25, seed: int = 1000) -> Inputs:
    """This rank's tokens and output gradient (every rank has its own): ``x = N(0, 1) + mu`` with one shared
    offset ``mu = skew * N(0, I)`` (the same on every rank), which gives the router a per-expert bias and so a
    realistically uneven load (skew 0.25 with the default router: the busiest of 16 experts gets ~1.7x the
    mean, and capacity 1.25 drops ~6% of the slots; skew 0: ~1.1x and no drops)."""
    mu = torch.randn(spec.d_model, generator=torch.Generator().manual_seed(seed - 1)) * skew
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(spec.tokens, spec.d_model, generator=g) + mu
    grad_out = torch.randn(spec.tokens, spec.d_model, generator=g)
    return Inputs(x, grad_out)


def local_experts(num_experts: int, ep_size: int, ep_rank: int) -> list[int]:
    """The contiguous block of global experts a rank holds (moeflux, torchtitan and DeepSpeed all use it)."""
    n = num_experts // ep_size
    return list(range(ep_rank * n, (ep_rank + 1) * n))
