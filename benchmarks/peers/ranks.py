"""Setting 3: 2 gloo ranks on this machine (benchmarks/gloo_ranks.py spawns them, one thread each), expert
parallelism ep=2: each rank holds 8 of the 16 experts and routes its own 4096 tokens (its own inputs, the
same global weights). moeflux (``MoE(ep_group=init_expert_parallel(2))``, bulk all-to-all) against
torchtitan's AllToAllTokenDispatcher (fp32 and stock bf16 experts) and DeepSpeed-MoE ep_size=2 (dropless and
capacity 1.25). Times: per round the slowest rank's; agreement: the max over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .spec import LayerSpec, make_inputs, make_weights
from .suite import Entry, run

S3 = "3. 2 ranks, ep=2, dropless, fp32"
S3C = "3c. 2 ranks, ep=2, capacity 1.25, fp32"


def entries(spec: LayerSpec, weights, peers: set[str], capacity: float) -> list[Entry]:
    import moeflux

    from .deepspeed_moe import DeepSpeedLayer
    from .moeflux_layer import MoefluxLayer
    from .torchtitan_moe import TorchtitanLayer

    world = dist.get_world_size()
    cache: dict = {}

    def groups():
        if "groups" not in cache:
            cache["groups"] = moeflux.init_expert_parallel(world)
        return cache["groups"]

    def mesh():
        if "mesh" not in cache:
            from torch.distributed.device_mesh import init_device_mesh

            cache["mesh"] = init_device_mesh("cpu", (world,))
        return cache["mesh"]

    ep = f"ep={world}"
    out = [Entry("s3/moeflux", S3, lambda b: MoefluxLayer(spec, weights, ep_group=groups(), label=f"moeflux {ep}"))]
    if "torchtitan" in peers:
        out += [
            Entry("s3/torchtitan-fp32", S3, lambda b: TorchtitanLayer(
                spec, weights, stock_bf16_experts=False, ep_mesh=mesh(), label=f"torchtitan {ep} (fp32 experts)"),
                ref="s3/moeflux", note="our subclass without the bf16 casts"),
            Entry("s3/torchtitan-bf16", S3, lambda b: TorchtitanLayer(
                spec, weights, stock_bf16_experts=True, ep_mesh=mesh(), label=f"torchtitan {ep} (stock bf16 experts)"),
                ref="s3/moeflux", tol=5e-2, note="experts compute in bf16 as shipped: bf16-level agreement"),
        ]
    if "deepspeed" in peers:
        out.append(Entry("s3/deepspeed", S3, lambda b: DeepSpeedLayer(spec, weights, ep_size=world,
                                                                       label=f"DeepSpeed-MoE {ep} dropless"),
                         ref="s3/moeflux", note="pads every expert to the largest count over the ep group"))
    out.append(Entry("s3c/moeflux", S3C, lambda b: MoefluxLayer(spec, weights, capacity_factor=capacity,
                                                                ep_group=groups(), label=f"moeflux {ep} cap {capacity}")))
    if "deepspeed" in peers:
        out.append(Entry("s3c/deepspeed", S3C, lambda b: DeepSpeedLayer(
            spec, weights, capacity_factor=capacity, ep_size=world, label=f"DeepSpeed-MoE {ep} cap {capacity}"),
            ref="s3c/moeflux", mask_dropped_of="s3c/moeflux",
            note="renormalises after the cut: out/x compared on tokens that lost no slot"))
    return out


def measure(args: dict) -> dict:
    """Every rank runs this (benchmarks/gloo_ranks.run_on_ranks); rank 0's result is returned."""
    rank = dist.get_rank()
    spec = LayerSpec(**args["spec"])
    weights = make_weights(spec, args["seed"])
    inputs = make_inputs(spec, rank, args["skew"], args["seed"] + 1000)
    log = print if rank == 0 else (lambda s: None)
    log(f"[ranks] {dist.get_world_size()} gloo ranks, {torch.get_num_threads()} thread(s) each")
    rows, skipped = run(entries(spec, weights, set(args["peers"]), args["capacity"]), inputs, args["rounds"],
                        args["warmup"], log=log)
    return {"rows": rows, "skipped": skipped, "threads_per_rank": torch.get_num_threads(),
            "world": dist.get_world_size()}
