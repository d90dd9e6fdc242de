"""The run folder's pictures: the loss curve, and each layer's expert load over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PLOTS = ("loss.png", "expert_load.png")


def write_plots(metrics: dict, folder: Path) -> list[str]:
    """Writes PLOTS of the run so far; returns the names written (none before its first logged step, and
    then stale ones, of a run this one overwrites, are removed: the folder shows one run only)."""
    figures = {"loss.png": loss_figure, "expert_load.png": expert_load_figure}
    for name in PLOTS:
        if metrics["steps"]:
            _save(figures[name](metrics), folder / name)
        else:
            (folder / name).unlink(missing_ok=True)
    return list(PLOTS) if metrics["steps"] else []


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_figure(metrics: dict) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.plot(metrics["steps"], metrics["train_bits_per_byte"], label="training loss")
    for point in metrics.get("eval", []):
        ax.scatter([point["step"]], [point["bits_per_byte"]], color="C1", zorder=3,
                   label="held-out" if point is metrics["eval"][0] else None)
    if "unigram_bits_per_byte" in metrics:
        ax.axhline(metrics["unigram_bits_per_byte"], color="gray", linestyle="--", label="unigram baseline")
    for i, step in enumerate(metrics.get("resumed_at", [])):
        ax.axvline(step, color="gray", linestyle=":", label="resumed" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("byte-level MoE LM on the Python standard library")
    ax.legend()
    return fig


def expert_load_figure(metrics: dict) -> Figure:
    """One heat map per MoE layer: the share of routed tokens each expert got, step by step. One colour
    scale for every layer, white at the uniform share 1 / experts (marked on it): red experts got more than
    their share, blue ones less."""
    loads = np.asarray(metrics["expert_load"], dtype=float)  # [record, layer, expert], fractions
    _, layers, experts = loads.shape
    uniform = 1 / experts
    norm = TwoSlopeNorm(vmin=0, vcenter=uniform, vmax=max(loads.max(), 2 * uniform))  # vmax > vcenter always
    fig, axes = plt.subplots(layers, 1, figsize=(8, layers * max(2.2, 0.18 * experts + 0.8) + 0.6),
                             squeeze=False, sharex=True, layout="constrained")
    x = _cell_edges(np.asarray(metrics["load_steps"], dtype=float))
    for layer, ax in enumerate(axes[:, 0]):
        mesh = ax.pcolormesh(x, np.arange(experts + 1) - 0.5, loads[:, layer].T, cmap="RdBu_r", norm=norm)
        ax.set_yticks(range(experts), [str(e) for e in range(experts)], fontsize=min(9, max(5, 160 // experts)))
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1][0].set_xlabel("step")
    bar = fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="share of tokens")
    bar.set_ticks([0, uniform, norm.vmax], labels=["0", f"1/{experts}: uniform", f"{norm.vmax:.2f}"])
    bar.ax.axhline(uniform, color="black", linewidth=1.5)
    fig.suptitle("expert load per layer")
    return fig


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Edges of one cell per logged step, centred on it: steps may be unevenly spaced (the last step, a stop,
    a resume with another --steps)."""
    if len(steps) == 1:
        return steps[0] + np.array([-0.5, 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])
