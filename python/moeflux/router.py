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
    """Linear gate ``[d_model] -> [num_experts]`` followed by softmax + top-k.

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
        jitter: float = 0.0,
        noisy_gating: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if jitter < 0 or jitter >= 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.num_experts, self.top_k, self.renormalize, self.jitter = num_experts, top_k, renormalize, jitter
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.noise_weight = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if noisy_gating else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = F.linear(x, self.weight)
        if self.training and self.noise_weight is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise_weight))
        weights, expert_ids = ops.route(logits, self.top_k, self.renormalize)
        return Routing(logits, weights, expert_ids)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"jitter={self.jitter}, noisy_gating={self.noise_weight is not None}"
        )
