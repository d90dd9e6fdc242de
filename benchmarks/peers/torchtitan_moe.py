"""torchtitan's MoE (torchtitan.models.common.moe in torchtitan 0.3: TokenChoiceTopKRouter + RoutedExperts =
token dispatcher + GroupedExperts) with the shared weights.

Router: softmax scores, top-k, ``route_norm=True`` (the k scores divided by their sum = Mixtral's weights);
``load_balance_coeff=None`` (no expert-bias buffer: it would be zeros anyway). Experts: w1 = gate, w3 = up
[E, F, d], w2 = down [E, d, F]; ``torch._grouped_mm`` over the expert-sorted rows.

As shipped, ``GroupedExperts.forward`` casts its input and weights to bfloat16 whatever the model dtype
("stock bf16 experts"); :class:`FP32GroupedExperts` is the same forward without those casts (our subclass:
torchtitan has no option for it), so that fp32 can be compared at fp32 precision.

Expert parallelism: ``AllToAllTokenDispatcher`` wired to a 1-D CPU device mesh of the ep ranks
(``wire_meshes(ep_mesh=...)``, what ``RoutedExperts.parallelize`` does), with the SPMD backend set to
"partial_dtensor" (the default "spmd_types" backend expects torchtitan's trainer to have registered meshes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PeerLayer, Unavailable
from .spec import LayerSpec, Weights


def _import():
    # TokenChoiceTopKRouter runs its gate under torch.autocast(dtype=float32), which CPU autocast rejects with a
    # warning (and no effect) at every forward; said once in the report's caveats instead.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    try:
        import torchtitan
        from torchtitan.distributed import utils as dist_utils
        from torchtitan.models.common import moe as tt_moe
        from torchtitan.models.common import token_dispatcher as tt_dispatch
        from torchtitan.models.common.linear import Linear
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"torchtitan not importable: {type(e).__name__}: {e}") from e
    return torchtitan, dist_utils, tt_moe, tt_dispatch, Linear


_FP32_CLASS = None


def fp32_grouped_experts_class():
    """GroupedExperts whose forward keeps the input dtype (no bfloat16 casts); built lazily (torchtitan is
    optional)."""
    global _FP32_CLASS
    if _FP32_CLASS is None:
        _, _, tt_moe, _, _ = _import()

        class FP32GroupedExperts(tt_moe.GroupedExperts):
            @dataclass(kw_only=True, slots=True)
            class Config(tt_moe.GroupedExperts.Config):
                pass

            def forward(self, x_RD: Tensor, num_tokens_per_expert_E: Tensor) -> Tensor:
                offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
                h = F.silu(self._grouped_mm(A=x_RD, B_t=self.w1_EFD.transpose(-2, -1), offs=offsets_E))
                h = h * self._grouped_mm(A=x_RD, B_t=self.w3_EFD.transpose(-2, -1), offs=offsets_E)
                return self._grouped_mm(A=h, B_t=self.w2_EDF.transpose(-2, -1), offs=offsets_E)

        _FP32_CLASS = FP32GroupedExperts
    return _FP32_CLASS


class TorchtitanLayer(PeerLayer):
    def __init__(self, spec: LayerSpec, weights: Weights, dtype=torch.float32, stock_bf16_experts: bool = True,
                 ep_mesh=None, label: str | None = None) -> None:
        torchtitan, dist_utils, tt_moe, tt_dispatch, Linear = _import()
        dist_utils.set_spmd_backend("partial_dtensor")
        ep_size = ep_mesh.size() if ep_mesh is not None else 1
        ep_rank = ep_mesh.get_local_rank() if ep_mesh is not None else 0
        local = spec.experts // ep_size
        held = list(range(ep_rank * local, (ep_rank + 1) * local))
        experts_cls = tt_moe.GroupedExperts if stock_bf16_experts else fp32_grouped_experts_class()
        dispatcher = (tt_dispatch.AllToAllTokenDispatcher.Config if ep_mesh is not None
                      else tt_dispatch.LocalTokenDispatcher.Config)(num_experts=spec.experts, top_k=spec.top_k)
        config = tt_moe.MoE.Config(
            num_experts=spec.experts,
            routed_experts=tt_moe.RoutedExperts.Config(
                inner_experts=experts_cls.Config(dim=spec.d_model, hidden_dim=spec.d_ffn, num_experts=local),
                token_dispatcher=dispatcher),
            router=tt_moe.TokenChoiceTopKRouter.Config(
                num_experts=spec.experts, gate=Linear.Config(in_features=spec.d_model, out_features=spec.experts),
                top_k=spec.top_k, score_func="softmax", route_norm=True),
            load_balance_coeff=None,
        )
        self.module = config.build().to(dtype)
        if ep_mesh is not None:
            self.module.routed_experts.token_dispatcher.wire_meshes(ep_mesh=ep_mesh)
        kind = "stock bf16 experts" if stock_bf16_experts else "fp32 experts"
        super().__init__(label or f"torchtitan ({kind})", dtype, held)
        self.version = getattr(torchtitan, "__version__", "?")
        inner = self.module.routed_experts.inner_experts
        with torch.no_grad():
            self.module.router.gate.weight.copy_(weights.router)
            inner.w1_EFD.copy_(weights.gate[held])
            inner.w3_EFD.copy_(weights.up[held])
            inner.w2_EDF.copy_(weights.down[held])

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.unsqueeze(0)).squeeze(0)

    def canonical_grads(self) -> dict[str, Tensor]:
        inner = self.module.routed_experts.inner_experts
        return {**self._x_grad(), "router": self.module.router.gate.weight.grad.float(),
                "gate": inner.w1_EFD.grad.float(), "up": inner.w3_EFD.grad.float(), "down": inner.w2_EDF.grad.float()}
