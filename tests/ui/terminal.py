"""A program in a pseudo-terminal, as a person runs it: read what it draws, type keys, check the terminal after."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable

import pyte


class Terminal:
    """A command in a pseudo-terminal of 150x36 (TERM xterm-256color); its output is kept in `output`, and
    what it drew on a terminal emulator of that size (pyte) in `screen`."""

    COLUMNS, LINES = 150, 36

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", self.LINES, self.COLUMNS, 0, 0))
        self.settings = termios.tcgetattr(slave)
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(self.COLUMNS), "LINES": str(self.LINES)}
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.output = b""
        self.screen = pyte.Screen(self.COLUMNS, self.LINES)
        self._stream = pyte.ByteStream(self.screen)

    def _read(self, timeout: float) -> bool:
        """Reads what the program wrote within `timeout` s; False once it has closed the terminal (exited)."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the other end closed
            return False
        self.output += data
        self._stream.feed(data)
        return bool(data)

    def _read_until(self, done: Callable[[], bool], what: Callable[[], str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{what()} within {timeout}s"
            if not self._read(min(remaining, 0.2)):
                raise AssertionError(f"the program ended (exit status {self.process.wait(10)}) first: {what()}")

    def read_until(self, text: bytes, timeout: float = 30) -> None:
        """Reads until the output holds `text`; fails when it does not within `timeout` s or the program ends."""
        self._read_until(
            lambda: text in self.output, lambda: f"{text!r} did not appear; it wrote {self.output[-2000:]!r}", timeout
        )

    def lines(self) -> list[str]:
        """The screen as the terminal shows it now, one string per line, without trailing blanks."""
        return [line.rstrip() for line in self.screen.display]

    def read_until_screen(self, expected: list[str], timeout: float = 30) -> None:
        """Reads until the screen shows exactly `expected` (every line); fails with the screen it shows."""
        self._read_until(
            lambda: self.lines() == expected,
            lambda: "the screen did not show what was expected; it shows:\n" + "\n".join(self.lines()),
            timeout,
        )

    def read_until_line(self, pattern: str, timeout: float = 30) -> str:
        """Reads until a line of the screen matches the regular expression `pattern`; returns that line."""
        found: list[str] = []

        def matched() -> bool:
            found[:] = [line for line in self.lines() if re.search(pattern, line)]
            return bool(found)

        self._read_until(
            matched, lambda: f"no line matched {pattern!r}; the screen shows:\n" + "\n".join(self.lines()), timeout
        )
        return found[0]

    def write(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 20) -> int:
        """Reads everything the program writes until it closes the terminal (it exits); its exit status."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0 and self._read(min(remaining, 0.2)):
            pass
        return self.process.wait(timeout=max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def restored(term: Terminal) -> None:
    """The terminal is as the program found it: alternate screen left, cursor shown, modes back."""
    tail = term.output[term.output.rfind(b"\x1b[?1049h") :]
    assert b"\x1b[?1049l" in tail  # left the alternate screen
    assert b"\x1b[?25h" in tail  # cursor visible again
    assert termios.tcgetattr(term.master)[3] == term.settings[3]  # local modes (echo, canonical) restored
