"""moeflux's MoE layer against peer libraries: the same layer shape, the SAME weights and inputs, forward +
backward, agreement of outputs and gradients, and interleaved timing.

    python benchmarks/bench_peers.py                     # full size (4096 tokens per rank), writes benchmarks/results/peers
    python benchmarks/bench_peers.py --quick             # smoke version: 512 tokens, 2 rounds (results/peers_quick)
    python benchmarks/bench_peers.py --parts one --peers hf,deepspeed --rounds 9
    python benchmarks/bench_peers.py --report benchmarks/results/peers   # rebuild table.md / peers.png from peers.json

Layer: 4096 tokens per rank, d_model 512, d_ffn 1024, 16 experts, top-2, SwiGLU, Mixtral routing (softmax
over E, top-2, the two weights divided by their sum), fp32 and a bf16 row. One set of weights (router
[E, d_model], per-expert gate/up/down) is copied into every library's layer (benchmarks/peers/spec.py has
the canonical layout, each adapter its library's); loss = sum(out * G) for a fixed random G.

Settings:
  1.  one process, dropless: moeflux vs transformers' MixtralSparseMoeBlock (experts_implementation "eager"
      and "grouped_mm"), torchtitan's MoE (fp32 experts, and its stock bf16 experts), DeepSpeed-MoE
      dropless; plus the GEMM floor (the expert GEMMs alone over moeflux's segment sizes, with
      torch._grouped_mm and with moeflux.ops.grouped_mm) and moeflux.ops.expert_ffn alone -- fp32, and bf16.
  2.  one process, capacity factor 1.25: moeflux vs DeepSpeed-MoE.
  3.  2 gloo ranks, expert parallelism ep=2, each rank its own 4096 tokens: moeflux vs torchtitan's
      AllToAllTokenDispatcher and DeepSpeed-MoE ep_size=2, dropless and capacity 1.25 (peers/ranks.py).
  E sweep: moeflux alone at E in {8, 64, 256}, 4096 tokens, top-2, d_model 512, d_ffn fixed (expert FLOPs per
      token constant), with its GEMM floors.
Threads: one process uses all cores (2 here: torch.set_num_threads(2)); the 2 ranks use 1 thread each.
Timing: warmup, then interleaved rounds (each round runs every layer of the part once, order rotated), median
and min-max, ratio = peer median / moeflux median of the same setting. Multi-rank: per round the slowest
rank's time. Outputs (--out): peers.json, table.md (also printed), peers.png. The full run takes about 7.5
minutes on the project's 2-core VM (--quick: about 3).

Optional extras (never needed by the tests; torch must stay as installed -- 2.14.1+cu130 here -- so every
package goes in with --no-deps, then its missing pure-Python dependencies one by one, checking
``python -c "import torch; print(torch.__version__)"`` before and after):

    DS_BUILD_OPS=0 pip install --no-deps deepspeed torchtitan       # deepspeed 0.19.8, torchtitan 0.3.0
    pip install --no-deps einops hjson msgpack psutil                # deepspeed's missing deps (ninja, numpy,
                                                                     # packaging, py-cpuinfo, pydantic, tqdm were present)
    pip install --no-deps spmd_types tyro docstring-parser typeguard # what torchtitan.models.common.moe imports
    # transformers 5.x was already installed (pip install -e .[hf])

DeepSpeed runs on CPU with DS_ACCELERATOR=cpu (set here if unset) over gloo. A peer that cannot be imported,
built or run is skipped with a one-line reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import report  # noqa: E402
from peers.floor import ExpertFFNAlone, GemmFloor  # noqa: E402
from peers.spec import LayerSpec, make_inputs, make_weights  # noqa: E402
from peers.suite import Entry, run  # noqa: E402

PEERS = ("hf", "torchtitan", "deepspeed")
PARTS = ("one", "ranks", "sweep")
S1 = "1. one process, dropless, fp32"
S1B = "1b. one process, dropless, bf16"
S2 = "2. one process, capacity {cf}, fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke version: 512 tokens, 2 rounds, 1 warmup, "
                                                        "E sweep with d_ffn 256")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per layer first (default 2; --quick 1)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 4096; --quick 512)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity", type=float, default=1.25, help="capacity factor of settings 2 and 3c")
    p.add_argument("--skew", type=float, default=0.25,
                   help="shared input offset that makes the load uneven (see peers/spec.make_inputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the one-process parts")
    p.add_argument("--world", type=int, default=2, help="ranks (= ep size) of the multi-rank part")
    p.add_argument("--peers", default=",".join(PEERS), help="peers to run (default %(default)s)")
    p.add_argument("--parts", default=",".join(PARTS), help="parts to run (default %(default)s)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows of setting 1")
    p.add_argument("--sweep-experts", default="8,64,256")
    p.add_argument("--sweep-d-ffn", type=int, default=None, help="d_ffn of the E sweep (default --d-ffn; --quick 256)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="only rebuild DIR/table.md and DIR/peers.png from DIR/peers.json (current caveats)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results/peers; --quick: benchmarks/results/peers_quick)")
    args = p.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (2 if quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.tokens = args.tokens if args.tokens is not None else (512 if quick else 4096)
    args.sweep_d_ffn = args.sweep_d_ffn if args.sweep_d_ffn is not None else (256 if quick else args.d_ffn)
    args.out = args.out or HERE / "results" / ("peers_quick" if quick else "peers")
    args.peers = {s for s in args.peers.split(",") if s}
    args.parts = {s for s in args.parts.split(",") if s}
    for name, given, known in (("--peers", args.peers, PEERS), ("--parts", args.parts, PARTS)):
        if given - set(known):
            p.error(f"{name}: unknown {sorted(given - set(known))}; choose from {known}")
    return args


# ---- one process: settings 1, 1b, 2


def one_process_entries(args, spec: LayerSpec, weights) -> list[Entry]:
    from peers.deepspeed_moe import DeepSpeedLayer
    from peers.hf_mixtral import HFMixtralLayer
    from peers.moeflux_layer import MoefluxLayer
    from peers.torchtitan_moe import TorchtitanLayer

    fp32, bf16 = torch.float32, torch.bfloat16
    peers = args.peers

    def floors(tag: str, setting: str, dtype) -> list[Entry]:
        def floor(impl: str):
            def build(built):
                layer = built[f"{tag}/moeflux"]  # the same segment sizes and weights as moeflux's last forward
                return GemmFloor(layer.tokens_per_expert(), spec.d_model, spec.d_ffn, dtype, impl,
                                 w_in=layer.module.experts.w_in, w_out=layer.module.experts.w_out)
            return build

        def ffn(built):
            layer = built[f"{tag}/moeflux"]
            return ExpertFFNAlone(layer.tokens_per_expert(), layer.module.experts.w_in, layer.module.experts.w_out)

        return [Entry(f"{tag}/floor-torch", setting, floor("torch._grouped_mm"), ref=f"{tag}/moeflux"),
                Entry(f"{tag}/floor-moeflux", setting, floor("moeflux.ops.grouped_mm"), ref=f"{tag}/moeflux"),
                Entry(f"{tag}/floor-ffn", setting, ffn, ref=f"{tag}/moeflux")]

    def dropless(tag: str, setting: str, dtype, also_vs: str | None) -> list[Entry]:
        ref = f"{tag}/moeflux"
        out = [Entry(ref, setting, lambda b: MoefluxLayer(spec, weights, dtype), also_vs=also_vs)]
        if "hf" in peers:
            for impl in ("eager", "grouped_mm"):
                out.append(Entry(f"{tag}/hf-{impl}", setting, lambda b, impl=impl: HFMixtralLayer(
                    spec, weights, impl, dtype), ref=ref, also_vs=also_vs,
                    note="Python loop over experts" if impl == "eager" else "sort + torch grouped_mm"))
        if "torchtitan" in peers:
            if dtype == fp32:
                out.append(Entry(f"{tag}/torchtitan-fp32", setting, lambda b: TorchtitanLayer(
                    spec, weights, dtype, stock_bf16_experts=False), ref=ref,
                    note="our subclass without the bf16 casts"))
            note = "experts cast to bf16 as shipped" + (": bf16-level agreement" if dtype == fp32 else "")
            out.append(Entry(f"{tag}/torchtitan-stock", setting, lambda b: TorchtitanLayer(
                spec, weights, dtype, stock_bf16_experts=True, label="torchtitan (stock bf16 experts)"), ref=ref,
                also_vs=also_vs, tol=5e-2, note=note))
        if "deepspeed" in peers:
            out.append(Entry(f"{tag}/deepspeed", setting, lambda b: DeepSpeedLayer(spec, weights, dtype), ref=ref,
                             also_vs=also_vs, note="pads every expert to the busiest one's count"))
        return out + floors(tag, setting, dtype)

    entries = dropless("s1", S1, fp32, None)
    if not args.no_bf16:
        entries += dropless("s1b", S1B, bf16, "s1/moeflux")
    s2 = S2.format(cf=args.capacity)
    entries.append(Entry("s2/moeflux", s2, lambda b: MoefluxLayer(spec, weights, capacity_factor=args.capacity,
                                                                  label=f"moeflux cap {args.capacity}")))
    if "deepspeed" in peers:
        entries.append(Entry("s2/deepspeed", s2, lambda b: DeepSpeedLayer(spec, weights, capacity_factor=args.capacity),
                             ref="s2/moeflux", mask_dropped_of="s2/moeflux",
                             note="renormalises after the cut: out/x compared on tokens that lost no slot; "
                                  "router/expert grads differ by design"))
    return entries


def load_stats(spec: LayerSpec, weights, inputs, capacity_factor: float) -> dict:
    """How uneven the routing of these inputs is (moeflux's own ops): rows of the busiest expert over the mean,
    and the share of slots a capacity drops (drop by position)."""
    import moeflux

    logits = inputs.x @ weights.router.T
    w, ids = moeflux.ops.route(logits, spec.top_k, True)
    counts = torch.bincount(ids.flatten().long(), minlength=spec.experts).float()
    kept = moeflux.ops.apply_capacity(ids, w, spec.experts, spec.capacity(capacity_factor), False)
    return {"max_over_mean": (counts.max() / counts.mean()).item(), "min_over_mean": (counts.min() / counts.mean()).item(),
            "tokens_per_expert": counts.long().tolist(), "dropped_fraction": (kept < 0).float().mean().item(),
            "tokens_losing_a_slot": int((kept < 0).any(-1).sum())}


def _load_stats_or_none(spec: LayerSpec, weights, inputs, capacity_factor: float) -> dict | None:
    try:
        return load_stats(spec, weights, inputs, capacity_factor)
    except Exception as e:  # noqa: BLE001  (moeflux itself unimportable: the rows say so already)
        print(f"load statistics unavailable: {type(e).__name__}: {e}")
        return None


# ---- E sweep


def sweep_entries(args, spec: LayerSpec) -> list[Entry]:
    from peers.moeflux_layer import MoefluxLayer

    entries = []
    for e in (int(v) for v in args.sweep_experts.split(",") if v):
        s = dataclasses.replace(spec, experts=e, d_ffn=args.sweep_d_ffn)
        setting = f"E sweep, E={e}"
        key = f"sweep{e}/moeflux"
        # weights made inside the build (not captured): at E=256 they are 1.6 GB
        entries.append(Entry(key, setting, lambda b, s=s: MoefluxLayer(s, make_weights(s, args.seed),
                                                                       label=f"moeflux E={s.experts}"),
                             snapshot=False))
        for impl, kind in (("torch._grouped_mm", "floor-torch"), ("moeflux.ops.grouped_mm", "floor-moeflux")):
            def build(b, s=s, key=key, impl=impl):
                layer = b[key]
                return GemmFloor(layer.tokens_per_expert(), s.d_model, s.d_ffn, torch.float32, impl,
                                 w_in=layer.module.experts.w_in, w_out=layer.module.experts.w_out)
            entries.append(Entry(f"sweep{e}/{kind}", setting, build, ref=key))
    return entries


def run_sweep(args, spec: LayerSpec, inputs) -> tuple[list[dict], list[dict]]:
    entries = sweep_entries(args, spec)
    rows, skipped = run(entries, inputs, args.rounds, args.warmup)
    built = {e.key: e.built for e in entries}
    for r in rows:
        experts_str, kind = r["key"][len("sweep"):].split("/")
        r.update(experts=int(experts_str), kind=kind, d_ffn=args.sweep_d_ffn)
        layer = built.get(f"sweep{experts_str}/moeflux")
        if layer is not None and kind == "moeflux":
            r["expert_params"] = layer.module.experts.w_in.numel() + layer.module.experts.w_out.numel()
            r["max_rows"] = int(layer.tokens_per_expert().max())
            r["empty_experts"] = int((layer.tokens_per_expert() == 0).sum())
    return rows, skipped


# ---- multi-rank part


def run_ranks(args, spec: LayerSpec) -> tuple[list[dict], list[dict], dict]:
    from gloo_ranks import run_on_ranks
    from peers import ranks

    payload = {"spec": spec.as_dict(), "seed": args.seed, "skew": args.skew, "peers": sorted(args.peers),
               "capacity": args.capacity, "rounds": args.rounds, "warmup": args.warmup}
    try:
        result = run_on_ranks(ranks.measure, args.world, payload)
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [""])[-1][:300]
        return [], [{"setting": ranks.S3, "key": "ranks/*", "reason": f"{type(e).__name__}: {reason}"}], {}
    return result["rows"], result["skipped"], {"threads_per_rank": result["threads_per_rank"],
                                               "world": result["world"]}


# ---- main


def versions() -> dict:
    out = {}
    for dist_name in ("moeflux", "transformers", "torchtitan", "deepspeed"):
        try:
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    return out


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


CAVEATS = [
    "Routing semantics are the same everywhere (softmax over E, top-2, weights renormalised over the 2) except "
    "DeepSpeed with a capacity: it renormalises the kept gates after the cut (a token that lost its 2nd slot gets "
    "weight 1 on its 1st), moeflux/GShard/HF before it; out and input grads are compared on tokens that lost no "
    "slot, router and expert grads differ by design there.",
    "DeepSpeed dropless sets the capacity to the busiest expert's count (over the ep group under expert "
    "parallelism) and computes every expert on that padded buffer: its cost grows with load imbalance (see the "
    "skew). moeflux, HF grouped_mm and torchtitan compute only the routed rows.",
    "torchtitan's GroupedExperts casts input and weights to bf16 as shipped; in the fp32 settings that row times "
    "bf16 expert GEMMs (not comparable with fp32 ones) and agrees only to bf16 precision. The fp32-experts row is our "
    "subclass with the casts removed (torchtitan has no option for it). Its router runs the gate under "
    "torch.autocast(dtype=float32), which CPU autocast does not support (warning, no effect): in bf16 its logits "
    "are bf16.",
    "Router precision in bf16: moeflux and HF compute the logits in bf16 (HF's softmax in fp32), DeepSpeed in fp32; "
    "near-ties can route differently, which shows as 'tokens off'. bf16 logits tie exactly quite often (with the "
    "default inputs 37 of 4096 tokens tie between their 2nd and 3rd logit), and moeflux's route op and torch.topk "
    "break exact ties differently: every token where moeflux bf16 and softmax + torch.topk chose different "
    "experts (16 of 4096) was at such a tie, so the bf16 'tokens off' between moeflux and HF/torchtitan are "
    "tie-breaks, not errors. Combine precision in bf16: moeflux, HF "
    "grouped_mm and DeepSpeed sum the k weighted expert outputs in fp32; HF eager (index_add_ into a bf16 "
    "buffer) and torchtitan (scatter_add into a bf16 buffer) in bf16.",
    "moeflux computes its load-balancing statistic in every forward (aux_loss_weight=0 keeps it out of the loss); "
    "DeepSpeed computes l_aux too; the HF block and torchtitan's MoE compute none.",
    "No library here is compiled (torch.compile) or uses a fused CPU kernel beyond torch's; all run eager on the "
    "same threads.",
    "The loss is out.backward(G) with a dense G: torch._grouped_mm's CPU backward rejects an expanded (stride-0) "
    "output gradient ('Invalid strides/sizes', e.g. loss = y.sum() right after it; torch 2.14.1), which would "
    "break the GEMM floor under a sum loss (the layers here all put other ops after their grouped GEMMs); "
    "moeflux's grouped_mm / expert_ffn accept it.",
    "Timing noise: the 2 cores were shared with other work during the runs (see the load average); interleaving "
    "spreads it over all layers, and min–max shows it. Ratios within about +-10% are not a difference.",
]


def main() -> None:
    args = parse_args()
    if args.report is not None:
        import json

        result = json.loads((args.report / "peers.json").read_text())
        result["caveats"] = CAVEATS
        print(report.write(result, args.report))
        return
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    spec = LayerSpec(args.tokens, args.d_model, args.d_ffn, args.experts, args.top_k)
    weights = make_weights(spec, args.seed)
    inputs = make_inputs(spec, 0, args.skew, args.seed + 1000)
    print(f"bench_peers: {spec}, skew {args.skew}, {args.rounds} rounds, {args.warmup} warmup, "
          f"{args.threads} threads (one process), peers {sorted(args.peers)}, parts {sorted(args.parts)}", flush=True)
    rows, skipped, sweep, rank_meta = [], [], [], {}
    if "one" in args.parts:
        print("== one process (settings 1, 1b, 2)", flush=True)
        r, s = run(one_process_entries(args, spec, weights), inputs, args.rounds, args.warmup)
        rows += r
        skipped += s
        import torch.distributed as dist

        if dist.is_initialized():  # DeepSpeed's 1-rank world
            dist.destroy_process_group()
    if "sweep" in args.parts:
        print("== E sweep (moeflux alone)", flush=True)
        sweep, s = run_sweep(args, spec, inputs)
        skipped += s
    if "ranks" in args.parts:
        print(f"== {args.world} ranks, ep={args.world} (setting 3)", flush=True)
        r, s, rank_meta = run_ranks(args, spec)
        rows += r
        skipped += s

    command = "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:])
    result = {
        "meta": {"command": command.strip(), "wall_s": time.perf_counter() - start, "machine": machine(),
                 "torch": torch.__version__, "versions": versions(), "spec": spec.as_dict(), "skew": args.skew,
                 "seed": args.seed, "rounds": args.rounds, "warmup": args.warmup, "capacity_factor": args.capacity,
                 "threads": f"{args.threads} in the one-process parts, "
                            f"{rank_meta.get('threads_per_rank', 1)} per rank x {args.world} ranks",
                 "load": _load_stats_or_none(spec, weights, inputs, args.capacity), "quick": args.quick,
                 "loadavg": [load_start, os.getloadavg()[0]]},
        "rows": rows, "skipped": skipped, "sweep": sweep,
        "sweep_meta": {"tokens": spec.tokens, "top_k": spec.top_k, "d_model": spec.d_model, "d_ffn": args.sweep_d_ffn},
        "caveats": CAVEATS,
    }
    result["meta"]["wall_s"] = time.perf_counter() - start
    text = report.write(result, args.out)
    print()
    print(text)
    print(f"wrote {args.out}/peers.json, table.md, peers.png ({result['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
