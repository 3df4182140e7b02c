"""Working-context entries and tree-node spans.

Tree nodes follow the design: node (level, index) covers tokens [index*K**level, (index+1)*K**level), so a
level-0 node is one token. The working context never holds single tokens, it holds *blocks*, so its entries
are addressed by :class:`Entry`: level 0 is the raw block of K tokens under gist (1, index), level >= 1 is
the gist node (level, index) itself. Keeping the two addressings apart avoids the upstream bug of looking
parents up with unaligned positions.
"""

from __future__ import annotations

from dataclasses import dataclass


def node_span(level: int, index: int, block_size: int) -> tuple[int, int]:
    """Token span [start, end) of tree node (level, index)."""
    width = block_size**level
    return index * width, (index + 1) * width


@dataclass(frozen=True, order=True)
class Entry:
    """One working-context entry: a raw block (level 0, cost K) or a gist (level >= 1, cost 1)."""

    level: int
    index: int

    def width(self, block_size: int) -> int:
        """Number of tokens this entry stands for (a raw block and a level-1 gist both cover K)."""
        return block_size ** max(self.level, 1)

    def cost(self, block_size: int) -> int:
        return block_size if self.level == 0 else 1

    def start(self, block_size: int) -> int:
        return self.index * self.width(block_size)

    def end(self, block_size: int) -> int:
        return (self.index + 1) * self.width(block_size)

    def span(self, block_size: int) -> tuple[int, int]:
        return self.start(block_size), self.end(block_size)

    def parent(self, block_size: int) -> Entry:
        """The coarser entry that replaces this one on collapse (a raw block collapses into its LOD1 gist)."""
        if self.level == 0:
            return Entry(1, self.index)
        return Entry(self.level + 1, self.index // block_size)

    def children(self, block_size: int) -> list[Entry]:
        """The finer entries that replace this one on expand (an LOD1 gist expands into its raw block)."""
        if self.level == 0:
            raise ValueError("a raw block cannot be expanded further")
        if self.level == 1:
            return [Entry(0, self.index)]
        return [Entry(self.level - 1, self.index * block_size + j) for j in range(block_size)]
