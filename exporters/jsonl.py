"""The JSON lines sink: `capture -o jsonl` (the record stream of flowscope.formats.jsonl) to stdout or a file."""

from __future__ import annotations

from typing import IO, Any

from flowscope.formats.jsonl import write_batch
from flowscope.schema import FlowBatch


class JsonlSink:
    name = "jsonl"

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.batches = 0

    def open(self) -> None:
        return None

    def write(self, batch: FlowBatch) -> None:
        write_batch(batch, self.out)
        self.batches += 1

    def close(self) -> None:
        self.out.flush()

    def health(self) -> dict[str, Any]:
        return {"state": "ok", "batches": self.batches}
