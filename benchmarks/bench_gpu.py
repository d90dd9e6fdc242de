"""The GPU measurements of benchmarks/gpu_suite.sh, against the device's own ceilings, in one process.

    python benchmarks/bench_gpu.py --out DIR              # on a GPU (the suite's step "bench")
    python benchmarks/bench_gpu.py --device cpu --quick   # the dry run: every section at toy sizes on the CPU
    python benchmarks/bench_gpu.py --summary DIR          # the short table of DIR/gpu.json (the suite's last step)

Sections (each one's figures go to DIR/gpu.json; a section that fails records its error and the rest go on):
  ceilings      copy bandwidth (device-to-device, bytes read + written) and a dense bf16 matmul's FLOP/s
  route         softmax / sigmoid + top-k + weights vs one read of the logits at copy bandwidth (target <= 2x)
  grouped_gemm  moeflux.ops.grouped_mm over balanced groups vs one dense matmul of the same FLOPs (>= 70%)
  layer         one MoE layer forward + backward at Qwen3-30B-A3B's and Mixtral-8x7B's shapes, bf16: the
                layer against its expert FFN alone (time outside the expert GEMMs < 15%)
  no_sync       capacity mode under torch.cuda.set_sync_debug_mode("error"): no host synchronisation
  nccl          dispatch/combine through NCCL at world size 1 equal to the local layer
  cuda_vs_cpu   the same model's forward/backward on CUDA equal to the CPU's on the same inputs (fp32)
The permute/unpermute grid is benchmarks/bench_ops.py --device cuda (the suite runs it next to this).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import moeflux
from moeflux import ops
from moeflux.exchange.transport import flat

LAYER_SHAPES = {  # name: (d_model, d_ffn, experts, top_k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}


def timed(fn: Callable[[], object], device: str, repeat: int, warmup: int = 2) -> float:
    """Median seconds of fn(); CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceilings(device: str, quick: bool) -> dict:
    n = (1 << 20 if quick else 1 << 28)  # elements: 4 MiB / 1 GiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, 10)
    size = 512 if quick else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    mm_s = timed(lambda: a @ b, device, 10)
    return {"copy_GBps": 2 * src.numel() * 4 / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * size ** 3 / mm_s / 1e12}


def route(device: str, quick: bool, copy_GBps: float) -> dict:
    out = {}
    tokens = 1024 if quick else 65536
    for experts, k in ((64, 8), (256, 8), (8, 2)):
        for scoring in ("softmax", "sigmoid"):
            logits = torch.randn(tokens, experts, device=device)
            s = timed(lambda: ops.route(logits, k, True, scoring), device, 20)
            floor = logits.numel() * 4 / (copy_GBps * 1e9 / 2)  # one read at half the copy rate (read only)
            out[f"E{experts}_k{k}_{scoring}"] = {"ms": s * 1e3, "x_one_read": s / floor}
    return out


def grouped_gemm(device: str, quick: bool) -> dict:
    out = {}
    rows = 2048 if quick else 65536
    for experts, k_dim, n_dim in ((8, 4096, 14336), (128, 2048, 1536), (64, 4096, 2048)):
        if quick:
            k_dim, n_dim = k_dim // 16, n_dim // 16
        x = torch.randn(rows, k_dim, device=device, dtype=torch.bfloat16)
        w = torch.randn(experts, k_dim, n_dim, device=device, dtype=torch.bfloat16) / k_dim ** 0.5
        counts = torch.full((experts,), rows // experts, dtype=torch.int32, device=device)
        dense = w[0]
        grouped_s = timed(lambda: ops.grouped_mm(x, w, counts), device, 10)
        dense_s = timed(lambda: x @ dense, device, 10)
        out[f"E{experts}_{k_dim}x{n_dim}"] = {"grouped_ms": grouped_s * 1e3, "dense_ms": dense_s * 1e3,
                                             "of_dense": dense_s / grouped_s}
    return out


def layer(device: str, quick: bool) -> dict:
    out = {}
    tokens = 512 if quick else 16384
    for name, (d_model, d_ffn, experts, top_k) in LAYER_SHAPES.items():
        if quick:
            d_model, d_ffn = d_model // 16, d_ffn // 16
        torch.manual_seed(0)
        dtype = torch.bfloat16
        moe = moeflux.MoE(d_model, d_ffn, experts, top_k, renormalize=True, device=device, dtype=dtype)
        x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        layer_s = timed(lambda: moe(x).backward(grad), device, 5)
        # The expert FFN alone over the same rows and segment sizes as the layer's last forward.
        counts = moe.tokens_per_expert.to(device=device, dtype=torch.int32)
        rows = torch.randn(int(counts.sum()), d_model, device=device, dtype=dtype)
        w_in = moe.experts.w_in.detach().requires_grad_()
        w_out = moe.experts.w_out.detach().requires_grad_()
        rows_grad = torch.randn_like(rows)
        rows.requires_grad_()
        ffn_s = timed(lambda: ops.expert_ffn(rows, w_in, w_out, counts).backward(rows_grad), device, 5)
        out[name] = {"layer_ms": layer_s * 1e3, "expert_ffn_ms": ffn_s * 1e3,
                     "outside_expert_gemms": 1 - ffn_s / layer_s, "tokens": tokens}
    return out


def no_sync(device: str, quick: bool) -> dict:
    if device != "cuda":
        return {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"}
    moe = moeflux.MoE(256, 512, 16, 2, capacity_factor=1.25, device=device, dtype=torch.bfloat16)
    x = torch.randn(4096, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    moe(x).sum().backward()  # warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host synchronisation raises: the section fails, none is recorded
    try:
        moe(x).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"capacity_mode_host_syncs": 0}


def nccl(device: str, quick: bool) -> dict:
    """The expert-parallel layer at world 1 against the single-process one: dropless, and with a capacity (with
    drops) on fixed splits, the GPUs' capacity path (on the CPU by the test-only
    moeflux.exchange.transport.flat.FIXED_SPLITS_ON_CPU, so the dry run takes it too; across ranks it is
    tests/test_expert_parallel.py's, on gloo)."""
    backend = "nccl" if device == "cuda" else "gloo"
    out = {"backend": backend}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        flat.FIXED_SPLITS_ON_CPU = True
        try:
            groups = moeflux.init_expert_parallel(1)
            for name, capacity_factor in (("dropless", None), ("capacity", 0.75)):
                torch.manual_seed(3)
                local = moeflux.MoE(64, 96, 8, 2, capacity_factor, device=device)
                torch.manual_seed(3)
                parallel = moeflux.MoE(64, 96, 8, 2, capacity_factor, ep_group=groups, device=device)
                x = torch.randn(300, 64, device=device)
                xs = [x.clone().requires_grad_() for _ in range(2)]
                ops.reset_collective_counts()
                ys = [local(xs[0]), parallel(xs[1])]
                for y in ys:
                    y.square().sum().backward()
                key = "" if capacity_factor is None else f"{name}_"  # the dropless keys as they were
                out |= {f"{key}max_abs_out": (ys[0] - ys[1]).abs().max().item(),
                        f"{key}max_abs_grad": (xs[0].grad - xs[1].grad).abs().max().item(),
                        f"{key}count_exchanges": ops.collective_counts()["count_exchanges"]}  # fixed splits: 0
            return out
        finally:
            flat.FIXED_SPLITS_ON_CPU = False
            dist.destroy_process_group()


def cuda_vs_cpu(device: str, quick: bool) -> dict:
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    result = {}
    for capacity_factor in (None, 1.25):
        torch.manual_seed(7)
        cpu = moeflux.MoE(128, 256, 16, 2, capacity_factor, renormalize=True)
        gpu = moeflux.MoE(128, 256, 16, 2, capacity_factor, renormalize=True, device="cuda")
        gpu.load_state_dict(cpu.state_dict())
        x = torch.randn(2048, 128)
        xs = [x.clone().requires_grad_(), x.cuda().requires_grad_()]
        outs = [cpu(xs[0]), gpu(xs[1])]
        for out in outs:
            out.square().sum().backward()
        result["dropless" if capacity_factor is None else "capacity"] = {
            "max_abs_out": (outs[0] - outs[1].cpu()).abs().max().item(),
            "max_abs_x_grad": (xs[0].grad - xs[1].grad.cpu()).abs().max().item(),
            "max_abs_w_in_grad": (cpu.experts.w_in.grad - gpu.experts.w_in.grad.cpu()).abs().max().item(),
        }
    return result


SECTIONS = ("ceilings", "route", "grouped_gemm", "layer", "no_sync", "nccl", "cuda_vs_cpu")


def run(device: str, quick: bool, out: Path) -> dict:
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "moeflux_cuda_kernels": moeflux.cuda_kernels_built(),
                     "quick": quick}
    copy_GBps = 1.0
    for name in SECTIONS:
        start = time.perf_counter()
        try:
            if name == "ceilings":
                results[name] = ceilings(device, quick)
                copy_GBps = results[name]["copy_GBps"]
            elif name == "route":
                results[name] = route(device, quick, copy_GBps)
            else:
                results[name] = globals()[name](device, quick)
        except Exception:  # noqa: BLE001 - recorded, the other sections still run
            results[name] = {"error": traceback.format_exc().splitlines()[-1]}
        results[name]["section_s"] = round(time.perf_counter() - start, 2)
        print(f"bench_gpu: {name} done in {results[name]['section_s']} s", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(results, indent=1))  # after every section: a kill keeps them
    return results


def summary(out: Path) -> str:
    r = json.loads((out / "gpu.json").read_text())
    lines = [f"device {r['device']}, torch {r['torch']}, CUDA kernels built: {r['moeflux_cuda_kernels']}"]

    def row(what: str, value: str, target: str) -> None:
        lines.append(f"{what:<44} {value:>22}   {target}")

    c = r.get("ceilings", {})
    if "copy_GBps" in c:
        row("copy bandwidth", f"{c['copy_GBps']:.0f} GB/s", "(ceiling)")
        row("bf16 matmul", f"{c['bf16_matmul_TFLOPs']:.3g} TFLOP/s", "(ceiling)")
    for section, key, fmt, target in (("route", "x_one_read", "{:.2f}x one read", "<= 2x"),
                                      ("grouped_gemm", "of_dense", "{:.0%} of dense", ">= 70%"),
                                      ("layer", "outside_expert_gemms", "{:.0%} outside GEMMs", "< 15%")):
        for name, v in r.get(section, {}).items():
            if isinstance(v, dict) and key in v:
                row(f"{section} {name}", fmt.format(v[key]), target)
            elif name == "error":
                row(section, "error", v)
    for section in ("no_sync", "nccl", "cuda_vs_cpu"):
        row(section, "", json.dumps({k: v for k, v in r.get(section, {}).items() if k != "section_s"})[:90])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="toy sizes (the CPU dry run)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")))
    parser.add_argument("--summary", type=Path, help="print the short table of DIR/gpu.json and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    run(args.device, args.quick, args.out)
    print(summary(args.out))


if __name__ == "__main__":
    main()
