"""The run folder's pictures: the loss curve, and each layer's expert load over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(metrics: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(metrics["steps"], metrics["train_bits_per_byte"], label="training loss")
    for point in metrics.get("eval", []):
        ax.scatter([point["step"]], [point["bits_per_byte"]], color="C1", zorder=3,
                   label="held-out" if point is metrics["eval"][0] else None)
    if "unigram_bits_per_byte" in metrics:
        ax.axhline(metrics["unigram_bits_per_byte"], color="gray", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("byte-level MoE LM on the Python standard library")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expert_load(metrics: dict, path: Path) -> None:
    """One heat map per MoE layer: the share of routed tokens each expert got, step by step.
    A uniform load is 1 / num_experts everywhere; dark rows are idle experts."""
    loads = metrics["expert_load"]  # [record][layer][expert], fractions
    layers = len(loads[0])
    fig, axes = plt.subplots(layers, 1, figsize=(8, 2.2 * layers + 0.6), squeeze=False, sharex=True)
    steps = metrics["load_steps"]
    for layer in range(layers):
        ax = axes[layer][0]
        grid = [[record[layer][e] for record in loads] for e in range(len(loads[0][layer]))]
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                          extent=(steps[0], steps[-1], -0.5, len(grid) - 0.5))
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    axes[-1][0].set_xlabel("step")
    fig.suptitle("expert load per layer (uniform = 1 / experts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
