"""Expert FFNs evaluated over the contiguous per-expert segments of permute's output."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .placement import ExpertPlacement

ACTIVATIONS = ("swiglu", "gelu", "clamped_swiglu")


def activation_spec(activation: str, swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702) -> str:
    """The expert ops' name of an activation: ``"clamped_swiglu"`` (GPT-OSS) carries its limit and alpha."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation != "clamped_swiglu":
        return activation
    if not (swiglu_limit > 0 and math.isfinite(swiglu_limit) and math.isfinite(swiglu_alpha)):
        raise ValueError(f"swiglu_limit must be a finite number > 0 and swiglu_alpha finite, got {swiglu_limit}, "
                         f"{swiglu_alpha}")
    return f"clamped_swiglu:{float(swiglu_limit)!r}:{float(swiglu_alpha)!r}"


def _parse_activation(activation: str) -> str:
    """An activation name or an ops name (``"clamped_swiglu:<limit>:<alpha>"``), checked and in the ops'
    form, so that a malformed one fails here rather than at the first forward."""
    name, *params = activation.split(":")
    if params and (name != "clamped_swiglu" or len(params) != 2):
        raise ValueError(f"activation must be one of {ACTIVATIONS} or 'clamped_swiglu:<limit>:<alpha>', got "
                         f"{activation!r}")
    try:
        numbers = [float(p) for p in params]
    except ValueError:
        raise ValueError(f"activation {activation!r}: limit and alpha must be numbers") from None
    return activation_spec(name, *numbers)


class ExpertWeights(NamedTuple):
    """One set of stacked expert parameters: this module's own, or copies of other ranks' (shadows)."""

    w_in: Tensor  # [n, d_model, F_in]
    w_out: Tensor  # [n, d_ffn, d_model]
    b_in: Tensor | None = None  # [n, F_in]
    b_out: Tensor | None = None  # [n, d_model]

    def map(self, fn: Callable[[Tensor], Tensor]) -> ExpertWeights:
        """``fn`` of every parameter present (biases stay None where there are none)."""
        return ExpertWeights(*(None if w is None else fn(w) for w in self))


class GroupedExperts(nn.Module):
    """``num_experts`` two-layer FFNs with weights stacked per expert.

    ``w_in [E, d_model, F_in]`` and ``w_out [E, d_ffn, d_model]`` with
    ``F_in = 2 * d_ffn`` for SwiGLU and GPT-OSS's clamped SwiGLU (gate and up
    projections side by side) and ``d_ffn`` for GELU; with ``bias=True`` also
    ``b_in [E, F_in]`` and ``b_out [E, d_model]``, added after each GEMM.
    ``activation`` is the expert ops' name (:func:`activation_spec`).
    Initialised like ``nn.Linear``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    Under expert parallelism a rank holds ``num_experts`` of the layer's
    experts: ``placement`` (a :class:`moeflux.ExpertPlacement`) says which;
    row ``i`` of the stacked weights is global expert
    ``placement.global_expert(i)`` (:attr:`global_experts`). Without a
    placement the module holds experts ``0 .. num_experts - 1``. Each expert is
    initialised from its own generator, seeded with ``seed`` and its global
    index, so a layer holds the same experts whatever the number of ranks it is
    split over; the state dict names each expert by its global index
    (``experts.7.w_in``), so checkpoints load across expert-parallel layouts.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ffn: int,
        activation: str = "swiglu",
        *,
        bias: bool = False,
        placement: ExpertPlacement | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ffn = num_experts, d_model, d_ffn
        self.activation = _parse_activation(activation)
        self.placement = placement if placement is not None else ExpertPlacement(num_experts)
        if self.placement.local_experts != num_experts:
            raise ValueError(f"GroupedExperts: placement holds {self.placement.local_experts} experts per rank, "
                             f"num_experts is {num_experts}")
        self.seed = int(torch.randint(2**62, ()).item()) if seed is None else seed
        factory = {"device": device, "dtype": dtype}
        in_features = d_ffn if activation == "gelu" else 2 * d_ffn
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, in_features, **factory))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ffn, d_model, **factory))
        self.b_in = nn.Parameter(torch.empty(num_experts, in_features, **factory)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w_in.is_meta:  # no values to draw (moeflux.hf builds on meta, then takes the checkpoint's)
            return
        with torch.no_grad():
            for i in range(self.num_experts):
                gen = torch.Generator().manual_seed(self.seed + self.global_experts[i])
                for weight, fan_in in ((self.w_in, self.d_model), (self.w_out, self.d_ffn), (self.b_in, self.d_model),
                                       (self.b_out, self.d_ffn)):
                    if weight is None:
                        continue
                    bound = 1 / math.sqrt(fan_in)
                    values = torch.empty(weight.shape[1:], dtype=torch.float64).uniform_(-bound, bound, generator=gen)
                    weight[i].copy_(values)

    # ---- state dict: one entry per expert, named by its global index

    @property
    def _weights(self) -> tuple[str, ...]:
        return ("w_in", "w_out") if self.b_in is None else ("w_in", "w_out", "b_in", "b_out")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in self._weights:
            weight = getattr(self, name)
            for i in range(self.num_experts):
                destination[f"{prefix}{self.global_experts[i]}.{name}"] = weight[i] if keep_vars else weight[i].detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in self._weights:
            weight = getattr(self, name)
            for i in range(self.num_experts):
                key = f"{prefix}{self.global_experts[i]}.{name}"
                if key not in state_dict:
                    missing_keys.append(key)
                elif state_dict[key].shape != weight.shape[1:]:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                      f"{tuple(state_dict[key].shape)} from checkpoint, the shape in current model "
                                      f"is {tuple(weight.shape[1:])}.")
                else:
                    with torch.no_grad():
                        weight[i].copy_(state_dict[key])
        # Entries of experts held by other ranks are expected in a full checkpoint; anything else is not.
        pattern = re.compile(rf"{re.escape(prefix)}\d+\.({'|'.join(self._weights)})")
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and not pattern.fullmatch(k))

    @property
    def global_experts(self) -> tuple[int, ...]:
        """The global index of each expert held here, in the order of the stacked weights."""
        return self.placement.experts_of()

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w_in, self.w_out, self.b_in, self.b_out)

    def forward(self, rows: Tensor, tokens_per_expert: Tensor, capacity: int | None = None,
                weights: ExpertWeights | None = None) -> Tensor:
        """``rows [N, d_model]`` grouped by expert → ``[N, d_model]``: the one expert op,
        :func:`moeflux.ops.expert_ffn`.

        Dropless: expert ``e``'s rows are the ``tokens_per_expert[e]`` rows after
        those of experts ``< e``. With a capacity every expert owns ``capacity``
        rows (zero padding past its count), so a batched matmul does the work.
        ``weights``: other experts' parameters of this module's shape (copies of
        other ranks' experts: FasterMoE's shadows); by default this module's own.
        """
        w = self.weights() if weights is None else weights
        return ops.expert_ffn(rows, w.w_in, w.w_out, tokens_per_expert, self.activation, capacity, w.b_in, w.b_out)

    def extra_repr(self) -> str:
        return (f"experts {list(self.global_experts)}, d_model={self.d_model}, d_ffn={self.d_ffn}, "
                f"activation={self.activation}, bias={self.b_in is not None}")


class SharedExpert(nn.Module):
    """A dense SwiGLU FFN that every token goes through, next to the routed experts
    (Qwen2-MoE's ``shared_expert``, DeepSeek's ``shared_experts``); with
    ``gated=True`` its output is scaled per token by ``sigmoid(shared_expert_gate(x))``
    as in Qwen2-MoE."""

    def __init__(self, d_model: int, d_ffn: int, gated: bool = False, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype, "bias": False}
        self.gate_proj = nn.Linear(d_model, d_ffn, **factory)
        self.up_proj = nn.Linear(d_model, d_ffn, **factory)
        self.down_proj = nn.Linear(d_ffn, d_model, **factory)
        self.gate = nn.Linear(d_model, 1, **factory) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out if self.gate is None else torch.sigmoid(self.gate(x)) * out
