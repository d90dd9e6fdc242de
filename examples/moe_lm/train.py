"""Train a byte-level Mixture-of-Experts language model on the Python standard
library's own source files, expert-parallel, with moeflux.MoE in every block
and moeflux.DataParallel synchronising the gradients.

    python examples/train_moe_lm.py                  # 2 ranks on this machine (gloo), a few minutes on 2 cores
    python examples/train_moe_lm.py --nproc 4 --experts 16 --steps 600
    torchrun --nproc-per-node 8 examples/train_moe_lm.py   # one rank per GPU (NCCL), or CPU ranks with gloo
    python examples/train_moe_lm.py --resume runs/moe-lm/checkpoint.pt --steps 800   # continue, on any number of ranks
    python examples/train_moe_lm.py --out runs/moe-lm --overwrite   # start again in a folder that holds a run
    python examples/train_moe_lm.py --shadowing auto --replace-every 50   # balance the load (FasterMoE, SmartMoE)

It shows a progress bar with the loss and tokens/s, evaluates bits per byte on
held-out files (never trained on) next to the unigram baseline, and writes a
run folder: metrics.json, loss.png, expert_load.png and checkpoint.pt, also at
every checkpoint and when Ctrl-C stops it. A resumed run goes on in its
checkpoint's folder and carries the run's metrics forward. A folder that holds
another run is never written over without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moeflux

from . import checkpoint, data, plots
from .interrupts import StopOnSignal, die_with_parent, exit_code
from .launch import RankFailed, spawn_ranks
from .model import ByteLM, ModelConfig
from .routing_trace import RoutingRecorder


DEFAULT_OUT = Path("runs/moe-lm")
DEFAULT_STEPS = 700
RUN_FILES = ("metrics.json", "checkpoint.pt")  # a folder holding either holds a run
# Kept from the checkpoint by a resumed run: the record of the whole run (the rest describes this session).
CARRIED_METRICS = ("steps", "train_bits_per_byte", "tokens_per_second", "load_steps", "expert_load", "eval",
                   "replacements", "shadowed_experts", "resumed_at", "train_seconds")


class UsageError(ValueError):
    """A bad option, reported as one line."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python examples/train_moe_lm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="folder of .py files to train on (default: this Python's standard library); "
                        "5%% of the files are held out for evaluation")
    g.add_argument("--seq-len", type=int, default=128, help="bytes per training sequence (default 128)")
    g.add_argument("--batch", type=int, default=16, help="sequences per rank per step (default 16)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=2, help="transformer blocks, each with an MoE MLP (default 2)")
    g.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    g.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--d-ffn", type=int, default=256, help="hidden width of each expert (default 256)")
    g.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    g.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    g.add_argument("--capacity-factor", type=float, default=None,
                   help="cap every expert at factor * tokens * top_k / experts tokens (default: dropless)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--nproc", type=int, default=None,
                   help="ranks to start on this machine when not under torchrun (default: one per GPU, else 2)")
    g.add_argument("--schedule", choices=("bulk", "chunked", "pairwise"), default="bulk",
                   help="how tokens cross ranks: bulk all-to-alls, or pipelined with the experts (default bulk)")
    g.add_argument("--chunks", type=int, default=2, help="stages of --schedule chunked (default 2)")
    g.add_argument("--pairwise-group-size", type=int, default=1,
                   help="ranks per group of --schedule pairwise (default 1)")
    g.add_argument("--shadowing", default="off",
                   help="FasterMoE's shadowing of hot experts: off, auto (a cost model with rough rates for the "
                        "device), or N (the same, at most N experts per layer and step); with any --schedule "
                        "(default off)")
    g.add_argument("--replace-every", type=int, default=0,
                   help="SmartMoE's expert re-placement: every N steps, move experts between ranks by the load of "
                        "the last N steps (0: off, the default); training is unchanged, only where experts live")
    g.add_argument("--ep-size", type=int, default=None,
                   help="expert-parallel size: experts are split over this many ranks, the rest are replicas "
                        "(default: all ranks); must divide the number of ranks and --experts")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None,
                   help=f"total optimizer steps (default {DEFAULT_STEPS}, or with --resume the resumed run's total)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    g.add_argument("--aux-loss-weight", type=float, default=1e-2, help="load-balancing loss weight (default 0.01)")
    g.add_argument("--eval-bytes", type=int, default=100_000, help="held-out bytes to evaluate on (default 100000)")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default 0)")
    g.add_argument("--out", type=Path, default=None,
                   help=f"run folder (default: with --resume the checkpoint's folder, else {DEFAULT_OUT})")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (its metrics.json, plots and checkpoint.pt); without it such "
                        "a folder is refused, unless it is the folder of the --resume checkpoint (that run goes on)")
    g.add_argument("--resume", type=Path, default=None,
                   help="checkpoint.pt to continue from (the run goes on in its folder unless --out names another)")
    g.add_argument("--record-routing", type=Path, default=None,
                   help="write the routing (tokens of each rank to each expert, per layer and step) to this .npz, "
                        "in the layout of the traces moeflux.sim reads")
    g.add_argument("--record-every", type=int, default=1, help="steps between recorded steps (default 1)")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step as a signal would (save the run folder, say how to resume): a "
                        "time-boxed allocation; --resume then goes on to --steps as if never stopped")
    g.add_argument("--compile", action="store_true",
                   help="compile the model with torch.compile (the whole forward as one graph with --schedule bulk "
                        "and no --shadowing; the pipelined and shadowed exchanges run eagerly inside it)")
    args = p.parse_args(argv)
    if args.out is None:  # a resumed run goes on where it was, not in the default folder
        args.out = args.resume.parent if args.resume is not None else DEFAULT_OUT
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(args.layers, args.d_model, args.heads, args.d_ffn, args.experts, args.top_k,
                       args.capacity_factor, args.seq_len)


def shadowing_option(value: str | int) -> str | int:
    """--shadowing as moeflux.MoE takes it: "off", "auto" or an int >= 0; raises UsageError."""
    if isinstance(value, int) or value in ("off", "auto"):
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise UsageError(f"--shadowing must be off, auto or an int >= 0, got {value!r}")
    return number


def expert_parallel_size(args: argparse.Namespace, world: int) -> int:
    """--ep-size as given (0 included, for validate to reject), every rank when not given."""
    return args.ep_size if args.ep_size is not None else world


def validate(args: argparse.Namespace, world: int, train_bytes: int) -> None:
    """Everything that can be checked before any rank starts but the run folder (check_run_folder); raises
    UsageError. Normalises --shadowing and sets --steps when not given."""
    resumed = resume_header(args)
    positive = {"--steps": args.steps, "--batch": args.batch, "--layers": args.layers, "--d-model": args.d_model,
                "--heads": args.heads, "--d-ffn": args.d_ffn, "--experts": args.experts, "--eval-bytes": args.eval_bytes,
                "--checkpoint-every": args.checkpoint_every, "--record-every": args.record_every,
                "--stop-after": 1 if args.stop_after is None else args.stop_after}
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.seq_len + 1 >= train_bytes:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the training data ({train_bytes} bytes)")
    if args.d_model % args.heads:
        raise UsageError(f"--heads {args.heads} must divide --d-model {args.d_model}")
    if not 1 <= args.top_k <= args.experts:
        raise UsageError(f"--top-k must be in [1, --experts={args.experts}], got {args.top_k}")
    if args.capacity_factor is not None and not (args.capacity_factor > 0 and math.isfinite(args.capacity_factor)):
        raise UsageError(f"--capacity-factor must be a finite number > 0, got {args.capacity_factor}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if not (args.aux_loss_weight >= 0 and math.isfinite(args.aux_loss_weight)):
        raise UsageError(f"--aux-loss-weight must be a finite number >= 0, got {args.aux_loss_weight}")
    if args.eval_bytes < args.seq_len + 1:
        raise UsageError(f"--eval-bytes must hold at least one sequence (--seq-len + 1 = {args.seq_len + 1} "
                         f"bytes), got {args.eval_bytes}")
    args.shadowing = shadowing_option(args.shadowing)
    if args.replace_every < 0:
        raise UsageError(f"--replace-every must be >= 0 (0: off), got {args.replace_every}")
    ep = expert_parallel_size(args, world)
    # Without --ep-size the experts are split over every rank: say so rather than name an option not given.
    named = f"--ep-size {ep}" if args.ep_size is not None else f"the expert-parallel size ({ep}: every rank)"
    if ep < 1 or world % ep:
        raise UsageError(f"{named} must divide the number of ranks ({world})")
    if args.experts % ep:
        raise UsageError(f"{named} must divide --experts {args.experts}")
    if resumed is not None:
        saved_config, saved_step = resumed
        checkpoint.check_config(args.resume, saved_config, asdict(model_config(args)))
        if args.steps <= saved_step:
            raise UsageError(f"--resume {args.resume} is at step {saved_step}: --steps {args.steps} leaves nothing "
                             f"to train (--steps is the total, so pass more than {saved_step})")
    if args.record_routing is not None:  # last, as it creates the folder
        check_writable_folder(args.record_routing.parent, "--record-routing")


def resume_header(args: argparse.Namespace) -> tuple[dict, int] | None:
    """The --resume checkpoint's (model config, step), None without --resume. --steps not given is the resumed
    run's total, so that following the stop message (`--resume path` alone) finishes the run as planned."""
    if args.resume is None:
        args.steps = DEFAULT_STEPS if args.steps is None else args.steps
        return None
    if not args.resume.is_file():
        raise UsageError(f"--resume {args.resume}: no such file")
    config, step, total_steps = checkpoint.read_header(args.resume)
    if args.steps is None:
        args.steps = total_steps if total_steps is not None else DEFAULT_STEPS
    return config, step


def check_run_folder(args: argparse.Namespace) -> None:
    """Refuses --out when it holds a run this one would write over (unless --overwrite, or it is the resumed
    checkpoint's own run, which goes on), then creates it; raises UsageError. Checked where the folder is
    written: by the launcher (its ranks run on its machine), or on rank 0 under torchrun (on_rank_zero)."""
    own = args.out / "checkpoint.pt"
    goes_on = args.resume is not None and own.is_file() and os.path.samefile(own, args.resume)
    held = [name for name in RUN_FILES if (args.out / name).exists()]
    if held and not (goes_on or args.overwrite):
        raise UsageError(f"{args.out}/ already holds a run ({', '.join(held)}): pass --overwrite to replace it, "
                         f"or --out another folder")
    # Before any rank starts: a run that cannot save must not train first and fail at the end.
    check_writable_folder(args.out, "--out")


def check_writable_folder(folder: Path, option: str) -> None:
    """Creates `folder` and writes a file in it; raises UsageError saying why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {folder}: cannot write there ({e.strerror or e})") from None


# ---- one rank


def clip_grad_norm(model: ByteLM, max_norm: float, ep_group: dist.ProcessGroup) -> float:
    """Clip by the norm of all gradients of the model, experts of every rank of the group included.
    The squares are summed on the gradients' device: one host synchronisation per step."""
    expert_params = {id(ep.param) for ep in moeflux.expert_parameters(model)}
    grads = [(id(p) in expert_params, p.grad.detach()) for p in model.parameters() if p.grad is not None]
    device = grads[0][1].device
    dense, experts = torch.zeros((), device=device), torch.zeros((), device=device)
    for is_expert, grad in grads:
        if is_expert:
            experts += grad.float().square().sum()
        else:
            dense += grad.float().square().sum()
    dist.all_reduce(experts, group=ep_group)
    norm = float((dense + experts).sqrt())
    if norm > max_norm:
        for _, grad in grads:
            grad.mul_(max_norm / (norm + 1e-6))
    return norm


def global_expert_load(model: ByteLM, groups: moeflux.ExpertParallelGroups) -> list[list[float]]:
    """Share of all routed tokens that each expert of each layer got in the last step, over every rank.
    From each rank's routed slots per global expert: right whatever the placement (re-placement may have
    moved experts since that forward) and whether or not an expert was shadowed (its tokens then never
    reach its owner)."""
    loads = []
    for layer in model.moe_layers():
        full = layer.routed_tokens_per_expert.float()  # a copy, on the device (NCCL reduces device tensors)
        dist.all_reduce(full)
        full = full.cpu()
        loads.append((full / full.sum().clamp(min=1)).tolist())
    return loads


@torch.no_grad()
def held_out_bits_per_byte(model, test: torch.Tensor, args, device) -> float:
    """Every rank evaluates its share of the windows; every rank runs the same number of
    forwards (their all-to-alls must match), padding with masked windows."""
    model.eval()
    x, y = data.held_out_windows(test, args.seq_len, args.eval_bytes)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = math.ceil(x.shape[0] / world)
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    valid = mine < x.shape[0]
    mine = torch.where(valid, mine, 0)
    total = torch.zeros(2, dtype=torch.float64)  # summed nats, bytes
    for i in range(0, per_rank, args.batch):
        idx, ok = mine[i:i + args.batch], valid[i:i + args.batch]
        logits = model(x[idx].to(device))
        nats = F.cross_entropy(logits.flatten(0, 1), y[idx].to(device).flatten(), reduction="none").view(len(idx), -1)
        total[0] += float(nats[ok.to(device)].sum())
        total[1] += float(ok.sum()) * args.seq_len
    dist.all_reduce(total)
    model.train()
    return data.to_bits(float(total[0] / total[1]))


def train(args: argparse.Namespace, corpus: tuple[torch.Tensor, torch.Tensor], stop: StopOnSignal) -> int:
    """One rank's run; returns 0, or 128 + the signal when SIGINT/SIGTERM stopped it (after a checkpoint)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    train_data, test = corpus
    groups = moeflux.init_expert_parallel(expert_parallel_size(args, world))
    config = model_config(args)
    torch.manual_seed(args.seed)
    exchange = moeflux.ExchangeConfig(schedule=args.schedule, chunks=args.chunks, group_size=args.pairwise_group_size,
                                      shadowing=args.shadowing)  # normalised by validate
    model = moeflux.DataParallel(ByteLM(config, groups, exchange).to(device))
    lm: ByteLM = model.module
    if args.compile:  # in place: parameter names, hooks and checkpoints are the eager model's
        lm.compile(fullgraph=args.schedule == "bulk" and args.shadowing == "off" and not args.record_routing
                   and not args.replace_every)
    for moe in lm.moe_layers():
        moe.aux_loss_weight = args.aux_loss_weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    metrics = {"config": asdict(config), "world_size": world, "ep_size": groups.ep_size,
               "shadowing": exchange.shadowing, "replace_every": args.replace_every, "total_steps": args.steps,
               "steps": [], "train_bits_per_byte": [], "tokens_per_second": [], "load_steps": [], "expert_load": [],
               "eval": [], "replacements": [], "shadowed_experts": [], "resumed_at": [], "train_seconds": 0.0}
    # SmartMoE: moves experts (weights, AdamW state) between the ranks of each expert-parallel group as the
    # load shifts; every rank, replicas included, makes the same choice from the load summed over the world.
    replacement = moeflux.ExpertReplacement(lm, optimizer, every=args.replace_every) if args.replace_every else None
    start_step = 0
    if args.resume is not None:
        start_step, saved = checkpoint.load(args.resume, lm, optimizer, schedule)  # and the saved placements
        for key in CARRIED_METRICS:  # the whole run's record, not this session's only
            metrics[key] = saved.get(key, metrics[key])
        metrics["resumed_at"] = [*metrics["resumed_at"], start_step]
        if replacement is not None:
            replacement.steps = start_step  # re-place at the same steps as a run that was not interrupted
    earlier_seconds = metrics["train_seconds"]
    if rank == 0:
        metrics["unigram_bits_per_byte"] = data.unigram_bits_per_byte(train_data, test[: args.eval_bytes])
        if args.resume is not None:
            print(f"resumed from step {start_step} of {args.resume}: training to step {args.steps} in {args.out}/",
                  flush=True)

    recorder = RoutingRecorder(lm.moe_layers()) if args.record_routing is not None else None
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)
    tokens_per_step = args.batch * args.seq_len * world
    log_every = max(1, min(20, args.steps // 20))
    started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
    for step in range(start_step + 1, args.steps + 1):
        x, y = data.batch(train_data, args.batch, args.seq_len, seed=args.seed * 1_000_003 + step * 1009 + rank)
        x, y = x.to(device), y.to(device)
        record = recorder is not None and step % args.record_every == 0
        if record:
            recorder.start_step()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if record:
            recorder.end_step(step)
        (loss + moeflux.aux_loss(lm)).backward()
        clip_grad_norm(lm, 1.0, groups.ep_group)
        optimizer.step()
        if replacement is not None and (made := replacement.step()):
            if rank == 0:
                metrics["replacements"].extend(
                    {"step": step, "layer": r.layer, "moved": r.moved, "imbalance_before": r.imbalance_before,
                     "imbalance_after": r.imbalance_after, "expert_at": list(r.new.expert_at)} for r in made)
                bar.write(f"step {step}: re-placed experts of {', '.join(r.layer for r in made)}: "
                          f"{sum(r.moved for r in made)} moved, busiest rank at "
                          f"{max(r.imbalance_before for r in made):.2f} -> {max(r.imbalance_after for r in made):.2f}"
                          f" x the mean load")
        optimizer.zero_grad(set_to_none=False)
        schedule.step()
        window_steps += 1
        signum = stop.agreed(device) if step != args.steps else 0  # the last step's save is the final one
        stopping = bool(signum) or (step == args.stop_after and step != args.steps)
        if step % log_every == 0 or step == args.steps or stopping:  # a stopped run's record ends at its last step
            mean_loss = loss.detach().float().cpu()
            dist.all_reduce(mean_loss)
            bits = data.to_bits(float(mean_loss) / world)
            speed = window_steps * tokens_per_step / (time.perf_counter() - window_start)
            load = global_expert_load(lm, groups)
            if rank == 0:
                metrics["steps"].append(step)
                metrics["train_bits_per_byte"].append(bits)
                metrics["tokens_per_second"].append(speed)
                metrics["load_steps"].append(step)
                metrics["expert_load"].append(load)
                if exchange.shadowed:  # what the last forward shadowed (the same on every rank)
                    metrics["shadowed_experts"].append(
                        {"step": step, "experts": [list(layer.exchange.shadowed_experts)
                                                   for layer in lm.moe_layers()]})
                bar.set_postfix_str(f"loss {bits:.3f} bits/byte, {speed:,.0f} tokens/s")
            window_start, window_steps = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if stopping or (step % args.checkpoint_every == 0 and step != args.steps):  # one save, whichever asks
            metrics["train_seconds"] = earlier_seconds + time.perf_counter() - started
            files = save_run(args.out, lm, optimizer, schedule, step, metrics)
        if stopping:
            if bar is not None:
                bar.close()
                why = f"by {signal.Signals(signum).name}" if signum else "(--stop-after)"
                print(f"stopped {why} after step {step} of {args.steps}: saved "
                      f"{folder_summary(args.out, files)}; continue with --resume {args.out / 'checkpoint.pt'}",
                      file=sys.stderr)
            return exit_code(signum) if signum else 0
    if bar is not None:
        bar.close()
    session_seconds = time.perf_counter() - started

    if recorder is not None and (written := recorder.save(args.record_routing)) is not None:
        print(f"routing of {len(recorder.steps)} steps written to {written}")
    bpb = held_out_bits_per_byte(model, test, args, device)
    if rank == 0:
        metrics["eval"].append({"step": args.steps, "bits_per_byte": bpb})
        metrics["train_seconds"] = earlier_seconds + session_seconds
        metrics["mean_tokens_per_second"] = (args.steps - start_step) * tokens_per_step / max(session_seconds, 1e-9)
    files = save_run(args.out, lm, optimizer, schedule, args.steps, metrics)
    if rank == 0:
        since = f", {session_seconds:.0f} s of it since the resume at step {start_step}" if start_step else ""
        print(f"held-out: {bpb:.3f} bits/byte (unigram baseline {metrics['unigram_bits_per_byte']:.3f}) after "
              f"{args.steps} steps; {metrics['mean_tokens_per_second']:,.0f} tokens/s over {world} ranks (ep size "
              f"{groups.ep_size}); training {metrics['train_seconds']:.0f} s{since}")
        print(f"run folder: {folder_summary(args.out, files)}")
    return 0


def save_run(out: Path, lm: ByteLM, optimizer, schedule, step: int, metrics: dict) -> list[str]:
    """Collective: saves the checkpoint and, on rank 0, metrics.json and the plots of the run so far, so that
    the folder always shows the run up to its checkpoint. Returns the names written (none on other ranks)."""
    checkpoint.save(out / "checkpoint.pt", lm, optimizer, schedule, step, metrics["config"], metrics)
    if dist.get_rank() != 0:
        return []
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return ["metrics.json", *plots.write_plots(metrics, out), "checkpoint.pt"]


def folder_summary(out: Path, written: list[str]) -> str:
    return f"{out}/ ({', '.join(written)})"


# ---- launching


def _use_gpus() -> bool:
    return torch.cuda.is_available() and moeflux.cuda_kernels_built()


def _rank_main(rank: int, world: int, init_method: str, args: argparse.Namespace, corpus) -> None:
    stop = StopOnSignal()  # first: a Ctrl-C from now on stops the run cleanly
    die_with_parent()
    backend = "nccl" if _use_gpus() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    try:
        code = train(args, corpus, stop)
    finally:
        dist.destroy_process_group()
    sys.exit(code)


def on_rank_zero(check: Callable[[], None]) -> None:
    """Collective: runs `check` on rank 0 only and raises its UsageError on every rank. For what only rank 0
    writes (the run folder): the ranks may not share its filesystem, and a rank that stopped alone would leave
    the others waiting for it."""
    refusal = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except UsageError as e:
            refusal[0] = str(e)
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise UsageError(refusal[0])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    default_world = torch.cuda.device_count() if _use_gpus() else 2
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else (
        args.nproc if args.nproc is not None else default_world)
    try:
        if world < 1:
            raise UsageError(f"--nproc must be >= 1, got {world}")
        corpus = data.load_corpus(args.data)
        validate(args, world, corpus[0].numel())
        if not under_torchrun:  # under torchrun, rank 0 checks once every rank has joined: see on_rank_zero
            check_run_folder(args)
    except (UsageError, data.DataError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None

    if under_torchrun:
        if _use_gpus():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        stop = StopOnSignal()  # torchrun passes SIGINT/SIGTERM on to its workers
        dist.init_process_group("nccl" if _use_gpus() else "gloo", timeout=timedelta(minutes=10))
        try:
            on_rank_zero(lambda: check_run_folder(args))
            code = train(args, corpus, stop)
        except UsageError as e:
            code = f"error: {e}"
        finally:
            dist.destroy_process_group()
        if code:
            raise SystemExit(code)
        return
    print(f"moeflux {moeflux.__version__}: {world} ranks ({'NCCL' if _use_gpus() else 'gloo, CPU'}), "
          f"{corpus[0].numel() / 1e6:.1f} MB of training text, {corpus[1].numel() / 1e6:.1f} MB held out")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            code = spawn_ranks(_rank_main, world, (world, f"file://{tmp}/store", args, corpus))
        except RankFailed as e:
            raise SystemExit(f"error: {e}") from None
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
