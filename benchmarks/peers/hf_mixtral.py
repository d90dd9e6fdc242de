"""transformers' MixtralSparseMoeBlock with the shared weights.

transformers 5 picks the experts' forward from ``config._experts_implementation`` at every call
(``@use_experts_implementation`` on MixtralExperts -> ``ALL_EXPERTS_FUNCTIONS.get_interface``): "eager" is the
per-expert Python loop of the modeling file, "grouped_mm" is ``integrations.moe.grouped_mm_experts_forward``
(sort by expert, ``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``, which has a CPU kernel in torch >=
2.9). A model sets it through ``from_pretrained(..., experts_implementation=...)`` or
``model.set_experts_implementation``; a bare block has no model, so we set the config attribute (the block
reads it at call time; left at None the interface raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PeerLayer, Unavailable
from .spec import LayerSpec, Weights

IMPLEMENTATIONS = ("eager", "grouped_mm")


class HFMixtralLayer(PeerLayer):
    def __init__(self, spec: LayerSpec, weights: Weights, implementation: str, dtype=torch.float32) -> None:
        try:
            import transformers
            from transformers.models.mixtral.configuration_mixtral import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"transformers Mixtral not importable: {type(e).__name__}: {e}") from e
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(implementation)
        config = MixtralConfig(hidden_size=spec.d_model, intermediate_size=spec.d_ffn,
                               num_local_experts=spec.experts, num_experts_per_tok=spec.top_k,
                               router_jitter_noise=0.0, hidden_act="silu")
        config._experts_implementation = implementation
        self.module = MixtralSparseMoeBlock(config).to(dtype)
        super().__init__(f"HF Mixtral {implementation}", dtype, list(range(spec.experts)))
        self.version = transformers.__version__
        with torch.no_grad():
            self.module.gate.weight.copy_(weights.router)
            self.module.experts.gate_up_proj.copy_(torch.cat([weights.gate, weights.up], dim=1))  # [E, 2F, d]
            self.module.experts.down_proj.copy_(weights.down)  # [E, d, F]
        self.d_ffn = spec.d_ffn

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.unsqueeze(0)).squeeze(0)

    def canonical_grads(self) -> dict[str, Tensor]:
        gu = self.module.experts.gate_up_proj.grad.float()
        return {**self._x_grad(), "router": self.module.gate.weight.grad.float(), "gate": gu[:, :self.d_ffn],
                "up": gu[:, self.d_ffn:], "down": self.module.experts.down_proj.grad.float()}
