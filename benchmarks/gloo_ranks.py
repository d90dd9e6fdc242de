"""Shared by the multi-rank benchmarks: run a measurement on N gloo ranks of
this machine, and save the results as JSON plus a plot."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, store: str, measure: Callable, args: Any, queue) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores are shared by the ranks
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = measure(args)
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def run_on_ranks(measure: Callable[[Any], dict], world: int, args: Any) -> dict:
    """measure(args) on `world` spawned gloo ranks; returns rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), measure, args, queue), nprocs=world,
                           start_method="spawn")
    return queue.get()


def save(results: list[dict], out: Path, stem: str, plot: Callable[[list[dict], Path], None]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{stem}.png")
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')}")
