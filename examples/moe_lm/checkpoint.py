"""One checkpoint file for an expert-parallel model, loadable on any number of ranks.

Experts are sharded over ranks, so every rank sends its share to rank 0, which
writes one file in which every expert, and its optimizer state, is stored
under its global index (``blocks.0.mlp.experts.7.w_in``). Loading, each rank
takes the dense parameters and the experts it holds in its own layout.

Expert re-placement (``--replace-every``) moves experts between ranks; the file
also records each layer's placement, and a run resumed with the same
expert-parallel size starts from it (on another size, from the contiguous one:
experts are found by global index either way).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import moeflux


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run, reported as a one-line error."""


def _expert_names(model: nn.Module) -> dict[str, list[str]]:
    """Stacked expert parameter name -> the per-expert name of each of its rows, by global expert as the
    layer's placement says (``blocks.0.mlp.experts.w_in`` -> ``[blocks.0.mlp.experts.4.w_in, ...]``)."""
    out = {}
    for ep in moeflux.expert_parameters(model):
        prefix, weight = ep.name.rsplit(".", 1)
        out[ep.name] = [f"{prefix}.{expert}.{weight}" for expert in ep.layer.placement.experts_of()]
    return out


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    experts = _expert_names(model)
    by_name = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param)
        if not state:
            continue
        if name in experts:
            for i, expert_name in enumerate(experts[name]):
                by_name[expert_name] = {
                    k: (_own_copy(v[i]) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()}
        else:
            by_name[name] = dict(state)
    return by_name


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own storage: torch.save writes a view's whole storage, so one expert's row of a
    stacked [E, ...] weight would carry every expert of the stack."""
    return tensor.detach().to("cpu", copy=True)


def _placements(model: nn.Module) -> dict[str, dict]:
    """Where each MoE layer's experts live (the same on every rank: re-placement chooses for all)."""
    return {name: {"ep_size": m.ep_size, "expert_at": list(m.placement.expert_at)}
            for name, m in model.named_modules() if isinstance(m, moeflux.MoE)}


def _restore_placements(model: nn.Module, saved: dict[str, dict]) -> None:
    """Route by the saved placements where the expert-parallel size is the same (before loading the weights:
    they are then read into the slots that placement gives each expert)."""
    for name, layer in model.named_modules():
        entry = saved.get(name)
        if isinstance(layer, moeflux.MoE) and entry is not None and entry["ep_size"] == layer.ep_size:
            layer.set_placement(moeflux.ExpertPlacement(layer.num_experts, layer.ep_size, layer.ep_rank,
                                                        tuple(entry["expert_at"])))


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int, config: dict,
         metrics: dict) -> None:
    """Collective: every rank calls it; rank 0 writes `path` (atomically)."""
    local = {"model": {k: _own_copy(v) for k, v in model.state_dict().items()},
             "optimizer": {k: {s: (_own_copy(t) if torch.is_tensor(t) else t) for s, t in v.items()}
                           for k, v in _optimizer_state_by_name(model, optimizer).items()}}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() == 0:
        merged_model, merged_optim = {}, {}
        for part in gathered:  # replicas hold equal values; every expert appears at least once
            merged_model.update(part["model"])
            merged_optim.update(part["optimizer"])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        tmp = path.with_suffix(".tmp")
        torch.save({"format": "moeflux-lm/1", "config": config, "step": step, "model": merged_model,
                    "optimizer": merged_optim, "param_groups": groups, "scheduler": scheduler.state_dict(),
                    "metrics": metrics, "placements": _placements(model)}, tmp)
        os.replace(tmp, path)
    dist.barrier()


def _read(path: Path, mmap: bool = False) -> dict:
    """The checkpoint at `path`, loaded as data only (weights_only: no code in the file runs); with `mmap` the
    tensors stay in the file until read (a header read costs no copy of the weights)."""
    expected = "expected a checkpoint.pt written by examples/train_moe_lm.py"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as e:
        raise CheckpointError(f"--resume {path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds; all mean "not our file"
        raise CheckpointError(f"--resume {path}: not a PyTorch checkpoint ({e.__class__.__name__}); {expected}"
                              ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "moeflux-lm/1":
        raise CheckpointError(f"--resume {path}: a PyTorch file, but not one of this script's checkpoints; "
                              f"{expected}")
    return checkpoint


def read_header(path: Path) -> tuple[dict, int, int | None]:
    """(model config, step, the run's total steps: None in a checkpoint older than that field) of the
    checkpoint at `path`; raises CheckpointError with one line."""
    checkpoint = _read(path, mmap=True)
    return checkpoint["config"], int(checkpoint["step"]), checkpoint["metrics"].get("total_steps")


def check_config(path: Path, saved: dict, current: dict) -> None:
    differ = [f"{k} {saved.get(k)!r} (now {current.get(k)!r})" for k in current if saved.get(k) != current.get(k)]
    if differ:
        raise CheckpointError(f"--resume {path} was written for a different model: {', '.join(differ)}")


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, dict]:
    """Every rank loads its share (in the saved placement where the expert-parallel size is the same);
    returns (step, metrics)."""
    checkpoint = _read(path)
    _restore_placements(model, checkpoint.get("placements", {}))
    model.load_state_dict(checkpoint["model"])
    saved = checkpoint["optimizer"]
    experts = _expert_names(model)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name in experts:
            parts = [saved.get(expert_name) for expert_name in experts[name]]
            if any(p is None for p in parts):
                continue
            state = {k: (torch.stack([p[k] for p in parts]) if torch.is_tensor(v) and v.dim() > 0 else v)
                     for k, v in parts[0].items()}
        elif name in saved:
            state = saved[name]
        else:
            continue
        optimizer.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in state.items()}
    for group, saved_group in zip(optimizer.param_groups, checkpoint["param_groups"]):
        group.update(saved_group)
    scheduler.load_state_dict(checkpoint["scheduler"])
    return checkpoint["step"], checkpoint["metrics"]
