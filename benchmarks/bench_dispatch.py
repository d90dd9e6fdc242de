"""Cost of dispatch + combine (forward and backward) across gloo ranks on this
machine, against a bare torch.distributed.all_to_all_single moving the same
bytes with the same split sizes, in the same run. Prints a table (time per
phase, overhead ratio), writes JSON and a PNG plot.

    python benchmarks/bench_dispatch.py                   # 2 and 4 ranks, T=4096 per rank, H=1024, E=16, k=2
    torchrun --nproc-per-node 2 benchmarks/bench_dispatch.py --worker   # one world, under torchrun

One training step of an expert-parallel layer moves token rows through four
all-to-alls (dispatch and combine, forward and backward); the bare baseline is
those four all-to-alls alone. Everything else dispatch/combine do (permute,
count exchange, regroup, weighted unpermute and their backward) is overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import moeflux
from gloo_ranks import run_on_ranks, save
from moeflux import ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs, every rank in step (the slowest rank counts)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def measure(args) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype)
    logits = torch.randn(args.tokens, args.experts, generator=gen)
    weights, ids = ops.route(logits, args.topk)
    group = dist.group.WORLD

    rows, plan = ops.dispatch(x, ids, args.experts, None, group)
    out = rows * 1.5  # stand-in for the experts
    y = ops.combine(out, plan, weights)
    grad_y = torch.randn(y.shape, generator=gen).to(dtype)
    _, returned = ops._ops.combine(out, plan.row_map, plan.regroup_map, plan.send_splits, plan.recv_splits, weights,
                                   plan.group_name)
    grad_out, _ = ops._ops.combine_backward(grad_y, returned, plan.row_map, plan.regroup_map, plan.send_splits,
                                            plan.recv_splits, weights, plan.group_name)
    send, recv = plan.send_splits.tolist(), plan.recv_splits.tolist()

    def step():
        xr = x.detach().requires_grad_()
        wr = weights.detach().requires_grad_()
        r, p = ops.dispatch(xr, ids, args.experts, None, group)
        ops.combine(r, p, wr).backward(grad_y)  # identity experts: only the token traffic is timed

    sent = torch.empty(sum(send), args.hidden, dtype=dtype).normal_(generator=gen)

    def bare(inp, out_splits, in_splits):  # a fresh output each time, as split sizes change every step
        out = torch.empty(sum(out_splits), args.hidden, dtype=dtype)
        dist.all_to_all_single(out, inp, out_splits, in_splits)
        return out

    def bare_forward():  # dispatch's direction, then combine's
        bare(bare(sent, recv, send), send, recv)

    phases = {
        "dispatch fwd": lambda: ops.dispatch(x, ids, args.experts, None, group),
        "combine fwd": lambda: ops.combine(out, plan, weights),
        "combine bwd": lambda: ops._ops.combine_backward(grad_y, returned, plan.row_map, plan.regroup_map,
                                                         plan.send_splits, plan.recv_splits, weights,
                                                         plan.group_name),
        "dispatch bwd": lambda: ops._ops.dispatch_backward(grad_out, plan.row_map, plan.regroup_map,
                                                           plan.send_splits, plan.recv_splits, plan.group_name),
        "fwd+bwd (autograd)": step,
        "bare all-to-all x1": lambda: bare(sent, recv, send),
        "bare all-to-all x4": lambda: (bare_forward(), bare_forward()),
    }
    times = {name: timed(fn, args.repeat) * 1e3 for name, fn in phases.items()}
    if rank != 0:
        return None
    row_bytes = args.hidden * x.element_size()
    result = dict(world=world, dtype=args.dtype, tokens_per_rank=args.tokens, hidden=args.hidden,
                  experts=args.experts, topk=args.topk, bytes_per_all_to_all_rank0=sum(send) * row_bytes,
                  times_ms=times, overhead=times["fwd+bwd (autograd)"] / times["bare all-to-all x4"] - 1)
    return result


def print_result(r: dict) -> None:
    print(f"\n{r['world']} gloo ranks, {r['dtype']}, T={r['tokens_per_rank']}/rank H={r['hidden']} "
          f"E={r['experts']} k={r['topk']} ({r['bytes_per_all_to_all_rank0'] / 1e6:.1f} MB sent per all-to-all "
          "by rank 0)")
    for name, ms in r["times_ms"].items():
        print(f"  {name:22s} {ms:9.2f} ms")
    print(f"  overhead of dispatch+combine fwd+bwd over the four bare all-to-alls: {r['overhead']:+.1%}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['world']} ranks\n{r['dtype']}" for r in results]
    xs = range(len(results))
    ours = [r["times_ms"]["fwd+bwd (autograd)"] for r in results]
    bare = [r["times_ms"]["bare all-to-all x4"] for r in results]
    ax.bar([i - 0.2 for i in xs], ours, 0.4, label="dispatch + combine, fwd + bwd")
    ax.bar([i + 0.2 for i in xs], bare, 0.4, label="4 bare all_to_all_single")
    for i, r in zip(xs, results):
        ax.annotate(f"{r['overhead']:+.0%}", (i - 0.2, ours[i]), ha="center", va="bottom")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms per step (slowest rank)")
    r0 = results[0]
    ax.set_title(f"gloo, T={r0['tokens_per_rank']}/rank H={r0['hidden']} E={r0['experts']} k={r0['topk']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--worker", action="store_true", help="run as one rank of an existing torchrun world")
    args = parser.parse_args(argv)

    if args.worker:  # under torchrun
        dist.init_process_group("gloo")
        args.dtype = args.dtypes[0]
        result = measure(args)
        if result:
            print_result(result)
        dist.destroy_process_group()
        return

    print(f"moeflux {moeflux.__version__}, torch {torch.__version__}, {os.cpu_count()} cores")
    results = []
    for dtype in args.dtypes:
        for world in args.worlds:
            args.dtype = dtype
            results.append(run_on_ranks(measure, world, args))
            print_result(results[-1])
    save(results, args.out, "dispatch_gloo", plot)

if __name__ == "__main__":
    main(sys.argv[1:])
