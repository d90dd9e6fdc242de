"""Expert FFNs evaluated over the contiguous per-expert segments of permute's output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

ACTIVATIONS = ("swiglu", "gelu")


class GroupedExperts(nn.Module):
    """``num_experts`` two-layer FFNs with weights stacked per expert.

    ``w_in [E, d_model, F_in]`` and ``w_out [E, d_ffn, d_model]`` with
    ``F_in = 2 * d_ffn`` for SwiGLU (gate and up projections side by side) and
    ``d_ffn`` for GELU. Initialised like ``nn.Linear``:
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ffn: int,
        activation: str = "swiglu",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.d_model, self.d_ffn, self.activation = num_experts, d_model, d_ffn, activation
        factory = {"device": device, "dtype": dtype}
        in_features = 2 * d_ffn if activation == "swiglu" else d_ffn
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, in_features, **factory))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ffn, d_model, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.d_ffn), 1 / math.sqrt(self.d_ffn))

    def _activate(self, h: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def forward(self, rows: Tensor, tokens_per_expert: Tensor, capacity: int | None = None) -> Tensor:
        """``rows [N, d_model]`` grouped by expert → ``[N, d_model]``.

        Dropless: expert ``e``'s rows are the ``tokens_per_expert[e]`` rows after
        those of experts ``< e``. With a capacity every expert owns ``capacity``
        rows (zero padding past its count), so a batched matmul does the work.
        """
        if capacity is not None:
            h = torch.bmm(rows.view(self.num_experts, capacity, self.d_model), self.w_in)
            out = torch.bmm(self._activate(h), self.w_out)
            return out.view(-1, self.d_model)
        h = ops.grouped_mm(rows, self.w_in, tokens_per_expert)
        return ops.grouped_mm(self._activate(h), self.w_out, tokens_per_expert)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ffn={self.d_ffn}, activation={self.activation}"
