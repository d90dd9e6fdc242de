"""The schedule: in how many stages, and which part of every (peer, local expert) segment each stage moves.

The partition itself is C++ (``csrc/exchange/schedule.cpp``, run by the staged engine on the segment sizes it
learns from the count exchange); this is its typed, validated description.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("bulk", "chunked", "pairwise")


@dataclass(frozen=True)
class Schedule:
    """``"bulk"``: one stage, every segment whole; ``"chunked"`` (Lina): ``chunks`` stages, stage ``c`` moves
    part ``c`` of every segment; ``"pairwise"`` (FasterMoE): ranks in groups of ``group_size``, stage ``s``
    sends to group ``g + s`` and receives from group ``g - s``."""

    name: str = "bulk"
    chunks: int = 2
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.name!r}")
        if not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or self.chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {self.chunks!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {self.group_size!r}")

    def check_group(self, size: int, what: str) -> None:
        """The pairwise groups must tile the ranks the stages exchange over (``size`` of ``what``)."""
        if self.name == "pairwise" and size % self.group_size:
            raise ValueError(f"schedule='pairwise': group_size ({self.group_size}) must divide the size of {what} "
                             f"({size})")

    @property
    def staged(self) -> bool:
        """Whether it overlaps stages (anything but bulk: the staged engine's C++ autograd function)."""
        return self.name != "bulk"

    def stages(self, world: int) -> int:
        return {"bulk": 1, "chunked": self.chunks, "pairwise": world // self.group_size}[self.name]
