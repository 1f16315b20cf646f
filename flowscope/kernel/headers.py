"""Kernel headers for BCC: the running kernel's own when installed, else the nearest installed ones.

BCC compiles probes against kernel headers found at /lib/modules/$(uname -r)/build. Distributions often
ship headers for another kernel than the one running (here: Debian's 6.1 headers on a 6.18 kernel). The
probes never take structure layouts from these headers (offsets come from BTF), so the nearest version
is good enough for the types and macros BCC needs; it is merged into one tree (generated + source
headers, as symlinks) under a cache directory and handed to BCC through BCC_KERNEL_SOURCE.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MODULES_DIR = Path("/lib/modules")
SOURCES_DIR = Path("/usr/src")
CACHE_DIR = Path("/var/cache/flowscope/kernel-headers")


class HeadersError(RuntimeError):
    """No usable kernel headers."""


@dataclass(frozen=True)
class Headers:
    path: Path  # the tree BCC compiles against
    description: str  # for `doctor`
    exact: bool  # headers of the running kernel itself
    bcc_kernel_source: str | None  # value for BCC_KERNEL_SOURCE, None when BCC finds them itself


def version_tuple(release: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not match:
        return ()
    return tuple(int(part or 0) for part in match.groups())


def _has_headers(tree: Path) -> bool:
    return (tree / "include" / "linux" / "kconfig.h").exists() or (tree / "include" / "generated").exists()


@dataclass(frozen=True)
class _Candidate:
    release: str
    build: Path  # generated headers (arch-specific)
    source: Path | None  # common source headers, when split from build


def installed_candidates(modules_dir: Path = MODULES_DIR, sources_dir: Path = SOURCES_DIR) -> list[_Candidate]:
    """Header trees on this host, from /lib/modules/*/build and /usr/src/linux-headers-*."""
    found: dict[Path, _Candidate] = {}
    if modules_dir.is_dir():
        for release_dir in modules_dir.iterdir():
            build = release_dir / "build"
            if build.is_dir():
                source = release_dir / "source"
                candidate = _Candidate(release_dir.name, build, source if source.is_dir() else None)
                found[build.resolve()] = candidate
    if sources_dir.is_dir():
        for tree in sources_dir.glob("linux-headers-*"):
            name = tree.name.removeprefix("linux-headers-")
            if name.endswith("-common") or tree.resolve() in found or not (tree / "Makefile").exists():
                continue
            # Debian splits a flavour's generated headers (…-amd64) from the shared source (…-common).
            common = sources_dir / re.sub(r"-[^-]+$", "-common", tree.name)
            found[tree.resolve()] = _Candidate(name, tree, common if common.is_dir() and common != tree else None)
    return [c for c in found.values() if version_tuple(c.release)]


def _nearest(candidates: list[_Candidate], release: str) -> _Candidate:
    running = version_tuple(release)

    def distance(candidate: _Candidate) -> tuple[int, int, int]:
        version = version_tuple(candidate.release)
        # Same major first, then the closest minor, then the newest patch level.
        return (abs(version[0] - running[0]), abs(version[1] - running[1]), -version[2])

    return min(candidates, key=distance)


def _merge(candidate: _Candidate, cache_dir: Path) -> Path:
    """One tree of symlinks: the source headers overlaid with the generated ones (idempotent)."""
    target = cache_dir / candidate.release
    stamp = target / ".flowscope-complete"
    if stamp.exists():
        return target
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for tree in (candidate.source, candidate.build):
        if tree is not None:
            subprocess.run(["cp", "-asf", f"{tree.resolve()}/.", str(target)], check=True, capture_output=True)
    stamp.write_text(f"{candidate.build}\n{candidate.source or ''}\n")
    return target


def find_headers(
    release: str | None = None,
    modules_dir: Path = MODULES_DIR,
    sources_dir: Path = SOURCES_DIR,
    cache_dir: Path = CACHE_DIR,
) -> Headers:
    release = release or platform.release()
    own = modules_dir / release / "build"
    if own.is_dir() and (_has_headers(own) or _has_headers(modules_dir / release / "source")):
        return Headers(own, f"running kernel's headers ({own})", True, None)
    candidates = installed_candidates(modules_dir, sources_dir)
    if not candidates:
        raise HeadersError(
            f"no kernel headers are installed for kernel {release}; install linux-headers-{release} "
            "or your distribution's linux-headers package (make setup does this)."
        )
    nearest = _nearest(candidates, release)
    if nearest.release == release:
        merged = _merge(nearest, cache_dir) if nearest.source else nearest.build
        return Headers(merged, f"running kernel's headers ({nearest.build})", True, str(merged))
    merged = _merge(nearest, cache_dir)
    return Headers(
        merged,
        f"nearest installed headers {nearest.release} for kernel {release} (prepared at {merged}); "
        "structure offsets come from BTF",
        False,
        str(merged),
    )


def export_for_bcc(headers: Headers) -> None:
    """Points BCC at the chosen tree; must run before the first BPF() compile."""
    if headers.bcc_kernel_source:
        os.environ["BCC_KERNEL_SOURCE"] = headers.bcc_kernel_source
