"""Kernel addresses to "function+0xoffset", from /proc/kallsyms (what BCC's ksym does, without loading
libbcc and its LLVM into the agent).

The table is read once, at the first address asked for, and kept as the file's bytes with the start of
each function symbol's line, sorted by address (~8 MB for ~120k symbols); names are decoded only for
the addresses asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

KALLSYMS = Path("/proc/kallsyms")
FUNCTION_TYPES = b"tTwW"  # text symbols, local and global, and weak ones


class KernelSymbols:
    def __init__(self, path: Path = KALLSYMS) -> None:
        self.path = path
        self._text: bytes | None = None
        self._addresses = np.zeros(0, dtype=np.uint64)
        self._name_starts = np.zeros(0, dtype=np.int64)
        self._name_ends = np.zeros(0, dtype=np.int64)

    def _load(self) -> None:
        """Parses every line "<hex address> <type> <name>[\\t[module]]" at once, column-wise."""
        text = self.path.read_bytes()
        self._text = text
        raw = np.frombuffer(text, dtype=np.uint8)
        ends = np.flatnonzero(raw == ord("\n"))
        starts = np.concatenate(([0], ends[:-1] + 1)) if len(ends) else np.zeros(0, dtype=np.int64)
        width = text.find(b" ") if len(ends) else 0  # address digits (16 on 64-bit), as on the first line
        types = raw[starts + width + 1] if len(starts) else raw[:0]
        keep = np.isin(types, np.frombuffer(FUNCTION_TYPES, dtype=np.uint8))
        starts, ends = starts[keep], ends[keep]
        addresses = np.zeros(len(starts), dtype=np.uint64)
        for column in range(width):  # one hex digit of every line at a time
            digit = raw[starts + column]
            value = np.where(digit >= ord("a"), digit - (ord("a") - 10), digit - ord("0")).astype(np.uint64)
            addresses = (addresses << np.uint64(4)) | value
        known = addresses != 0  # unprivileged readers see every address as 0
        order = np.argsort(addresses[known], kind="stable")
        self._addresses = addresses[known][order]
        self._name_starts = (starts[known] + width + 3)[order]
        self._name_ends = ends[known][order]

    def name(self, address: int) -> str | None:
        """ "function+0xoffset" of the nearest function symbol at or below `address`; None when there is none
        (or the addresses are hidden)."""
        if self._text is None:
            self._load()
        index = int(np.searchsorted(self._addresses, np.uint64(address), side="right")) - 1
        if index < 0 or not address:
            return None
        line = self._text[self._name_starts[index] : self._name_ends[index]]  # type: ignore[index]
        symbol = line.split(b"\t", 1)[0].decode(errors="replace")
        return f"{symbol}+{address - int(self._addresses[index]):#x}"
