"""Agreement of a peer's output and gradients with moeflux's (same weights, same inputs, one step each).

Reported per tensor: the max abs difference (float32). ``experts`` is the max over the gate, up and down
weight gradients of the experts this rank holds. ``out_rel_median`` is the median over tokens of
|out row - ref row| / |ref row| (L2): the typical rounding error, which a few routing flips do not move (they
dominate the max and any mean). ``tokens_off`` counts
the tokens whose output row differs by more than ``tol`` of the reference's largest entry (1e-3 when both are
fp32, 5e-2 when one is bf16 or computes in bf16, i.e. well above bf16 rounding): routing flips at near-ties, or dropped slots.
``scale`` holds the reference's max abs value of each tensor, to read the differences against.

With a token mask (capacity settings against DeepSpeed), ``out`` and ``x`` are compared on the masked tokens
only (those that lost no slot) and ``out_all`` over every token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

KEYS = ("out", "x", "router", "experts")


def _max_abs(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def compare(ref_out: Tensor, ref_grads: dict[str, Tensor], out: Tensor, grads: dict[str, Tensor],
            token_mask: Tensor | None = None, tol: float | None = None) -> dict[str, float]:
    if tol is None:
        tol = 1e-3 if ref_out.dtype == out.dtype == torch.float32 else 5e-2
    ref_out, out = ref_out.float(), out.float()
    rows = token_mask if token_mask is not None else slice(None)
    result = {
        "out": _max_abs(ref_out[rows], out[rows]),
        "x": _max_abs(ref_grads["x"][rows], grads["x"][rows]),
        "router": _max_abs(ref_grads["router"], grads["router"]),
        "experts": max(_max_abs(ref_grads[k], grads[k]) for k in ("gate", "up", "down")),
    }
    if token_mask is not None:
        result["out_all"] = _max_abs(ref_out, out)
        result["tokens_compared"] = int(token_mask.sum())
    diff = ref_out - out
    result["out_rel_median"] = (diff.norm(dim=-1) / ref_out.norm(dim=-1).clamp_min(1e-30)).median().item()
    result["tokens_off"] = int((diff.abs().amax(dim=-1) > tol * ref_out.abs().max()).sum())
    result["tokens_off_tol"] = tol
    result["scale"] = {"out": ref_out.abs().max().item(), "x": ref_grads["x"].abs().max().item(),
                       "router": ref_grads["router"].abs().max().item(),
                       "experts": max(ref_grads[k].abs().max().item() for k in ("gate", "up", "down"))}
    return result


def max_over_ranks(result: dict) -> dict:
    """Element-wise max of the numbers over the ranks (sum for the token counts); all ranks get it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return result
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, result)
    merged: dict = {}
    for key, value in result.items():
        if isinstance(value, dict):
            merged[key] = {k: max(g[key][k] for g in gathered) for k in value}
        elif key in ("tokens_off", "tokens_compared"):  # per-rank tokens: the total
            merged[key] = sum(g[key] for g in gathered)
        else:
            merged[key] = max(g[key] for g in gathered)
    return merged
