"""Step time of the MoE model for each schedule (bulk / chunked / pairwise) x all-to-all priority (off / on) on
the emulated cluster, interleaved in rounds, next to what moeflux.sim predicts; and the simulator's
prediction for 64 and 256 GPUs (8 per node, NVLink + 400 Gbit/s InfiniBand) on the shared trace. Root.

    python benchmarks/bench_pipeline.py                      # 2 nodes x 2 ranks at 500 Mbit/s (the default setting)
    python benchmarks/bench_pipeline.py --rounds 2 --chunks 4 --out benchmarks/results/pipeline

Each configuration runs benchmarks/bench_step.py on a fresh cluster (benchmarks/cluster.py); a round runs
every configuration once, in order, so slow drift of the machine hits all of them alike; the table reports
the median over rounds. Prediction: the bulk run's measured parts (exposed all-to-all A, expert compute E,
the rest) with the layer's all-to-all and experts replaced by moeflux.sim.pipelined_layer_time(A, E, stages)
(priority is not modelled).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from moeflux.sim import pipelined_layer_time

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--link", default="500mbit")
    p.add_argument("--chunks", type=int, default=4, help="stages of the chunked schedule (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sim-json", type=Path, default=ROOT / "benchmarks" / "results" / "sim" / "trace_16_1024.json",
                   help="python -m moeflux.sim --json output for the large-cluster prediction")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline")
    return p.parse_args()


def configurations(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """(label, bench_step arguments, pipeline stages)."""
    world = args.nodes * args.ranks_per_node
    schedules = [("bulk", ["--schedule", "bulk"], 1),
                 (f"chunked x{args.chunks}", ["--schedule", "chunked", "--chunks", str(args.chunks)], args.chunks),
                 ("pairwise", ["--schedule", "pairwise", "--pairwise-group-size", "1"], world)]
    return [(f"{label}, priority {p}", [*a, "--priority", p], stages) for label, a, stages in schedules
            for p in ("off", "on")]


def run_one(args: argparse.Namespace, extra: list[str], path: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cluster.py"), "--nodes", str(args.nodes), "--ranks-per-node",
           str(args.ranks_per_node), "--link", args.link, "--timeout", "400", "--",
           str(ROOT / "benchmarks" / "bench_step.py"), "--json", str(path), "--steps", str(args.steps), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_pipeline: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(path.read_text())


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = configurations(args)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    for r in range(args.rounds):
        for i, (label, extra, _) in enumerate(configs):
            result = run_one(args, extra, args.out / f"run_{r}_{i}.json")
            runs[label].append(result)
            print(f"round {r}: {label}: step {1e3 * result['step_s']:.0f} ms, exposed all-to-all "
                  f"{1e3 * result['breakdown_s']['all_to_all']:.0f} ms", flush=True)

    def median(label: str, key: str) -> float:
        values = [run["step_s"] if key == "step" else run["breakdown_s"][key] for run in runs[label]]
        return statistics.median(values)

    base = configs[0][0]
    a2a, experts = median(base, "all_to_all"), median(base, "expert_compute")
    rest = median(base, "step") - a2a - experts
    rows = []
    for label, _, stages in configs:
        predicted = rest + pipelined_layer_time(a2a, experts, stages)
        rows.append({"configuration": label, "stages": stages, "step_s": median(label, "step"),
                     "all_to_all_exposed_s": median(label, "all_to_all"),
                     "all_to_all_in_flight_s": median(label, "all_to_all_in_flight"),
                     "expert_compute_s": median(label, "expert_compute"),
                     "grad_allreduce_wait_s": median(label, "grad_allreduce_wait"),
                     "predicted_step_s": predicted if "priority off" in label else None,
                     "speedup_vs_bulk": median(base, "step") / median(label, "step")})
    large = large_cluster_prediction(args.sim_json, args.chunks)
    (args.out / "pipeline.json").write_text(json.dumps({"rows": rows, "runs": runs, "large_clusters": large},
                                                        indent=1))
    write_table(args, rows, large)
    plot(rows, args.out / "pipeline.png")


def large_cluster_prediction(sim_json: Path, chunks: int) -> list[dict]:
    """Per layer and step, from the simulator's trace run: all-to-all (direct) and the busiest rank's experts."""
    if not sim_json.is_file():
        return []
    out = []
    for r in json.loads(sim_json.read_text())["results"]:
        if r["gpus"] not in (64, 256):
            continue
        a2a, experts = r["summary"]["direct_s"]["median"], r["summary"]["compute_s"]["median"]
        out.append({"gpus": r["gpus"], "a2a_s": a2a, "experts_s": experts, "bulk_s": a2a + experts,
                    "chunked_s": pipelined_layer_time(a2a, experts, chunks),
                    "pairwise_s": pipelined_layer_time(a2a, experts, r["gpus"] // 8)})
    return out


def write_table(args: argparse.Namespace, rows: list[dict], large: list[dict]) -> None:
    lines = [f"{args.nodes} nodes x {args.ranks_per_node} ranks at {args.link}; median of {args.rounds} interleaved "
             f"rounds of {args.steps} steps (each: slowest rank's median step)", "",
             "| configuration | step ms | vs bulk, no priority | exposed all-to-all ms | all-to-all in flight ms "
             "| expert ms | all-reduce wait ms | sim predicted step ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pred = f"{1e3 * r['predicted_step_s']:.0f}" if r["predicted_step_s"] is not None else "–"
        lines.append(f"| {r['configuration']} | {1e3 * r['step_s']:.0f} | {r['speedup_vs_bulk']:.2f}x | "
                     f"{1e3 * r['all_to_all_exposed_s']:.0f} | {1e3 * r['all_to_all_in_flight_s']:.0f} | "
                     f"{1e3 * r['expert_compute_s']:.0f} | {1e3 * r['grad_allreduce_wait_s']:.0f} | {pred} |")
    if large:
        lines += ["", f"Simulator, one layer per step on the SmartMoE trace (H100 NVLink + 400G IB, 8 GPUs per node; "
                      f"chunked x{args.chunks}, pairwise with groups of one node):", "",
                  "| GPUs | all-to-all ms | experts ms (busiest rank) | bulk ms | chunked ms | pairwise ms | "
                  "chunked speedup |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in large:
            lines.append(f"| {r['gpus']} | {1e3 * r['a2a_s']:.1f} | {1e3 * r['experts_s']:.1f} | "
                         f"{1e3 * r['bulk_s']:.1f} | {1e3 * r['chunked_s']:.1f} | {1e3 * r['pairwise_s']:.1f} | "
                         f"{r['bulk_s'] / r['chunked_s']:.2f}x |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["configuration"].replace(", ", "\n") for r in rows]
    exposed = [1e3 * r["all_to_all_exposed_s"] for r in rows]
    allreduce = [1e3 * r["grad_allreduce_wait_s"] for r in rows]
    rest = [1e3 * r["step_s"] - e - a for r, e, a in zip(rows, exposed, allreduce)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(labels, rest, label="compute and other", color="#7f7f7f")
    ax.bar(labels, allreduce, bottom=rest, label="gradient all-reduce (exposed)", color="#ff7f0e")
    ax.bar(labels, exposed, bottom=[a + b for a, b in zip(rest, allreduce)], label="all-to-all (exposed)",
           color="#d62728")
    for i, r in enumerate(rows):
        ax.text(i, 1e3 * r["step_s"], f"{r['speedup_vs_bulk']:.2f}x", ha="center", va="bottom", fontsize=8)
        if r["predicted_step_s"] is not None:
            ax.plot([i - 0.35, i + 0.35], [1e3 * r["predicted_step_s"]] * 2, color="black", lw=1.5,
                    label="simulator" if i == 0 else None)
    ax.set_ylabel("ms per training step")
    ax.set_title("Schedules x all-to-all priority (label: speedup over bulk without priority)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
