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
    k weights by their sum; ``scale`` multiplies them. DeepSeek-V3 routing adds
    ``expert_bias=True`` (a buffer ``expert_bias [E]`` added to the scores for the
    choice only, adjusted by the training loop rather than by gradients) and
    group-limited choice (``num_groups``, ``top_groups``). ``logits_dtype``
    computes the logits in that dtype (e.g. float32 for a bfloat16 model).

    Training-time exploration (both off by default):
      * ``jitter``: multiply the input by ``U(1 - jitter, 1 + jitter)`` (Switch Transformer);
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
        expert_bias: bool = False,
        num_groups: int = 1,
        top_groups: int = 1,
        scale: float = 1.0,
        logits_dtype: torch.dtype | None = None,
        jitter: float = 0.0,
        noisy_gating: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if jitter < 0 or jitter >= 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        if num_groups < 1 or num_experts % num_groups or not 1 <= top_groups <= num_groups:
            raise ValueError(f"num_groups must divide num_experts ({num_experts}) and top_groups be in "
                             f"[1, num_groups], got num_groups={num_groups}, top_groups={top_groups}")
        if top_k > top_groups * (num_experts // num_groups):
            raise ValueError(f"top_k={top_k} exceeds the {top_groups * (num_experts // num_groups)} experts of "
                             f"top_groups={top_groups} groups")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.num_experts, self.top_k, self.renormalize, self.jitter = num_experts, top_k, renormalize, jitter
        self.scoring, self.num_groups, self.top_groups, self.scale = scoring, num_groups, top_groups, scale
        self.logits_dtype = logits_dtype
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.noise_weight = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if noisy_gating else None
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device) if expert_bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        if self.logits_dtype is not None:
            logits = F.linear(x.to(self.logits_dtype), self.weight.to(self.logits_dtype))
        else:
            logits = F.linear(x, self.weight)
        if self.training and self.noise_weight is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise_weight).to(logits.dtype))
        weights, expert_ids = ops.route(logits, self.top_k, self.renormalize, self.scoring, self.expert_bias,
                                        self.num_groups, self.top_groups, self.scale)
        return Routing(logits, weights, expert_ids)

    def extra_repr(self) -> str:
        extra = ""
        if self.scoring != "softmax" or self.expert_bias is not None or self.num_groups > 1 or self.scale != 1:
            extra = (f", scoring={self.scoring}, expert_bias={self.expert_bias is not None}, "
                     f"groups={self.top_groups}/{self.num_groups}, scale={self.scale}")
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"jitter={self.jitter}, noisy_gating={self.noise_weight is not None}{extra}"
        )
