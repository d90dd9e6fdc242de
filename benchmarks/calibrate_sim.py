"""Calibrate the simulator's α-β model on the emulated cluster, then check it on held-out configurations.

    python benchmarks/calibrate_sim.py            # selftests + 14 cluster runs (root, ~3.5 minutes), fits, predicts
    python benchmarks/calibrate_sim.py --reuse    # refits from benchmarks/results/calibration/measurements.json

Runs ``benchmarks/cluster.py`` with ``benchmarks/bench_all_to_all.py`` over a grid of cluster shapes, link rates,
token counts and routing skews. Every measurement is tagged ``fit`` or ``predict``: the link parameters are fitted
(``moeflux.sim.calibrate.fit``) on the fit set only, then the prediction set (other rank counts, link rates,
token counts and skews) is predicted and compared with what was measured. Writes ``measurements.json`` (raw),
``fitted.json`` and ``table.md`` to --out-dir, and prints the table.

Also checks the nccl-tests ceiling for a uniform all-to-all: algBw = bytes per rank / time, busBw =
algBw·(n−1)/n, against the configured link rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moeflux.sim.calibrate import FittedLinks, fit, load_measurements, predict, save_fitted
from moeflux.sim.cost_model import algbw, busbw_from_algbw

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "results" / "calibration"
TOLERANCE = 0.20

# (nodes, ranks per node, link, [settings]); a setting is bench_all_to_all.py's key=value list.
# FIT: two link rates and an 8x spread of bytes on 2x2 (two ranks per NIC, two remote peers each), a 2x1 (one
# rank per NIC, one remote peer: separates the per-peer α from the overhead, and the pair serialisation from the
# efficiency) and intra-node-only 1x2 and 1x4 (loopback: the intra class, with 1 and 3 peers). PREDICT: other
# shapes (4x1, 3x1, 1x3), rates (500mbit), token counts (outside the fit range), skews (zipf), hidden sizes.
GRID: list[tuple[int, int, str, list[str]]] = [
    (2, 2, "1gbit", ["tokens=256,tag=fit", "tokens=1024,tag=fit", "tokens=2048,tag=fit",
                     "tokens=4096,tag=predict", "tokens=1024,routing=zipf,s=1.5,tag=predict"]),
    (2, 2, "200mbit", ["tokens=256,tag=fit", "tokens=1024,tag=fit"]),
    (2, 1, "1gbit", ["tokens=512,tag=fit", "tokens=2048,tag=fit"]),
    (1, 2, "1gbit", ["tokens=1024,tag=fit", "tokens=4096,tag=fit"]),
    (1, 4, "1gbit", ["tokens=512,tag=fit", "tokens=2048,tag=fit"]),
    (2, 2, "500mbit", ["tokens=1024,routing=zipf,s=1.2,tag=predict", "tokens=3072,hidden=512,tag=predict"]),
    (2, 1, "200mbit", ["tokens=768,tag=predict"]),
    (4, 1, "1gbit", ["tokens=1024,tag=predict"]),
    (4, 1, "500mbit", ["tokens=1024,routing=zipf,s=1.2,tag=predict"]),
    (4, 1, "200mbit", ["tokens=512,tag=predict"]),
    (3, 1, "500mbit", ["tokens=1024,routing=zipf,s=0.8,tag=predict"]),
    (1, 3, "1gbit", ["tokens=2048,tag=predict"]),
]


def run_grid(out: Path, timeout: float) -> None:
    """Every cluster of GRID in turn (never two at once), appending to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("[]")
    for nodes, rpn, link, settings in GRID:
        cmd = [sys.executable, str(HERE / "cluster.py"), "--nodes", str(nodes), "--ranks-per-node", str(rpn),
               "--link", link, "--timeout", str(timeout), "--", str(HERE / "bench_all_to_all.py"),
               "--out", str(out), "--repeats", "40", *settings]
        start = time.monotonic()
        print(f"== {nodes}x{rpn} @ {link}: {' '.join(settings)}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if "a2a P=" in line:
                print("   " + line.split("] ", 2)[-1], flush=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"calibrate_sim: cluster run {nodes}x{rpn} @ {link} failed ({proc.returncode})")
        print(f"   ({time.monotonic() - start:.0f} s)", flush=True)


SELFTEST_LINKS = ("1gbit", "200mbit")


def run_selftests(mib: int = 32) -> list[dict]:
    """cluster.py --selftest: one TCP flow node 0 -> node 1 at each rate of SELFTEST_LINKS, outside gloo. Its
    payload rate / configured rate is the links' efficiency (TCP/IP and Ethernet headers: 1448 of 1514 bytes
    that htb counts on a veth), measured independently of the all-to-alls."""
    results = []
    for link in SELFTEST_LINKS:
        cmd = [sys.executable, str(HERE / "cluster.py"), "--nodes", "2", "--link", link, "--selftest",
               "--selftest-mb", str(mib)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"throughput (\d+(?:\.\d+)?) Mbit/s", proc.stdout)
        rtt = re.search(r"TCP RTT median (\d+)us", proc.stdout)
        if proc.returncode != 0 or not m:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
            raise SystemExit(f"calibrate_sim: cluster.py --selftest at {link} failed ({proc.returncode})")
        gbit = float(re.fullmatch(r"(\d+(?:\.\d+)?)(mbit|gbit)", link).group(1)) * (1e-3 if "mbit" in link else 1)
        results.append({"link": link, "link_gbit_per_s": gbit, "throughput_mbit_per_s": float(m.group(1)),
                        "efficiency": float(m.group(1)) / (gbit * 1e3), "rtt_us": float(rtt.group(1)) if rtt else None})
        print(f"== selftest {link}: one TCP flow {m.group(1)} Mbit/s (efficiency {results[-1]['efficiency']:.3f}), "
              f"RTT {rtt.group(1) if rtt else '?'} us", flush=True)
    return results


def describe(raw: dict) -> str:
    skew = f"zipf s={raw['skew']:g}" if raw["kind"] == "zipf" else "uniform"
    return (f"{raw['nodes']}x{raw['ranks_per_node']} @ {raw['link'] if raw['nodes'] > 1 else 'loopback'}, "
            f"T={raw['tokens']} H={raw['hidden']} k={raw['top_k']} E={raw['experts']}, {skew}")


def table(rows: list[tuple[str, float, float]]) -> list[str]:
    lines = ["| configuration | measured ms | predicted ms | error |", "|---|---:|---:|---:|"]
    for name, measured, predicted in rows:
        lines.append(f"| {name} | {measured * 1e3:.2f} | {predicted * 1e3:.2f} | "
                     f"{(predicted / measured - 1) * 100:+.1f}% |")
    return lines


def _busbw(per_rank_bytes: float, n: int, seconds: float) -> float:
    return busbw_from_algbw(algbw(per_rank_bytes, seconds), n)


def busbw_check(raws: list[dict], measurements: list, fitted: FittedLinks) -> list[str]:
    """nccl-tests' all-to-all: algBw = bytes per rank (its whole send buffer, own chunk included) / time,
    busBw = algBw·(n−1)/n; with one full-duplex link per rank its ceiling is the link's payload rate."""
    lines = ["| configuration | bytes/rank MB | measured ms | algBw MB/s | busBw MB/s | ceiling MB/s | "
             "busBw / ceiling | model busBw / ceiling: full duplex, fitted |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    duplex = dataclasses.replace(fitted, pair_serialization=0.0, inter_alpha_s=0.0, intra_alpha_s=0.0, overhead_s=0.0)
    for raw, m in zip(raws, measurements):
        if raw["kind"] != "uniform" or raw["nodes"] < 2:
            continue
        n, r = m.world, m.ranks_per_node
        per_rank = float(m.traffic().sum(1).mean())
        payload = m.rate_bytes_per_s * fitted.inter_efficiency
        # The formula's ceiling for the shared NIC of the testbed: its link carries r·(n−r)/n of each of its r
        # ranks' buffers, so busBw <= payload·(n−1)/(r·(n−r)) (= payload when r = 1, 0.75·payload for 2x2).
        ceiling = payload * (n - 1) / (r * (n - r))
        bus = _busbw(per_rank, n, m.measured_s)
        ideal = _busbw(per_rank, n, predict(m, duplex)) / ceiling
        model = _busbw(per_rank, n, predict(m, fitted)) / ceiling
        lines.append(f"| {describe(raw)} | {per_rank / 1e6:.2f} | {m.measured_s * 1e3:.1f} | "
                     f"{algbw(per_rank, m.measured_s) / 1e6:.1f} | {bus / 1e6:.1f} | {ceiling / 1e6:.1f} | "
                     f"{bus / ceiling:.2f} | {ideal:.2f}, {model:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="refit from the existing measurements.json")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per cluster run")
    args = parser.parse_args()
    raw_path = args.out_dir / "measurements.json"
    selftest_path = args.out_dir / "selftest.json"
    if not args.reuse:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        selftest_path.write_text(json.dumps(run_selftests(), indent=1))
        with tempfile.TemporaryDirectory() as tmp:
            partial = Path(tmp) / "measurements.json"
            run_grid(partial, args.timeout)
            args.out_dir.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(json.loads(partial.read_text()), indent=1))
    raws = json.loads(raw_path.read_text())
    measurements = load_measurements(raw_path)
    fit_set = [m for m, r in zip(measurements, raws) if r["tag"] == "fit"]
    # Measured apart by the selftests (plain TCP between two nodes, no gloo): β of the inter-node links (one flow's
    # payload rate / configured rate) and α (half the ping-pong RTT, both link classes). Fitted from the
    # all-to-alls: the per-collective overhead, the loopback β, and the serialisation of a gloo pair's two
    # directions (see moeflux.sim.calibrate). Fitted from the all-to-alls too, the efficiency went above 1
    # (impossible: it made up for part of the serialisation) and α to ~0.8 ms per peer (20x the RTT: µs-scale
    # latencies cannot be told apart from ms-scale noise and the per-collective overhead).
    selftests = json.loads(selftest_path.read_text())
    efficiency = float(np.mean([t["efficiency"] for t in selftests]))
    alpha = float(np.mean([t["rtt_us"] for t in selftests])) / 2 * 1e-6
    prior = FittedLinks(inter_efficiency=efficiency, inter_alpha_s=alpha, intra_alpha_s=alpha)
    fitted = fit(fit_set, prior=prior, parameters=("overhead_s", "intra_beta_s_per_byte", "pair_serialization"))

    fit_rows = [(describe(r), m.measured_s, predict(m, fitted)) for m, r in zip(measurements, raws) if r["tag"] == "fit"]
    pred_rows = [(describe(r), m.measured_s, predict(m, fitted))
                 for m, r in zip(measurements, raws) if r["tag"] == "predict"]
    errors = [abs(p / m - 1) for _, m, p in pred_rows]
    within = sum(e <= TOLERANCE for e in errors)

    lines = [
        "# Simulator calibration on the emulated cluster",
        "",
        "Generated by `python benchmarks/calibrate_sim.py` (raw data: `measurements.json`). Testbed: "
        "`benchmarks/cluster.py` network namespaces, one htb-shaped veth per node, ranks of a node over loopback, "
        "gloo, 2 CPU cores; no netem (no added latency). Each time is the median over repeats of the max over ranks "
        "of one `moeflux.ops.all_to_all` of float32 rows (splits exchanged beforehand).",
        "",
        "## Fitted parameters (fit set only)",
        "",
        f"- overhead_s = {fitted.overhead_s * 1e3:.3f} ms per collective",
        f"- inter_efficiency = {fitted.inter_efficiency:.3f} (payload rate / configured link rate; measured by "
        f"`cluster.py --selftest`, one TCP flow: "
        + ", ".join(f"{t['throughput_mbit_per_s']:.0f} Mbit/s at {t['link']}" for t in selftests) + ")",
        f"- inter_alpha_s = {fitted.inter_alpha_s * 1e6:.1f} us per remote peer (half the selftests' TCP RTT, "
        + ", ".join(f"{t['rtt_us']:.0f} us at {t['link']}" for t in selftests) + ")",
        f"- intra_beta_s_per_byte = {fitted.intra_beta_s_per_byte:.3e} s/B "
        f"(loopback {1 / fitted.intra_beta_s_per_byte / 1e9 if fitted.intra_beta_s_per_byte else float('inf'):.2f} GB/s)",
        f"- intra_alpha_s = {fitted.intra_alpha_s * 1e6:.1f} us per local peer (the same)",
        f"- pair_serialization = {fitted.pair_serialization:.3f} (share of a connection's smaller direction that "
        f"waits for the other; 1 = fully serialised, 0 = full duplex)",
        f"- latency_factor = {fitted.latency_factor:g} (not identifiable: no added delay, netem missing)",
        f"- fitted: {', '.join(fitted.fitted)} (the others keep their prior); rms relative error on the fit set "
        f"{fitted.rms_relative_error * 100:.1f}%, max {fitted.max_relative_error * 100:.1f}%, "
        f"{fitted.num_measurements} measurements, {fitted.fit_iterations} linearisation(s)",
        "",
        f"## Predictions (held out): {within}/{len(pred_rows)} within {TOLERANCE:.0%}",
        "",
        *table(pred_rows),
        "",
        "## Fit set (residuals)",
        "",
        *table(fit_rows),
        "",
        "## Uniform all-to-all against the nccl-tests ceiling",
        "",
        "busBw = algBw·(n−1)/n with algBw = bytes per rank / time (nccl-tests). Its ceiling is the payload rate "
        f"of a rank's link (configured rate × {fitted.inter_efficiency:.3f}, the selftests' one-flow efficiency) when "
        "each rank has its own full-duplex link: the 2x1/4x1 rows, where it is exact. The testbed's 2x2 has one "
        "link per node shared by r = 2 ranks, and same-node bytes take loopback: the link carries r·(n−r)/n of "
        "each of its ranks' buffers, so busBw tops out at payload·(n−1)/(r·(n−r)) = 0.75·payload — the "
        "ceiling column. The model reaches the ceiling with full-duplex pairs and no α/overhead (first number of "
        "the last column: 0.97–1.01, the rest being α and the multinomial routing's imbalance: the formula holds in "
        "the model); the measured busBw stays below "
        "it mostly because a gloo pair moves its two directions one after the other (pair_serialization): 0.5 of "
        "the ceiling for 2x1 (one pair), about 2/3 for 4x1, 0.8–0.95 for 2x2 (four pairs per link, whose "
        "directions interleave better); the fitted model's value is the second number.",
        "",
        *busbw_check(raws, measurements, fitted),
        "",
        "## Notes",
        "",
        "- Without `pair_serialization` (the model as it was: every link full duplex) the fit put the efficiency at "
        "0.73 and missed 5 of 9 predictions by 20–32% (2x1 under, zipf over). Probes on 2x1 at 1gbit: one-way 16 MB "
        "140 ms, both ways at once over one gloo group 280 ms, both ways over two groups (two sockets) 143 ms, plain "
        "TCP both ways on one socket 140 ms: gloo's pair serialises its two directions. Where the repeats vary "
        "(e.g. 2x1: min 82 ms, median 140 ms) some repeats do overlap the directions.",
        "- Loopback (1xN) times vary ±30% between runs: 2 cores shared by every rank of the cluster (and whatever "
        "else runs on the machine); the intra class fit is correspondingly loose.",
        "",
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text("\n".join(lines))
    save_fitted(args.out_dir / "fitted.json", fitted)
    print("\n".join(lines))
    if within < len(pred_rows):
        print(f"\n{len(pred_rows) - within} prediction(s) off by more than {TOLERANCE:.0%}", file=sys.stderr)


if __name__ == "__main__":
    main()
