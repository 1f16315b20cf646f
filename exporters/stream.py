"""Text outputs to stdout or a file, robust to the signals capture and top expect (Ctrl-C while `| less` waits)."""

from __future__ import annotations

import io
import os
from typing import IO


class WholeWrites(io.TextIOBase):
    """Text out through os.write, looping until every byte is written. A signal that interrupts a write
    blocked on a full pipe makes it return short, and CPython's buffered writer (3.11) then loses part of
    the data."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(self.fd, data) :]
        return len(text)


def whole_writes(stream: IO[str]) -> IO[str]:
    """`stream` written through WholeWrites when it is a real file descriptor (else as it is: a test's capture)."""
    try:
        fd = stream.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return stream
    stream.flush()
    return WholeWrites(fd)


class TextOutput:
    """stdout, or a file opened for writing (closed by close(); stdout stays open)."""

    def __init__(self, path: str | None, stdout: IO[str]) -> None:
        self.path = path
        self._file = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115 - closed by close()
        self.stream: IO[str] = whole_writes(self._file if self._file is not None else stdout)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
