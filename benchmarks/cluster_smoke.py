"""Tiny workload for benchmarks/cluster.py: a few expert-parallel moeflux steps on every rank.

    python benchmarks/cluster.py --nodes 2 --ranks-per-node 2 -- benchmarks/cluster_smoke.py [--steps 3]

Started by torchrun (env:// rendezvous); prints one `rank r/world node=... ok` line per rank and exits 0.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import moeflux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank and step")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = moeflux.init_expert_parallel(ep_size=world)

    torch.manual_seed(0)  # the same dense (router) weights on every rank
    moe = moeflux.MoE(64, 128, num_experts=2 * world, top_k=2, ep_group=groups)
    opt = torch.optim.SGD(moe.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens per rank
    for _ in range(args.steps):
        x = torch.randn(args.tokens, 64, generator=gen)
        loss = moe(x).square().mean() + moeflux.aux_loss(moe)
        opt.zero_grad()
        loss.backward()
        opt.step()

    ran = torch.ones(1)
    dist.all_reduce(ran)  # every rank got here
    if int(ran.item()) != world:
        raise SystemExit(f"rank {rank}: all_reduce saw {int(ran.item())} of {world} ranks")
    node = os.environ.get("MOEFLUX_CLUSTER_NODE", "?")
    print(f"rank {rank}/{world} node={node} group_rank={os.environ.get('GROUP_RANK')} "
          f"local_rank={os.environ.get('LOCAL_RANK')} ok steps={args.steps} loss={loss.item():.4f} "
          f"link={os.environ.get('MOEFLUX_CLUSTER_LINK', '?')} ({time.perf_counter() - start:.1f}s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
