"""Speed of route, permute and unpermute (forward and backward) against the
best pure-PyTorch composition of the same work and a plain copy of the same
bytes, all in one run. Prints a table, writes JSON and a PNG plot.

    python benchmarks/bench_ops.py                       # CPU, the issue's shapes
    python benchmarks/bench_ops.py --device cuda --tokens 16384 --hidden 4096 --topk 2 8

Bytes counted per phase (H-wide rows; index and weight traffic is ignored):
  permute fwd   reads T rows, writes N = T*k rows
  unpermute fwd reads N rows, writes T rows
  unpermute bwd reads T grad rows and N expert rows, writes N rows
  permute bwd   reads N rows, writes T rows
The copy baseline is ``dst.copy_(src)`` on a buffer of the same size, so
"of copy" = (our bytes / our time) / (copy bytes / copy time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import moeflux
from moeflux import ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timeit(fn: Callable[[], object], device: str, repeat: int, warmup: int = 3) -> float:
    """Median wall time of fn() in seconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- the pure-PyTorch composition: argsort + index_select / index_add / gather


def torch_permute(x, ids, num_experts):
    flat = ids.flatten().long()
    order = torch.argsort(flat, stable=True)  # row -> flat slot
    counts = torch.bincount(flat, minlength=num_experts)
    return x.index_select(0, order // ids.shape[1]), counts, order


def torch_unpermute_index_add(rows, order, weights, num_tokens, k):
    scaled = rows * weights.flatten()[order].unsqueeze(1).to(rows.dtype)
    out = torch.zeros(num_tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, order // k, scaled)


def torch_unpermute_gather(rows, order, weights, num_tokens, k):
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    picked = rows.index_select(0, inverse).view(num_tokens, k, rows.shape[1])
    return torch.bmm(weights.to(rows.dtype).unsqueeze(1), picked).squeeze(1)


def torch_route(logits, k):
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights, ids.int()


def run_case(device, dtype, num_tokens, hidden, num_experts, k, repeat):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(device)
    weights, ids = ops.route(logits, k)
    grad_out = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    rows, _, row_map = ops.permute(x, ids, num_experts)
    num_rows = rows.shape[0]
    row_bytes = hidden * x.element_size()
    t_bytes, n_bytes = num_tokens * row_bytes, num_rows * row_bytes

    _, _, order = torch_permute(x, ids, num_experts)
    torch_unpermute = min(
        (torch_unpermute_index_add, torch_unpermute_gather),
        key=lambda f: timeit(lambda: f(rows, order, weights, num_tokens, k), device, 3, 1),
    )

    # Autograd closures for whole forward + backward.
    def ours_fwd_bwd():
        xr = x.detach().requires_grad_()
        wr = weights.detach().requires_grad_()
        permuted, _, rmap = ops.permute(xr, ids, num_experts)
        ops.unpermute(permuted, rmap, wr).backward(grad_out)

    def torch_fwd_bwd():
        xr = x.detach().requires_grad_()
        wr = weights.detach().requires_grad_()
        permuted, _, order_ = torch_permute(xr, ids, num_experts)
        torch_unpermute(permuted, order_, wr, num_tokens, k).backward(grad_out)

    phases = {
        "permute fwd": (
            lambda: ops.permute(x, ids, num_experts),
            lambda: torch_permute(x, ids, num_experts),
            t_bytes + n_bytes,
        ),
        "unpermute fwd": (
            lambda: ops.unpermute(rows, row_map, weights),
            lambda: torch_unpermute(rows, order, weights, num_tokens, k),
            n_bytes + t_bytes,
        ),
        "unpermute bwd": (
            lambda: ops._ops.unpermute_backward(grad_out, rows, row_map, weights),
            None,
            t_bytes + 2 * n_bytes,
        ),
        "permute bwd": (lambda: ops.unpermute(rows, row_map), None, n_bytes + t_bytes),
        # the four phases above together
        "permute+unpermute fwd+bwd": (ours_fwd_bwd, torch_fwd_bwd, 4 * t_bytes + 5 * n_bytes),
    }

    results = []
    for name, (ours, baseline, moved) in phases.items():
        t_ours = timeit(ours, device, repeat)
        t_torch = timeit(baseline, device, repeat) if baseline else None
        src = torch.empty(moved // 2 // x.element_size(), dtype=dtype, device=device).normal_()
        dst = torch.empty_like(src)
        t_copy = timeit(lambda: dst.copy_(src), device, repeat)
        results.append(dict(phase=name, ours_ms=t_ours * 1e3, torch_ms=None if t_torch is None else t_torch * 1e3,
                             copy_ms=t_copy * 1e3, bytes=moved, ours_gbps=moved / t_ours / 1e9,
                             copy_gbps=moved / t_copy / 1e9))

    t_route = timeit(lambda: ops.route(logits, k), device, repeat)
    t_route_torch = timeit(lambda: torch_route(logits, k), device, repeat)
    logit_bytes = logits.numel() * logits.element_size()
    src = torch.empty(logits.numel(), device=device)
    t_read = timeit(lambda: src.sum(), device, repeat)
    results.append(dict(phase="route fwd", ours_ms=t_route * 1e3, torch_ms=t_route_torch * 1e3, copy_ms=None,
                        bytes=logit_bytes, ours_gbps=logit_bytes / t_route / 1e9, copy_gbps=None,
                        read_logits_ms=t_read * 1e3))
    for r in results:
        r["speedup"] = None if r["torch_ms"] is None else r["torch_ms"] / r["ours_ms"]
        r["of_copy"] = None if r["copy_gbps"] is None else r["ours_gbps"] / r["copy_gbps"]
    return dict(device=device, dtype=str(dtype).removeprefix("torch."), tokens=num_tokens, hidden=hidden,
                experts=num_experts, topk=k, torch_unpermute=torch_unpermute.__name__, phases=results)


def print_case(case):
    print(f"\n{case['device']} {case['dtype']}  T={case['tokens']} H={case['hidden']} E={case['experts']} "
          f"k={case['topk']}  (PyTorch unpermute baseline: {case['torch_unpermute']})")
    print(f"{'phase':28s} {'ours ms':>9s} {'torch ms':>9s} {'speedup':>8s} {'GB/s':>8s} {'copy GB/s':>10s} {'of copy':>8s}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in case["phases"]:
        print(f"{r['phase']:28s} {r['ours_ms']:9.3f} {fmt(r['torch_ms'], '9.3f')} {fmt(r['speedup'], '7.2f')}x "
              f"{r['ours_gbps']:8.2f} {fmt(r['copy_gbps'], '10.2f')} {fmt(r['of_copy'], '7.0%')}")


def plot(cases, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = [r for r in case["phases"] if r["copy_gbps"] is not None]
        names = [r["phase"].replace(" ", "\n", 1) for r in rows]
        xs = range(len(rows))
        ax.bar([i - 0.2 for i in xs], [r["ours_gbps"] for r in rows], 0.4, label="moeflux")
        ax.bar([i + 0.2 for i in xs], [r["copy_gbps"] for r in rows], 0.4, label="copy of same bytes")
        for i, r in zip(xs, rows):
            if r["speedup"]:
                ax.annotate(f"{r['speedup']:.1f}x vs torch", (i - 0.2, r["ours_gbps"]), ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(list(xs), names, fontsize=7)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{case['device']} {case['dtype']} T={case['tokens']} H={case['hidden']} "
                     f"E={case['experts']} k={case['topk']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, nargs="+", default=[2])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    allocator = os.environ.get("LD_PRELOAD") or "default (glibc malloc)"
    print(f"moeflux {moeflux.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, allocator {allocator}")
    cases = []
    for dtype in args.dtypes:
        for k in args.topk:
            case = run_case(args.device, DTYPES[dtype], args.tokens, args.hidden, args.experts, k, args.repeat)
            print_case(case)
            cases.append(case)
    for case in cases:
        case["allocator"] = allocator
    (args.out / f"ops_{args.device}.json").write_text(json.dumps(cases, indent=2))
    plot(cases, args.out / f"ops_{args.device}.png")
    print(f"\nwrote {args.out / f'ops_{args.device}.json'} and {args.out / f'ops_{args.device}.png'}")


if __name__ == "__main__":
    main()
