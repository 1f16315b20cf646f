"""The compile step in a short-lived process of its own: BCC compiles and loads the probes there, and the
process that asked for them receives every file descriptor it needs over a unix socket (SCM_RIGHTS).

Why: `import bcc` maps libbcc with LLVM and clang (~60 MB resident), and compiling leaves ~110 MB of
LLVM's heap behind; none of it is needed once the programs are in the kernel. The agent (the parent)
keeps only file descriptors: maps (read with flowscope.kernel.bpf_syscall and the ring reader), programs (tc
attaches them by fd) and the attachments of the tracepoint and kprobe programs, whose closing detaches
them. The child is a fresh interpreter (`python -m flowscope.kernel.compile_child FD`), not a fork of a
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
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowscope.kernel import bpf_object, bpf_syscall
from flowscope.kernel.catalog import CATALOG, FamilyStatus
from flowscope.kernel.features import probe_features
from flowscope.kernel.headers import HeadersError, export_for_bcc, find_headers
from flowscope.kernel.loader import (
    BCC_MISSING,
    LoadedProbes,
    LoaderError,
    LoadOptions,
    cflags_for,
    import_bcc,
    module_text,
    plan_families,
    require_privileges,
)

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


@dataclass
class CompiledModule:
    """The compile step's result, in the process that compiled it (or read it from the cache)."""

    statuses: list[FamilyStatus]
    perf_events: bool
    loaded: bpf_object.LoadedObject
    tc_programs: dict[str, str] = field(default_factory=dict)  # "ingress"/"egress" -> program name
    object_cache: str = "off"
    compiler_warnings: int = 0
    compiler: object = None  # the bcc.BPF module of a compile: it owns the maps until the handover


TC_HOOKS = ("ingress", "egress")


@contextlib.contextmanager
def _stderr_to_log(lines: list[str]) -> Iterator[None]:
    """Sends what is written to fd 2 meanwhile (clang's diagnostics, from libbcc) into `lines` and the debug
    log instead of the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += sink.read().decode(errors="replace").splitlines()
    for line in lines:
        log.debug("compiler: %s", line)


def _compile(text: str, cflags: list[str], tc_names: set[str]) -> tuple[object, bpf_object.ObjectImage, int]:
    """BCC compiles the module (and creates its maps) without loading a program: (the bcc.BPF module, the
    image of what it compiled, how many warnings the compiler printed)."""
    bcc = import_bcc()

    class Module(bcc.BPF):
        def _trace_autoload(self) -> None:
            """Nothing: flowscope.kernel.bpf_object loads and attaches every program."""

    diagnostics: list[str] = []
    with _stderr_to_log(diagnostics):
        try:
            module = Module(text=text.encode(), cflags=cflags)
        except Exception as err:  # BCC raises a bare Exception on compile failure, its details on stderr
            failure = err
        else:
            failure = None
    warnings = sum(1 for line in diagnostics if re.search(r": warning: ", line))
    if failure is not None:  # the compiler's or libbcc's first error says more than BCC's exception
        errors = [line.strip() for line in diagnostics if "error" in line.lower()]
        raise LoaderError(
            f"the probes failed to compile or load ({errors[0] if errors else failure}); run `flowscope doctor -v` "
            "and report the output."
        )
    lib = bcc.lib
    map_fds = _module_maps(module)
    maps = []
    for name, fd in map_fds.items():
        info, flags = bpf_syscall.map_info(fd), bpf_object.map_flags(fd)
        spec = bpf_object.MapSpec(name, info.map_type, info.key_size, info.value_size, info.max_entries, flags, fd)
        maps.append(spec)
    programs = []
    for index in range(lib.bpf_num_functions(module.module)):
        name = lib.bpf_function_name(module.module, index).decode()
        point = bpf_object.attach_point(name)
        if point is None and name in tc_names:
            point = bpf_object.PROG_TYPE["sched_cls"], "tc"
        if point is not None:
            programs.append(bpf_object.ProgramSpec(name, point[0], point[1], module.dump_func(name.encode())))
    license_text = lib.bpf_module_license(module.module).decode()
    return module, bpf_object.ObjectImage(tuple(maps), tuple(programs), license_text), warnings


def _module_maps(module: object) -> dict[str, int]:
    """Every map of the module (BCC's Python side lists only those it opened): name -> fd."""
    import ctypes

    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    handle = module.module  # type: ignore[attr-defined]
    names = [lib.bpf_table_name(handle, i) for i in range(lib.bpf_num_tables(handle))]
    return {name.decode(): lib.bpf_table_fd(handle, name) for name in names}


def compile_and_load(options: LoadOptions) -> CompiledModule:
    """Compiles the runnable families with BCC (or reads them from the compiled-object cache), loads and
    attaches their programs, loads the tc programs and runs the families' one-time preparations. Leaves
    LLVM's memory in the process that calls it: flowscope.kernel.compile_child runs it in a process of its own."""
    require_privileges()
    features = probe_features()
    try:
        headers = find_headers(host_root=options.host_root)
    except HeadersError as err:
        raise LoaderError(str(err)) from None
    statuses = plan_families(features, options)
    active = [s.family for s in statuses if s.active]
    if not active:
        raise LoaderError("no probe can run on this kernel; run `flowscope doctor` to see why.")
    perf_events = options.perf_events or not features.ringbuf
    text, cflags = module_text(active), cflags_for(active, features, options)
    tc_programs = {hook: f"fs_tc_{hook}" for hook in TC_HOOKS} if any(f.name == "tc_flows" for f in active) else {}
    image, outcome, compiler, warnings, map_fds = None, "off", None, 0, None
    if options.object_cache is not None:
        btf = bpf_object.file_checksum(features.btf_path) if features.btf_path else "no BTF"
        key = bpf_object.cache_key(features.release, btf, str(headers.path), text, cflags)
        image, outcome = bpf_object.read_cached(key, Path(options.object_cache))
    if image is None:
        export_for_bcc(headers)
        compiler, image, warnings = _compile(text, cflags, set(tc_programs.values()))
        map_fds = _module_maps(compiler)
        if options.object_cache is not None:
            bpf_object.write_cached(key, image, Path(options.object_cache))
    try:
        loaded = bpf_object.load_image(image, map_fds, features.tracefs)
    except bpf_object.ObjectError as err:
        raise LoaderError(f"{err} Run `flowscope doctor` and report the output.") from None
    for family in active:
        if family.prepare is not None:
            family.prepare(loaded.maps)
    return CompiledModule(statuses, perf_events, loaded, tc_programs, outcome, warnings, compiler)


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
    before the socket's fd number) is `python -m flowscope.kernel.compile_child` unless said otherwise."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    started = time.monotonic()
    with ours:
        with theirs:
            argv = [*(command or [sys.executable, "-m", "flowscope.kernel.compile_child"]), str(theirs.fileno())]
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


def load(options: LoadOptions) -> LoadedProbes:
    """Compiles and loads the probes in a short-lived process (flowscope.kernel.compile_child) and takes over
    their file descriptors: LLVM and libbcc never enter this process, nor stay in its memory."""
    if importlib.util.find_spec("bcc") is None:  # said here too: the child would only say it later
        raise LoaderError(BCC_MISSING)
    require_privileges()
    return load_in_child(options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
