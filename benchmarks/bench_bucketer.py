"""Backward + gradient synchronisation with moeflux.DataParallel (buckets
all-reduced while backward runs) against backward followed by one flat
all-reduce of all gradients (what FastMoE's allreduce_params() does), and
against backward alone, on gloo ranks of this machine, in the same run.
Prints a table and the share of the communication hidden behind backward,
writes JSON and a PNG plot.

    python benchmarks/bench_bucketer.py                # 2 and 4 ranks
    python benchmarks/bench_bucketer.py --layers 12 --width 1536 --batch 256

hidden = (flat - bucketed) / (flat - backward alone): the part of the
communication time that no longer adds to the step.
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
from torch import nn

import moeflux
from gloo_ranks import run_on_ranks, save


def make_model(args) -> nn.Module:
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.GELU()]
    return nn.Sequential(*layers)




def measure(args) -> dict:
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.width)
    plain = make_model(args)
    wrapped = moeflux.DataParallel(make_model(args), bucket_cap_mb=args.bucket_cap_mb)

    def forward(model):  # not timed: only backward and the synchronisation are
        model.zero_grad(set_to_none=False)
        return model(x).square().mean()

    def backward_only():
        loss = forward(plain)
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    def backward_then_flat_allreduce():
        loss = forward(plain)
        start = time.perf_counter()
        loss.backward()
        grads = [p.grad for p in plain.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(piece.view_as(g))
        return time.perf_counter() - start

    def bucketed():
        loss = forward(wrapped)
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    # Round-robin over the three variants, so that the machine's drift hits all of them alike.
    variants = {"backward alone": backward_only, "backward + flat all-reduce": backward_then_flat_allreduce,
                "moeflux.DataParallel": bucketed}
    samples = {name: [] for name in variants}
    for i in range(args.repeat + 2):
        for name, fn in variants.items():
            dist.barrier()
            t = torch.tensor([fn()])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if i >= 2:
                samples[name].append(t.item())
    results = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    comm = results["backward + flat all-reduce"] - results["backward alone"]
    hidden = (results["backward + flat all-reduce"] - results["moeflux.DataParallel"]) / comm if comm > 0 else 0.0
    params = sum(p.numel() for p in plain.parameters())
    return dict(world=dist.get_world_size(), layers=args.layers, width=args.width, batch=args.batch,
                gradient_mb=params * 4 / 2**20, buckets=len(wrapped.bucket_indices()), times_ms=results,
                speedup=results["backward + flat all-reduce"] / results["moeflux.DataParallel"], hidden=hidden)


def print_result(r: dict) -> None:
    print(f"\n{r['world']} gloo ranks, {r['layers']} x Linear({r['width']}), batch {r['batch']}, "
          f"{r['gradient_mb']:.0f} MB of gradients in {r['buckets']} buckets")
    for name, ms in r["times_ms"].items():
        print(f"  {name:28s} {ms:9.1f} ms")
    print(f"  speedup over backward + flat all-reduce: {r['speedup']:.2f}x; communication hidden: {r['hidden']:.0%}")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results[0]["times_ms"])
    for i, name in enumerate(names):
        ax.bar([j + (i - 1) * 0.27 for j in range(len(results))], [r["times_ms"][name] for r in results], 0.27,
               label=name)
    for j, r in enumerate(results):
        ax.annotate(f"{r['hidden']:.0%} hidden", (j + 0.27, r["times_ms"]["moeflux.DataParallel"]), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), [f"{r['world']} ranks" for r in results])
    ax.set_ylabel("ms (slowest rank)")
    r0 = results[0]
    ax.set_title(f"backward + gradient sync, {r0['layers']} x Linear({r0['width']}), batch {r0['batch']}, gloo")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bucket-cap-mb", type=float, default=8, help="8 MB: several buckets for this 32 MB model")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    print(f"moeflux {moeflux.__version__}, torch {torch.__version__}, {os.cpu_count()} cores")
    results = []
    for world in args.worlds:
        results.append(run_on_ranks(measure, world, args))
        print_result(results[-1])
    save(results, args.out, "bucketer_gloo", plot)

if __name__ == "__main__":
    main(sys.argv[1:])
