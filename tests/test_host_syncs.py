"""Device->host reads (each a host synchronisation on a GPU) per MoE layer step, by site.

Every read in moeflux goes through one funnel (csrc/host_sync.h; moeflux.ops.to_host from Python), which counts
it by site on every device, so these CPU tests see the reads a GPU would make (moeflux.ops.host_reads()):

- the single-process layer: none with a capacity; dropless, one read of the counts for the per-segment expert
  GEMMs (``counts:expert_gemms``), none where torch._grouped_mm does them (bf16 on Hopper GPUs; the CPU's
  "aten" backend here);
- the dropless expert-parallel layer: its count exchange (``counts:dispatch``, or ``counts:routing_counts``
  for shadowing, ``counts:count_exchange`` for the hierarchical transport's rail counts) once per forward, plus the GEMMs' read as above;
  nothing in backward;
- capacity mode across ranks on fixed splits (the GPUs' path; here by the test-only switch): none.

A reader that bypasses the funnel in Python (a stray ``.item()``, ``.tolist()``, ``.cpu()``...) is caught by
``raw_reads``; ``test_sync_free_paths_on_cuda`` checks the sync-free paths on a GPU itself, where a read of any
kind raises under torch.cuda.set_sync_debug_mode("error").
"""

import collections
import contextlib
import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moeflux
from moeflux import ExchangeConfig, ops
from moeflux.exchange.transport import flat
from multiprocess import run_ranks

READS = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__")
GEMMS = {"counts:expert_gemms": 1}  # the per-segment expert GEMMs' read of their counts, forward only


class RawReads(TorchFunctionMode):
    """Python-level reads of tensor data that do not go through ops.to_host: method name -> count. (Not
    ``.to("cpu")``: on the CPU it cannot be told from moving a host copy back to the device.)"""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def reads_per_step(model, x):
    """(forward's reads by site, backward's, Python-level reads outside the funnel in both)."""
    out = model(x)
    raw = RawReads()
    ops.reset_collective_counts()
    with raw:
        model(x)
    forward = ops.host_reads()
    ops.reset_collective_counts()
    with raw:
        out.square().mean().backward()
    return forward, ops.host_reads(), dict(raw.seen)


@contextlib.contextmanager
def cpu_gemm_backend(backend):
    moeflux._C.set_cpu_grouped_mm_backend(backend)
    try:
        yield
    finally:
        moeflux._C.set_cpu_grouped_mm_backend("segments")


@contextlib.contextmanager
def fixed_splits():
    """The test-only switch: capacity mode on fixed splits on the CPU, as on a GPU."""
    flat.FIXED_SPLITS_ON_CPU = True
    try:
        yield
    finally:
        flat.FIXED_SPLITS_ON_CPU = False


@pytest.mark.parametrize("capacity_factor, backend, expected", [
    (None, "segments", GEMMS), (None, "aten", {}), (1.25, "segments", {}),
], ids=["dropless", "dropless-grouped-mm", "capacity"])
def test_single_process_layer_reads(capacity_factor, backend, expected):
    torch.manual_seed(0)
    model = moeflux.MoE(32, 16, 8, 2, capacity_factor=capacity_factor)
    with cpu_gemm_backend(backend):
        assert reads_per_step(model, torch.randn(64, 32)) == (expected, {}, {})


DISPATCH = {"counts:dispatch": 1}
CHUNKED = ExchangeConfig(schedule="chunked")
HIERARCHICAL = ExchangeConfig(transport="hierarchical")  # the node groups: made in the worker
FIXED_RATES = dataclasses.replace(moeflux.ShadowCostModel.default_for("cpu", max_shadows=2), calibrate=False)
EP_CASES = {  # name: (MoE options, the test-only fixed splits, CPU GEMM backend, forward's reads, Python reads)
    "bulk-dropless": (dict(), False, "segments", DISPATCH | GEMMS, {}),
    "bulk-dropless-grouped-mm": (dict(), False, "aten", DISPATCH, {}),
    "bulk-capacity-packed": (dict(capacity_factor=1.25), False, "segments", DISPATCH | GEMMS, {}),
    "bulk-capacity-fixed-splits": (dict(capacity_factor=1.25), True, "segments", {}, {}),
    "chunked-dropless": (dict(exchange=CHUNKED), False, "segments", DISPATCH, {}),
    "chunked-dropless-grouped-mm": (dict(exchange=CHUNKED, expert_bias=True), False, "aten", DISPATCH, {}),
    "pairwise-dropless": (dict(exchange=ExchangeConfig(schedule="pairwise")), False, "segments", DISPATCH, {}),
    "chunked-capacity-fixed-splits": (dict(exchange=CHUNKED, capacity_factor=1.25), True, "segments", {}, {}),
    # The cost model (shadowing=2's rates, fixed: not calibrated) shadows nothing here; it reads the host copy of
    # the counts routing_counts returned.
    "shadowed": (dict(exchange=ExchangeConfig(shadowing=FIXED_RATES)), False, "segments",
                 {"counts:routing_counts": 1} | GEMMS, {"numpy": 1}),
    # The node header (one read, moeflux.ops.count_exchange), then the node group's dispatch of the copies; the
    # rail splits are read from the header's host copy (.tolist() of host tensors, no device read).
    "hierarchical": (dict(exchange=HIERARCHICAL), False, "segments",
                     {"counts:count_exchange": 1} | DISPATCH | GEMMS, {"tolist": 2}),
}


def ep_worker(rank, world):
    groups = moeflux.init_expert_parallel(world)
    seen = {}
    for name, (options, fixed, backend, _, _) in EP_CASES.items():
        torch.manual_seed(0)
        if options.get("exchange") is HIERARCHICAL:
            nodes = moeflux.init_node_groups(groups.ep_group, ranks_per_node=1)
            options = dict(options, exchange=dataclasses.replace(HIERARCHICAL, nodes=nodes))
        model = moeflux.MoE(32, 16, 8, 2, ep_group=groups, **options)
        with cpu_gemm_backend(backend), fixed_splits() if fixed else contextlib.nullcontext():
            seen[name] = reads_per_step(model, torch.randn(64, 32))
    return seen


def test_expert_parallel_layer_reads():
    for seen in run_ranks(2, ep_worker):  # one group for every case
        assert {name: reads for name, reads in seen.items()} == {
            name: (forward, {}, raw) for name, (_, _, _, forward, raw) in EP_CASES.items()}


@pytest.mark.skipif(not (torch.cuda.is_available() and moeflux.cuda_kernels_built()), reason="needs a GPU")
@pytest.mark.parametrize("capacity_factor, dtype", [(1.25, torch.float32), (1.25, torch.bfloat16),
                                                    (None, torch.bfloat16)], ids=["capacity", "capacity-bf16",
                                                                                  "dropless-bf16"])
def test_sync_free_paths_on_cuda(capacity_factor, dtype):
    """The single-process layer's documented sync-free paths, forward and backward: capacity mode, and dropless
    where torch._grouped_mm does the expert GEMMs (bf16 on Hopper/Blackwell)."""
    if capacity_factor is None and torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch._grouped_mm's kernels need Hopper or Blackwell")
    torch.manual_seed(0)
    model = moeflux.MoE(256, 512, 16, 2, capacity_factor=capacity_factor, device="cuda", dtype=dtype)
    x = torch.randn(1024, 256, device="cuda", dtype=dtype, requires_grad=True)
    model(x).float().square().mean().backward()  # warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
