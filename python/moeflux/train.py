"""Train a small byte-level Mixture-of-Experts language model on the Python
standard library's own source files, with moeflux.MoE as every block's MLP.

    python -m moeflux.train --steps 300

Prints the loss and throughput while training, then the held-out bits per byte
(on files it never trained on) next to the unigram baseline of the same bytes.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import moeflux


def stdlib_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if not files:
        raise SystemExit(f"error: no .py files under {root}; pass --data DIR with some text files")
    return files


def load_corpus(root: Path, held_out_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the training files and of the held-out files, split by a hash of the path."""
    train, test = bytearray(), bytearray()
    for path in stdlib_files(root):
        data = path.read_bytes()
        bucket = zlib.crc32(str(path.relative_to(root)).encode()) % 1000
        (test if bucket < held_out_fraction * 1000 else train).extend(data)
    if not train or not test:
        raise SystemExit(f"error: {root} holds too little text to split into train and held-out sets")
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(test)


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, moe: moeflux.MoE) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.mlp = moe

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        d = args.d_model
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(args.seq_len, d))
        self.blocks = nn.ModuleList(
            Block(d, args.heads, moeflux.MoE(d, args.d_ffn, args.experts, args.top_k, args.capacity_factor))
            for _ in range(args.layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq = idx.shape[1]
        mask = torch.triu(torch.full((seq, seq), float("-inf"), device=idx.device), diagonal=1)
        x = self.embed(idx) + self.pos[:seq]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def bits_per_byte(model: ByteLM, data: torch.Tensor, seq_len: int, max_bytes: int) -> float:
    model.eval()
    data = data[: max_bytes + 1]
    usable = (data.numel() - 1) // seq_len * seq_len
    x = data[:usable].view(-1, seq_len)
    y = data[1:usable + 1].view(-1, seq_len)
    total = 0.0
    for i in range(0, x.shape[0], 32):
        logits = model(x[i:i + 32])
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + 32].flatten(), reduction="sum").item()
    model.train()
    return total / usable / math.log(2)


def unigram_bits_per_byte(train: torch.Tensor, test: torch.Tensor) -> float:
    counts = torch.bincount(train, minlength=256).double() + 1  # add-one smoothing
    log_p = torch.log2(counts / counts.sum())
    return float(-log_p[test].mean())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="folder of text (*.py) files (default: this Python's standard library)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ffn", type=int, default=256, help="hidden width of each expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--capacity-factor", type=float, default=None, help="expert capacity factor (default: dropless)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-bytes", type=int, default=200_000, help="held-out bytes to evaluate on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        p.error("--steps and --batch must be >= 1 and --seq-len >= 2")
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k must be in [1, --experts={args.experts}], got {args.top_k}")
    if not args.data.is_dir():
        p.error(f"--data {args.data} is not a folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, test = load_corpus(args.data, held_out_fraction=0.05)
    if train.numel() <= args.seq_len + 1:
        raise SystemExit(f"error: --seq-len {args.seq_len} is longer than the training data ({train.numel()} bytes)")
    print(f"data: {train.numel() / 1e6:.1f} MB train, {test.numel() / 1e6:.1f} MB held out, from {args.data}")
    model = ByteLM(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.experts} experts top-{args.top_k}, "
          f"{params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    data = batches(train, args.batch, args.seq_len, torch.Generator().manual_seed(args.seed))

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = next(data)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        (loss + moeflux.aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            load = torch.stack([b.mlp.tokens_per_expert.float() for b in model.blocks]).mean(0)
            print(f"step {step:5d}  loss {loss.item():.3f} ({loss.item() / math.log(2):.2f} bits/byte)  "
                  f"{step * args.batch * args.seq_len / elapsed:7.0f} tokens/s  "
                  f"expert load max/mean {load.max() / load.mean():.2f}", flush=True)

    bpb = bits_per_byte(model, test, args.seq_len, args.eval_bytes)
    baseline = unigram_bits_per_byte(train, test[: args.eval_bytes])
    print(f"held-out: {bpb:.3f} bits/byte (unigram baseline {baseline:.3f}) after {args.steps} steps in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
