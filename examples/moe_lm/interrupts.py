"""Stopping a run cleanly: SIGINT (Ctrl-C) or SIGTERM asks every rank to finish its
step, save a resumable checkpoint and exit with 128 + the signal's number.

A signal reaches ranks at different moments (or only some of them), while the
ranks must leave the training loop after the same step: their collectives have
to match. So the handler only records the signal, and once per step the ranks
agree on it with one small all-reduce.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Records SIGINT/SIGTERM instead of raising; `agreed()` says, the same on every rank, whether any rank
    got one (then the largest signal number, else 0)."""

    def __init__(self) -> None:
        self.received = 0
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame) -> None:
        self.received = max(self.received, signum)

    def agreed(self, device: torch.device) -> int:
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def exit_code(signum: int) -> int:
    """The shell's convention: 130 after SIGINT, 143 after SIGTERM."""
    return 128 + signum


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send `signum` to this process when its parent (the launcher) dies, so that a launcher
    killed outright leaves no rank behind: the ranks then save and stop as on a signal. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        pass
