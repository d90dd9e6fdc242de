"""Brute-force references for the moeflux ops: plain loops in float64, written
for clarity, not speed. Every op test compares against one of these."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def route(logits, k, renormalize=False, scoring="softmax", expert_bias=None, num_groups=1, top_groups=1, scale=1.0,
          group_score_top=2):
    """Every router option, token by token, in float64 (DeepSeek-V3's group-limited choice included).
    Ties go to the lower expert index."""
    x = logits.double()
    num_tokens, num_experts = x.shape
    scores = torch.sigmoid(x) if scoring == "sigmoid" else torch.softmax(x, -1)
    weights = torch.zeros(num_tokens, k, dtype=torch.float64)
    ids = torch.zeros(num_tokens, k, dtype=torch.int32)
    per_group = num_experts // num_groups
    for t in range(num_tokens):
        # Experts are chosen by logit, or by score + bias; groups are ranked by their scores (+ bias).
        biased = (scores[t] + expert_bias.double()).tolist() if expert_bias is not None else scores[t].tolist()
        choice = biased if expert_bias is not None else x[t].tolist()
        allowed = set(range(num_experts))
        if num_groups > 1:
            group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)[:group_score_top])
                           for g in range(num_groups)]
            best = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:top_groups]
            allowed = {e for g in best for e in range(g * per_group, (g + 1) * per_group)}
        order = sorted(allowed, key=lambda e: (-choice[e], e))[:k]
        chosen = [scores[t, e].item() for e in order]
        total = (sum(chosen) + (1e-20 if scoring == "sigmoid" else 0.0)) if renormalize else 1.0
        for j, e in enumerate(order):
            weights[t, j] = scale * chosen[j] / total
            ids[t, j] = e
    return weights, ids


def router_aux_loss(logits: Tensor, expert_ids: Tensor) -> tuple[Tensor, Tensor]:
    num_tokens, num_experts = logits.shape
    x = logits.double()
    probs = torch.softmax(x, dim=-1)
    counts = [0] * num_experts
    for e in expert_ids.flatten().tolist():
        if 0 <= e < num_experts:
            counts[e] += 1
    slots = max(expert_ids.numel(), 1)
    mean_prob = probs.sum(0) / max(num_tokens, 1)
    lb = num_experts * sum(counts[e] / slots * mean_prob[e] for e in range(num_experts))
    z = (torch.logsumexp(x, dim=-1) ** 2).sum() / max(num_tokens, 1)
    return torch.as_tensor(lb, dtype=torch.float64), z


def apply_capacity(expert_ids: Tensor, weights: Tensor, num_experts: int, capacity: int, by_probability: bool) -> Tensor:
    num_tokens, k = expert_ids.shape
    slots = [(j, t) for j in range(k) for t in range(num_tokens)]  # first choices first, tokens in order
    if by_probability:
        slots.sort(key=lambda s: -weights[s[1], s[0]].item())  # stable: ties keep that order
    kept = torch.full_like(expert_ids, -1)
    taken = [0] * num_experts
    for j, t in slots:
        e = int(expert_ids[t, j])
        if e >= 0 and taken[e] < capacity:
            taken[e] += 1
            kept[t, j] = e
    return kept


def permute(tokens: Tensor, expert_ids: Tensor, num_experts: int, capacity: int | None = None):
    num_tokens, k = expert_ids.shape
    num_rows = num_tokens * k if capacity is None else num_experts * capacity
    out = torch.zeros(num_rows, tokens.shape[1], dtype=tokens.dtype)
    row_map = torch.full((num_tokens, k), -1, dtype=torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32)
    row = 0
    for e in range(num_experts):
        for t in range(num_tokens):
            for j in range(k):
                if int(expert_ids[t, j]) != e:
                    continue
                if capacity is None:
                    dest = row
                    row += 1
                elif counts[e] < capacity:
                    dest = e * capacity + int(counts[e])
                else:
                    continue
                counts[e] += 1
                row_map[t, j] = dest
                out[dest] = tokens[t]
    return out, counts, row_map


def unpermute(rows: Tensor, row_map: Tensor, weights: Tensor | None = None) -> Tensor:
    num_tokens, k = row_map.shape
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float64)
    for t in range(num_tokens):
        for j in range(k):
            r = int(row_map[t, j])
            if r >= 0:
                w = 1.0 if weights is None else float(weights[t, j])
                out[t] += w * rows[r].double()
    return out


def expert_ffn(x: Tensor, w_in: Tensor, w_out: Tensor, activation: str, b_in: Tensor | None = None,
               b_out: Tensor | None = None) -> Tensor:
    h = x @ w_in + (0 if b_in is None else b_in)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
    elif activation.startswith("clamped_swiglu:"):  # GPT-OSS's, as transformers' GptOssExperts writes it
        _, limit, alpha = activation.split(":")
        gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp(max=float(limit))
        h = (up.clamp(-float(limit), float(limit)) + 1) * gate * torch.sigmoid(gate * float(alpha))
    else:
        h = torch.nn.functional.gelu(h)
    return h @ w_out + (0 if b_out is None else b_out)


def moe(module, x: Tensor) -> Tensor:
    """The MoE layer token by token: route, then sum each chosen expert's FFN output.
    Differentiable (plain torch ops), in the dtype of the module's parameters."""
    tokens = x.reshape(-1, module.d_model)
    logits = tokens @ module.router.weight.t() + (0 if module.router.bias is None else module.router.bias)
    probs = torch.softmax(logits.double(), dim=-1).to(logits.dtype)
    weights, ids = torch.topk(probs, module.top_k, dim=-1)
    if module.router.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if module.capacity_factor is not None:  # the documented formula, not the module's: that is what is tested
        capacity = capacity_for(module.capacity_factor, tokens.shape[0], module.top_k, module.num_experts)
        kept = apply_capacity(ids.int(), weights.detach(), module.num_experts, capacity,
                              module.drop_policy == "probability")
        keep = kept >= 0
    out = []
    for t in range(tokens.shape[0]):
        y = torch.zeros_like(tokens[t])
        for j in range(module.top_k):
            if keep[t, j]:
                e = int(ids[t, j])
                experts = module.experts
                biases = (None, None) if experts.b_in is None else (experts.b_in[e], experts.b_out[e])
                y = y + weights[t, j] * expert_ffn(tokens[t:t + 1], experts.w_in[e], experts.w_out[e],
                                                   experts.activation, *biases)[0]
        out.append(y)
    return torch.stack(out).view(x.shape) if out else tokens.new_zeros(x.shape)


def capacity_for(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """Slots per expert: every token takes k slots; rounded up, so that f = 1 drops nothing when balanced."""
    return math.ceil(capacity_factor * num_tokens * k / num_experts)
