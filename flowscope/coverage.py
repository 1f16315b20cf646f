"""Loss accounting: for every source, produced = delivered + lost.

Each stage of the data path (kernel flow map, spill ring, event ring or perf buffer, drop sampling,
sink queues) reports what it produced, what it passed on and what it could not pass on, under its own
source name, so that a reader can check that nothing disappears uncounted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

SINK_PREFIX = "sink:"


@dataclass
class SourceCount:
    produced: int = 0
    delivered: int = 0
    lost: int = 0

    @property
    def balanced(self) -> bool:
        return self.produced == self.delivered + self.lost


@dataclass
class Coverage:
    sources: dict[str, SourceCount] = field(default_factory=dict)

    def add(self, source: str, produced: int = 0, delivered: int = 0, lost: int = 0) -> None:
        count = self.sources.setdefault(source, SourceCount())
        count.produced += int(produced)
        count.delivered += int(delivered)
        count.lost += int(lost)

    def merge(self, other: Coverage) -> None:
        for source, count in other.sources.items():
            self.add(source, count.produced, count.delivered, count.lost)

    # The totals are of the data path (kernel and readers: packets and events); the outputs' own counts
    # (`sink:<name>`, in records) are of another unit and stay apart, in sinks().

    @property
    def produced(self) -> int:
        return sum(c.produced for name, c in self.sources.items() if not name.startswith(SINK_PREFIX))

    @property
    def lost(self) -> int:
        return sum(c.lost for name, c in self.sources.items() if not name.startswith(SINK_PREFIX))

    def sinks(self) -> dict[str, SourceCount]:
        return {n.removeprefix(SINK_PREFIX): c for n, c in self.sources.items() if n.startswith(SINK_PREFIX)}

    def without_sinks(self) -> Coverage:
        """A copy of the data path's counts only (no `sink:<name>`)."""
        return Coverage({n: SourceCount(c.produced, c.delivered, c.lost) for n, c in self.sources.items()
                         if not n.startswith(SINK_PREFIX)})  # fmt: skip

    def unbalanced(self) -> list[str]:
        """Sources whose produced count differs from delivered + lost (a bug in accounting)."""
        return [name for name, count in self.sources.items() if not count.balanced]

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {
            name: {"produced": c.produced, "delivered": c.delivered, "lost": c.lost}
            for name, c in sorted(self.sources.items())
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, int]]) -> Coverage:
        coverage = cls()
        for name, counts in data.items():
            coverage.add(name, counts.get("produced", 0), counts.get("delivered", 0), counts.get("lost", 0))
        return coverage
