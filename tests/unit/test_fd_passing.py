"""The compile step's handover (flowscope.kernel.compile_child): descriptors passed over a unix socket reach the
parent as the same open files, close-on-exec; what the child says or fails to say is one sentence in the
parent. Real processes and real descriptors (pipes, eventfds), no BPF: no root needed."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import textwrap

import pytest

from flowscope.kernel import compile_child
from flowscope.kernel.loader import LoaderError, LoadOptions

DOCTOR = "run `flowscope doctor` and report the output."


def a_child(body: str) -> list[str]:
    """A child process running `body` with `channel` (the socket to the parent) and `request` (what it asked)."""
    script = textwrap.dedent(
        """
        import socket, sys
        from flowscope.kernel import compile_child
        channel = socket.socket(fileno=int(sys.argv[-1]))
        request, _ = compile_child.receive(channel)
        """
    )
    return [sys.executable, "-c", script + textwrap.dedent(body), "--"]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_descriptors_arrive_as_the_same_open_files_and_close_on_exec() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    counter = os.eventfd(0)
    with ours, theirs:
        compile_child.send(theirs, {"maps": ["pipe", "counter"]}, [write_end, counter])
        message, fds = compile_child.receive(ours)
    assert message == {"maps": ["pipe", "counter"]}
    assert len(fds) == 2 and not set(fds) & {write_end, counter}
    os.write(fds[0], b"through the copy")
    assert os.read(read_end, 100) == b"through the copy"
    os.eventfd_write(fds[1], 5)
    assert os.eventfd_read(counter) == 5
    assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
    for fd in (read_end, write_end, counter, *fds):
        os.close(fd)


def test_a_closed_peer_is_no_message() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    with ours:
        assert compile_child.receive(ours) == (None, [])


def test_a_handover_that_does_not_match_its_descriptors_is_refused_and_closed() -> None:
    read_end, write_end = os.pipe()
    description = {"maps": ["fs_generation", "fs_counters"], "programs": [], "attachments": []}
    with pytest.raises(LoaderError) as raised:
        compile_child.loaded_from(description, [read_end, write_end][:1], LoadOptions())
    assert str(raised.value) == f"the probe loader handed over 1 file descriptors for 2 objects; {DOCTOR}"
    assert not is_open(read_end)
    os.close(write_end)


def test_options_reach_the_child_as_they_were() -> None:
    options = LoadOptions(interfaces=["fsme0"], flow_map_size=1024, perf_events=True, families={"tc_flows", "skb_drop"})
    request = json.loads(json.dumps(compile_child.request_for(options)))
    assert compile_child.options_from(request) == options
    assert compile_child.options_from(json.loads(json.dumps(compile_child.request_for(LoadOptions())))) == LoadOptions()


def test_the_childs_error_is_the_parents_sentence() -> None:
    # The child answers with an error built from the options it received: both directions are checked.
    child = a_child(
        """
        size = request["options"]["flow_map_size"]
        compile_child.send(channel, {"error": f"a flow map of {size} entries is refused here."})
        """
    )
    with pytest.raises(LoaderError) as raised:
        compile_child.load_in_child(LoadOptions(flow_map_size=2048), command=child)
    assert str(raised.value) == "a flow map of 2048 entries is refused here."


def test_a_child_that_dies_without_a_word_is_one_sentence() -> None:
    with pytest.raises(LoaderError) as raised:
        compile_child.load_in_child(LoadOptions(), command=a_child("sys.exit(3)"))
    assert str(raised.value) == f"the probe loader process exited with status 3 before handing over; {DOCTOR}"


def test_what_the_child_prints_goes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    # capture -o jsonl writes flows to stdout: nothing BCC or clang print in the child may land there.
    child = a_child(
        """
        print("a compiler's chatter")
        compile_child.send(channel, {"error": "refused."})
        """
    )
    with pytest.raises(LoaderError):
        compile_child.load_in_child(LoadOptions(), command=child)
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == "a compiler's chatter\n"
