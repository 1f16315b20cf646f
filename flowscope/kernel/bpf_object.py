"""A compiled probe module as plain data, the loader that puts it into the kernel, and the on-disk cache of it.

BCC compiles (flowscope.kernel.loader); what it compiled becomes an ObjectImage: the maps to create, each
program's bytecode and how it attaches. BCC's bytecode names its maps by file descriptor (BPF_LD_IMM64 with
BPF_PSEUDO_MAP_FD), so the image keeps each map's definition with the number the code uses for it; loading
an image read from the cache creates the maps anew and rewrites those numbers. Programs load through one
path (bpf(2) and perf_event_open(2), here), whether compiled just now or read from the cache, and each
load is measured for doctor's verifier report (instructions, instructions verified, load time).

Cache: one file per key under /var/cache/flowscope/objects; the key is a hash of the kernel release, the
kernel's BTF (its checksum), the headers compiled against, the module text and the cflags. A file whose
checksum or key does not match is deleted and rebuilt, never loaded.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flowscope.kernel import bpf_syscall

log = logging.getLogger(__name__)

CACHE_DIR = Path("/var/cache/flowscope/objects")
FORMAT = 1  # of the cache files; part of the key

# include/uapi/linux/bpf.h
BPF_PROG_LOAD = 5
BPF_RAW_TRACEPOINT_OPEN = 17
PROGRAM_TYPES = {2: "kprobe", 3: "sched_cls", 5: "tracepoint", 17: "raw_tracepoint"}
PROG_TYPE = {name: number for number, name in PROGRAM_TYPES.items()}
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2  # src_reg of an LD_IMM64 whose immediate is a map's descriptor
PROG_INFO_SIZE = 232  # struct bpf_prog_info up to verified_insns (Linux 5.16) and a little beyond
VERIFIED_INSNS_OFFSET = 216
XLATED_LEN_OFFSET = 20
VERIFIER_LOG_SIZE = 1 << 22

# include/uapi/linux/perf_event.h
PERF_TYPE_TRACEPOINT = 2
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
PERF_ATTR_SIZE = 112
PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331, "riscv64": 241}
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ObjectError(RuntimeError):
    """The image cannot be loaded or attached; the message says which program and why."""


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    code_fd: int  # the descriptor number the bytecode names this map by


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    prog_type: int
    attach: str  # "raw_tracepoint:<name>", "kprobe:<function>", "kretprobe:<function>", "tracepoint:<c>:<name>", "tc"
    insns: bytes = field(repr=False)


@dataclass(frozen=True)
class ObjectImage:
    maps: tuple[MapSpec, ...]
    programs: tuple[ProgramSpec, ...]
    license: str = "GPL"

    def to_json(self) -> dict[str, object]:
        return {
            "maps": [asdict(spec) for spec in self.maps],
            "programs": [
                {"name": p.name, "prog_type": p.prog_type, "attach": p.attach, "insns": _text(p.insns)}
                for p in self.programs
            ],
            "license": self.license,
        }

    @classmethod
    def from_json(cls, data: dict) -> ObjectImage:
        return cls(
            tuple(MapSpec(**spec) for spec in data["maps"]),
            tuple(
                ProgramSpec(p["name"], p["prog_type"], p["attach"], base64.b64decode(p["insns"], validate=True))
                for p in data["programs"]
            ),
            data["license"],
        )


def _text(code: bytes) -> str:
    return base64.b64encode(code).decode()


def attach_point(function_name: str) -> tuple[int, str] | None:
    """(program type, attach point) of a function that BCC would attach by its name, else None."""
    for prefix, kind in (("kprobe__", "kprobe"), ("kretprobe__", "kretprobe"), ("raw_tracepoint__", "raw_tracepoint")):
        if function_name.startswith(prefix):
            return PROG_TYPE["kprobe" if kind == "kretprobe" else kind], f"{kind}:{function_name[len(prefix) :]}"
    if function_name.startswith("tracepoint__"):
        category, _, name = function_name[len("tracepoint__") :].partition("__")
        return PROG_TYPE["tracepoint"], f"tracepoint:{category}:{name}"
    return None


# ---- loading -----------------------------------------------------------------------------------------


@dataclass
class ProgramReport:
    """One program as the kernel took it, for doctor's verifier report."""

    name: str
    prog_type: str
    attach: str
    instructions: int  # as compiled
    verified_instructions: int | None  # what the verifier processed (None before Linux 5.16)
    translated_instructions: int  # after the verifier's rewrites
    load_ms: float


@dataclass
class LoadedObject:
    maps: dict[str, int]
    programs: dict[str, int]
    attachments: dict[str, int]
    report: list[ProgramReport]

    def close(self) -> None:
        for fd in [*self.attachments.values(), *self.programs.values(), *self.maps.values()]:
            os.close(fd)
        self.maps, self.programs, self.attachments = {}, {}, {}


def _relocated(program: ProgramSpec, fds: dict[int, int]) -> bytes:
    """The program's bytecode with each map descriptor replaced by the one loaded now."""
    code = bytearray(program.insns)
    index = 0
    while index + 16 <= len(code):
        if code[index] == LD_IMM64:
            if code[index + 1] >> 4 in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                (old,) = struct.unpack_from("<i", code, index + 4)
                if old not in fds:
                    raise ObjectError(f"program {program.name} names map descriptor {old}, which the image lacks.")
                struct.pack_into("<i", code, index + 4, fds[old])
            index += 16
        else:
            index += 8
    return bytes(code)


def _kernel_version() -> int:
    """LINUX_VERSION_CODE of the running kernel: kprobe programs carried it before Linux 5.0."""
    parts = [int(p) for p in platform.release().split("-")[0].split(".")[:3] if p.isdigit()] + [0, 0, 0]
    return parts[0] << 16 | parts[1] << 8 | min(parts[2], 255)


def _load_program(program: ProgramSpec, insns: bytes, license_text: bytes, log_size: int = 0) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    licence = ctypes.create_string_buffer(license_text)
    verifier_log = ctypes.create_string_buffer(log_size) if log_size else None
    attr = struct.pack(
        "<IIQQIIQII16sII",
        program.prog_type,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(licence),
        1 if log_size else 0,
        log_size,
        ctypes.addressof(verifier_log) if verifier_log is not None else 0,
        _kernel_version(),
        0,
        program.name.encode()[:15],
        0,
        0,
    )
    try:
        return bpf_syscall.bpf(BPF_PROG_LOAD, attr)
    except bpf_syscall.BpfSyscallError as err:
        if log_size:
            lines = [line for line in verifier_log.value.decode(errors="replace").splitlines() if line.strip()]
            raise ObjectError(
                f"the kernel refused program {program.name} ({err.strerror}): {' / '.join(lines[-3:])}"
            ) from None
    return _load_program(program, insns, license_text, VERIFIER_LOG_SIZE)  # again, for the verifier's words


def program_info(fd: int) -> tuple[int | None, int]:
    """(instructions the verifier processed, or None before Linux 5.16; instructions after its rewrites)."""
    info = ctypes.create_string_buffer(PROG_INFO_SIZE)  # zeroed: what an older kernel does not know stays 0
    bpf_syscall.bpf(bpf_syscall.BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, PROG_INFO_SIZE, ctypes.addressof(info)))
    (translated,) = struct.unpack_from("<I", info, XLATED_LEN_OFFSET)
    (verified,) = struct.unpack_from("<I", info, VERIFIED_INSNS_OFFSET)
    return (verified or None), translated // 8


def map_flags(fd: int) -> int:
    """map_flags of struct bpf_map_info (bpf_syscall.map_info reads the sizes)."""
    info = ctypes.create_string_buffer(88)
    bpf_syscall.bpf(bpf_syscall.BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))
    return struct.unpack_from("<I", info, 20)[0]


def _perf_event_open(attr: bytes, cpu: int) -> int:
    nr = _PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise ObjectError(f"perf_event_open's number is unknown on {platform.machine()}.")
    buffer = ctypes.create_string_buffer(attr.ljust(PERF_ATTR_SIZE, b"\0"), PERF_ATTR_SIZE)
    fd = _libc.syscall(nr, buffer, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return fd


def _retprobe_config() -> int:
    """The kprobe PMU's config bit that makes a return probe, as the PMU states it ("config:0")."""
    field, _, bit = (KPROBE_PMU / "format" / "retprobe").read_text().strip().partition(":")
    if field != "config" or not bit.isdigit():
        raise OSError(errno.EINVAL, f"unexpected kprobe PMU retprobe format {field}:{bit}")
    return 1 << int(bit)


def _attach(program: ProgramSpec, prog_fd: int, tracefs: Path | None) -> int | None:
    """Attaches a program where its name says; returns the descriptor that keeps it attached (None: tc,
    which the agent attaches to interfaces itself)."""
    kind, _, target = program.attach.partition(":")
    if kind == "tc":
        return None
    try:
        if kind == "raw_tracepoint":
            name = ctypes.create_string_buffer(target.encode())
            return bpf_syscall.bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QI", ctypes.addressof(name), prog_fd))
        if kind in ("kprobe", "kretprobe"):
            function = ctypes.create_string_buffer(target.encode())
            pmu = int((KPROBE_PMU / "type").read_text())
            config = _retprobe_config() if kind == "kretprobe" else 0
            # type, size, config (the retprobe bit, or 0: entry), sample_period, sample_type, read_format, flags,
            # wakeup_events, bp_type, config1 (the function's name), config2 (offset 0)
            attr = struct.pack(
                "<IIQQQQQIIQQ", pmu, PERF_ATTR_SIZE, config, 1, 0, 0, 0, 1, 0, ctypes.addressof(function), 0
            )
            event = _perf_event_open(attr, 0)
        elif kind == "tracepoint":
            if tracefs is None:
                raise ObjectError(f"program {program.name} needs tracefs, which is not mounted.")
            category, _, name = target.partition(":")
            number = int((tracefs / "events" / category / name / "id").read_text())
            attr = struct.pack("<IIQQQQQI", PERF_TYPE_TRACEPOINT, PERF_ATTR_SIZE, number, 1, 0, 0, 0, 1)
            event = _perf_event_open(attr, 0)
        else:
            raise ObjectError(f"program {program.name} attaches to {program.attach}, which flowscope does not know.")
        try:
            fcntl.ioctl(event, PERF_EVENT_IOC_SET_BPF, prog_fd)
            fcntl.ioctl(event, PERF_EVENT_IOC_ENABLE, 0)
        except OSError:
            os.close(event)
            raise
        return event
    except OSError as err:
        raise ObjectError(f"attaching program {program.name} to {program.attach} failed ({err.strerror}).") from None


def load_image(image: ObjectImage, map_fds: dict[str, int] | None = None, tracefs: Path | None = None) -> LoadedObject:
    """Loads and attaches every program of `image`. `map_fds`: the maps by name, already created (by BCC,
    with the descriptors its code names); None: created here. On failure, closes what it opened."""
    loaded = LoadedObject({}, {}, {}, [])
    try:
        if map_fds is None:
            for spec in image.maps:
                loaded.maps[spec.name] = _map_create(spec)
        else:
            loaded.maps = dict(map_fds)
        relocation = {spec.code_fd: loaded.maps[spec.name] for spec in image.maps}
        license_text = image.license.encode()
        for program in image.programs:
            started = time.monotonic()
            fd = _load_program(program, _relocated(program, relocation), license_text)
            load_ms = (time.monotonic() - started) * 1000
            loaded.programs[program.name] = fd
            verified, translated = program_info(fd)
            kind = PROGRAM_TYPES.get(program.prog_type, str(program.prog_type))
            size = len(program.insns) // 8
            loaded.report.append(
                ProgramReport(program.name, kind, program.attach, size, verified, translated, round(load_ms, 2))
            )
            attachment = _attach(program, fd, tracefs)
            if attachment is not None:
                loaded.attachments[program.attach] = attachment
    except BaseException:
        if map_fds is not None:
            loaded.maps = {}  # the caller's
        loaded.close()
        raise
    return loaded


def _map_create(spec: MapSpec) -> int:
    attr = struct.pack(
        "<IIIIIII16s", spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, 0, 0,
        spec.name.encode()[:15],
    )  # fmt: skip
    try:
        return bpf_syscall.bpf(bpf_syscall.BPF_MAP_CREATE, attr)
    except bpf_syscall.BpfSyscallError as err:
        raise ObjectError(f"creating map {spec.name} failed ({err.strerror}).") from None


# ---- the cache ---------------------------------------------------------------------------------------


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(release: str, btf_checksum: str, headers: str, text: str, cflags: list[str]) -> str:
    parts = [FORMAT, release, btf_checksum, headers, hashlib.sha256(text.encode()).hexdigest(), cflags]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def read_cached(key: str, directory: Path = CACHE_DIR) -> tuple[ObjectImage | None, str]:
    """(image, "hit") for a sound entry; (None, "miss") without one; (None, "rebuilt: <why>") for an entry
    that does not check out (it is deleted: the caller compiles and writes a new one)."""
    path = directory / f"{key}.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "miss"
    except OSError as err:
        return None, f"miss: {path} unreadable ({err.strerror})"
    checksum, _, body = raw.partition(b"\n")
    why = ""
    if hashlib.sha256(body).hexdigest().encode() != checksum:
        why = "its checksum does not match its content"
    else:
        try:
            data = json.loads(body)
            if data.get("key") != key or data.get("format") != FORMAT:
                why = "it was written for another key"
            else:
                return ObjectImage.from_json(data["image"]), "hit"
        except (ValueError, KeyError, TypeError) as err:
            why = f"it does not parse ({err})"
    log.warning("the compiled-object cache entry %s is unusable (%s): compiling anew", path, why)
    with contextlib.suppress(OSError):
        path.unlink()
    return None, f"rebuilt: {why}"


def write_cached(key: str, image: ObjectImage, directory: Path = CACHE_DIR) -> None:
    """Writes the entry atomically (a reader sees the old file or the whole new one); a cache that cannot
    be written is said in the debug log and otherwise ignored: the next start compiles again."""
    body = json.dumps({"format": FORMAT, "key": key, "image": image.to_json()}, separators=(",", ":")).encode()
    path = directory / f"{key}.json"
    partial = directory / f".{key}.{os.getpid()}.partial"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
        partial.rename(path)
    except OSError as err:
        log.debug("the compiled-object cache %s is not writable (%s)", directory, err.strerror)
        with contextlib.suppress(OSError):
            partial.unlink()
