"""Starting the ranks on this machine (when not under torchrun) and keeping them in step
with the launcher: a signal to the launcher reaches every rank, a rank that fails
stops the others, and no rank outlives the launcher."""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import time
from typing import Callable

import torch

from .interrupts import STOP_SIGNALS, exit_code


class RankFailed(RuntimeError):
    """A rank exited with an error (its traceback is on stderr); the others were stopped."""


def _stop(processes, sig: int) -> None:
    for process in processes:
        if process.is_alive():
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass


def spawn_ranks(target: Callable, world: int, args: tuple, grace_seconds: float = 600.0) -> int:
    """Runs target(rank, *args) in `world` spawned processes; returns 0, or the signal exit code (130, 143)
    when the run was interrupted and the ranks stopped as asked (target exits with that code); raises
    RankFailed when a rank failed.

    The first SIGINT/SIGTERM is passed on to every rank (they finish the step, save and exit with 128 + the
    signal); a second one, or ranks still running `grace_seconds` later (long enough for a first step that
    compiles, and a large save), kills them."""
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, *args), name=f"rank {rank}") for rank in range(world)]
    received: list[int] = []
    deadline = [float("inf")]

    def on_signal(signum, frame):
        received.append(signum)
        if len(received) == 1:
            _stop(processes, signum)
            deadline[0] = time.monotonic() + grace_seconds
        else:
            _stop(processes, signal.SIGKILL)

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        for process in processes:
            process.start()
        stopped_by_us = set(exit_code(s) for s in STOP_SIGNALS) | {0}
        while any(p.is_alive() for p in processes):
            multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], timeout=0.5)
            failed = [p for p in processes if p.exitcode is not None and p.exitcode not in stopped_by_us]
            if failed or time.monotonic() > deadline[0]:
                _stop(processes, signal.SIGKILL)  # the others would wait for it in a collective
                for p in processes:
                    p.join()
                if failed:
                    raise RankFailed(f"{failed[0].name} exited with code {failed[0].exitcode}; "
                                     f"the other ranks were stopped")
                raise RankFailed(f"ranks still running {grace_seconds:.0f} s after the signal: killed")
        # 0, or the code of ranks stopped by a signal (through the launcher or sent to them directly); a
        # signal that came after the last step changes nothing: the run completed.
        return max(p.exitcode for p in processes)
    finally:
        _stop(processes, signal.SIGKILL)
        for process in processes:
            process.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
