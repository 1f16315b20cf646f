"""Kernel headers for BCC: the running kernel's own when installed, else the nearest installed ones.

BCC compiles probes against kernel headers found at /lib/modules/$(uname -r)/build. Distributions often
ship headers for another kernel than the one running (here: Debian's 6.1 headers on a 6.18 kernel). The
probes never take structure layouts from these headers (offsets come from BTF), so the nearest version
is good enough for the types and macros BCC needs; it is merged into one tree (generated + source
headers, as symlinks) under a cache directory and handed to BCC through BCC_KERNEL_SOURCE.

In a container (the Helm chart's DaemonSet) the node's /lib/modules and /usr/src are mounted under a host root
(probes.host_root, e.g. /host/lib/modules), beside the image's own headers: the node's are looked at first,
with their symlinks resolved under the host root, then the image's, the fallback for nodes without headers.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MODULES_DIR = "lib/modules"  # under a root: the node's (host_root) and this container's or host's own (/)
SOURCES_DIR = "usr/src"
MAX_SYMLINKS = 40  # as the kernel's path walk allows
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


def resolve_under(root: Path, path: str) -> Path:
    """`path` of the file system whose root is mounted at `root`, every symlink on the way resolved as that system
    sees it (as in a chroot: an absolute target starts again at `root`, `..` stops there); always under `root`.
    Debian's /lib/modules/RELEASE/build -> /usr/src/linux-headers-RELEASE is absolute: with the node's
    directories mounted under /host it is /host/usr/src/linux-headers-RELEASE, not this container's /usr/src."""
    pending = [part for part in reversed(PurePosixPath(path).parts) if part != "/"]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            del resolved[-1:]
            continue
        here = root.joinpath(*resolved, part)
        if not here.is_symlink():
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            return here  # a loop: no directory, so no headers there
        target = PurePosixPath(os.readlink(here))
        if target.is_absolute():
            resolved = []
        pending.extend(part for part in reversed(target.parts) if part != "/")
    return root.joinpath(*resolved)


@dataclass(frozen=True)
class _Candidate:
    release: str
    build: Path  # generated headers (arch-specific), symlinks resolved under its root
    source: Path | None  # common source headers, when split from build


def _modules_candidate(root: Path, release: str) -> _Candidate | None:
    """The tree of root's lib/modules/RELEASE/build (and .../source, when split from it), if it is one."""
    build = resolve_under(root, f"/{MODULES_DIR}/{release}/build")
    if not build.is_dir():
        return None
    source = resolve_under(root, f"/{MODULES_DIR}/{release}/source")
    return _Candidate(release, build, source if source.is_dir() and source != build else None)


def installed_candidates(root: Path) -> list[_Candidate]:
    """Header trees under `root`, from lib/modules/*/build and usr/src/linux-headers-*."""
    found: dict[Path, _Candidate] = {}
    modules_dir = resolve_under(root, f"/{MODULES_DIR}")
    if modules_dir.is_dir():
        for release_dir in modules_dir.iterdir():
            candidate = _modules_candidate(root, release_dir.name)
            if candidate is not None:
                found[candidate.build] = candidate
    sources_dir = resolve_under(root, f"/{SOURCES_DIR}")
    if sources_dir.is_dir():
        for entry in sources_dir.glob("linux-headers-*"):
            tree = resolve_under(root, f"/{SOURCES_DIR}/{entry.name}")
            name = entry.name.removeprefix("linux-headers-")
            if name.endswith("-common") or tree in found or not (tree / "Makefile").exists():
                continue
            # Debian splits a flavour's generated headers (…-amd64) from the shared source (…-common).
            common = resolve_under(root, f"/{SOURCES_DIR}/{re.sub(r'-[^-]+$', '-common', entry.name)}")
            found[tree] = _Candidate(name, tree, common if common.is_dir() and common != tree else None)
    return [c for c in found.values() if version_tuple(c.release)]


def _nearest(candidates: list[_Candidate], release: str) -> _Candidate:
    running = version_tuple(release)

    def distance(candidate: _Candidate) -> tuple[int, int, int]:
        version = version_tuple(candidate.release)
        # Same major first, then the closest minor, then the newest patch level.
        return (abs(version[0] - running[0]), abs(version[1] - running[1]), -version[2])

    return min(candidates, key=distance)  # the first of equals: the node's before this system's own


def _made_of(stamp: Path) -> tuple[Path | None, ...]:
    """The trees a merged tree's stamp names, resolved: an earlier stamp's /lib/modules/RELEASE/build is the
    /usr/src tree a candidate names now (so an upgrade does not remake a tree another process may be reading)."""
    lines = stamp.read_text().split("\n")[:2]
    return tuple(Path(line).resolve() if line else None for line in lines)


def _merge(candidate: _Candidate, cache_dir: Path) -> Path:
    """One tree of symlinks: the source headers overlaid with the generated ones (idempotent; made again when
    the cached one is of other trees, e.g. the image's headers of the same release as the node's)."""
    target = cache_dir / candidate.release
    stamp = target / ".flowscope-complete"
    trees = (candidate.build, candidate.source)
    if stamp.exists() and _made_of(stamp) == tuple(tree.resolve() if tree else None for tree in trees):
        return target
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for tree in (candidate.source, candidate.build):
        if tree is not None:
            subprocess.run(["cp", "-asf", f"{tree}/.", str(target)], check=True, capture_output=True)
    stamp.write_text(f"{candidate.build}\n{candidate.source or ''}\n")
    return target


def find_headers(
    release: str | None = None,
    host_root: str = "",
    cache_dir: Path = CACHE_DIR,
    own_root: Path = Path("/"),
) -> Headers:
    """The headers BCC compiles against: the running kernel's own, else the nearest installed. With `host_root`
    (where a container has the node's lib/modules and usr/src), the node's are looked at first, their symlinks
    resolved under it, then those of the container's own root (an image's fallback headers)."""
    release = release or platform.release()
    roots = [Path(host_root), own_root] if host_root else [own_root]
    for root in roots:
        own = _modules_candidate(root, release)
        if own is None or not (_has_headers(own.build) or (own.source is not None and _has_headers(own.source))):
            continue
        if root == own_root:  # where BCC looks itself: /lib/modules/RELEASE/build and .../source
            return Headers(own.build, f"running kernel's headers ({own.build})", True, None)
        tree = _merge(own, cache_dir) if own.source else own.build
        return Headers(tree, f"running kernel's headers ({own.build})", True, str(tree))
    candidates = [candidate for root in roots for candidate in installed_candidates(root)]
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
        f"nearest installed headers {nearest.release} ({nearest.build}) for kernel {release} (prepared at "
        f"{merged}); structure offsets come from BTF",
        False,
        str(merged),
    )


def export_for_bcc(headers: Headers) -> None:
    """Points BCC at the chosen tree; must run before the first BPF() compile."""
    if headers.bcc_kernel_source:
        os.environ["BCC_KERNEL_SOURCE"] = headers.bcc_kernel_source
