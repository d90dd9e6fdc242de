"""Typed wrappers of the ``torch.ops.moeflux`` ops, and their fake kernels.

The ops are implemented in C++/CUDA (``csrc/``, ``cuda/``); this module only
gives them Python signatures and docstrings, and registers the fake (meta)
kernels that let shapes propagate under FakeTensor.

Conventions: ``T`` tokens, ``H`` hidden size, ``E`` experts, ``k`` experts per
token, ``N`` permuted rows (``T * k`` dropless, ``E * capacity`` with a
capacity). Expert ids and row maps are int32; ``-1`` marks a dropped slot.
Routing weights are float32 (float64 for float64 logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _C  # loading the extension registers the ops

__all__ = [
    "route",
    "router_aux_loss",
    "apply_capacity",
    "permute",
    "unpermute",
    "grouped_mm",
    "expert_ffn",
    "all_to_all",
    "dispatch",
    "combine",
    "DispatchPlan",
    "pipelined_moe",
    "routing_counts",
    "count_exchange",
    "broadcast_expert_rows",
    "move_expert_rows",
    "collective_counts",
    "reset_collective_counts",
    "cpu_workspace_bytes",
    "release_cpu_workspace",
]

_ops = torch.ops.moeflux


def route(
    logits: Tensor,
    k: int,
    renormalize: bool = False,
    scoring: str = "softmax",
    expert_bias: Tensor | None = None,
    num_groups: int = 1,
    top_groups: int = 1,
    scale: float = 1.0,
    group_score_top: int = 2,
) -> tuple[Tensor, Tensor]:
    """Fused scoring + top-k of router logits ``[T, E]``.

    Returns ``weights [T, k]`` (float32; float64 for float64 logits) and
    ``expert_ids [T, k]`` (int32), best choice first; ties go to the lower
    expert index. The weights are the scores of the chosen experts:
    ``softmax(logits)`` or ``sigmoid(logits)`` (``scoring``); with
    ``renormalize=True`` divided by their sum (for softmax that is the softmax
    over the top-k logits: Mixtral's top-k-then-softmax, Qwen-MoE's
    ``norm_topk_prob``); finally multiplied by ``scale``.

    DeepSeek-V3 routing: ``expert_bias [E]`` is added to the scores for the
    choice only (not to the weights), and with ``num_groups > 1`` the experts
    form ``num_groups`` groups of which only the ``top_groups`` best (by the
    sum of their ``group_score_top`` best biased scores: 2 in DeepSeek-V3, 1,
    the maximum, in DeepSeek-V2) may be chosen. Differentiable with
    respect to ``logits`` (the bias and the group limit steer the choice only).
    """
    return _ops.route(logits, k, renormalize, scoring, expert_bias, num_groups, top_groups, scale, group_score_top)


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

    ``input [N, K]``, ``weight [E, K, M]``, ``tokens_per_expert [E]`` (int32, on
    ``input``'s device or on the CPU): rows ``[start_e, start_e +
    tokens_per_expert[e])`` are multiplied by ``weight[e]``. Rows past the last
    segment are zero when the counts are on the CPU, unspecified otherwise.

    ``torch._grouped_mm`` does the work where it can (CPU in float32, bfloat16
    and float16; CUDA in bfloat16 on Hopper/Blackwell; ``K`` and ``M`` a
    multiple of 16 bytes) and never reads the counts on the host; elsewhere one matmul per
    segment, with the counts read on the host once in forward and reused by
    backward. Differentiable with respect to ``input`` and ``weight``: its own
    backward writes each gradient once (experts without rows get zeros).
    """
    return _ops.grouped_mm(input, weight, tokens_per_expert)


def expert_ffn(rows: Tensor, w_in: Tensor, w_out: Tensor, tokens_per_expert: Tensor, activation: str = "swiglu",
               capacity: int | None = None, b_in: Tensor | None = None, b_out: Tensor | None = None) -> Tensor:
    """The experts' two-layer FFN over rows grouped by expert, as one op with its own backward.

    ``y[segment e] = act(x[segment e] @ w_in[e]) @ w_out[e]`` with ``rows [N, H]``,
    ``w_in [E, H, F_in]``, ``w_out [E, F, H]``, and ``act`` SwiGLU (``F_in = 2F``:
    gate columns first, then up; ``silu(gate) * up``), GELU (``F_in = F``) or
    ``"clamped_swiglu:<limit>:<alpha>"`` (GPT-OSS: ``g = min(gate, limit)``,
    ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``). Optional
    per-expert biases ``b_in [E, F_in]`` and ``b_out [E, H]`` are added after
    each GEMM (rows past the segments get none).
    Segments as in :func:`grouped_mm`; with a ``capacity`` expert ``e`` owns rows
    ``[e * capacity, (e + 1) * capacity)`` (``N = E * capacity``), of which the
    first ``tokens_per_expert[e]`` hold tokens and the rest is zero padding (as
    :func:`permute` and :func:`dispatch` leave it): with the counts on the CPU
    only the token rows are multiplied, otherwise batched matmuls run over
    the padded rows (no host synchronisation). Differentiable with respect to ``rows``, the weights and
    the biases; backward writes every gradient once, the activation's gradient
    straight into its ``[N, F_in]`` buffer.
    """
    return _ops.expert_ffn(rows, w_in, w_out, tokens_per_expert, activation, capacity, b_in, b_out)


# ---- expert parallelism


def _group_name(group: dist.ProcessGroup | str | None) -> str:
    if isinstance(group, str):
        return group
    return (group if group is not None else dist.group.WORLD).group_name


def all_to_all(
    input: Tensor,
    output_split_sizes: list[int],
    input_split_sizes: list[int],
    group: dist.ProcessGroup | str | None = None,
    *,
    agree_first: bool = True,
) -> Tensor:
    """All-to-all of the rows of ``input`` over ``group`` (default: the world).

    ``input_split_sizes[r]`` rows go to rank ``r``; ``output_split_sizes[r]``
    rows arrive from rank ``r``. Goes through the group's c10d backend (gloo
    for CPU tensors, NCCL for CUDA tensors). Differentiable: the backward is
    the all-to-all with the splits swapped.

    ``agree_first``: before the exchange, one small fixed-size exchange checks
    every rank's arguments (splits that match pairwise, the same row shape and
    dtype, valid local arguments), so that a mistake on any rank raises the same
    error on every rank instead of a hang or an abort inside the backend. Pass
    False to skip it where the splits are known to match (one collective less).
    """
    return _ops.all_to_all(input, output_split_sizes, input_split_sizes, _group_name(group), agree_first)


class DispatchPlan(NamedTuple):
    """Routing state that :func:`dispatch` creates and :func:`combine` consumes."""

    tokens_per_local_expert: Tensor  # [E_local] int32: rows of each local expert in expert_rows
    row_map: Tensor  # [T, k] int32: row of each (token, slot) in the sent block, -1 if dropped
    regroup_map: Tensor  # [M, 1] int32: received row that becomes expert row m
    send_splits: Tensor  # [P] int64 (CPU): rows sent to each rank
    recv_splits: Tensor  # [P] int64 (CPU): rows received from each rank
    group_name: str
    capacity: int | None


def dispatch(
    tokens: Tensor,
    expert_ids: Tensor,
    num_experts: int,
    capacity: int | None = None,
    group: dist.ProcessGroup | str | None = None,
    routing_counts: Tensor | None = None,
    agree_first: bool = True,
) -> tuple[Tensor, DispatchPlan]:
    """Send every token to the ranks that hold its experts.

    Expert ``e`` lives on rank ``e // (num_experts // P)`` of the
    expert-parallel ``group`` of ``P`` ranks. Returns ``expert_rows [M, H]``,
    the rows this rank's experts must process, grouped by local expert (and by
    source rank within an expert), and the :class:`DispatchPlan`.

    Dropless (``capacity=None``): one all-to-all of per-expert counts (which
    also checks that every rank agrees on the hidden size, dtype and
    ``num_experts``), one host synchronisation, then the tokens. With a
    capacity every rank sends ``capacity`` rows per expert (zero padded): fixed
    splits, no count exchange, no host synchronisation; every rank must then
    use the same capacity. Differentiable with respect to ``tokens``.

    ``routing_counts``: :func:`routing_counts` of these ``expert_ids`` (dropless only); dispatch then
    takes its split sizes from it instead of exchanging counts (no collective, no host synchronisation).

    ``agree_first``: every rank first checks its arguments and the ranks compare ``num_experts``, the hidden
    size, the dtype and the capacity in one small fixed-size exchange, so that a rank with bad or different
    arguments makes every rank raise the same clear error (instead of a hang or an abort in the exchange).
    :class:`moeflux.MoE` agrees on its configuration once, at construction, and passes ``False``.
    """
    name = _group_name(group)
    rows, counts, row_map, regroup_map, send, recv = _ops.dispatch(tokens, expert_ids, num_experts, capacity, name,
                                                                   routing_counts, agree_first)
    return rows, DispatchPlan(counts, row_map, regroup_map, send, recv, name, capacity)


def combine(expert_out: Tensor, plan: DispatchPlan, weights: Tensor | None = None) -> Tensor:
    """Send expert outputs back and sum them per token: the inverse of :func:`dispatch`.

    ``expert_out [M, H]`` in the order of dispatch's ``expert_rows``; returns
    ``out[t] = sum_j weights[t, j] * expert_output(t, j)`` ``[T, H]``,
    accumulated in float32. Differentiable with respect to ``expert_out`` and
    ``weights``.
    """
    output, _ = _ops.combine(
        expert_out, plan.row_map, plan.regroup_map, plan.send_splits, plan.recv_splits, weights, plan.group_name
    )
    return output


def pipelined_moe(
    tokens: Tensor,
    expert_ids: Tensor,
    weights: Tensor | None,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    num_experts: int,
    capacity: int | None = None,
    group: dist.ProcessGroup | str | None = None,
    schedule: str = "chunked",
    chunks: int = 2,
    group_size: int = 1,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    routing_counts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """dispatch -> experts -> combine of one expert-parallel layer, in stages that overlap communication
    with expert compute, forward and backward.

    The experts are :func:`expert_ffn` on each stage's rows: ``act(x @ w_in[e] + b_in[e]) @ w_out[e] +
    b_out[e]`` with ``activation`` ``"swiglu"`` or ``"clamped_swiglu:<limit>:<alpha>"`` (``w_in [E_local, H,
    2F]``, gate half first) or ``"gelu"`` (``w_in [E_local, H, F]``); ``w_out [E_local, F, H]``; the biases
    ``b_in [E_local, F_in]``, ``b_out [E_local, H]`` are optional (GPT-OSS). ``schedule``:

    - ``"bulk"``: one stage (the plain exchange, in this op's one autograd function);
    - ``"chunked"``: every (destination, expert) block of rows is split into ``chunks`` parts; stage ``i+1``'s
      dispatch all-to-all is on the wire while stage ``i``'s experts run, and stage ``i``'s combine while
      stage ``i+1`` computes (Lina's micro-ops);
    - ``"pairwise"``: ranks form groups of ``group_size``; in stage ``s`` group ``g`` sends to group
      ``(g + s) mod n`` and receives from ``(g - s) mod n`` (FasterMoE's smart schedule).

    Equal to :func:`dispatch`, the experts and :func:`combine` in sequence (up to the order in which the
    expert weight gradients are summed). Token all-to-alls: 2 per stage forward, 2 per stage backward,
    plus dispatch's count exchange when dropless, which ``routing_counts`` (:func:`routing_counts` of these
    ``expert_ids``, dropless only) replaces, as in :func:`dispatch`. Returns ``(output [T, H],
    tokens_per_local_expert)``.
    """
    return _ops.pipelined_moe(tokens, expert_ids, weights, w_in, w_out, activation, num_experts, capacity,
                              _group_name(group), schedule, chunks, group_size, b_in, b_out, routing_counts)


def count_exchange(tokens: Tensor, counts: Tensor, num_experts: int,
                   group: dist.ProcessGroup | str | None = None) -> tuple[Tensor, Tensor]:
    """The one count/header exchange (the one :func:`dispatch` starts with): sends rank ``r`` the row counts
    ``counts[r]`` (``[P, m]`` integers on the tokens' device) with this rank's hidden size, dtype and
    ``num_experts``, which every rank checks (ranks that disagree all raise, naming the rank). Returns
    ``(sent, received)``, ``[P, m]`` int64 on the host, read in one host synchronisation."""
    return _ops.count_exchange(tokens, counts, num_experts, _group_name(group))


def routing_counts(tokens: Tensor, expert_ids: Tensor, num_experts: int,
                   group: dist.ProcessGroup | str | None = None, agree_first: bool = True) -> Tensor:
    """``[P, E]`` int64 on the host: how many of ``expert_ids``' slots every rank of ``group`` routes to each
    expert position, on every rank (one small all-to-all, one host synchronisation). It also checks that the
    ranks agree on ``tokens``' hidden size and dtype and on ``num_experts``, and that every id is in
    ``[-1, num_experts)``, raising the same error on every rank. ``agree_first=False`` skips the first of
    its two collectives, the agreement on the arguments; only for callers that know every rank passes the same
    ``num_experts`` (a layer's configuration is agreed at construction) and valid arguments."""
    return _ops.routing_counts(tokens, expert_ids, num_experts, _group_name(group), agree_first)


def broadcast_expert_rows(local: Tensor, positions: list[int], group: dist.ProcessGroup | str | None = None,
                          agree_first: bool = True) -> Tensor:
    """The rows of expert ``positions`` (ascending; position ``p`` is row ``p % E_local`` of rank
    ``p // E_local``'s ``local [E_local, ...]``) on every rank: ``[len(positions), ...]``. Differentiable:
    the gradient of every rank's copy is summed onto the owner's row (FasterMoE's shadowed experts).
    ``agree_first=False`` skips the agreement on the arguments (one small collective) for callers whose
    ranks chose ``positions`` from shared data."""
    return _ops.broadcast_expert_rows(local, positions, _group_name(group), agree_first)


def move_expert_rows(local: Tensor, old_expert_at: list[int], new_expert_at: list[int],
                     group: dist.ProcessGroup | str | None = None) -> Tensor:
    """Per-expert rows ``local [E_local, ...]`` laid out by placement ``old_expert_at`` (global expert of
    each position) -> the same experts' rows laid out by ``new_expert_at``: one all-to-all of the experts
    that change rank. Not differentiable (for parameters and optimizer state between steps)."""
    return _ops.move_expert_rows(local, old_expert_at, new_expert_at, _group_name(group))


def collective_counts() -> dict[str, int]:
    """Collectives this process has issued through moeflux ops, and its reads of routing counts on the host
    (each a host synchronisation on a GPU; the ``"counts:"`` sites of :func:`host_reads`):
    ``{"token_all_to_alls": ..., "count_exchanges": ..., "host_count_reads": ...}``."""
    return _C.collective_counts()


def to_host(tensor: Tensor, site: str) -> Tensor:
    """``tensor`` on the host (a host synchronisation when it lives on a GPU), counted under ``site`` on every
    device: moeflux reads device data on the host only through this (and its C++ twin), so that
    :func:`host_reads` sees every read, on the CPU too. Sites reading routing counts are ``"counts:<where>"``."""
    return _C.to_host(tensor, site)


def host_reads() -> dict[str, int]:
    """Device->host reads by site since the last :func:`reset_collective_counts` (see :func:`to_host`)."""
    return _C.host_reads()


def reset_collective_counts() -> None:
    """Zero :func:`collective_counts` and :func:`host_reads`."""
    _C.reset_collective_counts()


def cpu_workspace_bytes() -> int:
    """Bytes of CPU memory the experts' workspace pool holds free for the next step's buffers. On the CPU the
    expert FFN's large buffers (activations, their gradients, weight gradients) come from this pool rather
    than from fresh mmaps, which would page-fault on every step; it keeps at most 4 GiB free."""
    return _C.cpu_workspace_cached_bytes()


def release_cpu_workspace() -> None:
    """Return the workspace pool's free memory to the system (like ``torch.cuda.empty_cache``)."""
    _C.release_cpu_workspace()


# ---- fake kernels: output shapes and dtypes without touching data


def _weight_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("moeflux::route")
def _route_fake(logits: Tensor, k: int, renormalize: bool = False, scoring: str = "softmax",
                expert_bias: Tensor | None = None, num_groups: int = 1, top_groups: int = 1,
                scale: float = 1.0, group_score_top: int = 2) -> tuple[Tensor, Tensor]:
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=_weight_dtype(logits)), logits.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("moeflux::route_backward")
def _route_backward_fake(
    grad_weights: Tensor, logits: Tensor, weights: Tensor, expert_ids: Tensor, renormalize: bool, scoring: str,
    scale: float,
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("moeflux::apply_capacity")
def _apply_capacity_fake(
    expert_ids: Tensor, weights: Tensor, num_experts: int, capacity: int, drop_by_probability: bool = False
) -> Tensor:
    return torch.empty_like(expert_ids, memory_format=torch.contiguous_format)


def _check_same_device(op: str, *named: tuple[str, Tensor | None]) -> None:
    """The fake kernels run where the real ones' checks do not (meta tensors, tracing): tensors that the real
    kernel requires on one device must be on one device there too."""
    present = [(name, t) for name, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        torch._check(t.device == first.device, lambda: f"moeflux.{op}: {name} must be on the same device as "
                                                      f"{first_name} ({first.device}), got {t.device}")


@torch.library.register_fake("moeflux::permute")
def _permute_fake(
    tokens: Tensor, expert_ids: Tensor, num_experts: int, capacity: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    _check_same_device("permute", ("tokens", tokens), ("expert_ids", expert_ids))
    num_rows = expert_ids.numel() if capacity is None else num_experts * capacity
    return (
        tokens.new_empty((num_rows, tokens.shape[1])),
        expert_ids.new_empty((num_experts,)),
        torch.empty_like(expert_ids, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("moeflux::unpermute")
def _unpermute_fake(rows: Tensor, row_map: Tensor, weights: Tensor | None = None) -> Tensor:
    _check_same_device("unpermute", ("rows", rows), ("row_map", row_map), ("weights", weights))
    return rows.new_empty((row_map.shape[0], rows.shape[1]))


@torch.library.register_fake("moeflux::unpermute_backward")
def _unpermute_backward_fake(
    grad_output: Tensor, rows: Tensor, row_map: Tensor, weights: Tensor | None
) -> tuple[Tensor, Tensor]:
    grad_rows = torch.empty_like(rows, memory_format=torch.contiguous_format)
    if weights is None:
        return grad_rows, rows.new_empty((0,))
    return grad_rows, torch.empty_like(weights, memory_format=torch.contiguous_format)


def _group_size(group_name: str) -> int:
    return dist.distributed_c10d._resolve_process_group(group_name).size()


@torch.library.register_fake("moeflux::all_to_all")
def _all_to_all_fake(input: Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group_name: str,
                     agree_first: bool = True):
    return input.new_empty((sum(output_split_sizes), *input.shape[1:]))


@torch.library.register_fake("moeflux::dispatch")
def _dispatch_fake(tokens: Tensor, expert_ids: Tensor, num_experts: int, capacity: int | None, group_name: str,
                   routing_counts: Tensor | None = None, agree_first: bool = True):
    _check_same_device("dispatch", ("tokens", tokens), ("expert_ids", expert_ids))
    world = _group_size(group_name)
    local = num_experts // world
    if capacity is None:  # how many rows arrive is data-dependent
        num_rows = torch.library.get_ctx().new_dynamic_size()
    else:
        num_rows = world * local * capacity
    splits = torch.empty((world,), dtype=torch.int64, device="cpu")
    return (
        tokens.new_empty((num_rows, tokens.shape[1])),
        expert_ids.new_empty((local,)),
        torch.empty_like(expert_ids, memory_format=torch.contiguous_format),
        expert_ids.new_empty((num_rows, 1)),
        splits,
        torch.empty_like(splits),
    )


@torch.library.register_fake("moeflux::dispatch_backward")
def _dispatch_backward_fake(grad_expert_rows, row_map, regroup_map, send_splits, recv_splits, group_name):
    return grad_expert_rows.new_empty((row_map.shape[0], grad_expert_rows.shape[1]))


@torch.library.register_fake("moeflux::combine")
def _combine_fake(expert_out, row_map, regroup_map, send_splits, recv_splits, weights, group_name):
    _check_same_device("combine", ("expert_out", expert_out), ("row_map", row_map), ("weights", weights))
    returned = torch.library.get_ctx().new_dynamic_size()
    return (
        expert_out.new_empty((row_map.shape[0], expert_out.shape[1])),
        expert_out.new_empty((returned, expert_out.shape[1])),
    )


@torch.library.register_fake("moeflux::pipelined_moe")
def _pipelined_moe_fake(tokens, expert_ids, weights, w_in, w_out, activation, num_experts, capacity, group_name,
                        schedule, chunks, group_size, b_in=None, b_out=None, routing_counts=None):
    return tokens.new_empty(tokens.shape), expert_ids.new_empty((num_experts // _group_size(group_name),))


@torch.library.register_fake("moeflux::count_exchange")
def _count_exchange_fake(tokens, counts, num_experts, group_name):
    return (torch.empty(counts.shape, dtype=torch.int64, device="cpu"),
            torch.empty(counts.shape, dtype=torch.int64, device="cpu"))


@torch.library.register_fake("moeflux::combine_backward")
def _combine_backward_fake(grad_output, returned_rows, row_map, regroup_map, send_splits, recv_splits, weights,
                           group_name):
    grad_weights = grad_output.new_empty((0,)) if weights is None else torch.empty_like(weights)
    return grad_output.new_empty((regroup_map.shape[0], grad_output.shape[1])), grad_weights


@torch.library.register_fake("moeflux::routing_counts")
def _routing_counts_fake(tokens, expert_ids, num_experts, group_name, agree_first=True):
    return torch.empty((_group_size(group_name), num_experts), dtype=torch.int64, device="cpu")


@torch.library.register_fake("moeflux::broadcast_expert_rows")
def _broadcast_expert_rows_fake(local, positions, group_name, agree_first=True):
    return local.new_empty((len(positions), *local.shape[1:]))


@torch.library.register_fake("moeflux::reduce_expert_rows")
def _reduce_expert_rows_fake(grad_rows, positions, local_experts, group_name):
    return grad_rows.new_empty((local_experts, *grad_rows.shape[1:]))


@torch.library.register_fake("moeflux::move_expert_rows")
def _move_expert_rows_fake(local, old_expert_at, new_expert_at, group_name):
    return torch.empty_like(local, memory_format=torch.contiguous_format)


@torch.library.register_fake("moeflux::grouped_mm")
def _grouped_mm_fake(input, weight, tokens_per_expert):
    return input.new_empty((input.shape[0], weight.shape[2]))


@torch.library.register_fake("moeflux::grouped_mm_backward")
def _grouped_mm_backward_fake(grad_output, input, weight, tokens_per_expert, output_mask):
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else None
    return grad_input, grad_weight


@torch.library.register_fake("moeflux::expert_ffn_forward")
def _expert_ffn_forward_fake(rows, w_in, w_out, tokens_per_expert, activation, capacity, b_in=None, b_out=None):
    n = rows.shape[0]
    return rows.new_empty((n, rows.shape[1])), rows.new_empty((n, w_in.shape[2])), rows.new_empty((n, w_out.shape[1]))


@torch.library.register_fake("moeflux::expert_ffn_backward")
def _expert_ffn_backward_fake(grad_output, rows, w_in, w_out, tokens_per_expert, pre_activation, activated,
                              activation, capacity, biased=False):
    contiguous = torch.contiguous_format
    grad_b_in = rows.new_empty((w_in.shape[0], w_in.shape[2]) if biased else (0,))
    grad_b_out = rows.new_empty((w_in.shape[0], w_out.shape[2]) if biased else (0,))
    return (torch.empty_like(rows, memory_format=contiguous), torch.empty_like(w_in, memory_format=contiguous),
            torch.empty_like(w_out, memory_format=contiguous), grad_b_in, grad_b_out)
