"""Eager vs torch.compile: one training step (forward, backward, AdamW) of the main job's model, the same
weights and batches, interleaved in one run.

    python benchmarks/bench_compile.py                 # the main job's default model, 1 process and 2 gloo ranks
    python benchmarks/bench_compile.py --rounds 5 --settings one

Model: examples/moe_lm's ByteLM at the main job's defaults (2 blocks, d_model 128, 4 heads, d_ffn 256, 8
experts, top-2, dropless, 16 sequences of 128 bytes per rank). Settings: "one" (one process, all experts,
2 threads) and "ep2" (2 gloo ranks splitting the experts, 1 thread each, as the main job runs). The
compiled model is built like the eager one (same seed, same weights) and compiled in place with
fullgraph=True (the default --schedule bulk traces whole), then warmed up until it stops compiling; each
round times `--steps` steps of each, in alternating order; the ratio is eager median / compiled median. Writes benchmarks/results/compile/{compile.json,
table.md, compile.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import moeflux  # noqa: E402
from gloo_ranks import run_on_ranks  # noqa: E402
from moe_lm.model import ByteLM, ModelConfig  # noqa: E402

BATCH, SEQ = 16, 128


def make_models(groups) -> tuple[torch.nn.Module, torch.nn.Module]:
    models = []
    for _ in range(2):  # the same seed: the same weights (a deep copy cannot copy process groups)
        torch.manual_seed(0)
        models.append(ByteLM(ModelConfig(seq_len=SEQ), groups))
    eager, compiled = models
    compiled.compile(fullgraph=True)
    return eager, compiled


def step_time(model, optimizer, batches) -> float:
    start = time.perf_counter()
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) + moeflux.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if dist.is_initialized():
        dist.barrier()
    return (time.perf_counter() - start) / len(batches)


def measure(args: argparse.Namespace) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    groups = moeflux.init_expert_parallel(dist.get_world_size()) if dist.is_initialized() else None
    eager, compiled = make_models(groups)
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)}
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, 256, (BATCH, SEQ), generator=gen), torch.randint(0, 256, (BATCH, SEQ), generator=gen))
               for _ in range(args.steps)]
    start = time.perf_counter()
    step_time(compiled, optimizers[compiled], batches[:3])  # compiles (train mode; then no recompilation)
    compile_seconds = time.perf_counter() - start
    step_time(eager, optimizers[eager], batches[:2])
    times = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
        for name in order:
            model = eager if name == "eager" else compiled
            times[name].append(step_time(model, optimizers[model], batches))
    return {"times": times, "compile_seconds": compile_seconds}


def summarise(setting: str, result: dict) -> dict:
    med = {k: statistics.median(v) for k, v in result["times"].items()}
    return {"setting": setting, "eager_ms": 1e3 * med["eager"], "compiled_ms": 1e3 * med["compiled"],
            "eager_range_ms": [1e3 * min(result["times"]["eager"]), 1e3 * max(result["times"]["eager"])],
            "compiled_range_ms": [1e3 * min(result["times"]["compiled"]), 1e3 * max(result["times"]["compiled"])],
            "speedup": med["eager"] / med["compiled"], "compile_seconds": result["compile_seconds"]}


def write(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "command": "python benchmarks/bench_compile.py " + " ".join(sys.argv[1:]),
            "rounds": args.rounds, "steps_per_round": args.steps}
    (out / "compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| setting | eager ms/step | compiled ms/step | eager / compiled | first compile |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['eager_ms']:.1f} ({r['eager_range_ms'][0]:.1f}–{r['eager_range_ms'][1]:.1f})"
                     f" | {r['compiled_ms']:.1f} ({r['compiled_range_ms'][0]:.1f}–{r['compiled_range_ms'][1]:.1f})"
                     f" | {r['speedup']:.2f}x | {r['compile_seconds']:.0f} s |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["eager_ms"] for r in rows], 0.4, label="eager")
    ax.bar([x + 0.2 for x in xs], [r["compiled_ms"] for r in rows], 0.4, label="torch.compile")
    ax.set_xticks(list(xs), [r["setting"] for r in rows])
    ax.set_ylabel("ms per training step (median)")
    ax.set_title("main job's model: eager vs compiled")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compile.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    p.add_argument("--settings", default="one,ep2")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compile")
    args = p.parse_args()
    rows = []
    for setting in args.settings.split(","):
        if setting == "one":
            torch.set_num_threads(os.cpu_count() or 1)
            rows.append(summarise("1 process, 8 experts", measure(args)))
        elif setting == "ep2":
            rows.append(summarise("2 gloo ranks, ep=2", run_on_ranks(measure, 2, args)))
        else:
            raise SystemExit(f"unknown setting {setting!r} (one, ep2)")
        print(rows[-1])
    write(rows, args.out, args)


if __name__ == "__main__":
    main()
