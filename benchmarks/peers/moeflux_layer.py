"""moeflux.MoE with the shared weights: Mixtral routing (renormalize=True), SwiGLU experts, no aux loss in the
loss (aux_loss_weight=0; the layer still computes the load-balancing statistic in forward, as it always does)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PeerLayer
from .spec import LayerSpec, Weights


class MoefluxLayer(PeerLayer):
    def __init__(self, spec: LayerSpec, weights: Weights, dtype=torch.float32, capacity_factor: float | None = None,
                 ep_group=None, schedule: str = "bulk", label: str = "moeflux", experts: int | None = None) -> None:
        import moeflux

        num_experts = experts or spec.experts
        self.module = moeflux.MoE(spec.d_model, spec.d_ffn, num_experts, spec.top_k, capacity_factor,
                                  renormalize=True, aux_loss_weight=0.0, ep_group=ep_group,
                                  exchange=moeflux.ExchangeConfig(schedule=schedule), dtype=dtype)
        held = list(self.module.placement.experts_of())
        super().__init__(label, dtype, held)
        with torch.no_grad():
            self.module.router.weight.copy_(weights.router)
            # w_in [E_local, d, 2F]: gate columns first, then up (expert_ffn's SwiGLU: silu(gate) * up)
            w_in = torch.cat([weights.gate[held], weights.up[held]], dim=1).transpose(1, 2)
            self.module.experts.w_in.copy_(w_in)
            self.module.experts.w_out.copy_(weights.down[held].transpose(1, 2))  # [E_local, F, d]

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def canonical_grads(self) -> dict[str, Tensor]:
        f = self.module.d_ffn
        w_in, w_out = self.module.experts.w_in.grad.float(), self.module.experts.w_out.grad.float()
        return {**self._x_grad(), "router": self.module.router.weight.grad.float(),
                "gate": w_in[:, :, :f].transpose(1, 2), "up": w_in[:, :, f:].transpose(1, 2),
                "down": w_out.transpose(1, 2)}

    def tokens_per_expert(self) -> Tensor:
        """Rows per local expert of the last forward (int32), what the expert GEMMs ran over."""
        return self.module.tokens_per_expert.to(torch.int32)

    def dropped_tokens(self, x: Tensor) -> Tensor:
        """[T] bool: tokens that lost at least one of their top-k slots to the capacity (public ops only)."""
        import moeflux

        m = self.module
        cap = m.capacity(x.shape[0])
        with torch.no_grad():
            routing = m.router(x.to(self.dtype))
            if cap is None:
                return torch.zeros(x.shape[0], dtype=torch.bool)
            ids = moeflux.ops.apply_capacity(routing.expert_ids, routing.weights, m.num_experts, cap, False)
        return (ids < 0).any(dim=-1)
