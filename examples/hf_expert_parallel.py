"""Fine-tune a Hugging Face MoE model expert-parallel with moeflux, then save it
back in its original transformers format.

    python examples/hf_expert_parallel.py                # 2 gloo ranks, a small random Qwen3-MoE
    python examples/hf_expert_parallel.py --family mixtral --steps 50

1. build a small, randomly initialised transformers model (no download);
2. convert its sparse MoE blocks with moeflux.hf.convert_model, splitting the
   experts over the ranks (expert parallelism), wrap it in moeflux.DataParallel;
3. train a few steps on bytes of the Python standard library;
4. convert back with moeflux.hf.revert_model, save_pretrained, reload with
   from_pretrained, and check that the reloaded model's logits match the
   trained moeflux model's.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import moeflux
import moeflux.hf

from moe_lm import data  # examples/moe_lm/, next to this script: the main job's byte data

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=64,
                                                     num_key_value_heads=2, head_dim=16, num_experts=8,
                                                     num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=64, num_key_value_heads=2,
                                                  num_local_experts=8, num_experts_per_tok=2),
}


def rank_main(rank: int, world: int, store: str, args: argparse.Namespace, text: torch.Tensor) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same random model on every rank
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[args.family]())
    groups = moeflux.init_expert_parallel(world)
    report = moeflux.hf.convert_model(model, ep_group=groups,
                                      aux_loss_weight=model.config.router_aux_loss_coef)
    if rank == 0:
        moe = model.get_submodule(report[0][0])
        print(f"converted {len(report)} {report[0][1]} blocks ({', '.join(name for name, _ in report)}); "
              f"{moe.num_experts} experts each, {moe.experts.num_experts} per rank on {world} ranks")
    ddp = moeflux.DataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    for step in range(1, args.steps + 1):
        x, y = data.batch(text, 8, 64, seed=step * 100 + rank)
        loss = torch.nn.functional.cross_entropy(ddp(x).logits.flatten(0, 1), y.flatten())
        (loss + moeflux.aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % max(1, args.steps // 5) == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.3f}")

    probe, _ = data.batch(text, 2, 32, seed=12345)  # the same batch on every rank
    model.eval()
    with torch.no_grad():
        trained_logits = model(probe).logits
    moeflux.hf.revert_model(model)  # collective: gathers every rank's experts
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
            with torch.no_grad():
                diff = (reloaded(probe).logits - trained_logits).abs().max().item()
        print(f"saved with save_pretrained and reloaded: max |logits difference| = {diff:.2e} "
              f"({'match' if diff < 1e-4 else 'MISMATCH'})")
        if diff >= 1e-4:
            raise SystemExit(1)
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(CONFIGS), default="qwen3_moe")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", type=Path, default=Path(sysconfig.get_paths()["stdlib"]) / "json")
    args = parser.parse_args(argv)
    text, _ = data.load_corpus(args.data, held_out_fraction=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_main, args=(args.nproc, os.path.join(tmp, "store"), args, text), nprocs=args.nproc,
                           start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1:])
