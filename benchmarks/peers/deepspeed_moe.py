"""DeepSpeed-MoE (``deepspeed.moe.layer.MoE``, GShard's top-2 gate) with the shared weights.

- ``top2_2nd_expert_sampling=False``: DeepSpeed's default adds Gumbel noise to the logits before picking the
  2nd expert; off, the 2nd expert is the argmax of the rest (Mixtral's top-2).
- Weights: softmax over E, then the two kept gates divided by their sum *after* the capacity cut (a token
  whose 2nd slot was dropped gets weight 1 on its 1st expert). moeflux, GShard's paper and HF normalise
  before the cut (the dropped slot just contributes nothing), so with a capacity the outputs agree only on
  tokens that lost no slot. Dropless (``drop_tokens=False``) they should agree everywhere.
- Capacity ``ceil(tokens / E * 2 * factor)`` (= moeflux's), slots kept by position: all 1st choices in token
  order, then the 2nd choices (= moeflux's drop_policy="position"). Dropless pads every expert to the
  largest expert's count (under expert parallelism: the largest over the ep group, an all-reduce), and the
  experts run on that padded [E, capacity, d] buffer.
- Experts: ``Experts`` deep-copies one expert module per local expert; ours is a bias-free SwiGLU (below).
- The router computes its logits in float32 whatever the model dtype (``input.float()``, ``wg.weight.float()``).
- Needs torch.distributed (even for one rank) and ``DS_ACCELERATOR=cpu`` on a machine without a GPU;
  expert parallelism: ``MoE(ep_size=2)`` + ``set_deepspeed_parallelism()`` after ``deepspeed.init_distributed``.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PeerLayer, Unavailable
from .spec import LayerSpec, Weights


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ffn, bias=False)
        self.up = nn.Linear(d_model, d_ffn, bias=False)
        self.down = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


_store_dir = None


def _import():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import logging

        import deepspeed
        from deepspeed.moe.layer import MoE

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"deepspeed not importable: {type(e).__name__}: {e}") from e
    return deepspeed, MoE


def ensure_distributed() -> None:
    """DeepSpeed-MoE needs torch.distributed even on one process: a 1-rank gloo world if none is up."""
    global _store_dir
    deepspeed, _ = _import()
    if not dist.is_initialized():
        _store_dir = tempfile.TemporaryDirectory()
        dist.init_process_group("gloo", init_method=f"file://{_store_dir.name}/store", rank=0, world_size=1)
    try:
        deepspeed.init_distributed(dist_backend="gloo")
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"deepspeed.init_distributed(gloo) failed: {type(e).__name__}: {e}") from e


class DeepSpeedLayer(PeerLayer):
    def __init__(self, spec: LayerSpec, weights: Weights, dtype=torch.float32, capacity_factor: float | None = None,
                 ep_size: int = 1, label: str | None = None) -> None:
        deepspeed, MoE = _import()
        ensure_distributed()
        ep_rank = dist.get_rank() % ep_size if ep_size > 1 else 0
        local = spec.experts // ep_size
        held = list(range(ep_rank * local, (ep_rank + 1) * local))
        dropless = capacity_factor is None
        try:
            self.module = MoE(spec.d_model, SwiGLU(spec.d_model, spec.d_ffn), num_experts=spec.experts,
                              ep_size=ep_size, k=spec.top_k, capacity_factor=capacity_factor or 1.0,
                              eval_capacity_factor=capacity_factor or 1.0, min_capacity=0, drop_tokens=not dropless,
                              use_rts=False, top2_2nd_expert_sampling=False)
            self.module.set_deepspeed_parallelism()
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"deepspeed MoE(ep_size={ep_size}) not buildable: {type(e).__name__}: {e}") from e
        self.module.to(dtype)
        what = "dropless" if dropless else f"capacity {capacity_factor}"
        super().__init__(label or f"DeepSpeed-MoE {what}", dtype, held)
        self.version = deepspeed.__version__
        with torch.no_grad():
            self.module.deepspeed_moe.gate.wg.weight.copy_(weights.router)
            for slot, e in enumerate(held):
                ex = self._experts()[slot]
                ex.gate.weight.copy_(weights.gate[e])
                ex.up.weight.copy_(weights.up[e])
                ex.down.weight.copy_(weights.down[e])

    def _experts(self) -> nn.ModuleList:
        return self.module.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)[0]

    def canonical_grads(self) -> dict[str, Tensor]:
        ex = self._experts()

        def stack(name: str) -> Tensor:
            return torch.stack([getattr(m, name).weight.grad.float() for m in ex])

        return {**self._x_grad(), "router": self.module.deepspeed_moe.gate.wg.weight.grad.float(),
                "gate": stack("gate"), "up": stack("up"), "down": stack("down")}
