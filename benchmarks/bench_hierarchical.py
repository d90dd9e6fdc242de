"""Flat vs hierarchical (node-aware) all-to-all on the emulated cluster: inter-node bytes per step and step time.
Root (network namespaces).

    python benchmarks/bench_hierarchical.py --out benchmarks/results/hierarchical --rounds 2
    python benchmarks/bench_hierarchical.py --report benchmarks/results/hierarchical   # rebuild the report only

Each cluster run is bench_balance.py's worker (the main job's model, its MoE layers replaying the shared
SmartMoE trace or uniform routing) with two variants, interleaved step by step from a barrier: ``none`` (the
flat exchange) and ``hierarchical`` (``ExchangeConfig(transport="hierarchical")``, nodes from torchrun's
LOCAL_WORLD_SIZE). Runs:
--rounds x topologies (2x2, 4x1) x routings (trace, uniform), one link rate (inter-node links shaped with tc,
same-node ranks on loopback). Inter-node bytes: what moeflux's collectives send to ranks of other nodes
(moeflux.comm_stats), mean over ranks, per training step (both MoE layers, forward and backward); step: slowest
rank, median over the measured steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_balance  # noqa: E402  (the worker, run_cluster)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "hierarchical")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other options (model, routing) are bench_balance.py's, passed through.")
    bench_balance.add_sweep_args(p, ROOT / "benchmarks" / "results" / "hierarchical", rounds=2, timeout=600)
    return p.parse_known_args(argv)


def main() -> None:
    args, passed = parse_args()
    if args.report:
        report(args.report)
        return
    bench_balance.fresh_results_folder(args.out, "hier_*.json")
    for r, topology, nodes, per_node, routing in bench_balance.sweep(args):
        run_args = bench_balance.parse_args([
            "--nodes", str(nodes), "--ranks-per-node", str(per_node), "--link", args.link,
            "--variants", ",".join(VARIANTS), "--timeout", str(args.timeout),
            "--wait-quiet", str(args.wait_quiet), *passed])
        bench_balance.run_cluster(run_args, routing, args.out / f"hier_{routing}_{topology}_{args.link}_r{r}.json")
    report(args.out)


# ---- report


def _runs(folder: Path) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(folder.glob("hier_*.json")):
        run = json.loads(path.read_text())
        runs.setdefault((f"{run['nodes']}x{run['ranks_per_node']}", run["routing"]), []).append(run)
    return runs


def summary(runs: list[dict]) -> dict:
    """Medians over runs; ratios flat / hierarchical per run, then their median."""
    def med(variant: str, key: str) -> float:
        return statistics.median(r["variants"][variant][key] for r in runs)

    def ratio(key: str) -> list[float]:
        return [r["variants"]["none"][key] / r["variants"]["hierarchical"][key] for r in runs]

    out = {"runs": len(runs), "link": runs[0]["link"], "config": runs[0]["config"]}
    for v in VARIANTS:
        out[v] = {"inter_mb": med(v, "bytes_inter_per_step") / 1e6, "intra_mb": med(v, "bytes_intra_per_step") / 1e6,
                  "step_ms": 1e3 * med(v, "step_s"), "moe_ms": 1e3 * med(v, "moe_layers_s"),
                  "a2a_ms": 1e3 * med(v, "all_to_all_s"), "a2a_share": med(v, "all_to_all_share")}
    inter = [1 - r["variants"]["hierarchical"]["bytes_inter_per_step"] / r["variants"]["none"]["bytes_inter_per_step"]
             for r in runs]
    out["inter_saved"] = statistics.median(inter)
    out["step_speedup"], out["step_speedups"] = statistics.median(ratio("step_s")), ratio("step_s")
    out["moe_speedup"], out["moe_speedups"] = statistics.median(ratio("moe_layers_s")), ratio("moe_layers_s")
    out["machine"] = [r.get("machine", {}).get("during", {}) for r in runs]
    return out


def report(folder: Path) -> None:
    runs = _runs(folder)
    if not runs:
        raise SystemExit(f"bench_hierarchical: no hier_*.json in {folder}")
    rows = {key: summary(group) for key, group in sorted(runs.items())}
    first = next(iter(rows.values()))
    cfg = first["config"]
    lines = [f"Inter-node link {first['link']}; model d_model {cfg['d_model']}, d_ffn {cfg['d_ffn']}, "
             f"{cfg['experts']} experts, top-{cfg['top_k']}, {cfg['batch']}x{cfg['seq_len']} tokens per rank, "
             f"{cfg['layers']} MoE layers; {cfg['warmup']} warm-up + {cfg['steps']} measured steps per variant, "
             "interleaved. Medians over runs; ratios flat / hierarchical (each run's in brackets).", "",
             "| nodes x ranks | routing | inter-node MB/step flat -> hier | saved | intra-node MB/step flat -> hier "
             "| step ms flat -> hier | step speedup | MoE layers ms flat -> hier | MoE speedup "
             "| all-to-all ms (share) flat -> hier | runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (topology, routing), s in rows.items():
        f, h = s["none"], s["hierarchical"]
        each = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        lines.append(
            f"| {topology} | {routing} | {f['inter_mb']:.1f} -> {h['inter_mb']:.1f} | {100 * s['inter_saved']:.0f}% "
            f"| {f['intra_mb']:.1f} -> {h['intra_mb']:.1f} | {f['step_ms']:.0f} -> {h['step_ms']:.0f} "
            f"| {s['step_speedup']:.2f}x ({each(s['step_speedups'])}) | {f['moe_ms']:.0f} -> {h['moe_ms']:.0f} "
            f"| {s['moe_speedup']:.2f}x ({each(s['moe_speedups'])}) | {f['a2a_ms']:.0f} ({100 * f['a2a_share']:.0f}%) "
            f"-> {h['a2a_ms']:.0f} ({100 * h['a2a_share']:.0f}%) | {s['runs']} |")
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({f"{t} {r}": s for (t, r), s in rows.items()}, indent=1))
    print("\n".join(lines))
    plot(rows, folder / "hierarchical.png")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{t}\n{r}" for t, r in rows]
    x = range(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "inter_mb", "inter-node MB per step (per rank)"),
                           (axes[1], "step_ms", "step ms (slowest rank)")):
        for i, (variant, name) in enumerate((("none", "flat"), ("hierarchical", "hierarchical"))):
            ax.bar([v + 0.38 * i for v in x], [s[variant][key] for s in rows.values()], width=0.38, label=name)
        ax.set_xticks([v + 0.19 for v in x], labels)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
