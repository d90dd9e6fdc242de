"""Where a training step's time goes in moeflux's communication, per MoE layer and per link. Opt-in.

    with moeflux.comm_stats(model) as stats:          # off outside the block: no cost, no host sync
        for batch in loader:
            loss = model(batch).sum(); loss.backward(); optimizer.step()
            step = stats.step()                       # this step's breakdown (a StepStats)
    print(stats.table())                              # per layer, mean over the recorded steps

Each token all-to-all (dispatch, combine and their backward), the count
exchange and the wait for the gradient all-reduce at the end of backward
(:class:`moeflux.DataParallel`) is timed in C++ where it runs: ``seconds`` from
issue to completion, ``wait_seconds`` the part the host was blocked by it
(issuing and waiting: what the step could not hide; with the bulk schedule
that is all of it, with a pipelined one the rest overlapped expert compute),
and the bytes it sent to ranks on the same node and on other nodes. Expert
compute: the pipelined exchange times its experts itself (phase
``"experts"``); with the bulk exchange it is the time between a layer's
dispatch and its combine in forward, and between its combine and dispatch
gradients in backward. The collectives also appear in ``torch.profiler`` traces as
``moeflux::dispatch``, ``moeflux::count_exchange``, ``moeflux::combine_backward``,
``moeflux::grad_allreduce_wait``, ...

Node membership: rank ``r`` is on node ``r // ranks_per_node`` (torchrun numbers
ranks node by node); ``ranks_per_node`` defaults to torchrun's
``LOCAL_WORLD_SIZE``, else every rank is on one node.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from . import _C
from .topology import launcher_ranks_per_node

TOKEN_PHASES = ("dispatch", "combine", "combine_backward", "dispatch_backward")
BALANCE_PHASES = ("agreement", "shadow_broadcast", "shadow_reduce", "expert_move")  # moeflux.balance's collectives
A2A_PHASES = (*TOKEN_PHASES, "count_exchange", "all_to_all")  # what LayerStats.all_to_all_s sums
PHASES = (*A2A_PHASES, "grad_allreduce_wait", "experts", *BALANCE_PHASES)


@dataclass(frozen=True)
class CollectiveRecord:
    layer: str  # the MoE layer's name in the model ("" for collectives outside a layer)
    phase: str  # one of PHASES
    group: str
    start_s: float  # host steady clock at issue
    seconds: float  # issue to completion
    wait_seconds: float  # host blocked waiting for it
    bytes_intra: int  # sent to other ranks of this node
    bytes_inter: int  # sent to ranks of other nodes
    bytes_to_rank: tuple[int, ...]  # sent to each rank of the group
    stage: int = -1  # the pipelined exchange's stage (its stage trace); -1 outside a pipelined layer


@dataclass
class LayerStats:
    """One MoE layer in one step (or the mean over steps)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # phase -> issue to completion
    wait_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # phase -> exposed
    expert_compute_s: float = 0.0
    bytes_intra: int = 0
    bytes_inter: int = 0

    @property
    def all_to_all_s(self) -> float:
        """The four token all-to-alls and the count exchange (and a hierarchical exchange's rail all-to-alls)."""
        return sum(self.seconds[p] for p in A2A_PHASES)

    @property
    def all_to_all_wait_s(self) -> float:
        return sum(self.wait_seconds[p] for p in A2A_PHASES)


@dataclass
class StepStats:
    layers: dict[str, LayerStats]
    grad_allreduce_wait_s: float  # the bucketer's all-reduce that backward did not hide

    def _total(self, name: str) -> float:
        return sum(getattr(layer, name) for layer in self.layers.values())

    # sums over the layers
    all_to_all_s = property(lambda self: self._total("all_to_all_s"))
    all_to_all_wait_s = property(lambda self: self._total("all_to_all_wait_s"))
    expert_compute_s = property(lambda self: self._total("expert_compute_s"))
    bytes_intra = property(lambda self: int(self._total("bytes_intra")))
    bytes_inter = property(lambda self: int(self._total("bytes_inter")))

    def as_dict(self) -> dict:
        return {
            "all_to_all_s": self.all_to_all_s, "all_to_all_wait_s": self.all_to_all_wait_s,
            "expert_compute_s": self.expert_compute_s, "grad_allreduce_wait_s": self.grad_allreduce_wait_s,
            "bytes_intra": self.bytes_intra, "bytes_inter": self.bytes_inter,
            "layers": {name: {"seconds": dict(s.seconds), "wait_seconds": dict(s.wait_seconds),
                              "expert_compute_s": s.expert_compute_s, "bytes_intra": s.bytes_intra,
                              "bytes_inter": s.bytes_inter} for name, s in self.layers.items()},
        }


def _expert_compute_s(records: list[CollectiveRecord]) -> float:
    """Forward: dispatch end -> combine start; backward: combine_backward end -> dispatch_backward start."""
    ends: dict[str, float] = {}
    total = 0.0
    for r in sorted(records, key=lambda r: r.start_s):
        if r.phase in ("dispatch", "combine_backward"):
            ends[r.phase] = r.start_s + r.seconds
        elif r.phase == "combine" and "dispatch" in ends:
            total += max(0.0, r.start_s - ends.pop("dispatch"))
        elif r.phase == "dispatch_backward" and "combine_backward" in ends:
            total += max(0.0, r.start_s - ends.pop("combine_backward"))
    return total


class CommStats:
    """The records of one :func:`comm_stats` block; :meth:`step` closes a step and returns its breakdown."""

    def __init__(self, ranks_per_node: int | None = None) -> None:
        if ranks_per_node is None:
            ranks_per_node = launcher_ranks_per_node()
        self.ranks_per_node = ranks_per_node
        self.steps: list[StepStats] = []
        self.records: list[list[CollectiveRecord]] = []  # per step, in the order they were issued
        self._group_ranks: dict[str, list[int]] = {}  # group name -> global rank of each group rank

    def register_group(self, group: dist.ProcessGroup) -> None:
        if group.group_name not in self._group_ranks:
            self._group_ranks[group.group_name] = dist.get_process_group_ranks(group)

    def _node(self, global_rank: int) -> int:
        return 0 if self.ranks_per_node is None else global_rank // self.ranks_per_node

    def _record(self, raw: dict) -> CollectiveRecord:
        ranks = self._group_ranks.get(raw["group"])
        intra = inter = 0
        for peer, nbytes in enumerate(raw["bytes_to_rank"]):
            if peer == raw["rank"]:
                continue  # stays on this rank
            same_node = ranks is None or self._node(ranks[peer]) == self._node(ranks[raw["rank"]])
            if same_node:
                intra += nbytes
            else:
                inter += nbytes
        return CollectiveRecord(raw["layer"], raw["phase"], raw["group"], raw["start_s"], raw["seconds"],
                                raw["wait_seconds"], intra, inter, tuple(raw["bytes_to_rank"]), raw["stage"])

    def step(self) -> StepStats:
        """Everything recorded since the last call, as one step. Reads device timing events (a sync) if any."""
        records = [self._record(r) for r in _C.drain_comm_stats()]
        self.records.append(records)
        layers: dict[str, LayerStats] = {}
        by_layer: dict[str, list[CollectiveRecord]] = defaultdict(list)
        allreduce_wait = 0.0
        for r in records:
            if r.phase == "grad_allreduce_wait":
                allreduce_wait += r.wait_seconds
                continue
            stats = layers.setdefault(r.layer, LayerStats())
            stats.seconds[r.phase] += r.seconds
            stats.wait_seconds[r.phase] += r.wait_seconds
            stats.bytes_intra += r.bytes_intra
            stats.bytes_inter += r.bytes_inter
            by_layer[r.layer].append(r)
        for name, stats in layers.items():
            timed = stats.seconds.pop("experts", None)
            stats.wait_seconds.pop("experts", None)
            stats.expert_compute_s = timed if timed is not None else _expert_compute_s(by_layer[name])
        step = StepStats(layers, allreduce_wait)
        self.steps.append(step)
        return step

    def mean(self, skip: int = 0) -> StepStats:
        """The mean of the recorded steps after the first ``skip`` (warm-up)."""
        steps = self.steps[skip:]
        if not steps:
            raise ValueError(f"CommStats.mean: no steps recorded after skipping {skip} (have {len(self.steps)})")
        layers: dict[str, LayerStats] = {}
        for step in steps:
            for name, s in step.layers.items():
                m = layers.setdefault(name, LayerStats())
                for phase, v in s.seconds.items():
                    m.seconds[phase] += v / len(steps)
                for phase, v in s.wait_seconds.items():
                    m.wait_seconds[phase] += v / len(steps)
                m.expert_compute_s += s.expert_compute_s / len(steps)
                m.bytes_intra += s.bytes_intra // len(steps)
                m.bytes_inter += s.bytes_inter // len(steps)
        return StepStats(layers, sum(s.grad_allreduce_wait_s for s in steps) / len(steps))

    def table(self, skip: int = 0) -> str:
        """Per layer: milliseconds in each collective phase, expert compute, and MB sent intra / inter node."""
        mean = self.mean(skip)
        phases = [p for p in A2A_PHASES if any(p in s.seconds for s in mean.layers.values())]
        header = ["layer", *phases, "a2a wait", "experts", "MB intra", "MB inter"]
        rows = [header]
        for name, s in mean.layers.items():
            rows.append([name or "-", *(f"{1e3 * s.seconds[p]:.2f}" for p in phases), f"{1e3 * s.all_to_all_wait_s:.2f}",
                         f"{1e3 * s.expert_compute_s:.2f}", f"{s.bytes_intra / 1e6:.2f}", f"{s.bytes_inter / 1e6:.2f}"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"gradient all-reduce wait (exposed): {1e3 * mean.grad_allreduce_wait_s:.2f} ms per step "
                     "(times in ms per step)")
        return "\n".join(lines)


_active: CommStats | None = None


@contextlib.contextmanager
def comm_stats(model: nn.Module | None = None, ranks_per_node: int | None = None) -> Iterator[CommStats]:
    """Record moeflux's collectives inside the block. ``model``: name each MoE layer by its path in it."""
    global _active
    if _active is not None:
        raise RuntimeError("moeflux.comm_stats: already recording (blocks do not nest)")
    stats = CommStats(ranks_per_node)
    if model is not None:
        for name, module in model.named_modules():
            if hasattr(module, "stats_name"):  # a moeflux.MoE (the layer imports this module: no import back)
                module.stats_name = name
    _C.drain_comm_stats()  # drop anything recorded before
    _active = stats
    _C.set_comm_stats_enabled(True)
    try:
        yield stats
    finally:
        _C.set_comm_stats_enabled(False)
        _active = None


@contextlib.contextmanager
def layer_scope(name: str, groups: tuple[dist.ProcessGroup, ...] = ()) -> Iterator[None]:
    """Tag the collectives inside (and, through autograd, their backward) with a layer; free when not recording."""
    if _active is None:
        yield
        return
    for group in groups:
        _active.register_group(group)
    previous = _C.exchange_comm_stats_layer(name)
    try:
        yield
    finally:
        _C.exchange_comm_stats_layer(previous)
