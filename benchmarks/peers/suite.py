"""Run a list of layers (entries) on the same inputs: build each, one untimed step each for the agreement
against its moeflux reference, then interleaved timing of all of them. Used by the one-process part (in the
driver) and by every rank of the multi-rank part (peers.ranks)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch.distributed as dist

from . import agreement, timing
from .base import Unavailable
from .spec import Inputs


@dataclass
class Entry:
    key: str  # unique id, e.g. "s1/moeflux"
    setting: str  # the setting (table section) the row belongs to
    build: Callable[[dict], object]  # built entries by key -> a PeerLayer or a GemmFloor; may raise Unavailable
    ref: str | None = None  # key of the moeflux entry to compare with and divide by (None: it is one)
    mask_dropped_of: str | None = None  # compare out / x only on tokens that lost no slot in that moeflux entry
    also_vs: str | None = None  # a second reference (bf16 rows: the fp32 moeflux entry)
    note: str = ""
    tol: float | None = None  # tokens-off tolerance (default by dtype; 5e-2 for a layer computing in bf16)
    snapshot: bool = True  # keep a copy of the first step's output and gradients for the agreement
    built: object = None
    first: tuple | None = None  # (out, canonical grads) of the first step
    result: dict = field(default_factory=dict)


def _reason(e: BaseException) -> str:
    if isinstance(e, Unavailable):
        return str(e)
    frame = traceback.extract_tb(e.__traceback__)[-1]
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first} (at {frame.filename.split('site-packages/')[-1]}:{frame.lineno})"


def run(entries: list[Entry], inputs: Inputs, rounds: int, warmup: int, log: Callable[[str], None] = print
        ) -> tuple[list[dict], list[dict]]:
    """-> (rows, skipped). Under torch.distributed (more than one rank) every call is collective: the ranks
    must pass the same entries; times are the max over ranks of each round, agreement the max over ranks."""
    multi = dist.is_initialized() and dist.get_world_size() > 1
    built: dict[str, object] = {}
    skipped: list[dict] = []
    for entry in entries:
        layer, reason = None, ""
        try:
            layer = entry.build(built)
            if hasattr(layer, "prepare"):
                layer.prepare(inputs)
            layer.step()  # first (untimed) step: its outputs and gradients are the agreement's
            if entry.snapshot and hasattr(layer, "canonical_grads"):
                # copied now: a later entry may share tensors with this one (the GEMM floors use moeflux's weights)
                entry.first = (layer.out.clone(), {k: v.clone() for k, v in layer.canonical_grads().items()})
        except Exception as e:  # noqa: BLE001  (a peer that cannot run is skipped, with the reason)
            layer, reason = None, _reason(e)
        if multi:  # a layer that failed on any rank is skipped on all of them
            reasons = [None] * dist.get_world_size()
            dist.all_gather_object(reasons, reason)
            reason = next((r for r in reasons if r), "")
        if reason:
            entry.first = None
            skipped.append({"setting": entry.setting, "key": entry.key, "reason": reason})
            log(f"  skipped {entry.key}: {reason}")
            continue
        entry.built = built[entry.key] = layer
        log(f"  built {entry.key}: {getattr(layer, 'label', '')}")

    by_key = {e.key: e for e in entries}
    for entry in entries:
        if entry.first is None:
            continue
        for name, ref_key in (("agreement", entry.ref), ("agreement_vs_fp32", entry.also_vs)):
            ref = by_key.get(ref_key) if ref_key else None
            if ref is None or ref.first is None or ref is entry:
                continue
            mask = None
            if entry.mask_dropped_of and name == "agreement":
                mask = ~built[entry.mask_dropped_of].dropped_tokens(inputs.x)
            result = agreement.compare(*ref.first, *entry.first, mask, entry.tol)
            entry.result[name] = agreement.max_over_ranks(result)
    for entry in entries:
        entry.first = None

    live = [e for e in entries if e.built is not None]
    seconds = timing.interleaved({e.key: e.built.step for e in live}, rounds, warmup,
                                 barrier=dist.barrier if multi else None)
    if multi:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, seconds)
        seconds = {k: [max(g[k][i] for g in gathered) for i in range(rounds)] for k in seconds}

    rows = []
    for e in live:
        layer = e.built
        row = {"key": e.key, "setting": e.setting, "label": getattr(layer, "label", e.key),
               "dtype": str(getattr(layer, "dtype", "")).replace("torch.", ""), "ref": e.ref,
               "note": e.note, **timing.summary(seconds[e.key]), **e.result}
        if getattr(layer, "version", None):
            row["version"] = layer.version
        rows.append(row)
    return rows, skipped
