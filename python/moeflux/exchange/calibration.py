"""Calibration of a layer's :class:`moeflux.ShadowCostModel` (``calibrate=True``, what ``shadowing="auto"``
builds): its fixed rates are a prior, replaced by what the layer measures of its own forwards.

Measured (forward only; backward is assumed to cost the same per byte, and twice the forward per row, as the
model's ``flops_per_row`` says):

- **shadow broadcasts**: the wall time of the shadows' weight broadcasts, less the model's latency of those
  collectives (``2 * owners * latency_s``), per broadcast parameter byte: the shadow term's seconds per byte
  (their gradients' reduce in backward is assumed to cost the same);
- **shadow compute**: the time of the shadows' expert op on this rank, per forward FLOP of its rows: the
  compute term's seconds per FLOP;
- **all-to-all**: the time of the transport's run (dispatch, the experts, combine), less the model's estimate
  of its busiest rank's forward compute at the current rates, per byte of its two all-to-alls through the
  busiest port (the transport's :meth:`~moeflux.exchange.Transport.wire_bytes`): the comm term's seconds per
  byte. The run ends in the combine, which waits for the slowest rank, so the time is the step's, not just
  this rank's; the host work around the all-to-alls (the permutes) counts as wire time.

On the CPU the spans are the host clock (gloo's collectives block the host). On a GPU they are CUDA events on
the current stream, read at the next forward, after its routing counts' host synchronisation has passed them:
no synchronisation is added. Each measurement is smoothed per rank by an exponential moving average
(``smoothing``: the weight of the newest). A rate is measured only when its stretch runs: the shadow ones
while something is shadowed, the all-to-all's while rows cross.

Agreement: the shadows must be the same on every rank, so the estimate uses the rates agreed by the ranks,
never a rank's own: at the second forward (the first with a measurement) and every ``every`` forwards after,
one all-reduce (MAX: the slowest rank's seconds per unit) of three float64 over the expert-parallel group, on
its device. On the CPU the agreed rates apply at once; on a GPU the result is copied to the host
asynchronously and adopted at the next forward (every rank at the same one), so again no synchronisation.
Until a rate was measured by some rank, it is the prior's.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..balance import Rates, ShadowCostModel

WIRE, SHADOW, FLOP = range(3)  # the measured seconds per unit: all-to-all byte, shadow parameter byte, FLOP
EVERY = 16  # forwards between agreements: one tiny all-reduce each
SMOOTHING = 0.25  # the weight of the newest measurement in the moving average
MIN_SECONDS_PER_UNIT = 1e-30  # a stretch measured at no time still gives a finite rate


def smooth(average: float, sample: float, smoothing: float) -> float:
    """The exponential moving average after ``sample`` (``average`` NaN: nothing measured yet)."""
    return sample if math.isnan(average) else average + smoothing * (sample - average)


def agreed_rates(prior: Rates, seconds_per_unit: np.ndarray) -> Rates:
    """The rates of the agreed ``seconds_per_unit`` (indexed by :data:`WIRE`, :data:`SHADOW`, :data:`FLOP`;
    NaN: nobody measured it, the prior's). The latency is the prior's: the measurements are net of it."""
    def rate(kind: int, fallback: float) -> float:
        seconds = float(seconds_per_unit[kind])
        return fallback if math.isnan(seconds) else 1.0 / max(seconds, MIN_SECONDS_PER_UNIT)

    return Rates(rate(WIRE, prior.link_bytes_per_s), rate(SHADOW, prior.shadow_bytes_per_s),
                 rate(FLOP, prior.flops_per_s), prior.latency_s)


class Span:
    """How long a stretch of this rank's work took: the host clock on the CPU, CUDA events on the current stream
    on a GPU (read by :meth:`seconds` only after a later host synchronisation has passed them)."""

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if self._stream is not None:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record(self._stream)
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self._stream is not None:
            self._events[1].record(self._stream)
        else:
            self._seconds = time.perf_counter() - self._start

    def seconds(self) -> float:
        if self._stream is None:
            return self._seconds
        self._events[1].synchronize()  # a no-op in the layer: the next forward's routing counts synchronised
        return self._events[0].elapsed_time(self._events[1]) / 1e3


class ShadowCalibration:
    """The measured, agreed rates of one layer's :class:`~moeflux.exchange.shadowing.Shadowing` (see the
    module's docstring). :attr:`rates` is identical on every rank of ``group`` at every forward."""

    def __init__(self, prior: ShadowCostModel, group: dist.ProcessGroup, every: int = EVERY,
                 smoothing: float = SMOOTHING) -> None:
        self.prior = self.rates = prior.rates
        self.group, self.every, self.smoothing = group, every, smoothing
        self.measured = np.full(3, np.nan)  # this rank's moving averages, seconds per unit (NaN: not yet)
        self.agreed = np.full(3, np.nan)  # the last agreement's, the same on every rank
        self.forwards = 0
        self._samples: list[tuple[int, Span, float, float]] = []  # (kind, span, overhead_s, units)
        self._pending: tuple[Tensor, torch.cuda.Event, Tensor] | None = None  # a GPU agreement in flight

    @torch.compiler.disable
    def start(self, device: torch.device) -> Span:
        return Span(device)

    @torch.compiler.disable
    def record(self, kind: int, span: Span, overhead_s: float, units: float) -> None:
        """End ``span``: ``(its seconds - overhead_s) / units`` is a measurement of ``kind`` (read next forward)."""
        span.stop()
        if units > 0:
            self._samples.append((kind, span, overhead_s, float(units)))

    @torch.compiler.disable
    def step(self, device: torch.device) -> Rates:
        """Once per forward on every rank of the group, after the routing counts' exchange (on a GPU, its host
        synchronisation has passed the last forward's spans and agreement): take in the last forward's
        measurements, agree when due; returns this forward's rates."""
        if self._pending is not None:
            host, done, _ = self._pending
            done.synchronize()  # passed already, as the spans
            self._adopt(host.numpy())
            self._pending = None
        for kind, span, overhead_s, units in self._samples:
            sample = max(span.seconds() - overhead_s, 0.0) / units
            self.measured[kind] = smooth(float(self.measured[kind]), sample, self.smoothing)
        self._samples.clear()
        self.forwards += 1
        if self.forwards >= 2 and (self.forwards - 2) % self.every == 0:
            self._agree(device)
        return self.rates

    def _agree(self, device: torch.device) -> None:
        mine = torch.from_numpy(np.where(np.isnan(self.measured), -1.0, self.measured))  # -1: MAX ignores it
        if device.type != "cuda":
            dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group)
            self._adopt(mine.numpy())
            return
        source = mine.pin_memory()  # kept alive until the copy is done
        on_device = source.to(device, non_blocking=True)
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX, group=self.group)
        host = torch.empty(3, dtype=torch.float64, pin_memory=True)
        host.copy_(on_device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        self._pending = (host, done, source)

    def _adopt(self, agreed: np.ndarray) -> None:
        self.agreed = np.where(agreed >= 0, agreed, np.nan)
        self.rates = agreed_rates(self.prior, self.agreed)
