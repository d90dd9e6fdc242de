"""A small pre-norm transformer over bytes with moeflux.MoE as every block's MLP."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

import moeflux


@dataclass(frozen=True)
class ModelConfig:
    layers: int = 2
    d_model: int = 128
    heads: int = 4
    d_ffn: int = 256
    experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    seq_len: int = 128

    def as_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ep: moeflux.ExpertParallelGroups | None,
                 exchange: moeflux.ExchangeConfig | None) -> None:
        super().__init__()
        d = config.d_model
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, config.heads, batch_first=True)
        self.mlp = moeflux.MoE(d, config.d_ffn, config.experts, config.top_k, config.capacity_factor, ep_group=ep,
                               exchange=exchange)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, placement: moeflux.SamplePlacement | None = None,
                order: moeflux.SampleOrder | None = None) -> tuple[torch.Tensor, moeflux.SampleOrder | None]:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        if placement is not None:  # whole samples (and their residual) move to where this layer's experts are
            x, order = placement.place(x, self.mlp, order, router_input=self.norm2(x))
        return x + self.mlp(self.norm2(x)), order


class ByteLM(nn.Module):
    def __init__(self, config: ModelConfig, ep: moeflux.ExpertParallelGroups | None = None,
                 exchange: moeflux.ExchangeConfig | None = None, sample_placement: moeflux.SamplePlacement | None = None) -> None:
        """``exchange``: how the MoE layers move tokens (a :class:`moeflux.ExchangeConfig`: transport, schedule,
        shadowing); ``sample_placement``: move samples before each MoE layer to where its experts are
        (NetMoE), the output returned in the input's order. Neither is part of the model (checkpoints load under
        any)."""
        super().__init__()
        self.config = config
        self.sample_placement = sample_placement
        self.embed = nn.Embedding(256, config.d_model)
        self.pos = nn.Parameter(torch.zeros(config.seq_len, config.d_model))
        self.blocks = nn.ModuleList(Block(config, ep, exchange) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq = idx.shape[1]
        mask = torch.triu(torch.full((seq, seq), float("-inf"), device=idx.device), diagonal=1)
        x = self.embed(idx) + self.pos[:seq]
        order = None
        for block in self.blocks:
            x, order = block(x, mask, self.sample_placement, order)
        if order is not None:
            x = self.sample_placement.restore(x, order)
        return self.head(self.norm(x))

    def moe_layers(self) -> list[moeflux.MoE]:
        return [block.mlp for block in self.blocks]
