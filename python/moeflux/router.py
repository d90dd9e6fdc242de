"""The gate: a linear layer, optional training noise, and the fused route op."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops


class Routing(NamedTuple):
    logits: Tensor  # [T, E]
    weights: Tensor  # [T, k], float32
    expert_ids: Tensor  # [T, k], int32


class Router(nn.Module):
    """Linear gate ``[d_model] -> [num_experts]`` followed by the route op (scoring + top-k).

    ``scoring`` is ``"softmax"`` or ``"sigmoid"``; ``renormalize`` divides the
    k weights by their sum; ``routed_scaling_factor`` multiplies them (the route
    op's ``scale``). DeepSeek-V3 routing adds ``use_expert_bias=True`` (a buffer
    ``expert_bias [E]`` added to the scores for the choice only, adjusted by the
    training loop rather than by gradients) and group-limited choice
    (``num_groups``, ``top_groups``; a group's score is the sum of its
    ``group_score_top`` best scores: 2 in DeepSeek-V3, 1 in DeepSeek-V2's
    ``group_limited_greedy``). ``router_dtype`` is the dtype the logits are
    computed in (Megatron-Core's ``moe_router_dtype``; e.g. float32 for a
    bfloat16 model), also under autocast; ``None``: the router's own weight
    dtype, or autocast's where it is on. The router's parameters may be of
    another dtype than the input and the experts: DeepSeek-style checkpoints
    keep the gate and its correction bias in float32 (transformers'
    ``_keep_in_fp32_modules_strict``) next to bfloat16 experts; the input is
    cast to the router's dtype first. :class:`moeflux.MoE` takes
    the same options under the same names (``bias``: ``router_bias``, a bias on
    the logits, GPT-OSS).

    Training-time exploration (both off by default):
      * ``router_jitter``: multiply the input by ``U(1 - jitter, 1 + jitter)`` (Switch Transformer);
      * ``noisy_gating``: add ``N(0, 1) * softplus(x @ W_noise)`` to the logits (noisy top-k,
        Shazeer et al. 2017), with a learned ``W_noise`` initialised to zero.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = False,
        scoring: str = "softmax",
        use_expert_bias: bool = False,
        num_groups: int = 1,
        top_groups: int = 1,
        group_score_top: int = 2,
        routed_scaling_factor: float = 1.0,
        router_dtype: torch.dtype | None = None,
        router_jitter: float = 0.0,
        noisy_gating: bool = False,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if router_jitter < 0 or router_jitter >= 1:
            raise ValueError(f"router_jitter must be in [0, 1), got {router_jitter}")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        if num_groups < 1 or num_experts % num_groups or not 1 <= top_groups <= num_groups:
            raise ValueError(f"num_groups must divide num_experts ({num_experts}) and top_groups be in "
                             f"[1, num_groups], got num_groups={num_groups}, top_groups={top_groups}")
        if top_k > top_groups * (num_experts // num_groups):
            raise ValueError(f"top_k={top_k} exceeds the {top_groups * (num_experts // num_groups)} experts of "
                             f"top_groups={top_groups} groups")
        if not isinstance(group_score_top, int) or group_score_top < 1:
            raise ValueError(f"group_score_top must be an int >= 1, got {group_score_top!r}")
        if not routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {routed_scaling_factor}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.router_jitter = router_jitter
        self.scoring, self.num_groups, self.top_groups = scoring, num_groups, top_groups
        self.group_score_top = group_score_top
        self.routed_scaling_factor, self.router_dtype = routed_scaling_factor, router_dtype
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, **factory)) if bias else None
        self.noise_weight = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if noisy_gating else None
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device) if use_expert_bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        if self.bias is not None:
            bound = 1 / self.weight.shape[1] ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.router_jitter, 1 + self.router_jitter)
        logits = self.logits(x)
        if self.training and self.noise_weight is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise_weight).to(logits.dtype))
        weights, expert_ids = ops.route(logits, self.top_k, self.renormalize, self.scoring, self.expert_bias,
                                        self.num_groups, self.top_groups, self.routed_scaling_factor,
                                        self.group_score_top)
        return Routing(logits, weights, expert_ids)

    def logits(self, x: Tensor) -> Tensor:
        """``[T, E]``: the router's logits for ``x`` before any training noise: in ``router_dtype`` if set (autocast
        cannot lower it), else in the router weight's dtype (or autocast's, where it is on)."""
        if self.router_dtype is None:  # the weight and bias share a dtype: they are moved together
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        dtype, bias = self.router_dtype, self.bias.to(self.router_dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype), bias)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """``[T, top_k]`` int32: the experts ``forward`` would choose for ``x`` without its training noise
        (jitter, noisy gating): no gradient, no random numbers drawn, no forward hooks run (what
        :class:`moeflux.SamplePlacement` plans the next layer's traffic with)."""
        return ops.route(self.logits(x), self.top_k, self.renormalize, self.scoring, self.expert_bias,
                         self.num_groups, self.top_groups, self.routed_scaling_factor, self.group_score_top)[1]

    def extra_repr(self) -> str:
        extra = ""
        if (self.scoring != "softmax" or self.expert_bias is not None or self.num_groups > 1
                or self.routed_scaling_factor != 1):
            extra = (f", scoring={self.scoring}, use_expert_bias={self.expert_bias is not None}, "
                     f"groups={self.top_groups}/{self.num_groups} (by top-{self.group_score_top}), routed_scaling_factor={self.routed_scaling_factor}")
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"router_jitter={self.router_jitter}, noisy_gating={self.noise_weight is not None}{extra}"
        )
