"""Routing replay: make a MoE layer route exactly as recorded per-expert counts say, with real compute and
real traffic, while its router keeps training.

A recorded trace gives, per step, rank and layer, how many token slots chose each expert (the SmartMoE trace:
``counts[iteration, source rank, layer, micro-batch, expert]``). On a testbed of another size the replay

1. maps the trace's ranks onto the testbed's (:func:`merge_source_ranks`: consecutive source ranks merged,
   experts kept, so the expert skew survives) and picks layers and iterations (:func:`trace_replay_counts`);
2. rescales one rank's counts to its batch (:func:`fit_counts`: exactly ``T * k`` slots, none above ``T``,
   since a token chooses an expert at most once);
3. builds expert ids ``[T, k]`` with distinct experts per token whose per-expert counts are exactly those
   (:func:`replay_expert_ids`: Ryser's construction, each expert from the most to the least loaded taking the
   tokens with the most free slots, ties broken by the router's score for that expert, so tokens that prefer
   a hot expert get it);
4. takes the weights from the layer's own router scores at those ids (:func:`replay_weights`: the route op's
   scoring, renormalisation and scale), so they are differentiable and the router trains.

:class:`RoutingReplay` does 2-4 in a forward hook on :attr:`moeflux.MoE.router`: the layer, its exchange
and its load-balancing machinery run unchanged on the replayed ids (the aux loss, too, is computed from the
real logits and the replayed ids).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .routing import RoutingTrace

__all__ = ["merge_source_ranks", "trace_replay_counts", "trace_sample_counts", "uniform_replay_counts", "fit_counts",
           "replay_expert_ids", "replay_weights", "RoutingReplay", "SampleRoutingReplay", "attach_replay"]


# ---------------------------------------------------------------------------------------------- trace -> testbed


def merge_source_ranks(counts: np.ndarray, ranks: int) -> np.ndarray:
    """``counts[..., R0, E]`` -> ``[..., ranks, E]``: testbed rank ``r`` takes the slots of source ranks
    ``[r * R0 / ranks, (r + 1) * R0 / ranks)`` (``R0`` must be a multiple of ``ranks``). Experts are kept, so
    the global expert load, and with it its skew, is unchanged."""
    counts = np.asarray(counts)
    if counts.ndim < 2:
        raise ValueError(f"merge_source_ranks: counts must be [..., ranks, experts], got shape {counts.shape}")
    r0 = counts.shape[-2]
    if not isinstance(ranks, (int, np.integer)) or ranks < 1 or r0 % ranks:
        raise ValueError(f"merge_source_ranks: ranks must be a positive divisor of the trace's {r0} ranks, "
                         f"got {ranks!r}")
    return counts.reshape(*counts.shape[:-2], ranks, r0 // ranks, counts.shape[-1]).sum(-2)


def trace_replay_counts(trace: RoutingTrace, layers: Sequence[int], ranks: int, start: int, steps: int
                        ) -> np.ndarray:
    """``[steps, ranks, len(layers), E]`` int64: step ``i`` replays trace sample ``(start + i) mod N`` (summed
    over its micro-batches), the trace's ranks merged onto ``ranks`` (:func:`merge_source_ranks`)."""
    if not layers or any(not 0 <= l < trace.num_layers for l in layers):
        raise ValueError(f"trace_replay_counts: layers must be a non-empty list in [0, {trace.num_layers}), "
                         f"got {list(layers)}")
    if steps < 1 or start < 0:
        raise ValueError(f"trace_replay_counts: need steps >= 1 and start >= 0, got {steps}, {start}")
    index = (start + np.arange(steps)) % trace.num_iterations
    picked = trace.counts[index][:, :, list(layers)].sum(3)  # [steps, R0, L, E]
    return merge_source_ranks(picked.transpose(0, 2, 1, 3), ranks).transpose(0, 2, 1, 3)


def trace_sample_counts(trace: RoutingTrace, layers: Sequence[int], samples: int, start: int, steps: int
                        ) -> np.ndarray:
    """``[steps, samples, len(layers), E]``: per-sample routing for sample placement (each sample's routing
    follows it to whichever rank holds it). Global sample ``g`` of step ``i`` replays the counts of one
    (source rank, micro-batch) unit of trace sample ``(start + i) mod N``: unit ``g * U // samples`` of the
    ``U = R0 * M`` units (source rank major) when ``samples <= U``, so testbed rank ``r``'s samples come from the
    source ranks :func:`merge_source_ranks` gives it; unit ``g mod U`` otherwise. A unit is 2048 tokens of one
    source rank: it carries that rank's expert skew, a milder affinity than one sequence's."""
    if not layers or any(not 0 <= l < trace.num_layers for l in layers):
        raise ValueError(f"trace_sample_counts: layers must be a non-empty list in [0, {trace.num_layers}), "
                         f"got {list(layers)}")
    if steps < 1 or start < 0 or samples < 1:
        raise ValueError(f"trace_sample_counts: need steps, samples >= 1 and start >= 0, got {steps}, {samples}, "
                         f"{start}")
    index = (start + np.arange(steps)) % trace.num_iterations
    picked = trace.counts[index][:, :, list(layers)]  # [steps, R0, L, M, E]
    units = picked.transpose(0, 1, 3, 2, 4).reshape(steps, -1, len(layers), picked.shape[-1])
    u = units.shape[1]
    which = np.arange(samples) * u // samples if samples <= u else np.arange(samples) % u
    return units[:, which].astype(np.int64)


def uniform_replay_counts(steps: int, ranks: int, layers: int, num_experts: int, slots_per_rank: int = 0,
                          seed: int = 0) -> np.ndarray:
    """``[steps, ranks, layers, E]``: uniform routing. ``slots_per_rank = 0``: equal counts (every expert gets
    ``T * k / E`` slots of every rank, up to rounding by :func:`fit_counts`); otherwise each rank's
    ``slots_per_rank`` slots drawn uniformly over the experts (:func:`moeflux.sim.uniform`: a balanced router's
    sampling noise), the same on every rank for a given ``seed``."""
    if min(steps, ranks, layers, num_experts) < 1 or slots_per_rank < 0:
        raise ValueError(f"uniform_replay_counts: need steps, ranks, layers, num_experts >= 1 and slots_per_rank "
                         f">= 0, got {steps}, {ranks}, {layers}, {num_experts}, {slots_per_rank}")
    if slots_per_rank == 0:
        return np.ones((steps, ranks, layers, num_experts), dtype=np.int64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(slots_per_rank, np.full(num_experts, 1.0 / num_experts), size=(steps, ranks, layers))
    return draws.astype(np.int64)


# ---------------------------------------------------------------------------------------------- one rank's batch


def fit_counts(counts: np.ndarray | Sequence[float], num_tokens: int, top_k: int) -> np.ndarray:
    """One rank's per-expert slot counts rescaled to a batch of ``num_tokens`` tokens and ``top_k`` experts per
    token: ``[E]`` int64 summing to exactly ``num_tokens * top_k``, each at most ``num_tokens``.

    Proportional (an expert above ``num_tokens`` is capped and its excess spread over the others in proportion
    to their counts, repeatedly), then rounded by largest remainder. All-zero counts become uniform."""
    raw = np.asarray(counts, dtype=np.float64)
    if raw.ndim != 1 or raw.size < 1 or not np.all(np.isfinite(raw)) or raw.min() < 0:
        raise ValueError(f"fit_counts: counts must be a 1-d array of finite numbers >= 0, got shape {raw.shape}")
    num_experts = raw.size
    if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
        raise ValueError(f"fit_counts: num_tokens must be an int >= 0, got {num_tokens!r}")
    if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_experts:
        raise ValueError(f"fit_counts: top_k must be an int in [1, {num_experts}], got {top_k!r}")
    total = num_tokens * top_k
    if total == 0:
        return np.zeros(num_experts, dtype=np.int64)
    if raw.sum() == 0:
        raw = np.ones(num_experts)
    exact = raw / raw.sum() * total
    capped = np.zeros(num_experts, dtype=bool)
    for _ in range(num_experts):  # each round caps at least one more expert
        over = exact > num_tokens * (1 + 1e-12)
        if not over.any():
            break
        excess = (exact[over] - num_tokens).sum()
        exact[over] = num_tokens
        capped |= over
        free = ~capped
        weights = raw * free
        weights = weights / weights.sum() if weights.sum() > 0 else free / free.sum()
        exact = exact + excess * weights
    exact = np.minimum(exact, num_tokens)
    whole = np.floor(exact + 1e-9).astype(np.int64)
    short = total - int(whole.sum())
    if short > 0:  # biggest remainders first, among experts with room
        remainder = np.where(whole < num_tokens, exact - whole, -np.inf)
        order = np.argsort(-remainder, kind="stable")
        whole[order[:short]] += 1
    elif short < 0:  # float rounding only: take back from the biggest counts
        order = np.argsort(-whole, kind="stable")
        whole[order[:-short]] -= 1
    assert whole.sum() == total and whole.max() <= num_tokens and whole.min() >= 0, "fit_counts: internal error"
    return whole


def replay_expert_ids(counts: Tensor | np.ndarray | Sequence[int], top_k: int, scores: Tensor | None = None,
                      generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Expert ids ``[T, top_k]`` int32 (``T = sum(counts) / top_k``) with ``top_k`` distinct experts per token
    and exactly ``counts[e]`` slots on expert ``e``. Needs ``counts[e] <= T`` (:func:`fit_counts` ensures it).

    Ryser's construction: experts from the most to the least loaded, each taking the tokens with the most free
    slots (which keeps the rest feasible), ties broken by ``scores [T, E]`` for that expert (e.g. the router's
    logits: the tokens that like an expert most get it), or at random without scores. With scores, each
    token's experts are ordered best first, like the route op's."""
    c = torch.as_tensor(np.asarray(counts), dtype=torch.int64).flatten().cpu()
    num_experts = c.numel()
    if num_experts < 1 or (c < 0).any():
        raise ValueError("replay_expert_ids: counts must be a non-empty array of ints >= 0")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"replay_expert_ids: top_k must be an int in [1, {num_experts}], got {top_k!r}")
    total = int(c.sum())
    if total % top_k:
        raise ValueError(f"replay_expert_ids: the counts' sum ({total}) must be a multiple of top_k ({top_k})")
    num_tokens = total // top_k
    if int(c.max()) > num_tokens:
        raise ValueError(f"replay_expert_ids: expert {int(c.argmax())} has {int(c.max())} slots but there are only "
                         f"{num_tokens} tokens (an expert takes a token at most once; see fit_counts)")
    if scores is not None:
        if scores.shape != (num_tokens, num_experts):
            raise ValueError(f"replay_expert_ids: scores must be [T={num_tokens}, E={num_experts}], got "
                             f"{tuple(scores.shape)}")
        device = scores.device if device is None else device
        # In [0, 1] per expert, so that a free slot (+2) always outranks a score.
        s = scores.detach().to(torch.float64)
        low, high = s.min(0, keepdim=True).values, s.max(0, keepdim=True).values
        tie = ((s - low) / (high - low).clamp_min(1e-300)).cpu()
    else:
        tie = torch.rand(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    free = torch.full((num_tokens,), top_k, dtype=torch.int64)
    ids = torch.full((num_tokens, top_k), -1, dtype=torch.int32)
    order = sorted(range(num_experts), key=lambda e: (-int(c[e]), e))
    for e in order:
        n = int(c[e])
        if n == 0:
            break
        chosen = torch.topk(free.to(torch.float64) * 2 + tie[:, e], n, sorted=False).indices
        if not bool((free[chosen] > 0).all()):  # cannot happen when counts[e] <= T (Gale-Ryser)
            raise RuntimeError("replay_expert_ids: internal error (no token with a free slot)")
        ids[chosen, top_k - free[chosen]] = e
        free[chosen] -= 1
    if scores is not None and top_k > 1:
        best_first = torch.argsort(-tie.gather(1, ids.long()), dim=1, stable=True)
        ids = ids.gather(1, best_first)
    return ids.to(device) if device is not None else ids


def replay_weights(logits: Tensor, expert_ids: Tensor, scoring: str = "softmax", renormalize: bool = False,
                   scale: float = 1.0) -> Tensor:
    """The routing weights ``[T, k]`` of ``expert_ids`` from router ``logits [T, E]``, as the route op computes
    them for its own choice: ``softmax`` or ``sigmoid`` scores at the ids, divided by their sum if
    ``renormalize`` (+1e-20 for sigmoid), times ``scale``. float32 (float64 for float64 logits);
    differentiable with respect to ``logits``."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"replay_weights: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if logits.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"replay_weights: need logits [T, E] and expert_ids [T, k], got {tuple(logits.shape)} "
                         f"and {tuple(expert_ids.shape)}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    scores = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    weights = scores.gather(1, expert_ids.long().to(scores.device))
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    return weights * scale if scale != 1 else weights


# ---------------------------------------------------------------------------------------------- the layer hook


class RoutingReplay:
    """Replays ``counts [steps, E]`` (this rank's slots per expert, any scale: each step is fitted to the batch
    by :func:`fit_counts`) in one :class:`moeflux.MoE` layer: :meth:`attach` puts a forward hook on the layer's
    router that swaps the router's choice for :func:`replay_expert_ids` of the current step's counts (ties by
    the real logits) and its weights for :func:`replay_weights` of those ids. Each forward in training mode
    moves to the next step (cycling); set :attr:`step` to jump. :attr:`last_counts` holds the counts used by
    the last forward."""

    def __init__(self, counts: np.ndarray, *, advance: bool = True) -> None:
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[0] < 1 or not np.issubdtype(counts.dtype, np.number) or counts.min() < 0:
            raise ValueError(f"RoutingReplay: counts must be [steps, experts] of numbers >= 0, got {counts.dtype} "
                             f"{counts.shape}")
        self.counts = counts
        self.advance = advance
        self.step = 0
        self.last_counts: np.ndarray | None = None
        self._handle = None

    def routing(self, router: torch.nn.Module, routing: object) -> object:
        """The replayed :class:`moeflux.Routing` for ``router``'s output ``routing`` (at the current step)."""
        from ..router import Routing  # sim stays importable without the extension until a layer is replayed

        logits = routing.logits
        if self.counts.shape[1] != logits.shape[1]:
            raise ValueError(f"RoutingReplay: counts have {self.counts.shape[1]} experts, the router "
                             f"{logits.shape[1]}")
        fitted = fit_counts(self.counts[self.step % self.counts.shape[0]], logits.shape[0], router.top_k)
        ids = replay_expert_ids(fitted, router.top_k, scores=logits)
        weights = replay_weights(logits, ids, router.scoring, router.renormalize, router.routed_scaling_factor)
        self.last_counts = fitted
        return Routing(logits, weights, ids)

    def attach(self, layer: torch.nn.Module) -> RoutingReplay:
        """Replay in ``layer`` (a :class:`moeflux.MoE`, or its router) from now on; :meth:`detach` undoes it."""
        router = getattr(layer, "router", layer)
        if self._handle is not None:
            raise RuntimeError("RoutingReplay: already attached")

        def hook(module, inputs, output):
            replayed = self.routing(module, output)
            if self.advance and module.training:
                self.step += 1
            return replayed

        self._handle = router.register_forward_hook(hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class SampleRoutingReplay:
    """Replays per-sample counts ``[steps, G, E]`` (every sample of the global batch, by its original slot) in
    one :class:`moeflux.MoE` layer whose samples may have moved (:class:`moeflux.SamplePlacement`):
    ``samples()`` says which original samples this rank holds now, in order, each of ``T / B`` tokens. Each
    sample's tokens get :func:`replay_expert_ids` of its counts fitted to them (ties by the real logits), so a
    sample routes the same wherever it is. :meth:`attach` hooks the router's forward and replaces its
    ``predict`` (what the placement plans with) by the same choice, built once per step and sample."""

    def __init__(self, counts: np.ndarray, samples) -> None:
        counts = np.asarray(counts)
        if counts.ndim != 3 or counts.shape[0] < 1 or counts.min() < 0:
            raise ValueError(f"SampleRoutingReplay: counts must be [steps, samples, experts] of numbers >= 0, got "
                             f"{counts.shape}")
        self.counts, self.samples, self.step = counts, samples, 0
        self._built: dict[int, Tensor] = {}  # this step's ids per sample: predict's, reused by forward

    def expert_ids(self, router: torch.nn.Module, logits: Tensor) -> Tensor:
        held = list(self.samples())
        if not held:
            return torch.empty(0, router.top_k, dtype=torch.int32, device=logits.device)
        per_sample = logits.shape[0] // len(held)
        counts = self.counts[self.step % self.counts.shape[0]]
        for i, g in enumerate(held):
            if g not in self._built or self._built[g].shape[0] != per_sample:
                self._built[g] = replay_expert_ids(fit_counts(counts[g], per_sample, router.top_k), router.top_k,
                                                   scores=logits[i * per_sample:(i + 1) * per_sample])
        return torch.cat([self._built[g] for g in held]).to(logits.device)

    def attach(self, layer: torch.nn.Module) -> SampleRoutingReplay:
        from ..router import Routing

        router = getattr(layer, "router", layer)

        def hook(module, inputs, output):
            ids = self.expert_ids(module, output.logits)
            weights = replay_weights(output.logits, ids, module.scoring, module.renormalize,
                                     module.routed_scaling_factor)
            if module.training:
                self.step += 1
            self._built.clear()
            return Routing(output.logits, weights, ids)

        def predict(x: Tensor) -> Tensor:
            with torch.no_grad():
                return self.expert_ids(router, router.logits(x))

        router.register_forward_hook(hook)
        router.predict = predict
        return self


def attach_replay(layers: Sequence[torch.nn.Module], counts: np.ndarray) -> list[RoutingReplay]:
    """One :class:`RoutingReplay` per layer: ``counts [steps, len(layers), E]`` (this rank's)."""
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[1] != len(layers):
        raise ValueError(f"attach_replay: counts must be [steps, {len(layers)} layers, experts], got {counts.shape}")
    return [RoutingReplay(counts[:, i]).attach(layer) for i, layer in enumerate(layers)]
