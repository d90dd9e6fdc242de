"""Hugging Face ``transformers`` drop-in: turn the sparse MoE blocks of a model
into :class:`moeflux.MoE` layers with the same weights (and back).

    import moeflux.hf
    report = moeflux.hf.convert_model(model)                  # in place; returns what was replaced
    report = moeflux.hf.convert_model(model, ep_group=groups) # expert-parallel: this rank keeps its experts
    ...train...
    moeflux.hf.revert_model(model)                            # back to transformers blocks, then save_pretrained

Supported blocks: Mixtral, Qwen2-MoE (shared expert with its sigmoid gate,
``norm_topk_prob``), Qwen3-MoE, OLMoE and DeepSeek-V3 (sigmoid scores,
``e_score_correction_bias``, group-limited top-k, ``routed_scaling_factor``,
shared experts). Anything else, or an option moeflux cannot express, raises
:class:`UnsupportedBlockError` naming the block and the option: nothing is
converted silently wrong. ``transformers`` is only needed to revert (and to
build the models); converting reads the modules' weights and configs.

After conversion, use :func:`moeflux.aux_loss` for the load-balancing loss:
the transformers model's own router-logit outputs are not produced by the
converted blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .distributed import ExpertParallelGroups
from .moe import MoE


class UnsupportedBlockError(ValueError):
    """A transformers MoE block, or one of its options, that moeflux cannot reproduce exactly."""


@dataclass(frozen=True)
class Family:
    name: str
    router_options: Callable[[nn.Module, Any], dict]
    shared: str | None = None  # attribute of the shared expert MLP
    shared_gate: str | None = None  # attribute of its sigmoid gate (Qwen2-MoE)


def _softmax_topk(renormalize: Callable[[Any], bool]) -> Callable[[nn.Module, Any], dict]:
    return lambda block, config: dict(renormalize=renormalize(config))


def _mixtral_router(block: nn.Module, config: Any) -> dict:
    if getattr(config, "router_jitter_noise", 0.0):
        raise UnsupportedBlockError(
            f"{type(block).__name__}: router_jitter_noise={config.router_jitter_noise} jitters the experts' input "
            "as well as the router's; moeflux jitters only the router (set it to 0 to convert)")
    return dict(renormalize=True)


def _deepseek_v3_router(block: nn.Module, config: Any) -> dict:
    gate = block.gate
    return dict(renormalize=bool(gate.norm_topk_prob), scoring="sigmoid", use_expert_bias=True,
                num_groups=int(gate.num_group), top_groups=int(gate.topk_group),
                routed_scaling_factor=float(gate.routed_scaling_factor), router_dtype=torch.float32)


FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family("Mixtral", _mixtral_router),
    "Qwen2MoeSparseMoeBlock": Family("Qwen2-MoE", _softmax_topk(lambda c: bool(c.norm_topk_prob)),
                                     shared="shared_expert", shared_gate="shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": Family("Qwen3-MoE", _softmax_topk(lambda c: bool(c.norm_topk_prob))),
    "OlmoeSparseMoeBlock": Family("OLMoE", _softmax_topk(lambda c: bool(c.norm_topk_prob))),
    "DeepseekV3MoE": Family("DeepSeek-V3", _deepseek_v3_router, shared="shared_experts"),
}


def _config_of(model_or_block: nn.Module) -> Any:
    config = getattr(model_or_block, "config", None)
    if config is None:
        for attr in ("experts", "gate"):
            config = getattr(getattr(model_or_block, attr, None), "config", None) or config
    return config


def _check_activation(block: nn.Module, config: Any) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedBlockError(f"{type(block).__name__}: hidden_act={act!r} is not supported "
                                    "(moeflux experts are SwiGLU: silu(gate) * up)")
    experts = block.experts
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise UnsupportedBlockError(f"{type(block).__name__}: its experts have no stacked '{name}' weight "
                                        "(an older transformers layout?)")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise UnsupportedBlockError(f"{type(block).__name__}: expert biases are not supported")


def from_hf_block(block: nn.Module, config: Any = None,
                  ep_group: ExpertParallelGroups | dist.ProcessGroup | None = None) -> MoE:
    """A moeflux.MoE computing what the transformers ``block`` computes, with its weights (copied)."""
    kind = type(block).__name__
    family = FAMILIES.get(kind)
    if family is None:
        raise UnsupportedBlockError(f"{kind}: not a supported MoE block (supported: {', '.join(FAMILIES)})")
    config = config if config is not None else _config_of(block)
    if config is None:
        raise UnsupportedBlockError(f"{kind}: pass the model's config to convert it")
    _check_activation(block, config)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj  # [E, 2F, H], [E, H, F]
    num_experts, d_ffn, d_model = gate_up.shape[0], gate_up.shape[1] // 2, gate_up.shape[2]
    top_k = int(getattr(block.gate, "top_k", getattr(config, "num_experts_per_tok", 0)))
    options = family.router_options(block, config)
    shared_ffn, shared_gated = 0, False
    if family.shared is not None:
        shared = getattr(block, family.shared)
        shared_ffn, shared_gated = shared.gate_proj.out_features, family.shared_gate is not None
    moe = MoE(d_model, d_ffn, num_experts, top_k, aux_loss_weight=0.0, shared_expert_ffn=shared_ffn,
              shared_expert_gate=shared_gated, ep_group=ep_group, device=gate_up.device, dtype=gate_up.dtype,
              **options)
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.copy_(block.gate.e_score_correction_bias)
        held = list(moe.placement.experts_of())  # the global experts this rank holds, in slot order
        moe.experts.w_in.copy_(gate_up[held].transpose(1, 2))
        moe.experts.w_out.copy_(down[held].transpose(1, 2))
        if moe.shared_expert is not None:
            shared = getattr(block, family.shared)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.shared_expert, name).weight.copy_(getattr(shared, name).weight)
            if shared_gated:
                moe.shared_expert.gate.weight.copy_(getattr(block, family.shared_gate).weight)
    moe.hf_origin = (type(block), config, family.name)
    return moe


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
    """The transformers block that ``moe`` came from, with moeflux's current weights.
    Under expert parallelism this gathers the experts: every rank of the group must call it."""
    origin = getattr(moe, "hf_origin", None)
    if origin is None:
        raise UnsupportedBlockError("this moeflux.MoE was not converted from a transformers block")
    cls, config, family_name = origin
    block = cls(config).to(device=moe.router.weight.device, dtype=moe.router.weight.dtype)
    family = FAMILIES[cls.__name__]
    w_in, w_out = _gather_experts(moe, moe.experts.w_in), _gather_experts(moe, moe.experts.w_out)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        if moe.router.expert_bias is not None:
            block.gate.e_score_correction_bias.copy_(moe.router.expert_bias)
        block.experts.gate_up_proj.copy_(w_in.transpose(1, 2))
        block.experts.down_proj.copy_(w_out.transpose(1, 2))
        if family.shared is not None:
            shared = getattr(block, family.shared)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(shared, name).weight.copy_(getattr(moe.shared_expert, name).weight)
            if family.shared_gate is not None:
                getattr(block, family.shared_gate).weight.copy_(moe.shared_expert.gate.weight)
    block.train(moe.training)
    return block


def _replace(model: nn.Module, predicate: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]
             ) -> list[tuple[str, nn.Module]]:
    """Replaces every submodule that satisfies `predicate` by make(submodule); returns (name, new module)."""
    report = []
    for name, module in list(model.named_modules()):
        if not name or not predicate(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(module)
        setattr(parent, attr, new)
        report.append((name, new))
    return report


def convert_model(model: nn.Module, ep_group: ExpertParallelGroups | dist.ProcessGroup | None = None
                  ) -> list[tuple[str, str]]:
    """Replace every supported sparse MoE block of ``model`` in place; returns ``[(module name, family)]``.

    Blocks whose class name looks like an MoE block but is not supported raise
    :class:`UnsupportedBlockError` before anything is replaced. Blocks already converted
    (:class:`moeflux.MoE`) are left as they are: converting a model twice returns ``[]`` the second time.
    """
    config = getattr(model, "config", None)
    converted = {n for n, m in model.named_modules() if isinstance(m, MoE)}  # already moeflux: left as they are
    candidates = [(n, m) for n, m in model.named_modules()
                  if not isinstance(m, MoE) and not any(n.startswith(c + ".") for c in converted)
                  and (type(m).__name__ in FAMILIES or ("Moe" in type(m).__name__ and "Block" in type(m).__name__)
                       or type(m).__name__.endswith("MoE"))]
    for name, module in candidates:  # validate everything first: all or nothing
        if type(module).__name__ not in FAMILIES:
            raise UnsupportedBlockError(f"{name} ({type(module).__name__}): not a supported MoE block "
                                        f"(supported: {', '.join(FAMILIES)})")
        _check_activation(module, config if config is not None else _config_of(module))
        FAMILIES[type(module).__name__].router_options(module, config)
    replaced = _replace(model, lambda m: type(m).__name__ in FAMILIES,
                        lambda m: from_hf_block(m, config, ep_group))
    return [(name, new.hf_origin[2]) for name, new in replaced]


def revert_model(model: nn.Module) -> list[tuple[str, str]]:
    """Put transformers blocks back in place of converted moeflux layers (collective under expert parallelism)."""
    replaced = _replace(model, lambda m: isinstance(m, MoE) and getattr(m, "hf_origin", None) is not None,
                        to_hf_block)
    return [(name, FAMILIES[type(block).__name__].name) for name, block in replaced]
