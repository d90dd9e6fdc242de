"""``moeflux.MoE``: a drop-in Mixture-of-Experts replacement for a transformer MLP block."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .instrumentation import layer_scope
from .distributed import ExpertParallelGroups, check_agreement
from .exchange import ExchangeConfig, ExchangeEngine, failed_probe, make_exchange
from .experts import GroupedExperts, SharedExpert, activation_spec
from .placement import ExpertPlacement
from .router import Router

DROP_POLICIES = ("position", "probability")
_layer_numbers = itertools.count()


class MoE(nn.Module):
    """Mixture-of-Experts FFN: ``[..., d_model] -> [..., d_model]``.

    Each token goes to its ``top_k`` experts, chosen by a linear router, and
    the experts' outputs are summed with the routing weights::

        routing = router(x)                                 # route op: softmax + top-k
        y, load = exchange.run(x, routing.expert_ids, routing.weights, capacity, experts)

    :attr:`exchange` (a :class:`moeflux.exchange.ExchangeEngine`) moves the
    tokens to their experts and back: within the process, or over the
    expert-parallel group by the transport, schedule and shadowing its
    :class:`moeflux.ExchangeConfig` names; :attr:`placement` (a
    :class:`moeflux.ExpertPlacement`) says which rank and slot hold each expert.

    Args:
        d_model: model width.
        d_ffn: hidden width of each expert.
        num_experts: number of experts ``E``.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        capacity_factor: ``None`` for dropless routing; otherwise each expert
            takes at most ``ceil(capacity_factor * tokens * top_k / E)`` tokens
            and the rest are dropped (their slot contributes zero; keep a
            residual connection around the layer).
        activation: ``"swiglu"``, ``"gelu"`` or ``"clamped_swiglu"`` (GPT-OSS:
            ``g = min(gate, swiglu_limit)``, ``(clamp(up, ±swiglu_limit) + 1) * g * sigmoid(swiglu_alpha * g)``).
        expert_bias: per-expert biases after each expert GEMM (GPT-OSS).
        router_bias: a bias on the router's logits (GPT-OSS).
        renormalize: divide the top-k weights by their sum (top-k-then-softmax).
        weight_expert_input: scale each token by its routing weight before its
            expert and sum the experts' outputs unweighted (Llama 4); top_k=1 only.
        drop_policy: with a capacity, which assignments an expert keeps:
            ``"position"`` (first choices first, then token order; GShard) or
            ``"probability"`` (highest routing weight first).
        aux_loss_weight: weight of the load-balancing loss in :attr:`aux_loss`.
        z_loss_weight: weight of the router z-loss in :attr:`aux_loss`.
        router_jitter: multiplicative input jitter of the router while training.
        noisy_gating: learned Gaussian noise on the router logits while training.
        scoring, use_expert_bias, num_groups, top_groups, group_score_top,
        routed_scaling_factor, router_dtype: router variants (sigmoid scores,
            DeepSeek's bias and group-limited choice, a factor on the weights,
            float32 logits); see
            :class:`moeflux.Router` and :func:`moeflux.ops.route`.
        shared_expert_ffn: hidden width of a dense SwiGLU expert every token
            also goes through (0: none); ``shared_expert_gate`` scales its output
            by a learned per-token sigmoid gate (Qwen2-MoE).
        ep_group: expert parallelism: the :class:`moeflux.ExpertParallelGroups`
            from :func:`moeflux.init_expert_parallel` (or just the
            ``torch.distributed`` group of ``P`` ranks that split the experts;
            :class:`moeflux.DataParallel` then cannot tell where the experts'
            replicas are); this rank holds experts ``[rank * E / P, (rank + 1) * E / P)``
            and tokens travel to them by all-to-all. Constructing the layer is
            collective: every rank of the group must agree on the configuration,
            or all of them raise. With a capacity every rank must route the same
            number of tokens (the capacity is computed from it); dropless
            routing takes any number, zero included.
        exchange: how tokens cross the group (ignored without one): a
            :class:`moeflux.ExchangeConfig` (transport ``"flat"`` or
            ``"hierarchical"``, schedule ``"bulk"``, ``"chunked"`` or
            ``"pairwise"``, shadowing); ``None``: flat, bulk, no shadows. Every
            combination works and gives the same outputs and gradients.

    After each forward, :attr:`aux_loss` holds ``aux_loss_weight * load_balancing
    + z_loss_weight * z_loss`` (differentiable: add it to the training loss, or
    use :func:`moeflux.aux_loss` to sum it over a model), and
    :attr:`tokens_per_expert` the load of each expert.
    """

    exchange: ExchangeEngine
    placement: ExpertPlacement
    aux_loss: Tensor | None
    tokens_per_expert: Tensor | None  # [E] rows per expert; under expert parallelism [E / P], this rank's experts
    routed_tokens_per_expert: Tensor | None  # [E] int64: this rank's token slots per global expert (after capacity)

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        *,
        activation: str = "swiglu",
        swiglu_limit: float = 7.0,
        swiglu_alpha: float = 1.702,
        expert_bias: bool = False,
        router_bias: bool = False,
        renormalize: bool = False,
        weight_expert_input: bool = False,
        drop_policy: str = "position",
        aux_loss_weight: float = 1e-2,
        z_loss_weight: float = 0.0,
        router_jitter: float = 0.0,
        noisy_gating: bool = False,
        scoring: str = "softmax",
        use_expert_bias: bool = False,
        num_groups: int = 1,
        top_groups: int = 1,
        group_score_top: int = 2,
        routed_scaling_factor: float = 1.0,
        router_dtype: torch.dtype | None = None,
        shared_expert_ffn: int = 0,
        shared_expert_gate: bool = False,
        ep_group: ExpertParallelGroups | dist.ProcessGroup | None = None,
        exchange: ExchangeConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(ep_group, ExpertParallelGroups):
            ep_group, self.edp_group = ep_group.ep_group, ep_group.edp_group
        else:
            self.edp_group = None  # unknown: the caller holds the expert-data-parallel group
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        activation_name = activation  # in the expert ops' form once checked
        try:
            _check_arguments(d_model, d_ffn, num_experts, top_k, capacity_factor, drop_policy, aux_loss_weight,
                             z_loss_weight, self.ep_size)
            activation_name = activation_spec(activation, swiglu_limit, swiglu_alpha)
            if weight_expert_input and top_k != 1:  # one weight per token: it scales the token before dispatch
                raise ValueError(f"weight_expert_input=True needs top_k=1, got top_k={top_k}")
            if exchange is not None and not isinstance(exchange, ExchangeConfig):
                raise TypeError(f"exchange must be a moeflux.ExchangeConfig or None, got {exchange!r}")
            (exchange or ExchangeConfig()).check(ep_group)
            error = None
        except (ValueError, TypeError) as e:
            if ep_group is None:
                raise
            error = str(e)  # raised by the agreement, on every rank of the group: none is left waiting in it
        if ep_group is not None:
            check_agreement(
                ep_group, "moeflux.MoE", local_error=error, num_experts=num_experts, ep_size=self.ep_size,
                d_model=d_model, d_ffn=d_ffn, top_k=top_k, dtype=dtype or torch.get_default_dtype(),
                capacity_factor=capacity_factor, activation=activation_name,
                expert_bias=expert_bias, router_bias=router_bias, renormalize=renormalize,
                weight_expert_input=weight_expert_input, scoring=scoring,
                num_groups=num_groups, top_groups=top_groups, group_score_top=group_score_top,
                use_expert_bias=use_expert_bias, routed_scaling_factor=routed_scaling_factor,
                router_dtype=router_dtype, noisy_gating=noisy_gating, shared_expert_ffn=shared_expert_ffn,
                shared_expert_gate=shared_expert_gate,
                **(exchange if isinstance(exchange, ExchangeConfig) else ExchangeConfig()).agreement_fields(),
            )

        self.d_model, self.d_ffn, self.num_experts, self.top_k = d_model, d_ffn, num_experts, top_k
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.weight_expert_input = weight_expert_input
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        factory = {"device": device, "dtype": dtype}
        self.router = Router(
            d_model, num_experts, top_k, renormalize=renormalize, scoring=scoring, use_expert_bias=use_expert_bias,
            num_groups=num_groups, top_groups=top_groups, group_score_top=group_score_top,
            routed_scaling_factor=routed_scaling_factor,
            router_dtype=router_dtype, router_jitter=router_jitter, noisy_gating=noisy_gating, bias=router_bias,
            **factory,
        )
        self.shared_expert = (
            SharedExpert(d_model, shared_expert_ffn, shared_expert_gate, **factory) if shared_expert_ffn else None
        )
        self.placement = ExpertPlacement(num_experts, self.ep_size, self.ep_rank)
        self.experts = GroupedExperts(
            self.placement.local_experts, d_model, d_ffn, activation_name, bias=expert_bias, placement=self.placement,
            **factory
        )
        self.exchange = make_exchange(self.placement, ep_group, exchange, device)
        self.stats_name = f"moe{next(_layer_numbers)}"  # moeflux.comm_stats(model) renames it to its path
        self.aux_loss = None
        self.tokens_per_expert = None
        self.routed_tokens_per_expert = None

    def capacity(self, num_tokens: int) -> int | None:
        """Tokens each expert can take for a batch of ``num_tokens`` tokens (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _input_error(self, x: Tensor) -> str | None:
        """What is wrong with the input ``x`` (None: nothing), checked before any collective. The layer's dtype is
        its experts' (the router may hold another: :class:`moeflux.Router`)."""
        weight = self.experts.w_in
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            return f"MoE expects input [..., d_model={self.d_model}], got shape {tuple(x.shape)}"
        if x.device != weight.device:
            return f"MoE expects input on {weight.device} (its weights' device), got {x.device}"
        if not x.is_floating_point() or (x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type)):
            return f"MoE expects input of dtype {weight.dtype} (its experts' dtype), got {x.dtype}"
        return None

    def forward(self, x: Tensor) -> Tensor:
        if (error := self._input_error(x)) is not None:
            # The other ranks of the group are about to wait for this one in the exchange: join it so that
            # they raise too (naming what this rank sent), then raise the precise error here.
            probe = failed_probe(x, self.d_model, self.experts.w_in)
            self.exchange.join_failed_dispatch(probe, self.top_k, self.capacity(0))
            raise ValueError(error)
        tokens = x.reshape(-1, self.d_model)
        routing = self.router(tokens)
        if torch.is_autocast_enabled(x.device.type):  # the tokens cross ranks and meet the experts in autocast's dtype
            tokens = tokens.to(torch.get_autocast_dtype(x.device.type))
        load_balancing, z_loss = ops.router_aux_loss(routing.logits, routing.expert_ids)
        self.aux_loss = self.aux_loss_weight * load_balancing + self.z_loss_weight * z_loss

        expert_ids, capacity = routing.expert_ids, self.capacity(tokens.shape[0])
        if capacity is not None:
            expert_ids = ops.apply_capacity(
                expert_ids, routing.weights, self.num_experts, capacity, self.drop_policy == "probability"
            )
        self.routed_tokens_per_expert = _count_slots(expert_ids, self.num_experts)
        routed, weights = tokens, routing.weights
        if self.weight_expert_input:  # Llama 4: the weight (rounded to the tokens' dtype) scales the expert's input
            routed, weights = tokens * weights.to(tokens.dtype), torch.ones_like(weights)
        with layer_scope(self.stats_name, self.exchange.groups):
            out, self.tokens_per_expert = self.exchange.run(routed, expert_ids, weights, capacity, self.experts)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(x.shape)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Hold and route by ``placement`` from now on (the experts' rows must already be where it says:
        :class:`moeflux.ExpertReplacement` moves them, then calls this)."""
        old = self.placement
        if (placement.num_experts, placement.ep_size, placement.ep_rank) != (old.num_experts, old.ep_size,
                                                                              old.ep_rank):
            raise ValueError(f"set_placement: the placement must keep num_experts={old.num_experts}, "
                             f"ep_size={old.ep_size} and ep_rank={old.ep_rank}, got {placement}")
        self.placement = self.experts.placement = self.exchange.placement = placement

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ffn={self.d_ffn}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy!r}, ep_size={self.ep_size}"
        )


def _check_arguments(d_model, d_ffn, num_experts, top_k, capacity_factor, drop_policy, aux_loss_weight,
                     z_loss_weight, ep_size) -> None:
    """MoE's own argument checks (the activation by activation_spec; the router, exchange and shadowing options
    where they are used)."""
    for name, value in (("d_model", d_model), ("d_ffn", d_ffn), ("num_experts", num_experts)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if capacity_factor is not None and not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor must be a finite number > 0, or None (dropless), got {capacity_factor!r}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if aux_loss_weight < 0 or z_loss_weight < 0:
        raise ValueError(f"aux_loss_weight and z_loss_weight must be >= 0, got {aux_loss_weight}, {z_loss_weight}")
    if num_experts % ep_size != 0:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of the expert-parallel size ({ep_size})")


class ExpertParameter(NamedTuple):
    """A routed experts' stacked parameter ``[E_local, ...]`` of one MoE layer."""

    name: str  # as in model.named_parameters()
    param: nn.Parameter
    layer: MoE  # its layer: layer.placement says which global expert each row is; layer.ep_group / edp_group


def expert_parameters(model: nn.Module) -> list[ExpertParameter]:
    """The routed experts' parameters of every MoE layer of ``model`` (not the router's, not shared experts').

    Under expert parallelism these are the parameters that differ between ranks of the expert-parallel group:
    their gradients are reduced over the expert-data-parallel group only, their norm is summed over ranks, and
    checkpoints store them per global expert.
    """
    owner = {id(p): layer for layer in model.modules() if isinstance(layer, MoE) for p in layer.experts.parameters()}
    return [ExpertParameter(name, p, owner[id(p)]) for name, p in model.named_parameters() if id(p) in owner]


def _count_slots(expert_ids: Tensor, num_experts: int) -> Tensor:
    """``[E]`` int64: slots routed to each expert (``-1`` ignored). Not ``torch.bincount``: on CUDA it reads
    the maximum back to the host."""
    ids = expert_ids.reshape(-1).long() + 1
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    return counts.index_add_(0, ids, torch.ones_like(ids))[1:]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of :attr:`MoE.aux_loss` over the MoE layers of ``model`` from their last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(losses).sum()
