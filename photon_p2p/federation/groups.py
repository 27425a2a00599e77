"""Which group a peer averages in, when a round has more live peers than ``target_group_size``.

Averaging pseudo-gradients inside disjoint groups splits the swarm into as many models as groups, for good.
Instead, a round with n > G live peers averages in two stages over a grid (Moshpit-style, exact):

- stage 1, rows: the n peers (sorted by peer id, the same list on every peer) are dealt round-robin into
  k = ceil(n / G) rows of nearly equal size; each row all-reduces, and every row member holds the row's
  weighted mean (bit-identical inside the row) and knows the row's total weight W_row.
- stage 2, columns: the member at position p of its row joins column p mod m, where m is the smallest row
  size, so every column holds at least one member of every row. In each column exactly one member per row
  (the first) sends its row mean with weight W_row, any other sends weight 0; reducers sum the rows in row
  order. Every column therefore computes Σ W_row·mean_row / Σ W_row, the global weighted mean, from the same
  bytes in the same order: every peer of the swarm ends on the same bytes.

Stage 2 groups have k ≤ G members while n ≤ G²; beyond that they grow past G (documented, not capped).

Every peer derives the grid from its own read of the round's members; a member whose report one peer saw and
another did not yet would put them in different grids. The matchmaking keys carry the member list's digest, so
peers with different views never mix in one group; a peer still waiting re-reads the members and regroups
(averaging.py). A peer alone in its row (3 peers in groups of 2) goes straight to its column.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupPlan:
    """This peer's place in a round's grid (``stages`` is 1 when every live peer fits one group)."""

    members: tuple[str, ...]
    me: str
    target: int

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def stages(self) -> int:
        return 1 if self.n <= self.target else 2

    @property
    def rows(self) -> int:
        return math.ceil(self.n / self.target)

    @property
    def index(self) -> int:
        return self.members.index(self.me)

    @property
    def row(self) -> int:
        return self.index % self.rows

    @property
    def position(self) -> int:
        return self.index // self.rows

    @property
    def digest(self) -> int:
        """16 bits of the member list's hash: peers meet in a grid's groups only if they hold the same list."""
        return int.from_bytes(hashlib.sha256("\n".join(self.members).encode()).digest()[:2], "big")

    def row_size(self, row: int | None = None) -> int:
        row = self.row if row is None else row
        return len(range(row, self.n, self.rows))

    @property
    def columns(self) -> int:
        return min(self.row_size(r) for r in range(self.rows))

    @property
    def column(self) -> int:
        return self.position % self.columns

    @property
    def designated(self) -> bool:
        """Whether this peer carries its row's weight into its column (the first of its row there)."""
        return self.position < self.columns

    def row_members(self) -> tuple[str, ...]:
        """Everyone in this peer's row (itself included)."""
        return tuple(m for i, m in enumerate(self.members) if i % self.rows == self.row)

    def column_members(self) -> tuple[str, ...]:
        """Everyone in this peer's column (itself included)."""
        return tuple(m for i, m in enumerate(self.members) if (i // self.rows) % self.columns == self.column)

    def column_size(self, column: int | None = None) -> int:
        column = self.column if column is None else column
        return sum(1 for r in range(self.rows) for p in range(self.row_size(r)) if p % self.columns == column)


def plan_groups(members: list[str], me: str, target: int) -> GroupPlan:
    """The plan for ``me`` among ``members`` (me is added if missing; order is made canonical here)."""
    return GroupPlan(tuple(sorted(set(members) | {me})), me, max(2, int(target)))
