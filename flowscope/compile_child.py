"""The compile step in a short-lived process of its own: BCC compiles and loads the probes there, and the
process that asked for them receives every file descriptor it needs over a unix socket (SCM_RIGHTS).

Why: `import bcc` maps libbcc with LLVM and clang (~60 MB resident), and compiling leaves ~110 MB of
LLVM's heap behind; none of it is needed once the programs are in the kernel. The agent (the parent)
keeps only file descriptors: maps (read with flowscope.bpf_syscall and the ring reader), programs (tc
attaches them by fd) and the attachments of the tracepoint and kprobe programs, whose closing detaches
them. The child is a fresh interpreter (`python -m flowscope.compile_child FD`), not a fork of a
process that may run threads.

Protocol on a SOCK_SEQPACKET socketpair: the parent sends one message, {"options": LoadOptions as a
dict, "log_level": int}; the child answers with one message, either {"error": sentence} or the handover
description with the descriptors attached in the order it lists them: maps, then programs, then
attachments. The child then exits without BCC's exit handler, which would disable the perf-event
attachments the parent now shares.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from flowscope import bpf_syscall
from flowscope.loader import CompiledModule, LoadedProbes, LoaderError, LoadOptions, compile_and_load
from flowscope.probe_catalog import CATALOG, FamilyStatus

log = logging.getLogger(__name__)

MESSAGE_MAX = 1 << 20
SCM_MAX_FD = 253  # the kernel's limit of descriptors in one message (include/net/scm.h)
DOCTOR = "run `flowscope doctor` and report the output."


def send(channel: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    if len(fds) > SCM_MAX_FD:
        raise LoaderError(f"the probes have {len(fds)} file descriptors, more than one message carries; {DOCTOR}")
    socket.send_fds(channel, [json.dumps(message).encode()], list(fds))


def receive(channel: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its descriptors (close-on-exec); (None, []) when the other side closed first."""
    # recvmsg, not socket.recv_fds: that one drops its flags, and with them MSG_CMSG_CLOEXEC.
    fds = array.array("i")
    data, ancillary, flags, _ = channel.recvmsg(
        MESSAGE_MAX, socket.CMSG_LEN(SCM_MAX_FD * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise LoaderError(f"the probe loader's handover did not fit one message; {DOCTOR}")
    if not data:
        return None, list(fds)
    return json.loads(data), list(fds)


# ---- the child -----------------------------------------------------------------------------------------


def handover(module: CompiledModule, compile_seconds: float) -> tuple[dict[str, Any], list[int]]:
    """The description the parent receives, and the descriptors in the order it lists them."""
    loaded = module.loaded
    description = {
        "statuses": [
            {"name": s.family.name, "active": s.active, "reason": s.reason, "remedy": s.remedy, "detail": s.detail}
            for s in module.statuses
        ],
        "perf_events": module.perf_events,
        "tc_programs": module.tc_programs,
        "maps": list(loaded.maps),
        "programs": list(loaded.programs),
        "attachments": list(loaded.attachments),
        "compile_seconds": round(compile_seconds, 3),
        "verifier": [dataclasses.asdict(report) for report in loaded.report],
        "object_cache": module.object_cache,
        "compiler_warnings": module.compiler_warnings,
    }
    return description, [*loaded.maps.values(), *loaded.programs.values(), *loaded.attachments.values()]


def options_from(request: dict[str, Any]) -> LoadOptions:
    fields = dict(request["options"])
    if fields.get("families") is not None:
        fields["families"] = set(fields["families"])
    return LoadOptions(**fields)


def main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[0]))
    request, _ = receive(channel)
    if request is None:
        return 1  # the parent went away before asking
    logging.basicConfig(level=request["log_level"], format="flowscope: %(message)s", stream=sys.stderr)
    started = time.monotonic()
    try:
        module = compile_and_load(options_from(request))
        description, fds = handover(module, time.monotonic() - started)
    except LoaderError as err:
        send(channel, {"error": str(err)})
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # one sentence in the parent, the details here
        log.debug("the compile step failed", exc_info=True)
        send(channel, {"error": f"loading the probes failed ({type(err).__name__}: {err}); {DOCTOR}"})
        return 1
    with contextlib.suppress(OSError):  # the parent is gone: exiting closes everything, nothing stays attached
        send(channel, description, fds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not through BCC's atexit cleanup, which disables perf-event attachments the parent now holds


# ---- the parent ----------------------------------------------------------------------------------------


def _statuses(described: list[dict[str, Any]]) -> list[FamilyStatus]:
    families = {family.name: family for family in CATALOG}
    return [FamilyStatus(families[s["name"]], s["active"], s["reason"], s["remedy"], s["detail"]) for s in described]


def loaded_from(description: dict[str, Any], fds: list[int], options: LoadOptions) -> LoadedProbes:
    """The parent's LoadedProbes from a handover; closes the descriptors if the description does not fit."""
    names = [*description["maps"], *description["programs"], *description["attachments"]]
    if len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise LoaderError(
            f"the probe loader handed over {len(fds)} file descriptors for {len(names)} objects; {DOCTOR}"
        )
    by_name = iter(fds)
    maps = {name: bpf_syscall.map_info(next(by_name)) for name in description["maps"]}
    programs = {name: next(by_name) for name in description["programs"]}
    attachments = {name: next(by_name) for name in description["attachments"]}
    return LoadedProbes(
        statuses=_statuses(description["statuses"]),
        perf_events=description["perf_events"],
        options=options,
        maps=maps,
        programs=programs,
        attachments=attachments,
        tc_programs={hook: programs[name] for hook, name in description["tc_programs"].items()},
        compile_seconds=description["compile_seconds"],
        verifier=description["verifier"],
        object_cache=description["object_cache"],
        compiler_warnings=description["compiler_warnings"],
    )


def request_for(options: LoadOptions) -> dict[str, Any]:
    fields = dataclasses.asdict(options)
    if fields["families"] is not None:
        fields["families"] = sorted(fields["families"])
    return {"options": fields, "log_level": logging.getLogger("flowscope").getEffectiveLevel()}


def exchange(channel: socket.socket, child: subprocess.Popen, options: LoadOptions) -> LoadedProbes:
    """Asks the child at the other end of `channel` for the probes and takes them over."""
    send(channel, request_for(options))
    message, fds = receive(channel)
    if message is None:
        for fd in fds:
            os.close(fd)
        status = child.wait()
        raise LoaderError(f"the probe loader process exited with status {status} before handing over; {DOCTOR}")
    if "error" in message:
        raise LoaderError(message["error"])
    return loaded_from(message, fds, options)


def load_in_child(options: LoadOptions, command: list[str] | None = None) -> LoadedProbes:
    """Runs the compile step in a child process and returns what it handed over. `command` (the argv
    before the socket's fd number) is `python -m flowscope.compile_child` unless said otherwise."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    started = time.monotonic()
    with ours:
        with theirs:
            argv = [*(command or [sys.executable, "-m", "flowscope.compile_child"]), str(theirs.fileno())]
            # stdout to stderr: nothing BCC or clang print may end up in the parent's output (capture -o jsonl)
            child = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=2)
        try:
            loaded = exchange(ours, child, options)
        except BaseException:  # an error it sent, or this process interrupted: the child has no more to do
            child.kill()
            child.wait()
            raise
        child.wait()  # it exits right after the handover
    log.debug(
        "probes compiled and loaded in %.1f s (%.1f s in the compile step's process)",
        time.monotonic() - started,
        loaded.compile_seconds,
    )
    return loaded


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
