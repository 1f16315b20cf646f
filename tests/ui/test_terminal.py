"""The pseudo-terminal helper of the TUI tests fails, rather than passing, when what it waits for never comes."""

import sys

import pytest

from tests.ui.terminal import Terminal


def test_text_that_never_comes_because_the_program_ended_fails():
    term = Terminal([sys.executable, "-c", "print('hello')"])
    try:
        with pytest.raises(AssertionError, match=r"the program ended \(exit status 0\) first: b'goodbye' did not"):
            term.read_until(b"goodbye")
        assert b"hello" in term.output
    finally:
        term.close()


def test_a_screen_that_never_comes_fails_showing_the_screen():
    term = Terminal([sys.executable, "-c", "print('hello')"])
    try:
        with pytest.raises(
            AssertionError, match=r"first: the screen did not show what was expected; it shows:\nhello\n"
        ):
            term.read_until_screen(["goodbye"])
    finally:
        term.close()


def test_the_screen_is_what_the_program_drew():
    # Line 1, then the cursor back to column 1 of line 1 to overwrite "one" with "ONE".
    term = Terminal(
        [
            sys.executable,
            "-c",
            "import sys; sys.stdout.write('one two\\r\\nthree\\x1b[1;1HONE'); sys.stdout.flush(); input()",
        ]
    )
    try:
        term.read_until_screen(["ONE two", "three", *[""] * (Terminal.LINES - 2)], timeout=20)
        term.write(b"\r")
        assert term.wait() == 0
    finally:
        term.close()
