"""Run a function on several gloo ranks in spawned processes, with timeouts
everywhere, so a hanging collective fails the test instead of hanging it."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

GROUP_TIMEOUT = timedelta(seconds=60)  # a collective that waits longer raises
PROCESS_TIMEOUT = 300  # seconds for the whole run of one world


def _worker(rank: int, world: int, store_path: str, fn: Callable, args: tuple, results) -> None:
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=GROUP_TIMEOUT)
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = PROCESS_TIMEOUT) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo ranks; returns each rank's result or raises with every traceback.
    A rank process that dies (abort, segfault) fails the run at once rather than after the timeout."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, fn, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        collected: dict[int, tuple[str, Any]] = {}
        died: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        try:
            while len(collected) < world and time.monotonic() < deadline and not died:
                try:
                    rank, status, value = results.get(timeout=0.2)
                    collected[rank] = (status, value)
                except queue.Empty:
                    died = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = [f"rank {r} died with exit code {code}" for r, code in died]
    errors += [f"rank {r}:\n{v}" for r, (s, v) in sorted(collected.items()) if s == "error"]
    missing = [r for r in range(world) if r not in collected]
    if missing and not died:
        errors.append(f"ranks {missing} did not finish within {timeout} s")
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected[r][1] for r in range(world)]


MAX_ERROR_BYTES = 512  # of a failing rank's error, what reaches the others (csrc/distributed/agreement.h)


def carried(own: str, rank: int) -> str:
    """What every other rank raises when rank ``rank``'s own check failed with ``own`` ("moeflux.<op>: <what is
    wrong>"): what is wrong, its first MAX_ERROR_BYTES (cut at a character boundary and marked "...")."""
    what, message = own.split(": ", 1)
    if len(message.encode()) > MAX_ERROR_BYTES:
        message = message.encode()[:MAX_ERROR_BYTES - 3].decode(errors="ignore") + "..."
    return f"{what}: rank {rank} of the process group failed its check: {message}"


def distributed_gradcheck(fn: Callable, inputs: tuple, eps: float = 1e-6, atol: float = 1e-7) -> None:
    """gradcheck for collectives: every rank's output depends on every rank's inputs, so
    the per-rank gradcheck of torch does not apply. Checks the gradient of the global
    scalar L = sum over ranks of <fn(inputs), g> against central differences, perturbing
    one input element of one rank at a time (all ranks in lockstep). float64 inputs."""
    import torch

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1000 + rank)
    inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    analytical = torch.autograd.grad(out, inputs, g, allow_unused=True)
    analytical = [torch.zeros_like(t) if a is None else a for t, a in zip(inputs, analytical)]

    def global_loss() -> float:
        with torch.no_grad():
            local = (fn(*inputs) * g).sum()
        dist.all_reduce(local)
        return local.item()

    sizes = torch.tensor([sum(t.numel() for t in inputs)])
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    for owner in range(world):
        for flat in range(int(all_sizes[owner])):
            target = None
            if rank == owner:  # find the element to perturb
                offset = flat
                for t, a in zip(inputs, analytical):
                    if offset < t.numel():
                        target = (t.view(-1), a.view(-1), offset)
                        break
                    offset -= t.numel()
            values = []
            for sign in (1, -1):
                if target is not None:
                    with torch.no_grad():
                        target[0][target[2]] += sign * eps
                values.append(global_loss())
                if target is not None:
                    with torch.no_grad():
                        target[0][target[2]] -= sign * eps
            if target is not None:
                numerical = (values[0] - values[1]) / (2 * eps)
                got = target[1][target[2]].item()
                assert abs(numerical - got) <= atol + 1e-5 * abs(numerical), (
                    f"rank {rank}, element {flat}: analytical {got} vs numerical {numerical}")
