"""Typed wrappers of the ``torch.ops.moeflux`` ops, and their fake kernels.

The ops are implemented in C++/CUDA (``csrc/``, ``cuda/``); this module only
gives them Python signatures and docstrings, and registers the fake (meta)
kernels that let shapes propagate under ``torch.compile`` and FakeTensor.

Conventions: ``T`` tokens, ``H`` hidden size, ``E`` experts, ``k`` experts per
token, ``N`` permuted rows (``T * k`` dropless, ``E * capacity`` with a
capacity). Expert ids and row maps are int32; ``-1`` marks a dropped slot.
Routing weights are float32 (float64 for float64 logits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the extension registers the ops)

__all__ = [
    "route",
    "router_aux_loss",
    "apply_capacity",
    "permute",
    "unpermute",
    "grouped_mm",
]

_ops = torch.ops.moeflux


def route(logits: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """Fused softmax + top-k of router logits ``[T, E]``.

    Returns ``weights [T, k]`` (float32; float64 for float64 logits) and
    ``expert_ids [T, k]`` (int32), largest weight first; ties go to the lower
    expert index. ``weights`` are the softmax probabilities of the chosen
    experts; with ``renormalize=True`` they are divided by their sum, which is
    the softmax over the top-k logits (Mixtral's top-k-then-softmax,
    Qwen-MoE's ``norm_topk_prob``). Differentiable with respect to ``logits``.
    """
    return _ops.route(logits, k, renormalize)


def router_aux_loss(logits: Tensor, expert_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Switch/GShard load-balancing loss and ST-MoE router z-loss.

    ``load_balancing_loss = E * sum_e f_e * P_e`` where ``f_e`` is the fraction
    of the ``T * k`` assignments in ``expert_ids`` that chose expert ``e`` and
    ``P_e`` the mean softmax probability of ``e``; it is 1 for uniform routing.
    ``z_loss = mean_t logsumexp(logits[t]) ** 2``. Both are differentiable
    with respect to ``logits``; dropped ids (-1) do not count.
    """
    return _ops.router_aux_loss(logits, expert_ids)


def apply_capacity(
    expert_ids: Tensor, weights: Tensor, num_experts: int, capacity: int, drop_by_probability: bool = False
) -> Tensor:
    """Drop the assignments that exceed ``capacity`` tokens per expert.

    Returns ``expert_ids`` with dropped slots set to -1. By position (GShard):
    every token's first choice is served before any second choice, and tokens
    in order. By probability: an expert keeps its ``capacity`` highest-weight
    assignments. Not differentiable (indices only).
    """
    return _ops.apply_capacity(expert_ids, weights, num_experts, capacity, drop_by_probability)


def permute(
    tokens: Tensor, expert_ids: Tensor, num_experts: int, capacity: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter tokens ``[T, H]`` into rows grouped by expert.

    Returns ``permuted [N, H]``, ``tokens_per_expert [E]`` (int32) and
    ``row_map [T, k]`` (int32: the row of each (token, slot), or -1 when
    dropped). Within an expert, rows keep token order. Dropless
    (``capacity=None``): ``N = T * k``, experts packed one after another.
    With a capacity: ``N = E * capacity``, expert ``e`` owns rows
    ``[e * capacity, (e + 1) * capacity)``; assignments past the capacity
    are dropped in token order and unused rows are zero. Differentiable with
    respect to ``tokens``.
    """
    return _ops.permute(tokens, expert_ids, num_experts, capacity)


def unpermute(rows: Tensor, row_map: Tensor, weights: Tensor | None = None) -> Tensor:
    """Gather expert outputs back to tokens: ``out[t] = sum_j w[t, j] * rows[row_map[t, j]]``.

    ``rows [N, H]``, ``row_map [T, k]`` from :func:`permute`, optional
    ``weights [T, k]`` (any float dtype). Dropped slots contribute nothing.
    Accumulates in float32 (float64 for float64 rows) in a fixed order, without
    atomics, so the result is deterministic. Differentiable with respect to
    ``rows`` and ``weights``.
    """
    return _ops.unpermute(rows, row_map, weights)


def grouped_mm(input: Tensor, weight: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """Per-expert matmul over the contiguous segments of :func:`permute`'s output.

    ``input [N, K]``, ``weight [E, K, M]``, ``tokens_per_expert [E]`` (int32):
    rows ``[start_e, start_e + tokens_per_expert[e])`` are multiplied by
    ``weight[e]``. Uses ``torch._grouped_mm`` on Hopper GPUs in bfloat16, one
    matmul per expert elsewhere (which reads the counts on the host).
    Differentiable with respect to ``input`` and ``weight``.
    """
    return _ops.grouped_mm(input, weight, tokens_per_expert)


# ---- fake kernels: output shapes and dtypes without touching data


def _weight_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("moeflux::route")
def _route_fake(logits: Tensor, k: int, renormalize: bool = False) -> tuple[Tensor, Tensor]:
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=_weight_dtype(logits)), logits.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("moeflux::route_backward")
def _route_backward_fake(
    grad_weights: Tensor, logits: Tensor, weights: Tensor, expert_ids: Tensor, renormalize: bool
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("moeflux::apply_capacity")
def _apply_capacity_fake(
    expert_ids: Tensor, weights: Tensor, num_experts: int, capacity: int, drop_by_probability: bool = False
) -> Tensor:
    return torch.empty_like(expert_ids, memory_format=torch.contiguous_format)


@torch.library.register_fake("moeflux::permute")
def _permute_fake(
    tokens: Tensor, expert_ids: Tensor, num_experts: int, capacity: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    num_rows = expert_ids.numel() if capacity is None else num_experts * capacity
    return (
        tokens.new_empty((num_rows, tokens.shape[1])),
        expert_ids.new_empty((num_experts,)),
        torch.empty_like(expert_ids, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("moeflux::unpermute")
def _unpermute_fake(rows: Tensor, row_map: Tensor, weights: Tensor | None = None) -> Tensor:
    return rows.new_empty((row_map.shape[0], rows.shape[1]))


@torch.library.register_fake("moeflux::unpermute_backward")
def _unpermute_backward_fake(
    grad_output: Tensor, rows: Tensor, row_map: Tensor, weights: Tensor | None
) -> tuple[Tensor, Tensor]:
    grad_rows = torch.empty_like(rows, memory_format=torch.contiguous_format)
    if weights is None:
        return grad_rows, rows.new_empty((0,))
    return grad_rows, torch.empty_like(weights, memory_format=torch.contiguous_format)
