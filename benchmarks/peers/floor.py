"""The floor: the layer's expert GEMMs alone, forward + backward, over the same per-expert segment sizes; and
moeflux's expert FFN op alone (GEMMs + SwiGLU, no routing, permutation or combine).

Per step: ``h = X @ W_in[e]`` ([rows, d] x [d, 2F], gate and up fused as in moeflux) and ``y = A @ W_out[e]``
([rows, F] x [F, d]) per expert segment, then backward with fixed output gradients: dX, dW_in, dA, dW_out.
The layer's six expert GEMMs (2 forward, 4 backward); no routing, permutation, activation or combine. ``A`` is an
independent input, not silu(gate) * up, so the activation is not in the floor.

Two implementations: ``torch._grouped_mm`` (torch's grouped GEMM; CPU kernel since torch 2.9) and
``moeflux.ops.grouped_mm`` (moeflux's own, what its layer calls), so that
``layer - floor(moeflux.ops.grouped_mm)`` is exactly moeflux's time outside its expert GEMMs.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLEMENTATIONS = ("torch._grouped_mm", "moeflux.ops.grouped_mm")


class GemmFloor:
    def __init__(self, tokens_per_expert: Tensor, d_model: int, d_ffn: int, dtype=torch.float32,
                 implementation: str = "torch._grouped_mm", w_in: Tensor | None = None, w_out: Tensor | None = None,
                 seed: int = 5) -> None:
        """``w_in [E, d, 2F]`` / ``w_out [E, F, d]``: leaf tensors to use as the weights (e.g. the moeflux layer's
        own parameters, to save memory at large E: each step drops their gradients first, as the layer does);
        default: fresh ones."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(implementation)
        self.implementation, self.dtype = implementation, dtype
        self.label = f"GEMM floor ({implementation})"
        g = torch.Generator().manual_seed(seed)
        counts = tokens_per_expert.to(torch.int32).cpu()
        rows, experts = int(counts.sum()), counts.numel()

        def leaf(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(True)

        self.counts, self.offsets = counts, torch.cumsum(counts, 0, dtype=torch.int32)
        self.x, self.a = leaf(rows, d_model), leaf(rows, d_ffn)
        self.w_in = w_in if w_in is not None else leaf(experts, d_model, 2 * d_ffn, scale=d_model ** -0.5)
        self.w_out = w_out if w_out is not None else leaf(experts, d_ffn, d_model, scale=d_ffn ** -0.5)
        self.grad_h = torch.randn(rows, 2 * d_ffn, generator=g).to(dtype)
        self.grad_y = torch.randn(rows, d_model, generator=g).to(dtype)

    def _gmm(self, a: Tensor, w: Tensor) -> Tensor:
        if self.implementation == "torch._grouped_mm":
            return torch._grouped_mm(a, w, offs=self.offsets)
        import moeflux

        return moeflux.ops.grouped_mm(a, w, self.counts)

    def step(self) -> None:
        for t in (self.x, self.a, self.w_in, self.w_out):
            t.grad = None
        h = self._gmm(self.x, self.w_in)
        y = self._gmm(self.a, self.w_out)
        torch.autograd.backward([h, y], [self.grad_h, self.grad_y])

    def flops(self) -> float:
        rows, d, f = self.x.shape[0], self.x.shape[1], self.a.shape[1]
        return 3 * (2 * rows * d * 2 * f + 2 * rows * f * d)  # forward + 2x backward, both GEMMs


class ExpertFFNAlone:
    """``moeflux.ops.expert_ffn`` (both GEMMs and the SwiGLU between them, one op with its own backward) on
    random rows with the layer's weights and segment sizes, forward + backward: what the layer spends on its
    experts; the layer minus this is routing, permutation, combine and the Python around them. Needs a moeflux
    build that has the op (skipped otherwise)."""

    def __init__(self, tokens_per_expert: Tensor, w_in: Tensor, w_out: Tensor, seed: int = 6) -> None:
        import moeflux

        if not hasattr(moeflux.ops, "expert_ffn"):
            raise RuntimeError("this moeflux has no ops.expert_ffn")
        self.label, self.dtype = "moeflux.ops.expert_ffn alone (GEMMs + SwiGLU)", w_in.dtype
        g = torch.Generator().manual_seed(seed)
        self.counts = tokens_per_expert.to(torch.int32).cpu()
        rows = int(self.counts.sum())
        self.w_in, self.w_out = w_in, w_out
        self.x = torch.randn(rows, w_in.shape[1], generator=g).to(w_in.dtype).requires_grad_(True)
        self.grad_y = torch.randn(rows, w_out.shape[2], generator=g).to(w_in.dtype)

    def step(self) -> None:
        import moeflux

        for t in (self.x, self.w_in, self.w_out):
            t.grad = None
        y = moeflux.ops.expert_ffn(self.x, self.w_in, self.w_out, self.counts, "swiglu")
        y.backward(self.grad_y)
