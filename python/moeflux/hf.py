"""Hugging Face ``transformers`` drop-in: turn the sparse MoE blocks of a model
into :class:`moeflux.MoE` layers with the same weights (and back).

    import moeflux.hf
    report = moeflux.hf.convert_model(model)                  # in place; returns what was replaced
    report = moeflux.hf.convert_model(model, ep_group=groups) # expert-parallel: this rank keeps its experts
    ...train...
    moeflux.hf.revert_model(model)                            # back to transformers blocks, then save_pretrained

Supported blocks (transformers >= 5 layouts):

* Mixtral (``MixtralSparseMoeBlock``; top-k weights renormalized), Qwen3-MoE
  (``Qwen3MoeSparseMoeBlock``), OLMoE (``OlmoeSparseMoeBlock``): softmax
  top-k, ``norm_topk_prob``; Qwen3-VL-MoE's text blocks
  (``Qwen3VLMoeTextSparseMoeBlock``; always renormalized) and Jamba
  (``JambaSparseMoeBlock``; never renormalized) too;
* Qwen2-MoE (``Qwen2MoeSparseMoeBlock``) and Qwen3-Next
  (``Qwen3NextSparseMoeBlock``): the same plus a shared expert scaled by its
  sigmoid gate;
* DeepSeek-V2 (``DeepseekV2Moe``): softmax scores, ``topk_method`` "greedy"
  or "group_limited_greedy" (groups ranked by their best score),
  ``routed_scaling_factor``, shared experts. Like transformers, no
  renormalization of the top-k weights (its router ignores ``norm_topk_prob``);
* DeepSeek-V3 (``DeepseekV3MoE``) and GLM-4-MoE (``Glm4MoeMoE``): sigmoid
  scores, ``e_score_correction_bias``, group-limited top-k (groups ranked by
  their two best scores), ``norm_topk_prob``, ``routed_scaling_factor``,
  shared experts;
* GPT-OSS (``GptOssMLP``): a router with a bias, softmax over the top-k
  logits; experts with biases and GPT-OSS's clamped SwiGLU (``swiglu_limit``,
  ``swiglu_alpha``; its interleaved gate/up columns are reordered to
  moeflux's ``[gate | up]`` and back). The converted layer
  (:class:`TupleOutputMoE`) returns ``(hidden states, None)`` as the block's
  decoder layer unpacks it;
* Ernie 4.5-MoE (``Ernie4_5_MoeSparseMoeBlock``): softmax over float32
  logits, chosen by score plus ``e_score_correction_bias`` (kept ``[1, E]``
  in transformers), renormalized, shared experts. transformers clamps the
  divisor at ``moe_norm_min`` (1e-12), moeflux does not: the same unless the
  chosen scores sum to less than that;
* dots.llm1 (``Dots1MoE``): DeepSeek-V3's router and shared experts;
* MiniMax-M2 (``MiniMaxM2SparseMoeBlock``): sigmoid scores, the block's
  ``e_score_correction_bias``, renormalized; no shared expert;
* HunYuan-MoE (``HunYuanMoEV1Moe``): softmax top-k renormalized, logits in
  its router's dtype (float32 as built), an ungated shared MLP;
* Granite-MoE (``GraniteMoeMoE``) and Granite-MoE-Shared
  (``GraniteMoeSharedMoE``): softmax over the top-k logits. Granite-MoE-Shared's
  shared MLP sits beside the block in the decoder layer and stays there as it is;
* Llama 4 (``Llama4TextMoe``) with ``num_experts_per_tok=1``: sigmoid of the
  top-1 logit scales the expert's input, not its output
  (``weight_expert_input``), plus its ungated shared expert; a
  :class:`TupleOutputMoE`, as for GPT-OSS. Top-k > 1 is refused (each expert
  would see the token scaled by its own weight).

Refused: Phi-MoE (its sparsemixer router: each expert weighted by a softmax
over only the logits close to it, Gumbel-sampled choices while training and a
custom gradient estimate), DBRX (its ``w1, v1, w2`` experts and p-norm weight
normalization), JetMoE (a bias on the experts' combined output, and a mixture
of attention experts) and any other block moeflux does not know.

A shared expert of width 0 (``n_shared_experts=0``,
``shared_expert_intermediate_size=0``) adds nothing: the layer gets none, and
its empty weights (and Qwen's gate, which then scales zero) are kept as they
are for the way back. Every parameter and buffer keeps its dtype, exact values
and ``requires_grad`` both ways (an fp32 ``e_score_correction_bias`` or router
in a bf16 model stays fp32).

:func:`convert_model` finds MoE blocks by what they hold (an ``experts``
submodule or a child of an ``...Experts`` class) as well as by class name, and
checks all of them before replacing anything: any other block, an option
moeflux cannot express (Mixtral's and MiniMax-M2's ``router_jitter_noise``, a
non-SwiGLU activation, expert or shared expert biases outside GPT-OSS,
DeepSeek-V2's other ``topk_method``, Llama 4's top-k > 1, experts sharded by
transformers' own tensor/expert parallelism) or ``config.output_router_logits``
raises :class:`UnsupportedBlockError` naming each block (path and class) and
the reason: nothing is converted silently wrong. ``transformers`` is only
needed to revert (and to build the models); converting reads the modules'
weights and configs.

The converted blocks do not produce transformers' router logits (nor the
aux loss transformers computes from them): keep ``output_router_logits`` off
(in the config and in the forward call), pass ``aux_loss_weight`` (e.g. the
config's ``router_aux_loss_coef``) to :func:`convert_model` and add
:func:`moeflux.aux_loss` of the model to the training loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .distributed import ExpertParallelGroups
from .moe import MoE


class UnsupportedBlockError(ValueError):
    """A transformers MoE block, or one of its options, that moeflux cannot reproduce exactly."""


# ---- families: how each supported block routes, and where its shared expert is


@dataclass(frozen=True)
class _Link:
    """A transformers tensor and its moeflux.MoE counterpart."""

    hf: str  # name in the transformers block
    ours: str  # name in moeflux.MoE
    experts: bool = False  # stacked per expert: sliced to this rank's experts, gathered back
    layout: str = "same"  # in transformers: "same", "transposed" or "interleaved" (experts), "row" ([1, N])


@dataclass(frozen=True)
class Family:
    name: str
    router_options: Callable[[nn.Module, Any], dict] | None  # MoE router options; raises UnsupportedBlockError
    router: str = "gate.weight"  # the router's weight; the module it starts with holds top_k
    correction_bias: _Link = _Link("gate.e_score_correction_bias", "router.expert_bias")  # with use_expert_bias
    shared: str | None = None  # attribute of the shared expert MLP
    shared_gate: str | None = None  # attribute of its sigmoid gate (Qwen2-MoE, Qwen3-Next)
    experts_in_out: bool = False  # experts stored [E, in, out] (Llama 4), not [E, out, in]
    module: type = MoE  # TupleOutputMoE where the block returns a tuple
    planner: Callable[[nn.Module, Any, "Family"], "_Plan"] | None = None  # a layout of its own (GPT-OSS)


class TupleOutputMoE(MoE):
    """A converted GPT-OSS MLP or Llama 4 MoE: its decoder layer unpacks ``(hidden states, router scores)`` and
    keeps the first; the second is None (the scores are only read through ``output_router_logits``, which
    conversion refuses)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


def _check_no_jitter(config: Any) -> None:
    if getattr(config, "router_jitter_noise", 0.0):
        raise UnsupportedBlockError(
            f"router_jitter_noise={config.router_jitter_noise} jitters the experts' input as well as the "
            "router's; moeflux jitters only the router (set it to 0 to convert)")


def _softmax_top_k(block: nn.Module, config: Any) -> dict:
    """Softmax over the top-k logits (or, the same, the top-k softmax scores renormalized)."""
    return dict(renormalize=True)


def _softmax_scores(block: nn.Module, config: Any) -> dict:
    """The top-k softmax scores as they are (Jamba)."""
    return dict(renormalize=False)


def _mixtral_router(block: nn.Module, config: Any) -> dict:
    _check_no_jitter(config)
    return _softmax_top_k(block, config)


def _qwen_router(block: nn.Module, config: Any) -> dict:
    return dict(renormalize=bool(block.gate.norm_topk_prob))


def _scaling(gate: nn.Module) -> float:
    factor = float(gate.routed_scaling_factor)
    if not factor > 0:
        raise UnsupportedBlockError(f"routed_scaling_factor={factor} (moeflux needs a factor > 0)")
    return factor


def _group_limit(gate: nn.Module, group_score_top: int) -> dict:
    """Group-limited choice: only the experts of the ``topk_group`` best of ``n_group`` groups."""
    num_experts, groups, top_groups = int(gate.num_experts), gate.num_group, gate.topk_group
    if groups is None or top_groups is None or groups < 1 or num_experts % groups or not 1 <= top_groups <= groups:
        raise UnsupportedBlockError(f"n_group={groups}, topk_group={top_groups}: n_group must divide the "
                                    f"{num_experts} experts and topk_group be in [1, n_group]")
    allowed = top_groups * (num_experts // groups)
    if int(gate.top_k) > allowed:  # transformers would then pick masked-out experts
        raise UnsupportedBlockError(f"num_experts_per_tok={gate.top_k} exceeds the {allowed} experts of "
                                    f"topk_group={top_groups} groups")
    return dict(num_groups=int(groups), top_groups=int(top_groups), group_score_top=group_score_top)


def _deepseek_v2_router(block: nn.Module, config: Any) -> dict:
    gate = block.gate
    if getattr(config, "mlp_bias", False):
        raise UnsupportedBlockError("mlp_bias=True: its shared experts have biases, moeflux's shared expert has none")
    if gate.topk_method == "greedy":
        groups = {}
    elif gate.topk_method == "group_limited_greedy":
        groups = _group_limit(gate, group_score_top=1)  # a group's score is its best expert's
    else:
        raise UnsupportedBlockError(f"topk_method={gate.topk_method!r} is not supported (transformers' "
                                    "DeepseekV2Moe implements 'greedy' and 'group_limited_greedy')")
    # Softmax over float32 logits, the chosen scores times the factor; transformers' router never renormalizes.
    return dict(renormalize=False, routed_scaling_factor=_scaling(gate), router_dtype=torch.float32, **groups)


def _deepseek_v3_router(block: nn.Module, config: Any) -> dict:
    gate = block.gate
    return dict(renormalize=bool(gate.norm_topk_prob), scoring="sigmoid", use_expert_bias=True,
                routed_scaling_factor=_scaling(gate), router_dtype=torch.float32,
                **_group_limit(gate, group_score_top=2))  # a group's score is the sum of its two best


def _ernie_router(block: nn.Module, config: Any) -> dict:
    # Softmax over float32 logits, chosen by score + correction bias, renormalized. transformers clamps the
    # divisor at moe_norm_min (1e-12): the same unless the chosen scores sum to less.
    return dict(renormalize=True, use_expert_bias=True, router_dtype=torch.float32)


def _minimax_m2_router(block: nn.Module, config: Any) -> dict:
    _check_no_jitter(config)  # sigmoid of the logits (in the router weight's dtype), bias for the choice only
    return dict(renormalize=True, scoring="sigmoid", use_expert_bias=True)


def _llama4_router(block: nn.Module, config: Any) -> dict:
    top_k = int(block.router.top_k)
    if top_k != 1:  # then each of a token's experts sees it scaled by its own weight: not one scaled token
        raise UnsupportedBlockError(f"num_experts_per_tok={top_k}: Llama 4 scales each expert's input by its "
                                    "sigmoid weight; moeflux's weight_expert_input needs num_experts_per_tok=1")
    return dict(scoring="sigmoid", weight_expert_input=True)


FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family("Mixtral", _mixtral_router),
    "Qwen2MoeSparseMoeBlock": Family("Qwen2-MoE", _qwen_router, shared="shared_expert",
                                     shared_gate="shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": Family("Qwen3-MoE", _qwen_router),
    "Qwen3NextSparseMoeBlock": Family("Qwen3-Next", _qwen_router, shared="shared_expert",
                                      shared_gate="shared_expert_gate"),
    "OlmoeSparseMoeBlock": Family("OLMoE", _qwen_router),
    "DeepseekV2Moe": Family("DeepSeek-V2", _deepseek_v2_router, shared="shared_experts"),
    "DeepseekV3MoE": Family("DeepSeek-V3", _deepseek_v3_router, shared="shared_experts"),
    "Glm4MoeMoE": Family("GLM-4-MoE", _deepseek_v3_router, shared="shared_experts"),
    "GptOssMLP": Family("GPT-OSS", None, router="router.weight", experts_in_out=True, module=TupleOutputMoE,
                        planner=lambda *args: _gpt_oss_plan(*args)),  # its own layout
    "Ernie4_5_MoeSparseMoeBlock": Family(
        "Ernie-4.5-MoE", _ernie_router, shared="shared_experts",
        correction_bias=_Link("gate.moe_statics.e_score_correction_bias", "router.expert_bias", layout="row")),
    "Dots1MoE": Family("dots.llm1", _deepseek_v3_router, shared="shared_experts"),
    "MiniMaxM2SparseMoeBlock": Family("MiniMax-M2", _minimax_m2_router,
                                      correction_bias=_Link("e_score_correction_bias", "router.expert_bias")),
    "HunYuanMoEV1Moe": Family("HunYuan-MoE", _softmax_top_k, router="gate.wg.weight", shared="shared_mlp"),
    "GraniteMoeMoE": Family("Granite-MoE", _softmax_top_k, router="router.weight"),
    # Its shared MLP is a sibling of the block in the decoder layer: it stays there, as it is.
    "GraniteMoeSharedMoE": Family("Granite-MoE-Shared", _softmax_top_k, router="router.weight"),
    "Llama4TextMoe": Family("Llama-4", _llama4_router, router="router.weight", shared="shared_expert",
                            experts_in_out=True, module=TupleOutputMoE),
    "JambaSparseMoeBlock": Family("Jamba", _softmax_scores, router="router.weight"),
    "Qwen3VLMoeTextSparseMoeBlock": Family("Qwen3-VL-MoE", _softmax_top_k),
}

# Why some well-known blocks are not supported (others get the generic message).
_UNSUPPORTED = {
    "PhimoeSparseMoeBlock": "Phi-MoE is not supported: its sparsemixer router weights each of its two experts by "
                            "a softmax over only the logits within 2 * router_jitter_noise (relative) of that "
                            "expert's, draws the experts by Gumbel sampling while training and backpropagates "
                            "Heun's third-order estimate (PhimoeMultiplier); moeflux's top-k of one softmax or "
                            "sigmoid reproduces none of these",
    "JetMoeMoE": "JetMoE is not supported: its MLP block adds a bias to the experts' combined output, and its "
                 "attention is a mixture of attention experts (JetMoeMoA); moeflux has neither",
    "JetMoeAttention": "JetMoE's mixture of attention experts (JetMoeMoA) is not supported: moeflux's experts are "
                       "FFNs",
    "DbrxFFN": "DBRX is not supported: its experts (w1, v1, w2) and its p-norm normalization of the weights "
               "(moe_normalize_expert_weights) have no moeflux counterpart",
}

# A block by its class name (SparseMoeBlock, Glm4MoeMoE, DeepseekV2Moe, ...) or by what it holds.
_BLOCK_NAME = re.compile(r"Mo[Ee]Block$|Mo[Ee]$|MOE$")
_EXPERTS_NAME = re.compile(r"Experts$|ExpertGLU$")


def _is_moe_block(module: nn.Module) -> bool:
    kind = type(module).__name__
    if kind in FAMILIES or kind in _UNSUPPORTED or _BLOCK_NAME.search(kind):
        return True
    return any(name == "experts" or _EXPERTS_NAME.search(type(child).__name__)
               for name, child in module.named_children())


# ---- the plan: what a block becomes, checked before anything is built


def _to_ours(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return t.transpose(1, 2)
    if layout == "interleaved":  # GPT-OSS: gate and up columns alternate; moeflux keeps [gate | up]
        return torch.cat((t[..., ::2], t[..., 1::2]), dim=-1)
    if layout == "row":  # Ernie keeps its correction bias [1, E]
        return t[0]
    return t


def _to_theirs(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return t.transpose(1, 2)
    if layout == "interleaved":
        gate, up = t.chunk(2, dim=-1)
        return torch.stack((gate, up), dim=-1).flatten(-2)
    if layout == "row":
        return t.unsqueeze(0)
    return t


@dataclass(frozen=True)
class _Plan:
    family: Family
    moe_kwargs: dict
    links: tuple[_Link, ...]
    inert: tuple[str, ...]  # tensors without effect on the output (a shared expert of width 0), kept for reverting


@dataclass(frozen=True)
class _Origin:
    """What to_hf_block needs to rebuild the transformers block (``MoE.hf_origin``)."""

    cls: type
    config: Any
    family: str
    links: tuple[_Link, ...]
    inert: dict[str, bool]  # name -> requires_grad; the values are non-persistent buffers of the MoE (_inert_buffer)
    buffered: dict[str, bool]  # name -> requires_grad of parameters the MoE holds as buffers (Ernie's correction bias)


_SHARED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_links(gate_up: str, down: str, biases: bool = False) -> list[_Link]:
    """The experts' stacked weights (and biases: GPT-OSS), ``gate_up`` and ``down`` their layouts in transformers
    (moeflux's w_in is [E, H, 2F], w_out [E, F, H])."""
    names = [("gate_up_proj", "w_in", gate_up), ("down_proj", "w_out", down)]
    if biases:
        names += [("gate_up_proj_bias", "b_in", gate_up), ("down_proj_bias", "b_out", down)]
    return [_Link(f"experts.{theirs}", f"experts.{ours}", experts=True, layout=layout)
            for theirs, ours, layout in names]


def _check_experts(block: nn.Module, config: Any, in_out: bool) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedBlockError(f"hidden_act={act!r} is not supported (moeflux experts are SwiGLU: "
                                    "silu(gate) * up)")
    experts = block.experts
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise UnsupportedBlockError(f"its experts have no stacked '{name}' weight (an older transformers layout?)")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise UnsupportedBlockError("expert biases are not supported")
    if (getattr(experts, "is_transposed", in_out) != in_out or not getattr(experts, "is_concatenated", True)
            or not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False)):
        raise UnsupportedBlockError("its experts' layout is not the [gate; up] stacked one moeflux reads")
    _check_unsharded(block)
    _expert_dims(experts, in_out)


def _check_unsharded(block: nn.Module) -> None:
    if getattr(block.experts, "_is_expert_parallel", False) or any(_is_dtensor(p) for p in block.parameters()):
        raise UnsupportedBlockError("its weights are sharded by transformers' tensor/expert parallelism (tp_plan): "
                                    "load the model unsharded and split the experts with ep_group instead")


def _expert_dims(experts: nn.Module, in_out: bool) -> tuple[int, int, int]:
    """(experts, d_model, d_ffn) of stacked ``gate_up_proj`` and ``down_proj``: stored [E, out, in] (``in_out``
    False: [E, 2F, H] and [E, H, F]) or [E, in, out] (GPT-OSS: [E, H, 2F] and [E, F, H])."""
    gate_up, down = tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)
    num_experts, two_ffn, d_model = (gate_up[0], gate_up[2], gate_up[1]) if in_out else gate_up
    expected_down = (num_experts, two_ffn // 2, d_model) if in_out else (num_experts, d_model, two_ffn // 2)
    if two_ffn % 2 or down != expected_down:
        raise UnsupportedBlockError(f"unexpected expert shapes gate_up_proj {gate_up}, down_proj {down}")
    return int(num_experts), int(d_model), int(two_ffn) // 2


def _check_all_linked(block: nn.Module, links: list[_Link], inert: list[str], why: str = "") -> None:
    """Every tensor of the block has a moeflux counterpart (or is inert): nothing is dropped silently."""
    unknown = sorted(set(_tensor_names(block)) - {link.hf for link in links} - set(inert))
    if unknown:
        raise UnsupportedBlockError(f"{', '.join(unknown)}: no moeflux.MoE counterpart{why}")


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # by name: torch.distributed.tensor is not in every build


def _tensor_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]


def _shared_expert(block: nn.Module, family: Family) -> tuple[int, list[_Link], list[str]]:
    """The shared expert's width, its links, and its inert tensors (all of them when its width is 0: it then
    adds exactly zero, and Qwen's sigmoid gate scales that zero)."""
    shared = getattr(block, family.shared) if family.shared is not None else None
    if shared is None:  # Ernie holds None without shared experts
        return 0, [], []
    pairs = [(f"{family.shared}.{p}.weight", f"shared_expert.{p}.weight") for p in _SHARED_PROJECTIONS]
    if family.shared_gate is not None:
        pairs.append((f"{family.shared_gate}.weight", "shared_expert.gate.weight"))
    width = shared.gate_proj.out_features
    if width == 0:
        return 0, [], [theirs for theirs, _ in pairs]
    return width, [_Link(theirs, ours) for theirs, ours in pairs], []


def _top_k(block: nn.Module, family: Family) -> int:
    return int(getattr(block, family.router.split(".")[0]).top_k)  # the router module's (HunYuan's: its gate's)


def _gpt_oss_plan(block: nn.Module, config: Any, family: Family) -> _Plan:
    """GPT-OSS: a router with a bias whose top-k logits go through a softmax (moeflux's renormalized softmax),
    experts with biases and the clamped SwiGLU, gate and up columns interleaved, stored [E, in, out]."""
    experts = block.experts
    _check_unsharded(block)
    num_experts, d_model, d_ffn = _expert_dims(experts, family.experts_in_out)
    links = [_Link(family.router, "router.weight"), _Link("router.bias", "router.bias"),
             *_expert_links("interleaved", "same", biases=True)]
    _check_all_linked(block, links, [])
    moe_kwargs = dict(d_model=d_model, d_ffn=d_ffn, num_experts=num_experts, top_k=_top_k(block, family),
                      renormalize=True, router_bias=True, expert_bias=True,
                      activation="clamped_swiglu", swiglu_limit=float(experts.limit),
                      swiglu_alpha=float(experts.alpha))
    return _Plan(family, moe_kwargs, tuple(links), ())


def _plan(block: nn.Module, config: Any) -> _Plan:
    """Checks that ``block`` converts exactly; raises UnsupportedBlockError(reason) otherwise."""
    kind = type(block).__name__
    family = FAMILIES.get(kind)
    if family is None:
        raise UnsupportedBlockError(_UNSUPPORTED.get(kind, f"not a supported MoE block (supported: "
                                                           f"{', '.join(FAMILIES)})"))
    if config is None:
        raise UnsupportedBlockError("pass the model's config to convert it")
    if getattr(config, "output_router_logits", False):
        raise UnsupportedBlockError(
            "config.output_router_logits=True: converted blocks do not return transformers' router logits (nor "
            "its aux loss); set config.output_router_logits = False, pass aux_loss_weight (e.g. "
            "config.router_aux_loss_coef) to convert_model and add moeflux.aux_loss(model) to the loss")
    if family.planner is not None:
        return family.planner(block, config, family)
    _check_experts(block, config, family.experts_in_out)
    options = family.router_options(block, config)
    layout = "same" if family.experts_in_out else "transposed"
    links = [_Link(family.router, "router.weight"), *_expert_links(layout, layout)]
    if options.get("use_expert_bias"):
        links.append(family.correction_bias)
    shared_ffn, shared_links, inert = _shared_expert(block, family)
    links += shared_links
    _check_all_linked(block, links, inert, " (biases are not supported)")
    num_experts, d_model, d_ffn = _expert_dims(block.experts, family.experts_in_out)
    moe_kwargs = dict(d_model=d_model, d_ffn=d_ffn, num_experts=num_experts, top_k=_top_k(block, family),
                      shared_expert_ffn=int(shared_ffn),
                      shared_expert_gate=bool(shared_ffn) and family.shared_gate is not None, **options)
    return _Plan(family, moe_kwargs, tuple(links), tuple(inert))


# ---- moving tensors between the two modules


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (root.get_submodule(owner) if owner else root), leaf


def _get(root: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = _owner(root, name)
    return getattr(owner, leaf)


def _assign(root: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    """Makes parameter or buffer ``name`` of ``root`` the tensor ``value`` (its dtype, device and values)."""
    owner, leaf = _owner(root, name)
    if isinstance(getattr(owner, leaf), nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=requires_grad))
    else:
        setattr(owner, leaf, value)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``t[rows]``, as a view when the rows are consecutive (no copy of the whole stack before the one we keep)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]: rows[0] + len(rows)]
    return t[rows]


def _inert_buffer(name: str) -> str:
    return "hf_" + name.replace(".", "_")


def _check_materialized(module: nn.Module, what: str) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a tensor no link filled: the module has changed under us
        raise RuntimeError(f"moeflux.hf: {what}: no value for {', '.join(left)}")


def _config_of(block: nn.Module, default: Any = None) -> Any:
    """The config the block was built from (transformers' experts keep it), else ``default``."""
    for owner in (block, getattr(block, "experts", None), getattr(block, "gate", None)):
        config = getattr(owner, "config", None)
        if config is not None:
            return config
    return default


def _build(block: nn.Module, plan: _Plan, config: Any, ep_group: ExpertParallelGroups | dist.ProcessGroup | None,
           aux_loss_weight: float) -> MoE:
    # Built on the meta device: every tensor is then taken from the block, in the block's dtype.
    moe = plan.family.module(**plan.moe_kwargs, aux_loss_weight=aux_loss_weight, ep_group=ep_group, device="meta",
                             dtype=block.experts.gate_up_proj.dtype)
    held = list(moe.placement.experts_of())  # the global experts this rank holds, in slot order
    for link in plan.links:
        theirs = _get(block, link.hf)
        value = _rows(theirs.detach(), held) if link.experts else theirs.detach()
        _assign(moe, link.ours, _copy(_to_ours(value, link.layout)), theirs.requires_grad)
    for name in plan.inert:
        moe.register_buffer(_inert_buffer(name), _copy(_get(block, name)), persistent=False)
    _check_materialized(moe, type(block).__name__)
    moe.train(block.training)
    buffers = {name for name, _ in moe.named_buffers()}
    moe.hf_origin = _Origin(type(block), config, plan.family.name, plan.links,
                            {name: _get(block, name).requires_grad for name in plan.inert},
                            {link.hf: _get(block, link.hf).requires_grad
                             for link in plan.links if link.ours in buffers})
    return moe


def from_hf_block(block: nn.Module, config: Any = None,
                  ep_group: ExpertParallelGroups | dist.ProcessGroup | None = None, *,
                  aux_loss_weight: float = 0.0) -> MoE:
    """A moeflux.MoE computing what the transformers ``block`` computes, with its weights (copied, in their
    dtypes, with their ``requires_grad``). ``config``: the model's, when the block does not keep one."""
    config = config if config is not None else _config_of(block)
    try:
        plan = _plan(block, config)
    except UnsupportedBlockError as e:
        raise UnsupportedBlockError(f"{type(block).__name__}: {e}") from None
    return _build(block, plan, config, ep_group, aux_loss_weight)


def _gather_experts(moe: MoE, weight: torch.Tensor) -> torch.Tensor:
    """Every expert's rows, in global expert order (the ranks hold them in placement order)."""
    if moe.ep_group is None or moe.ep_size == 1:
        by_position = weight.detach()
    else:
        parts = [torch.empty_like(weight) for _ in range(moe.ep_size)]
        dist.all_gather(parts, weight.detach().contiguous(), group=moe.ep_group)
        by_position = torch.cat(parts)
    if moe.placement.is_contiguous:
        return by_position
    by_expert = torch.empty_like(by_position)
    by_expert[list(moe.placement.expert_at)] = by_position
    return by_expert


def to_hf_block(moe: MoE) -> nn.Module:
    """The transformers block that ``moe`` came from, with moeflux's current weights (their dtypes and
    ``requires_grad``). Under expert parallelism this gathers the experts: every rank of the group must call it."""
    origin = getattr(moe, "hf_origin", None)
    if origin is None:
        raise UnsupportedBlockError("this moeflux.MoE was not converted from a transformers block")
    with torch.device("meta"):  # every tensor is then taken from moe
        block = origin.cls(origin.config)
    for link in origin.links:
        ours = _get(moe, link.ours)
        value = _gather_experts(moe, ours) if link.experts else ours.detach()
        _assign(block, link.hf, _copy(_to_theirs(value, link.layout)), origin.buffered.get(link.hf, ours.requires_grad))
    for name, requires_grad in origin.inert.items():
        _assign(block, name, _copy(getattr(moe, _inert_buffer(name))), requires_grad)
    _check_materialized(block, origin.cls.__name__)
    block.train(moe.training)
    return block


# ---- whole models


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost MoE blocks of ``model`` (not inside another block, nor inside a moeflux.MoE)."""
    if isinstance(model, MoE):
        return []
    if _is_moe_block(model):
        return [("", model)]
    found, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, MoE) or _is_moe_block(module):
            inside += (name + ".",)
            if not isinstance(module, MoE):
                found.append((name, module))
    return found


def _paths(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_split(plans: dict[str, _Plan], ep_group: ExpertParallelGroups | dist.ProcessGroup | None) -> None:
    """MoE would refuse these too, but only once earlier blocks were replaced: check them all first."""
    group = ep_group.ep_group if isinstance(ep_group, ExpertParallelGroups) else ep_group
    ep_size = dist.get_world_size(group) if group is not None else 1
    uneven = [name for name, plan in plans.items() if plan.moe_kwargs["num_experts"] % ep_size]
    if uneven:
        raise ValueError(f"{_paths(uneven)}: the number of experts is not a multiple of the expert-parallel "
                         f"size ({ep_size})")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def convert_model(model: nn.Module, ep_group: ExpertParallelGroups | dist.ProcessGroup | None = None, *,
                  aux_loss_weight: float = 0.0) -> list[tuple[str, str]]:
    """Replace every sparse MoE block of ``model`` in place; returns ``[(module name, family)]``.

    Every MoE block is checked first: if any is unsupported (or has an option moeflux cannot reproduce)
    :class:`UnsupportedBlockError` names each such block and why, and nothing is replaced. Blocks already
    converted (:class:`moeflux.MoE`) are left as they are: converting a model twice returns ``[]`` the second
    time. ``aux_loss_weight`` is the converted layers' load-balancing loss weight (see :func:`moeflux.aux_loss`).
    """
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    blocks = _find_blocks(model)
    if any(not name for name, _ in blocks):  # nothing to replace it in
        raise UnsupportedBlockError(f"the model is itself a {type(model).__name__} block: convert it with "
                                    "moeflux.hf.from_hf_block")
    plans, problems = {}, {}
    for name, block in blocks:  # all or nothing: check every block first
        try:
            plans[name] = _plan(block, _config_of(block, config))
        except UnsupportedBlockError as e:
            problems.setdefault((type(block).__name__, str(e)), []).append(name or "<the model itself>")
    if problems:
        raise UnsupportedBlockError("\n".join(f"{_paths(names)} ({kind}): {why}"
                                              for (kind, why), names in problems.items()))
    _check_split(plans, ep_group)
    report = []
    for name, block in blocks:
        moe = _build(block, plans[name], _config_of(block, config), ep_group, aux_loss_weight)
        _set_submodule(model, name, moe)
        report.append((name, moe.hf_origin.family))
    return report


def revert_model(model: nn.Module) -> list[tuple[str, str]]:
    """Put transformers blocks back in place of converted moeflux layers (collective under expert parallelism)."""
    report = []
    for name, module in list(model.named_modules()):
        if name and isinstance(module, MoE) and getattr(module, "hf_origin", None) is not None:
            _set_submodule(model, name, to_hf_block(module))
            report.append((name, module.hf_origin.family))
    return report
