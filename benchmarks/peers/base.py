"""What the harness needs from every library's layer: one forward + backward step on fixed inputs, and the
gradients in the canonical layout of peers.spec."""

from __future__ import annotations

from torch import Tensor, nn

from .spec import Inputs


class Unavailable(Exception):
    """A peer that cannot be imported, built or run here; the message is the one-line reason."""


class PeerLayer:
    """A built layer. Subclasses set ``module`` and implement :meth:`forward` and :meth:`canonical_grads`.

    ``step()`` is what gets timed: drop the previous gradients (set to None, as ``zero_grad`` does by
    default), forward, and backward of ``sum(out * grad_out)`` (``out.backward(grad_out)``).
    """

    module: nn.Module

    def __init__(self, label: str, dtype, held: list[int]) -> None:
        self.label, self.dtype, self.held = label, dtype, held  # held: global experts of this rank, in order
        self.x: Tensor | None = None
        self.grad_out: Tensor | None = None
        self.out: Tensor | None = None

    def prepare(self, inputs: Inputs) -> None:
        self.x = inputs.x.detach().to(self.dtype, copy=True).requires_grad_(True)  # this layer's own leaf
        self.grad_out = inputs.grad_out.detach().to(self.dtype, copy=True)

    def forward(self, x: Tensor) -> Tensor:  # [T, d_model] -> [T, d_model]
        raise NotImplementedError

    def step(self) -> Tensor:
        for p in self.module.parameters():
            p.grad = None
        self.x.grad = None
        out = self.forward(self.x)
        out.backward(self.grad_out)
        self.out = out.detach()
        return self.out

    def canonical_grads(self) -> dict[str, Tensor]:
        """After a step: {'x', 'router' [E, d], 'gate'/'up' [E_held, F, d], 'down' [E_held, d, F]} (float32)."""
        raise NotImplementedError

    def _x_grad(self) -> dict[str, Tensor]:
        return {"x": self.x.grad.float()}
