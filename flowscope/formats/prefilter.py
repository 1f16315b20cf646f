"""A filter's pushdown into Arrow: the terms of a filter (flowscope.filters) evaluated over a row group's table
before it becomes pandas columns, so read_flowlog converts only the rows they pass.

The terms are the filter language's own matchers reading the table through `ArrowColumns` (pyarrow.compute
over whole columns; text once per distinct value: over the column's dictionary), so a pushed-down term keeps
exactly the rows it keeps in pandas. A term on labels (Python dicts, which only a frame holds) is not pushed
down: it passes every row. The mask is therefore a superset of the filter's, and the filter, applied to the
frame afterwards, stays the definition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowscope.filters import OBJECT_FIELDS, Filter, FrameKind, Mask, spread


@dataclass(frozen=True)
class ArrowColumns:
    """The columns of an Arrow table (filters.Columns); text columns plain or dictionary-encoded."""

    table: Any  # pyarrow.Table

    @property
    def rows(self) -> int:
        return self.table.num_rows

    def isin(self, name: str, values: Iterable[str]) -> Mask:
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(list(values), pa.string())
        return self.by_distinct(name, lambda distinct: pc.is_in(distinct, value_set=wanted).to_numpy(False))

    def by_distinct(self, name: str, matches: Callable[[np.ndarray], Mask]) -> Mask:
        import pyarrow as pa
        import pyarrow.compute as pc

        if name not in self.table.column_names:
            return np.zeros(self.rows, dtype=bool)
        parts = [np.zeros(0, dtype=bool)]
        for chunk in self.table.column(name).chunks:
            encoded = chunk if pa.types.is_dictionary(chunk.type) else pc.dictionary_encode(chunk)
            codes = pc.fill_null(encoded.indices, -1).to_numpy()
            parts.append(spread(matches, encoded.dictionary.to_numpy(zero_copy_only=False), codes))
        return np.concatenate(parts)

    def integers(self, name: str, missing: int) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        if name not in self.table.column_names:
            return np.full(self.rows, missing, dtype=np.int64)
        column = pc.cast(self.table.column(name), pa.int64(), safe=False)  # as pandas' to_numpy(int64) wraps
        return pc.fill_null(column, missing).to_numpy()

    def objects(self, name: str) -> Sequence[object] | None:
        raise TypeError(f"{name}: Python objects are matched in pandas, not pushed down")


def prefilter(chosen: Filter, table: Any, kind: FrameKind) -> Any:
    """The rows of `table` (a pyarrow.Table of flows or events) that the terms of `chosen` Arrow can evaluate
    all pass: every row `chosen` keeps, and fewer others. `table` itself when no term can be pushed down."""
    import pyarrow as pa

    columns = ArrowColumns(table)
    mask = None
    for term in chosen.terms:
        if term.field not in OBJECT_FIELDS:
            matched = term.matches(columns, kind)
            mask = matched if mask is None else mask & matched
    return table if mask is None or mask.all() else table.filter(pa.array(mask))
