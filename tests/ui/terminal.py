"""A program in a pseudo-terminal, as a person runs it: read what it draws, type keys, check the terminal after."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time


class Terminal:
    """A command in a pseudo-terminal of 150x36 (TERM xterm-256color); its output is kept in `output`."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 36, 150, 0, 0))
        self.settings = termios.tcgetattr(slave)
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "150", "LINES": "36"}
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.output = b""

    def read_until(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} did not appear; the screen said: {self.output[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.2))
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # the other end closed
                    break

    def write(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    break
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
