"""Bytes of the Python standard library's sources, split into training and held-out files."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch


class DataError(ValueError):
    """A problem with the data folder, reported as a one-line error."""


def source_files(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"--data {root}: no such folder")
    if not root.is_dir():
        raise DataError(f"--data {root}: not a folder (a folder of .py files is expected)")
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise DataError(f"--data {root}: holds no .py files")
    return files


def load_corpus(root: Path, held_out_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Training bytes and held-out bytes; a file goes to one side by a hash of its path (deterministic)."""
    train, test = bytearray(), bytearray()
    for path in source_files(root):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        bucket = zlib.crc32(str(path.relative_to(root)).encode()) % 1000
        (test if bucket < held_out_fraction * 1000 else train).extend(data)
    if len(train) < 2 or len(test) < 2:
        raise DataError(f"--data {root}: too little text to hold out {held_out_fraction:.0%} of the files")
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).to(torch.long)  # noqa: E731
    return as_tensor(train), as_tensor(test)


def batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len + 1 bytes, drawn from a generator seeded with `seed` (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    window = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def held_out_windows(data: torch.Tensor, seq_len: int, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows covering the first max_bytes held-out bytes."""
    data = data[: max_bytes + 1]
    usable = (data.numel() - 1) // seq_len * seq_len
    return data[:usable].view(-1, seq_len), data[1:usable + 1].view(-1, seq_len)


def unigram_bits_per_byte(train: torch.Tensor, test: torch.Tensor) -> float:
    """Bits per byte of `test` under the byte frequencies of `train` (add-one smoothing)."""
    counts = torch.bincount(train, minlength=256).double() + 1
    return float(-(counts / counts.sum()).log2()[test].mean())


def to_bits(nats: float) -> float:
    return nats / math.log(2)
